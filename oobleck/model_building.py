"""From a job config to a model spec, a dataset and a batch source.

This is the one place that knows which module implements which model family and dataset, so the
engine, the profiler and the reference trainer all build exactly the same things from a config.

The models raise their own :class:`~models.errors.ModelConfigError`; every function here turns it into a
:class:`~oobleck.errors.ConfigError` with the same message, so a bad shape or dataset reaches the user as the
CLI's one-line error (exit 2) like any other config error.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from models.base import Layer, ModelSpec
from models.data import BatchSource, Dataset
from models.difffit import LoadReport, load_pretrained
from models.errors import ModelConfigError
from oobleck.config import DataConfig, JobConfig, ModelConfig
from oobleck.errors import ConfigError
from oobleck.training import torch_dtype

#: family -> (module, spec class)
FAMILIES: dict[str, tuple[str, str]] = {
    "gpt": ("models.gpt", "GPTSpec"),
    "dit": ("models.dit", "DiTSpec"),
    "moe": ("models.moe", "MoESpec"),
}

#: override fields for which 0 is a meaningful value (turns a feature off)
ZERO_ALLOWED = {"dropout", "class_dropout", "aux_coef"}


@contextmanager
def config_errors() -> Iterator[None]:
    """Re-raise a :class:`ModelConfigError` from the block as a :class:`ConfigError` with the same message
    (the models' error is chained as the cause)."""
    try:
        yield
    except ModelConfigError as e:
        raise ConfigError(str(e)) from e


def presets(family: str) -> dict[str, Any]:
    """The named configurations a family offers."""
    module_name, _ = FAMILIES[family]
    return importlib.import_module(module_name).PRESETS


def model_config(cfg: ModelConfig) -> Any:
    """The family's config dataclass for ``cfg.preset`` with ``cfg.overrides`` applied."""
    table = presets(cfg.family)
    if cfg.preset not in table:
        raise ConfigError(f"model.preset: got {cfg.preset!r}; allowed for {cfg.family}: {', '.join(table)}")
    base = table[cfg.preset]
    fields = {f.name: f for f in dataclasses.fields(base)}
    for key, value in cfg.overrides.items():
        if key not in fields:
            raise ConfigError(f"model.overrides.{key}: unknown field; allowed: {', '.join(fields)}")
        current = getattr(base, key)
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"model.overrides.{key}: got {value!r}; expected a number")
            if value < 0 or (value == 0 and key not in ZERO_ALLOWED):
                raise ConfigError(f"model.overrides.{key}: got {value!r}; must be positive (0 allowed for {sorted(ZERO_ALLOWED)})")
    return dataclasses.replace(base, **cfg.overrides)


def build_model(cfg: ModelConfig, seed: int) -> ModelSpec:
    """The model spec a config describes (its layers are built later, per stage)."""
    if cfg.family == "diffusers":
        from models.diffusers_zoo import build_spec

        if cfg.overrides:
            raise ConfigError("model.overrides: family diffusers reads model.config (the model's config.json fields); move them there")
        with config_errors():
            return build_spec(
                cfg.architecture, cfg.config, cfg.config_dir, seed=seed, dtype=torch_dtype(cfg.dtype), difffit=cfg.difffit
            )
    if cfg.family == "hf":
        from models.hf import build_hf_spec

        with config_errors():
            return build_hf_spec(
                cfg.architecture, cfg.config, cfg.config_dir, cfg.overrides, seed=seed, dtype=torch_dtype(cfg.dtype)
            )
    if ":" in cfg.family:  # your own layers, package.module:object (models/user_layers.py)
        from models.user_layers import user_spec

        if cfg.overrides:
            raise ConfigError("model.overrides: your own layers take their arguments from model.config; move the fields there")
        with config_errors():
            return user_spec(cfg.family, cfg.config, seed, torch_dtype(cfg.dtype))
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: got {cfg.family!r}; allowed: {', '.join(FAMILIES)}")
    module_name, class_name = FAMILIES[cfg.family]
    spec_class = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, Any] = {"seed": seed, "dtype": torch_dtype(cfg.dtype)}
    if cfg.family == "dit":
        kwargs["difffit"] = cfg.difffit
    with config_errors():
        return spec_class(model_config(cfg), **kwargs)


def check_data(job: JobConfig) -> None:
    """Check ``job.data`` against ``job.model`` cheaply, before anything is launched: :func:`check_dataset`
    on the model ``job.model`` describes."""
    check_dataset(job.data, build_model(job.model, job.training.seed))


