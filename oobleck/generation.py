"""Continue text from a causal LM's checkpoint (``oobleck generate``), reading only the checkpoint: its layer
files and the job config saved in its ``meta.json``.

Text is tokenised as UTF-8 bytes, unless the saved config's ``data.tokenizer`` names a folder holding
``tokenizer.json`` (the ``tokenizers`` library), as the run's data was. Every failure is a one-line
:class:`~oobleck.errors.OobleckError` (exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.base import Layer, ModelSpec
from models.causal_lm import continue_tokens
from models.text import VOCAB_SIZE
from oobleck import checkpoint
from oobleck.config import DataConfig, JobConfig, config_from_dict
from oobleck.errors import ConfigError, OobleckError
from oobleck.model_building import build_model


@dataclass
class CheckpointModel:
    """A checkpoint's whole model, loaded: the checkpoint folder, its saved job config, the spec and the
    layers (tied weights shared) holding the checkpoint's parameters."""

    path: Path
    config: JobConfig
    spec: ModelSpec
    layers: list[Layer]


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids; generation picks only ids below ``vocab_limit`` (those ``decode`` knows)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_limit: int


def find_checkpoint(run: str | Path, step: int | None) -> Path:
    """The checkpoint ``run`` names: ``run`` itself when it is a checkpoint folder (holding meta.json), else
    ``run``'s checkpoint of ``step``, or its latest complete one; each verified. OobleckError naming RUN or
    --step when there is none."""
    run = Path(run)
    if (run / checkpoint.META).exists() and step is None:
        path = run
    elif not run.is_dir():
        raise OobleckError(f"RUN: got {str(run)!r}; no such run directory (give a run's --run-dir or one checkpoint folder)")
    elif step is not None:
        path = checkpoint.checkpoint_dir(run, step)
        if not path.is_dir():
            raise OobleckError(f"--step: got {step}; {run} has no checkpoint of that step (see {run}/checkpoints)")
    else:
        found = checkpoint.latest_checkpoint(run)
        if found is None:
            raise OobleckError(f"RUN: {run} holds no complete checkpoint; train with checkpoints (a run writes one at its end)")
        return found
    checkpoint.verify(path)
    return path


def load_checkpoint_model(path: Path) -> CheckpointModel:
    """The model of the verified checkpoint ``path``, built from its saved config, with its parameters."""
    meta = checkpoint.read_meta(path)
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as e:
        raise OobleckError(f"checkpoint {path}: its saved config is not valid ({e})") from None
    spec = build_model(config.model, config.training.seed)
    if spec.num_layers != meta["num_layers"]:
        raise OobleckError(f"checkpoint {path}: {meta['num_layers']} layers saved but its config builds {spec.num_layers}")
    layers = spec.build_all()
    with torch.no_grad():
        for index, layer in enumerate(layers):
            checkpoint.restore_layer(checkpoint.load_layer_state(path, index), layer)
    return CheckpointModel(path, config, spec, layers)


def text_codec(data: DataConfig) -> Codec:
    """The tokenisation the run's data used: ``data.tokenizer``'s tokenizer.json, else UTF-8 bytes (an
    incomplete character at the end decodes as U+FFFD)."""
    if data.tokenizer is None:
        return Codec(lambda s: list(s.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace"), VOCAB_SIZE)
    from tokenizers import Tokenizer

    path = Path(data.tokenizer) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own exception type for a missing or malformed file
        raise OobleckError(f"data.tokenizer: cannot load {path} ({' '.join(str(e).split())[:200]}); the run's tokenizer must stay there") from None
    return Codec(lambda s: tokenizer.encode(s).ids, lambda ids: tokenizer.decode(ids), tokenizer.get_vocab_size())


def generate_text(
    run: str | Path, prompt: str, tokens: int, *, step: int | None = None, temperature: float = 0.0, seed: int = 0
) -> str:
    """The continuation (new text only) of ``prompt`` by ``tokens`` tokens from the checkpoint
    :func:`find_checkpoint` picks: greedy at ``temperature`` 0, else sampled with a generator seeded by ``seed``
    (the same arguments give the same text)."""
    model = load_checkpoint_model(find_checkpoint(run, step))
    if not callable(getattr(model.layers[-1], "logits", None)) or not hasattr(model.spec.config, "seq_len"):  # type: ignore[attr-defined]
        raise OobleckError(
            f"RUN: the checkpoint's model (family {model.config.model.family}) is not a causal LM; generate continues "
            "text from families gpt and hf"
        )
    codec = text_codec(model.config.data)
    ids = codec.encode(prompt)
    if not ids:
        raise OobleckError("--prompt: got ''; give at least one character to continue")
    out = continue_tokens(
        model.layers,
        torch.tensor(ids, dtype=torch.long),
        tokens,
        window=model.spec.config.seq_len,  # type: ignore[attr-defined]
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
        vocab_limit=codec.vocab_limit,
    )
    return codec.decode(out[len(ids) :].tolist())
