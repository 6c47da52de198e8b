"""diffusers models (``UNet2DModel``, ``DiTTransformer2DModel``) as layer lists: ``model.family: diffusers``.

:func:`build_spec` is the entry point; :mod:`.library` reads configs, weights and the scheduler,
:mod:`.spec` holds what both architectures share, :mod:`.unet` and :mod:`.dit` the layers.
"""

from __future__ import annotations

from typing import Any

import torch

from models.diffusers_zoo.library import resolve_config
from models.diffusers_zoo.spec import DiffusersSpec


def build_spec(
    architecture: str | None,
    config: dict[str, Any],
    config_dir: str | None,
    *,
    seed: int,
    dtype: torch.dtype,
    difffit: bool = False,
) -> DiffusersSpec:
    """The spec of a diffusers model named by ``architecture`` (unet2d, dit) with ``config`` inline, or by
    ``config_dir`` (config.json, optional weights and scheduler_config.json). Raises ModelConfigError (one
    line naming the field) for anything the adapter or the library refuses."""
    from models.diffusers_zoo.dit import DiTSpec
    from models.diffusers_zoo.unet import UNetSpec

    arch, kwargs, options, weights = resolve_config(architecture, config, config_dir)
    spec_class = {"unet2d": UNetSpec, "dit": DiTSpec}[arch]
    return spec_class(kwargs, options, weights, seed, dtype, difffit)
