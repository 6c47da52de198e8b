"""The ``hf`` family: Hugging Face ``transformers`` causal LMs (GPT-2, Llama) as Oobleck layer lists.

:func:`build_hf_spec` turns ``model.architecture`` / ``model.config`` / ``model.config_dir`` (plain values, the
framework's config stays out of the models package) into an :class:`~models.hf.spec.HFSpec`.
"""

from __future__ import annotations

from typing import Any

import torch

from models.errors import ModelConfigError
from models.hf.architectures import ARCHITECTURES, Architecture
from models.hf.config import resolve
from models.hf.spec import HFSpec, HFTextConfig

__all__ = ["ARCHITECTURES", "Architecture", "HFSpec", "HFTextConfig", "build_hf_spec"]


def build_hf_spec(
    architecture: str | None,
    config: dict[str, Any],
    config_dir: str | None,
    overrides: dict[str, Any],
    *,
    seed: int,
    dtype: torch.dtype,
) -> HFSpec:
    """The spec of the causal LM that the fields describe. ``overrides`` may hold only ``seq_len``, the
    training window (a positive integer up to the config's context length, which is the default).
    ModelConfigError (one line naming the field) for anything that cannot be built."""
    arch, hf_config = resolve(architecture, config, config_dir)
    unknown = sorted(set(overrides) - {"seq_len"})
    if unknown:
        raise ModelConfigError(f"model.overrides.{unknown[0]}: family hf takes only seq_len here; set the model's fields in model.config")
    context = int(getattr(hf_config, arch.context))
    seq_len = overrides.get("seq_len", context)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= context:
        raise ModelConfigError(
            f"model.overrides.seq_len: got {seq_len!r}; must be an integer in [1, {context}] (the config's {arch.context})"
        )
    return HFSpec(arch, hf_config, seed=seed, dtype=dtype, seq_len=seq_len, config_dir=config_dir)