def check_dataset(cfg: DataConfig, model: ModelSpec) -> None:
    """ConfigError (one line naming the field and the fix) unless the data ``cfg`` names can feed ``model``.

    Checked for every dataset: it suits the model (text datasets need ``seq_len`` in the model's config, image
    datasets ``image_size``) and ``data.path`` is given exactly when the dataset reads one; ``data.tokenizer``
    only for pydoc and text-file. ``text-file``: the path is a regular file, not empty, whose first
    :data:`models.text.CHECK_PREFIX_BYTES` bytes are valid UTF-8. Text datasets hold one window of ``seq_len +
    1`` tokens at least (with a tokenizer: among the tokens of that prefix). ``data.tokenizer``: the folder
    holds a ``tokenizer.json`` that loads, and the model's ``vocab_size`` covers its vocabulary. ``token-file``:
    a regular file whose size is a multiple of ``data.token_dtype``'s, and whose first
    :data:`models.tokens.CHECK_PREFIX_TOKENS` ids are below the model's ``vocab_size``. ``fashion-mnist``: the
    path is a folder holding the split's IDX files with valid headers and as many labels as images (the labels
    are read, the images' header only). ``image-folder``: the folder has class subfolders, each with an image
    (listings only; nothing is decoded), and the model has 1 or 3 channels. Image datasets: ``data.classes``
    names labels the dataset has, the images have the model's shape, and every label used is below the
    model's ``num_classes``. Cost: bounded whatever the data's size; what lies beyond is checked when the
    data is loaded (:func:`build_dataset`) or read."""
    with config_errors():
        _check(cfg, model.config)  # type: ignore[attr-defined]


#: datasets of token windows (the model's config has seq_len), and those that read data.path
TEXT_DATASETS = ("pydoc", "text-file", "token-file")
READS_PATH = ("text-file", "fashion-mnist", "token-file", "image-folder")


def _check(cfg: DataConfig, mcfg: Any) -> None:
    if cfg.path is not None and cfg.dataset not in READS_PATH:
        raise ConfigError(
            f"data.path: got {cfg.path!r}; data.dataset {cfg.dataset} is built in and reads no file; drop data.path "
            f"({', '.join(READS_PATH)} read one)"
        )
    if cfg.dataset in READS_PATH and cfg.dataset != "fashion-mnist" and not cfg.path:
        raise ConfigError(f"data.path: missing; data.dataset {cfg.dataset} reads a file or folder: give its path")
    if cfg.tokenizer is not None and cfg.dataset not in TEXT_DATASETS:
        raise ConfigError(f"data.tokenizer: got {cfg.tokenizer!r}; only the text datasets {', '.join(TEXT_DATASETS)} read it; drop it")
    if cfg.dataset in TEXT_DATASETS:
        if not hasattr(mcfg, "seq_len"):
            raise ConfigError(f"data.dataset: got {cfg.dataset!r}; text datasets need a text model (one with seq_len)")
        from models import text, tokens

        vocab = getattr(mcfg, "vocab_size", None)
        if cfg.dataset != "token-file" and cfg.tokenizer is None and vocab is not None and vocab < text.VOCAB_SIZE:
            raise ConfigError(
                f"data.dataset: got {cfg.dataset!r}; it reads byte tokens (ids below {text.VOCAB_SIZE}) but the model's "
                f"vocab_size is {vocab}; set vocab_size (model.config or config.json) to {text.VOCAB_SIZE} or more"
            )
        if cfg.dataset == "token-file":
            tokens.check_token_file(cfg.path, cfg.token_dtype, mcfg.seq_len, vocab)  # type: ignore[arg-type]
            if cfg.tokenizer is not None:  # the tokenizer that made the ids: generation decodes with it
                tokens.check_vocab(tokens.load_tokenizer(cfg.tokenizer), cfg.tokenizer, vocab)
        elif cfg.tokenizer is not None:
            tokenizer = tokens.load_tokenizer(cfg.tokenizer)
            tokens.check_vocab(tokenizer, cfg.tokenizer, vocab)
            prefix = _text(cfg, text.CHECK_PREFIX_BYTES)
            text.check_windows(len(tokens.tokenize(prefix, tokenizer)), mcfg.seq_len, "the tokenized text has {count} tokens")
        elif cfg.dataset == "pydoc":
            text.check_windows(len(text.pydoc_corpus().encode("utf-8")), mcfg.seq_len)
        else:
            text.check_windows(text.text_file_size(cfg.path), mcfg.seq_len)  # type: ignore[arg-type]
        return

    if not hasattr(mcfg, "image_size"):
        raise ConfigError(f"data.dataset: got {cfg.dataset!r}; image datasets need an image model (one with image_size)")
    from models import image_folder, images

    if cfg.dataset == "image-folder":
        image_folder.check_channels(mcfg.channels)
        shape = (mcfg.channels, mcfg.image_size, mcfg.image_size)  # every image is resized to the model's
        labels = list(range(len(image_folder.scan(cfg.path))))  # type: ignore[arg-type]
    elif cfg.dataset == "digits":
        shape, labels = images.DIGITS_IMAGE_SHAPE, list(images.DIGITS_LABELS)
    else:
        shape, labels = images.fashion_mnist_summary(cfg.path)
    images.check_classes(cfg.classes, labels)
    want = (mcfg.channels, mcfg.image_size, mcfg.image_size)
    if tuple(shape) != want:
        raise ConfigError(
            f"data.dataset: {cfg.dataset} images are {shape[1]}x{shape[2]} with {shape[0]} channel(s) but the model "
            f"expects {want[1]}x{want[2]} with {want[0]}; pick a matching model.preset or set model.overrides.image_size"
        )
    used = max(cfg.classes if cfg.classes is not None else labels)
    if mcfg.num_classes and used >= mcfg.num_classes:  # 0 or None: unconditional, labels unused
        raise ConfigError(
            f"model.overrides.num_classes: got {mcfg.num_classes} (labels 0..{mcfg.num_classes - 1}) but data.dataset "
            f"{cfg.dataset} uses labels up to {used}; set model.overrides.num_classes to {used + 1} or more, or "
            f"restrict data.classes to labels below {mcfg.num_classes}"
        )


