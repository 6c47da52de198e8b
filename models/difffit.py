"""DiffFit (Xie et al. 2023): parameter-efficient fine-tuning of a pretrained diffusion transformer.

DiffFit freezes every weight except

* biases (every parameter whose own name is ``bias``),
* normalisation parameters (weights and biases of LayerNorm / GroupNorm / RMSNorm modules; DiT's
  adaLN norms have none, so in DiT this adds nothing),
* the class embedding table (every ``nn.Embedding``; the diffusion models hold no other embedding),
* the per-channel scale factors ``gamma`` (:class:`ScaleFactor`, initialised to 1) that the model puts
  on the attention and MLP residual branches of the first half of its blocks.

Checkpoints for fine-tuning are plain ``{layer index: layer.state_dict()}`` dicts; :func:`load_pretrained`
copies them into freshly built layers, re-initialising the class table when the class count changes and
re-gridding learned position tables when the image resolution changes. (Fixed sin-cos tables are
non-persistent buffers that every layer computes for its own grid, so they never need re-gridding.)

This module knows no model family; it works on any layer that follows those conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelSpec
from models.errors import ModelConfigError

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

#: the name of learned position tables ``[tokens, dim]`` on a square grid (re-gridded on load)
POS_EMBED_NAME = "pos_embed"


class ScaleFactor(nn.Module):
    """DiffFit's per-channel scale ``x * gamma`` on a residual branch; ``gamma`` starts at 1, so adding
    it to a pretrained block leaves the block's function unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gamma.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def difffit_trainable_names(layer: nn.Module) -> list[str]:
    """The names (as in ``layer.named_parameters()``, in that order) of the parameters DiffFit trains."""
    names = []
    for module_name, module in layer.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            if leaf == "bias" or isinstance(module, (*_NORM_TYPES, nn.Embedding, ScaleFactor)):
                names.append(f"{module_name}.{leaf}" if module_name else leaf)
    order = {name: i for i, (name, _) in enumerate(layer.named_parameters())}
    return sorted(names, key=order.__getitem__)


def apply_difffit(layer: nn.Module) -> None:
    """Freeze every parameter of ``layer`` that :func:`difffit_trainable_names` does not list."""
    keep = set(difffit_trainable_names(layer))
    for name, p in layer.named_parameters():
        p.requires_grad_(name in keep)


def trainable_fraction(spec: ModelSpec) -> float:
    """Trainable parameters over all parameters of the whole model, from ``spec.layer_meta``."""
    metas = [spec.layer_meta(i) for i in range(spec.num_layers)]
    return sum(m.trainable_params for m in metas) / sum(m.params for m in metas)


def regrid_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A learned ``[n*n, dim]`` position table resampled bicubically onto an ``m*m`` grid (``tokens = m*m``)."""
    old, new = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if old * old != table.shape[0] or new * new != tokens:
        raise ValueError(f"position tables must be square grids, got {table.shape[0]} -> {tokens} tokens")
    grid = table.T.reshape(1, table.shape[1], old, old).to(torch.float64)
    out = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return out.reshape(table.shape[1], tokens).T.to(table.dtype)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, as ``(layer index, state name)`` pairs."""

    copied: list[tuple[int, str]] = field(default_factory=list)
    reinitialised: list[tuple[int, str]] = field(default_factory=list)
    regridded: list[tuple[int, str]] = field(default_factory=list)
    kept_init: list[tuple[int, str]] = field(default_factory=list)


def _embedding_names(layer: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Embedding)}


def _scale_names(layer: nn.Module) -> set[str]:
    return {f"{n}.gamma" for n, m in layer.named_modules() if isinstance(m, ScaleFactor)}


def _check_class_count(layer: nn.Module, index: int, new_num_classes: int) -> None:
    """Modules that declare ``num_classes`` (the label embedders) must agree with ``new_num_classes``."""
    for name, module in layer.named_modules():
        have = getattr(module, "num_classes", None)
        if isinstance(have, int) and have != new_num_classes:
            raise ModelConfigError(
                f"model.overrides.num_classes: layer {index} ({name or 'root'}) has {have} classes but fine-tuning "
                f"asks for {new_num_classes}; set model.overrides.num_classes to {new_num_classes}"
            )


def load_pretrained(
    layers: Sequence[nn.Module],
    state_by_layer: dict[int, dict[str, torch.Tensor]],
    new_num_classes: int | None = None,
    first_index: int = 0,
) -> LoadReport:
    """Copy a pretrained checkpoint into freshly built layers, in place.

    ``layers[j]`` is global layer ``first_index + j`` (a whole model, or one stage of it);
    ``state_by_layer`` maps global layer indices to ``state_dict()``s. For each entry of a layer's own
    state dict:

    * same name and shape in the checkpoint: copied;
    * a class embedding table (``nn.Embedding`` weight) whose row count differs: left at the layer's
      fresh initialisation (re-initialised), allowed only when ``new_num_classes`` is given;
    * a learned ``pos_embed`` table whose token count differs: resampled bicubically onto the new grid;
    * a DiffFit ``gamma`` absent from the checkpoint: kept at its initial 1 (identity);
    * anything else missing or of another shape: ModelConfigError naming the layer and the entry.

    An entry of the checkpoint that the layer lacks is an error too (the model would silently compute
    something else). If ``new_num_classes`` is given, every module with a ``num_classes`` attribute must
    have that many classes.
    """
    report = LoadReport()
    for j, layer in enumerate(layers):
        index = first_index + j
        if index not in state_by_layer:
            raise ModelConfigError(
                f"model.init_checkpoint: holds no layer {index}; it must come from the same model family and depth"
            )
        source = state_by_layer[index]
        if new_num_classes is not None:
            _check_class_count(layer, index, new_num_classes)
        target = layer.state_dict()
        extra = sorted(set(source) - set(target))
        if extra:
            raise ModelConfigError(
                f"model.init_checkpoint: layer {index} has entries {extra} this model lacks; "
                "the checkpoint comes from a different architecture (check model.preset and overrides)"
            )
        embeddings, scales = _embedding_names(layer), _scale_names(layer)
        loaded: dict[str, torch.Tensor] = {}
        for name, current in target.items():
            if name not in source:
                if name in scales:
                    report.kept_init.append((index, name))
                    continue
                raise ModelConfigError(
                    f"model.init_checkpoint: layer {index} lacks {name!r}; the checkpoint is from another architecture"
                )
            value = source[name]
            if value.shape == current.shape:
                loaded[name] = value
                report.copied.append((index, name))
            elif name in embeddings and new_num_classes is not None and value.shape[1:] == current.shape[1:]:
                report.reinitialised.append((index, name))
            elif name.split(".")[-1] == POS_EMBED_NAME and value.dim() == 2 and value.shape[1] == current.shape[1]:
                loaded[name] = regrid_positions(value, current.shape[0])
                report.regridded.append((index, name))
            else:
                hint = " (pass new_num_classes to re-initialise the class table)" if name in embeddings else ""
                raise ModelConfigError(
                    f"model.init_checkpoint: layer {index} {name!r} has shape {tuple(value.shape)} in the checkpoint "
                    f"but {tuple(current.shape)} in the model{hint}"
                )
        layer.load_state_dict(loaded, strict=False)
    return report
