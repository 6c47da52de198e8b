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
    if cfg.family == "hf":
        from models.hf import build_hf_spec

        with config_errors():
            return build_hf_spec(
                cfg.architecture, cfg.config, cfg.config_dir, cfg.overrides, seed=seed, dtype=torch_dtype(cfg.dtype)
            )
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

    Checked for every dataset: it suits the model family (text or images) and ``data.path`` is given exactly
    when the dataset reads one. ``text-file``: the path is a regular file, not empty, whose first
    :data:`models.text.CHECK_PREFIX_BYTES` bytes are valid UTF-8. Text datasets: the text holds one window of
    ``seq_len + 1`` bytes at least. ``fashion-mnist``: the path is a folder holding the split's IDX files
    with valid headers and as many labels as images (the labels are read, the images' header only). Image
    datasets: ``data.classes`` names labels the dataset has, the images have the model's shape, and every
    label used is below the model's ``num_classes``. Cost: the labels file, and at most
    CHECK_PREFIX_BYTES of a text file, whatever its size; what lies beyond is checked when the data is
    loaded (:func:`build_dataset`)."""
    with config_errors():
        _check(cfg, model.config)  # type: ignore[attr-defined]


def _check(cfg: DataConfig, mcfg: Any) -> None:
    reads_file = cfg.dataset in ("text-file", "fashion-mnist")
    if cfg.path is not None and not reads_file:
        raise ConfigError(
            f"data.path: got {cfg.path!r}; data.dataset {cfg.dataset} is built in and reads no file; drop data.path "
            "(text-file and fashion-mnist read one)"
        )
    if cfg.dataset in ("pydoc", "text-file"):
        if not hasattr(mcfg, "seq_len"):
            raise ConfigError(f"data.dataset: got {cfg.dataset!r}; text datasets need a text model (family gpt or hf)")
        from models import text

        if cfg.tokenizer is None and getattr(mcfg, "vocab_size", text.VOCAB_SIZE) < text.VOCAB_SIZE:
            raise ConfigError(
                f"data.dataset: got {cfg.dataset!r}; it reads byte tokens (ids below {text.VOCAB_SIZE}) but the model's "
                f"vocab_size is {mcfg.vocab_size}; set vocab_size (model.config or config.json) to {text.VOCAB_SIZE} or more"
            )
        if cfg.dataset == "pydoc":
            size = len(text.pydoc_corpus().encode("utf-8"))
        elif not cfg.path:
            raise ConfigError("data.path: missing; data.dataset text-file needs the path of a UTF-8 text file")
        else:
            size = text.text_file_size(cfg.path)
        text.check_windows(size, mcfg.seq_len)
        return

    if not hasattr(mcfg, "image_size"):
        raise ConfigError(f"data.dataset: got {cfg.dataset!r}; image datasets need an image model (family dit or moe)")
    from models import images

    if cfg.dataset == "digits":
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
    if used >= mcfg.num_classes:
        raise ConfigError(
            f"model.overrides.num_classes: got {mcfg.num_classes} (labels 0..{mcfg.num_classes - 1}) but data.dataset "
            f"{cfg.dataset} uses labels up to {used}; set model.overrides.num_classes to {used + 1} or more, or "
            f"restrict data.classes to labels below {mcfg.num_classes}"
        )


def build_dataset(cfg: DataConfig, model: ModelSpec) -> Dataset:
    """The dataset a config names, shaped for ``model`` (sequence length, image size), after
    :func:`check_dataset`; loading it reads the whole of it (a text file is decoded in full)."""
    check_dataset(cfg, model)
    with config_errors():
        return _dataset(cfg, model.config)  # type: ignore[attr-defined]


def _dataset(cfg: DataConfig, mcfg: Any) -> Dataset:
    if cfg.dataset in ("pydoc", "text-file"):
        from models import text

        corpus = text.pydoc_corpus() if cfg.dataset == "pydoc" else text.read_text_file(cfg.path)  # type: ignore[arg-type]
        return text.TokenWindows(corpus, mcfg.seq_len)

    from models import images

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