def _text(cfg: DataConfig, limit: int | None = None) -> str:
    """The text of ``pydoc`` or ``text-file`` (its first ``limit`` bytes, a character cut there dropped)."""
    from models import text

    if cfg.dataset == "pydoc":
        corpus = text.pydoc_corpus()
        return corpus if limit is None else corpus.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    if limit is None:
        return text.read_text_file(cfg.path)  # type: ignore[arg-type]
    text.text_file_size(cfg.path)  # type: ignore[arg-type]  # exists, regular, non-empty, valid UTF-8 prefix
    with open(cfg.path, "rb") as f:  # type: ignore[arg-type]
        return f.read(limit).decode("utf-8", errors="ignore")


def build_dataset(cfg: DataConfig, model: ModelSpec) -> Dataset:
    """The dataset a config names, shaped for ``model`` (sequence length, image size), after
    :func:`check_dataset`; loading it reads the whole of it (a text file is decoded in full)."""
    check_dataset(cfg, model)
    with config_errors():
        return _dataset(cfg, model.config)  # type: ignore[attr-defined]


def _dataset(cfg: DataConfig, mcfg: Any) -> Dataset:
    if cfg.dataset in TEXT_DATASETS:
        from models import text, tokens

        vocab = getattr(mcfg, "vocab_size", None)
        if cfg.dataset == "token-file":
            return tokens.token_file_windows(cfg.path, cfg.token_dtype, mcfg.seq_len, vocab)  # type: ignore[arg-type]
        if cfg.tokenizer is not None:
            ids = tokens.tokenize(_text(cfg), tokens.load_tokenizer(cfg.tokenizer))
            return text.Windows(ids, mcfg.seq_len, vocab, source=f"the text tokenized by {cfg.tokenizer!r}")
        return text.TokenWindows(_text(cfg), mcfg.seq_len)

    from models import image_folder, images

    if cfg.dataset == "image-folder":
        return image_folder.image_folder_dataset(cfg.path, mcfg.image_size, mcfg.channels, cfg.classes)  # type: ignore[arg-type]
    if cfg.dataset == "digits":
        return images.digits_dataset(classes=cfg.classes)
    return images.fashion_mnist_dataset(cfg.path, classes=cfg.classes)


def build_batches(job: JobConfig, model: ModelSpec) -> BatchSource:
    """The deterministic batch source every process of a job shares."""
    t = job.training
    return BatchSource(
        build_dataset(job.data, model),
        global_batch=t.global_batch,
        microbatch=t.microbatch,
        seed=t.seed,
        randomness=model.sample_randomness,
    )


def load_pretrained_layers(
    layers: list[Layer], states: dict[int, dict[str, Any]], new_num_classes: int | None
) -> LoadReport:
    """:func:`models.difffit.load_pretrained` (same arguments and report), its refusals as ConfigErrors."""
    with config_errors():
        return load_pretrained(layers, states, new_num_classes=new_num_classes)
