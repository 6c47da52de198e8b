"""diffusers ``UNet2DModel`` as a layer list.

Layers: ``[stem, down block x D, mid block (when the config has one), up block x D, head]``.

* The stem noises ``mb.data["image"]`` with the scheduler's ``add_noise`` and the sample's ``t`` and
  ``noise``, embeds the timestep (``time_proj`` + ``time_embedding``, plus the class embedding of
  ``mb.data["label"]`` when ``num_class_embeds`` is set) and applies ``conv_in``.
* The carry is ``(h, emb, skips)``: the feature map, the time(+class) embedding every block reads, and
  the pending skip tensors, flattened per sample and concatenated into one ``[N, S]`` tensor (a stage
  boundary then carries three tensors however deep the UNet is). Each down block appends its outputs to
  the skips; each up block takes the last ``len(resnets)`` of them, as ``UNet2DModel.forward`` does. After
  the last up block no skip is pending and the carry is ``(h, emb)``.
* The head applies ``conv_norm_out``, ``conv_act`` and ``conv_out`` and returns the summed noise-prediction
  loss on the first ``in_channels`` output channels.

Not supported (one-line errors): skip-sample blocks (``Skip*``, which carry a second image path),
``time_embedding_type: fourier``, ``class_embed_type``, and dropout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.base import Carry, Layer, MicroBatch
from models.diffusers_zoo.spec import DiffusersSpec, ImageShape, NoiseHead, as_tuple, mounted, square_size
from models.errors import ModelConfigError

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")

Shapes = list[tuple[int, ...]]


def pack(skips: list[torch.Tensor]) -> torch.Tensor:
    """Pending skips ``[N, ...]`` as one ``[N, S]`` tensor (each flattened, in order)."""
    return torch.cat([s.flatten(1) for s in skips], dim=1)


def unpack(packed: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    """The inverse of :func:`pack` for per-sample ``shapes`` (views, no copy)."""
    sizes = [math.prod(s) for s in shapes]
    return [p.view(packed.shape[0], *s) for p, s in zip(packed.split(sizes, dim=1), shapes)]


class UNetLayer(Layer):
    """A UNet layer: :meth:`step` maps ``(h, emb, skips list)`` to the next; ``forward`` unpacks the skips
    it receives (their per-sample shapes ``in_skips`` are known from the spec's trace) and packs those it sends."""

    def __init__(self, in_skips: Shapes) -> None:
        super().__init__()
        self.in_skips = in_skips

    def step(self, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def unpack_carry(self, carry: Carry) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        h, emb, *rest = as_tuple(carry)
        return h, emb, unpack(rest[0], self.in_skips) if rest else []

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        h, emb, skips = self.step(*self.unpack_carry(carry))
        return (h, emb, pack(skips)) if skips else (h, emb)

    def infer(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return self.forward(carry, mb)


class UNetStem(UNetLayer):
    def __init__(self, spec: "UNetSpec") -> None:
        super().__init__([])
        self.schedule, self.center = spec.schedule, bool(spec.skeleton.config.center_input_sample)
        self.conditional = spec.config.num_classes > 0

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> Carry:
        """The carry for noisy images ``x_t`` at timesteps ``t [N]`` (the inference path; ``drop`` is unused,
        the UNet has no null class)."""
        x = 2 * x_t - 1.0 if self.center else x_t
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        if self.conditional:
            emb = emb + self.class_embedding(labels).to(dtype)
        h = self.conv_in(x.to(dtype))
        return h, emb, pack([h])

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        x_t = self.schedule.q_sample(mb.data["image"].to(self.conv_in.weight.dtype), mb.data["t"], mb.data["noise"])
        return self.embed(x_t, mb.data["t"], mb.data["label"])

    def infer(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return self.embed(mb.data["image"], mb.data["t"], mb.data["label"])


class UNetDown(UNetLayer):
    def __init__(self, in_skips: Shapes, path: str) -> None:
        super().__init__(in_skips)
        self.path = path

    def step(self, h, emb, skips):  # type: ignore[no-untyped-def]
        h, res = mounted(self, self.path)(hidden_states=h, temb=emb)
        return h, emb, skips + list(res)


class UNetMid(UNetLayer):
    def step(self, h, emb, skips):  # type: ignore[no-untyped-def]
        return self.mid_block(h, emb), emb, skips


class UNetUp(UNetDown):
    def step(self, h, emb, skips):  # type: ignore[no-untyped-def]
        block = mounted(self, self.path)
        n = len(block.resnets)
        return block(h, tuple(skips[-n:]), emb), emb, skips[:-n]


class UNetHead(NoiseHead):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def predict(self, carry: Carry) -> torch.Tensor:
        """``eps_hat [N, C, H, W]`` (output channels beyond the input's are dropped)."""
        h = as_tuple(carry)[0]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))[:, : self.channels]


class UNetSpec(DiffusersSpec):
    """``UNet2DModel`` as ``2 D + 2`` (+1 with a mid block) layers; see the module docstring."""

    architecture = "unet2d"

    def __init__(self, kwargs: dict[str, Any], options: dict[str, Any], weights: Any, seed: int, dtype: torch.dtype, difffit: bool) -> None:
        if difffit:
            raise ModelConfigError("model.difffit: DiffFit applies to the diffusers dit architecture, not unet2d; set it false")
        super().__init__(kwargs, options, weights, seed, dtype, difffit)
        if options.get("class_dropout"):
            raise ModelConfigError("model.config.class_dropout: unet2d has no null class to drop labels to; use 0")
        c = self.skeleton.config
        for field, allowed, names in (("down_block_types", DOWN_BLOCKS, c.down_block_types), ("up_block_types", UP_BLOCKS, c.up_block_types)):
            for name in names:
                if name not in allowed:
                    raise ModelConfigError(f"model.config.{field}: {name} is not supported; use {', '.join(allowed)}")
        if c.time_embedding_type == "fourier":
            raise ModelConfigError("model.config.time_embedding_type: fourier is not supported; use positional or learned")
        if c.class_embed_type is not None:
            raise ModelConfigError("model.config.class_embed_type: not supported; use num_class_embeds for class labels")
        size = square_size(c.sample_size, "model.config.sample_size")
        if c.out_channels < c.in_channels:
            raise ModelConfigError(f"model.config.out_channels: got {c.out_channels}; must be >= in_channels {c.in_channels}")
        self.config = ImageShape(size, c.in_channels, c.num_class_embeds or 0)
        self.downs, self.ups = len(c.down_block_types), len(c.up_block_types)
        self.has_mid = self.skeleton.mid_block is not None
        self._shapes: list[list[tuple[tuple[int, ...], torch.dtype]]] = []
        self._trace()

    @property
    def num_layers(self) -> int:
        return 2 + self.downs + self.has_mid + self.ups

    def _kind(self, index: int) -> tuple[str, int]:
        """(kind, block number) of layer ``index``."""
        if index == 0:
            return "stem", 0
        if index <= self.downs:
            return "down", index - 1
        if self.has_mid and index == self.downs + 1:
            return "mid", 0
        up = index - 1 - self.downs - self.has_mid
        return ("up", up) if up < self.ups else ("head", 0)

    def layer_name(self, index: int) -> str:
        kind, k = self._kind(index)
        return f"{kind}{k}" if kind in ("down", "up") else kind

    def mounts(self, index: int) -> list[tuple[str, int]]:
        kind, k = self._kind(index)
        paths = {
            "stem": ["time_proj", "time_embedding", "conv_in"] + (["class_embedding"] if self.config.num_classes else []),
            "down": [f"down_blocks.{k}"],
            "mid": ["mid_block"],
            "up": [f"up_blocks.{k}"],
            "head": ["conv_norm_out", "conv_act", "conv_out"],
        }[kind]
        return [(p, index) for p in paths]

    def make_layer(self, index: int, modules: dict[str, nn.Module]) -> Layer:
        kind, k = self._kind(index)
        in_skips = [s for s, _ in self._shapes[index - 1][2:]] if 0 < index <= len(self._shapes) else []
        if kind == "stem":
            return UNetStem(self)
        if kind == "down":
            return UNetDown(in_skips, f"down_blocks.{k}")
        if kind == "mid":
            return UNetMid(in_skips)
        if kind == "up":
            return UNetUp(in_skips, f"up_blocks.{k}")
        return UNetHead(self.config.channels)

    def _trace(self) -> None:
        """Record each layer's outgoing carry shapes (h, emb, then every pending skip, per sample) by
        running the layers' steps on meta tensors; the packed carry counts the skips' elements."""
        mb = self._meta_batch()
        layer = self._layer(0, real=False)
        h, emb, _ = layer.embed(mb.data["image"], mb.data["t"], mb.data["label"])  # type: ignore[attr-defined]
        skips = [h]
        for index in range(self.num_layers - 1):
            if index > 0:
                h, emb, skips = self._layer(index, real=False).step(h, emb, skips)  # type: ignore[attr-defined]
            self._shapes.append([(tuple(t.shape[1:]), t.dtype) for t in (h, emb, *skips)])

    def carry_shapes(self, index: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``h``, ``emb`` and, while skips are pending, the packed skips ``[S]`` (S = their total elements)."""
        shapes = self._shapes[index]
        head, skips = shapes[:2], shapes[2:]
        if not skips:
            return head
        return head + [((sum(math.prod(s) for s, _ in skips),), skips[0][1])]
