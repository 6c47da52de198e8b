"""From ``model.architecture``, ``model.config`` and ``model.config_dir`` to a checked ``transformers`` config.

Every refusal is a :class:`~models.errors.ModelConfigError` of one line naming the field and the fix. The
directory is read offline: only its ``config.json`` here (its weights are read layer by layer later,
:mod:`models.hf.weights`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig
from transformers.utils import logging as hf_logging

from models.errors import ModelConfigError
from models.hf.architectures import ARCHITECTURES, Architecture

#: the attention kernel every block uses: the library's plain matmul-softmax-matmul, the same in a stage and
#: in the library's whole model, so a split model's numbers are exactly the unsplit model's
ATTENTION = "eager"


@contextmanager
def quiet_library() -> Iterator[None]:
    """The library's warnings (token ids outside a tiny vocabulary) and progress bars off for the block."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def read_config_json(config_dir: str) -> dict[str, Any]:
    """The object in ``config_dir/config.json``; ModelConfigError naming ``model.config_dir`` when the folder
    or the file is missing or the file is not a JSON object."""
    folder = Path(config_dir)
    if not folder.is_dir():
        raise ModelConfigError(
            f"model.config_dir: got {config_dir!r}; no such directory (give a folder holding config.json, e.g. one "
            "written by save_pretrained)"
        )
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(
            f"model.config_dir: {config_dir!r} holds no config.json; point it at a folder written by save_pretrained"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"model.config_dir: {path} is not readable JSON ({_one_line(e)}); fix or replace it") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"model.config_dir: {path} holds {type(raw).__name__}, not a JSON object; fix or replace it")
    return raw


def architecture_of(architecture: str | None, raw: dict[str, Any] | None, config_dir: str | None) -> Architecture:
    """The architecture ``model.architecture`` names, or ``config.json``'s ``model_type`` (``raw``) when it is
    left out; ModelConfigError when it is unknown or the two disagree."""
    allowed = ", ".join(ARCHITECTURES)
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ModelConfigError(f"model.architecture: got {architecture!r}; allowed for family hf: {allowed}")
    if raw is None:
        if architecture is None:
            raise ModelConfigError(f"model.architecture: missing; family hf needs one of {allowed} (or model.config_dir)")
        return ARCHITECTURES[architecture]
    model_type = raw.get("model_type")
    where = f"{config_dir}/config.json"
    if model_type is None:
        if architecture is None:
            raise ModelConfigError(f"model.config_dir: {where} names no model_type; set model.architecture ({allowed})")
        return ARCHITECTURES[architecture]
    by_type = {a.name: a for a in ARCHITECTURES.values()}
    if model_type not in by_type:
        raise ModelConfigError(f"model.config_dir: {where} has model_type {model_type!r}; family hf supports {allowed}")
    found = by_type[model_type]
    if architecture is not None and architecture != found.name:
        raise ModelConfigError(
            f"model.architecture: got {architecture!r} but {where} has model_type {model_type!r}; drop "
            "model.architecture or point model.config_dir at a matching config"
        )
    return found


def build_config(arch: Architecture, fields: dict[str, Any], where: str, *, inline: bool) -> PretrainedConfig:
    """``arch``'s config from ``fields`` (config.json's, or ``model.config`` when ``inline``), checked: an inline
    config names only the config class's own fields; dropout probabilities left out are 0 (not the library's
    defaults); sizes are
    positive integers, dropouts 0, and the heads divide as the blocks need. ``where`` prefixes a field's name
    in errors (``model.config.``, or ``model.config_dir: PATH: ``)."""
    fields = dict(fields)
    if inline:
        known = set(arch.config_class().to_dict()) | set(arch.config_class.attribute_map)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ModelConfigError(
                f"model.config.{unknown[0]}: not a field of {arch.config_class.__name__}; check the spelling "
                f"(fields: {', '.join(sorted(k for k in known if not k.startswith('_')))})"
            )
    fields = {name: 0.0 for name in arch.dropouts} | fields
    fields.pop("model_type", None)
    try:
        with quiet_library():
            config = arch.config_class(**fields)
    except (TypeError, ValueError, StrictDataclassError) as e:  # the library checks field types strictly
        raise ModelConfigError(f"{where.rstrip('.: ')}: {arch.config_class.__name__} refuses it ({_one_line(e)}); fix the field") from None
    _check_values(arch, config, where)
    config._attn_implementation = ATTENTION
    return config


def _check_values(arch: Architecture, config: PretrainedConfig, where: str) -> None:
    for name in arch.sizes:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"{where}{name}: got {value!r}; must be a positive integer")
    for name in arch.dropouts:
        value = getattr(config, name)
        if value != 0:
            # Dropout masks would come from each worker's running RNG, so a step re-run under a new plan after a
            # failure would not reproduce the same numbers.
            raise ModelConfigError(
                f"{where}{name}: got {value!r}; family hf supports only 0 (dropout breaks exact replay of a step "
                "after recovery); set it to 0"
            )
    if arch.name == "gpt2":
        if config.n_embd % config.n_head:
            raise ModelConfigError(f"{where}n_embd: got {config.n_embd}; must be a multiple of n_head ({config.n_head})")
        if config.add_cross_attention:
            raise ModelConfigError(f"{where}add_cross_attention: got true; a causal LM has no encoder, set it to false")
    if arch.name == "llama" and config.num_attention_heads % config.num_key_value_heads:
        raise ModelConfigError(
            f"{where}num_attention_heads: got {config.num_attention_heads}; must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )


def resolve(
    architecture: str | None, config: dict[str, Any], config_dir: str | None
) -> tuple[Architecture, PretrainedConfig]:
    """The architecture and checked config that ``model.architecture`` with ``model.config`` (inline) or
    ``model.config_dir`` (its config.json) describe."""
    if config_dir is None:
        arch = architecture_of(architecture, None, None)
        return arch, build_config(arch, config, "model.config.", inline=True)
    raw = read_config_json(config_dir)
    arch = architecture_of(architecture, raw, config_dir)
    return arch, build_config(arch, raw, f"model.config_dir: {config_dir}/config.json: ", inline=False)
