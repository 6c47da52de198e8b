"""The layer-list spec shared by the diffusers architectures: mounting library submodules into layers under
their own names, building, weights, sizes, randomness and export.

A layer holds its diffusers submodules at the paths they have in the whole library model (``conv_in``,
``down_blocks.1``, ``transformer_blocks.0``...), so a layer's ``state_dict`` names are the library's own:
loading pretrained weights reads exactly those entries, and export merges the layers' states. Entries a
layer adds itself (DiffFit scale factors) live outside the library's names.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec
from models.diffusers_zoo import library
from models.diffusion import draw_diffusion_randomness
from models.errors import ModelConfigError


def mount(layer: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` in ``layer`` at the dotted ``path`` (intermediate ModuleDicts are created), so
    its state names are ``path + "." + name`` as in the library model."""
    *parents, leaf = path.split(".")
    node = layer
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.ModuleDict())
        node = node._modules[part]  # type: ignore[assignment]
    node.add_module(leaf, module)


def mounted(layer: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` of ``layer``."""
    return layer.get_submodule(path)


def as_tuple(carry: Carry) -> tuple[torch.Tensor, ...]:
    return carry if isinstance(carry, tuple) else (carry,)


class ImageShape:
    """What the data checks, datasets and sampling read of an image model: ``image_size``, ``channels``,
    ``num_classes`` (0 when unconditional) and ``class_dropout`` (label dropout in training)."""

    def __init__(self, image_size: int, channels: int, num_classes: int, class_dropout: float = 0.0) -> None:
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.class_dropout = class_dropout

    def __repr__(self) -> str:
        return (
            f"ImageShape(image_size={self.image_size}, channels={self.channels}, num_classes={self.num_classes}, "
            f"class_dropout={self.class_dropout})"
        )


def square_size(value: Any, field: str) -> int:
    """An int image side from an int or a square (h, w); anything else is a ModelConfigError."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"{field}: got {value!r}; give a positive int (square images)")
    return value


def noise_loss(eps_hat: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """The summed noise-prediction loss: per-sample mean squared error, summed over samples (as models.dit)."""
    return ((eps_hat - mb.data["noise"].to(eps_hat.dtype)) ** 2).mean(dim=(1, 2, 3)).sum()


class NoiseHead(Layer):
    """A last layer: :meth:`predict` gives ``eps_hat [N, C, H, W]`` from the carry (the inference path) and
    the forward pass the summed noise-prediction loss."""

    @abc.abstractmethod
    def predict(self, carry: Carry) -> torch.Tensor: ...

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return noise_loss(self.predict(carry), mb)

    def infer(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        """What a meta forward of this layer runs to count its FLOPs."""
        return self.predict(carry)


class DiffusersSpec(ModelSpec):
    """A diffusers model as independently buildable layers. Subclasses list each layer's mounts
    (``(library path, owner layer)``: the owner's seed draws the values, so a tied copy equals its
    original), make the Layer around them, and give the carry's per-sample shapes."""

    architecture: str

    def __init__(
        self,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        weights: Path | None,
        seed: int,
        dtype: torch.dtype,
        difffit: bool,
    ) -> None:
        self.cls = library.model_class(self.architecture)
        self.kwargs, self.weights, self.seed, self.dtype, self.difffit = kwargs, weights, seed, dtype, difffit
        self.schedule = library.DiffusersSchedule(options.get(library.SCHEDULER_KEY) or {})
        self.class_dropout = float(options.get(library.CLASS_DROPOUT_KEY, 0.0))
        self.skeleton = library.skeleton(self.cls, kwargs)
        if self.skeleton.config.get("dropout", 0.0):
            raise ModelConfigError("model.config.dropout: must be 0 (per-sample randomness comes only from the data seed)")

    # -- what subclasses say -------------------------------------------------------------------------

    @abc.abstractmethod
    def mounts(self, index: int) -> list[tuple[str, int]]:
        """The library paths layer ``index`` holds, each with the layer whose seed initialises it."""

    @abc.abstractmethod
    def make_layer(self, index: int, modules: dict[str, nn.Module]) -> Layer:
        """Layer ``index`` around its mounted modules (``modules[path]``, already mounted by the caller's
        order in :meth:`mounts`)."""

    @abc.abstractmethod
    def carry_shapes(self, index: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Per-sample shapes and dtypes of the carry layer ``index`` sends (empty for the last layer)."""

    @abc.abstractmethod
    def layer_name(self, index: int) -> str: ...

    def layer_setup(self, layer: Layer, index: int) -> None:
        """Hook run after a layer's values are final (DiffFit's freezing)."""

    # -- building ------------------------------------------------------------------------------------

    def _module(self, path: str, owner: int, real: bool) -> nn.Module:
        """A fresh copy of the library submodule at ``path``, with meta parameters unless ``real``. Real
        values are those the owner layer's build gives it: the owner's mount holding ``path`` is
        materialised from the owner's seed (and its pretrained slice), and ``path`` is taken from it, so a
        tied copy equals the original."""
        import copy

        root = next(p for p, _ in self.mounts(owner) if path == p or path.startswith(p + "."))
        module = copy.deepcopy(self.skeleton.get_submodule(root))
        if real:
            library.materialize(module, self.seed, owner, self.dtype)
            if self.weights is not None:
                library.load_slice(module, self.weights, prefix=root + ".")
        return module if root == path else module.get_submodule(path[len(root) + 1 :])

    def _layer(self, index: int, real: bool) -> Layer:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        modules = {path: self._module(path, owner, real) for path, owner in self.mounts(index)}
        layer = self.make_layer(index, modules)
        for path, module in modules.items():
            mount(layer, path, module)
        layer.to(self.dtype)
        if not real:
            return layer.to("meta")  # buffers too (fixed position tables), for meta forwards
        self.layer_setup(layer, index)
        return layer

    def build_layer(self, index: int) -> Layer:
        return self._layer(index, real=True)

    # -- sizes ---------------------------------------------------------------------------------------

    def _meta_carry(self, index: int) -> Carry | None:
        if index == 0:
            return None
        tensors = tuple(torch.zeros((1, *shape), dtype=dt, device="meta") for shape, dt in self.carry_shapes(index - 1))
        return tensors if len(tensors) > 1 else tensors[0]

    def _meta_batch(self) -> MicroBatch:
        c = self.config
        image = torch.zeros((1, c.channels, c.image_size, c.image_size), dtype=self.dtype, device="meta")
        zeros = torch.zeros(1, dtype=torch.long, device="meta")
        return MicroBatch({"image": image, "noise": image, "t": zeros, "label": zeros})

    def layer_meta(self, index: int) -> LayerMeta:
        """Parameter counts from a meta build; forward FLOPs of one sample counted by torch's
        FlopCounterMode on a meta forward (matmuls, convolutions and attention; elementwise work is not
        counted); the carry's elements per sample, every tensor of it (the UNet's pending skips too)."""
        layer = self._layer(index, real=False)
        self.layer_setup(layer, index)
        params = sum(p.numel() for p in layer.parameters())
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            layer.infer(self._meta_carry(index), self._meta_batch())  # type: ignore[operator]
        out = sum(int(torch.Size(shape).numel()) for shape, _ in self.carry_shapes(index)) if index < self.num_layers - 1 else 0
        return LayerMeta(self.layer_name(index), params, trainable, float(counter.get_total_flops()), out)

    def loss_units(self, mb: MicroBatch) -> int:
        """The number of samples in ``mb`` (the loss sums per-sample mean squared errors)."""
        return mb.size

    def sample_randomness(self, sample: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``t``, ``noise`` and, with class dropout, ``drop_label`` (:func:`models.diffusion.draw_diffusion_randomness`)."""
        return draw_diffusion_randomness(sample, gen, self.schedule, label_dropout=self.class_dropout)

    def fingerprint(self) -> dict:
        return {
            "family": "diffusers",
            "architecture": self.architecture,
            "config": self.kwargs,
            "scheduler": self.schedule.to_dict(),
            "class_dropout": self.class_dropout,
            "pretrained": str(self.weights) if self.weights else None,
            "difffit": self.difffit,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- export --------------------------------------------------------------------------------------

    def library_state(self, states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The library model's state dict from the layers' states (tied copies are equal; a later copy
        wins). Subclasses fold their own entries in first."""
        merged: dict[str, torch.Tensor] = {}
        for state in states:
            merged.update(state)
        return merged

    def export_pretrained(self, states: list[dict[str, torch.Tensor]], out_dir: str) -> bool:
        """Assemble the library model from the layers' states and ``save_pretrained`` it under ``out_dir``
        (config.json and diffusion_pytorch_model.safetensors, in the spec's dtype), with the scheduler's
        config as scheduler_config.json; ``from_pretrained(out_dir)`` loads it and a config_dir reads both."""
        model = library.skeleton(self.cls, self.kwargs)
        model.load_state_dict(self.library_state(states), strict=True, assign=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        self.schedule.scheduler.save_config(out_dir)
        return True
