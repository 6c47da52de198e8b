"""diffusers ``DiTTransformer2DModel`` as a layer list, with optional DiffFit.

Layers: ``[stem, transformer block x num_layers, head]``.

* The stem noises ``mb.data["image"]`` with the scheduler's ``add_noise`` and embeds patches with the
  model's ``pos_embed`` (a ``PatchEmbed``: patches plus the fixed sin-cos table). The carry is ``(h, t, y)``:
  the tokens, the timesteps and the labels (the null class ``num_embeds_ada_norm`` where ``drop_label``
  says so: classifier-free guidance training with ``model.config.class_dropout``). The library's own random
  label dropout is switched off (``dropout_prob = 0``), so dropping is a function of the data seed only.
* Every diffusers block embeds ``(t, y)`` itself (each has its own ``norm1.emb``), so the blocks read them
  from the carry: ``(h, t, y) -> (block(h, t, y), t, y)``.
* The head applies the model's output stage (``norm_out``, adaLN shift/scale from ``proj_out_1`` on block
  0's embedding of ``(t, y)``, ``proj_out_2``, unpatchify) and returns the summed noise-prediction loss on the
  first ``in_channels`` output channels. It holds a copy of block 0's ``norm1.emb`` (declared tied).

DiffFit (``difffit=True``): the first ``num_layers // 2`` blocks get a :class:`~models.difffit.ScaleFactor`
on the attention and the feed-forward residual branches (a forward hook multiplies the output of ``attn1``
and of ``ff``, before the adaLN gate), and every layer freezes all but
:func:`~models.difffit.difffit_trainable_names`. Export folds each ``gamma`` into the branch's last linear
(``attn1.to_out.0``, the last ``ff.net`` linear): ``gamma * (W x + b) = (gamma W) x + gamma b``, exact up
to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Carry, Layer, MicroBatch, TiedGroup
from models.difffit import ScaleFactor, apply_difffit
from models.diffusers_zoo.spec import DiffusersSpec, ImageShape, NoiseHead, as_tuple, mounted, square_size
from models.errors import ModelConfigError

EMB = "transformer_blocks.0.norm1.emb"


class DiTStem(Layer):
    def __init__(self, spec: "DiTSpec") -> None:
        super().__init__()
        self.schedule, self.null_class = spec.schedule, spec.config.num_classes

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> Carry:
        """The carry for noisy images ``x_t`` at timesteps ``t [N]`` with ``labels [N]``; ``drop [N]`` (bool)
        replaces those labels by the null class (the inference path)."""
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.pos_embed(x_t.to(self.pos_embed.proj.weight.dtype)), t.long(), labels.long()

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        x_t = self.schedule.q_sample(mb.data["image"].to(self.pos_embed.proj.weight.dtype), mb.data["t"], mb.data["noise"])
        return self.embed(x_t, mb.data["t"], mb.data["label"], mb.data.get("drop_label"))

    def infer(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return self.embed(mb.data["image"], mb.data["t"], mb.data["label"])


class DiTBlock(Layer):
    """Block ``k`` on the carry; with DiffFit scale factors on its two residual branches."""

    def __init__(self, block: nn.Module, k: int, difffit_scale: bool) -> None:
        super().__init__()
        self.path = f"transformer_blocks.{k}"
        if difffit_scale:
            dim = block.norm1.linear.in_features
            self.difffit_attn, self.difffit_ff = ScaleFactor(dim), ScaleFactor(dim)
            block.attn1.register_forward_hook(lambda _m, _a, out: self.difffit_attn(out))
            block.ff.register_forward_hook(lambda _m, _a, out: self.difffit_ff(out))

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        h, t, y = as_tuple(carry)
        return mounted(self, self.path)(h, timestep=t, class_labels=y), t, y

    def infer(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return self.forward(carry, mb)


class DiTHead(NoiseHead):
    def __init__(self, spec: "DiTSpec") -> None:
        super().__init__()
        self.patch, self.out_channels, self.channels = spec.patch, spec.out_channels, spec.config.channels

    def predict(self, carry: Carry) -> torch.Tensor:
        """``eps_hat [N, C, H, W]``, as ``DiTTransformer2DModel.forward`` computes its output (variance
        channels beyond ``in_channels`` dropped)."""
        h, t, y = as_tuple(carry)
        cond = mounted(self, EMB)(t, y, hidden_dtype=h.dtype)
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        h = self.proj_out_2(self.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        p, c, side = self.patch, self.out_channels, int(h.shape[1] ** 0.5)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, side, side, p, p, c))
        return h.reshape(-1, c, side * p, side * p)[:, : self.channels]


class DiTSpec(DiffusersSpec):
    """``DiTTransformer2DModel`` as ``num_layers + 2`` layers; see the module docstring."""

    architecture = "dit"

    def __init__(self, kwargs: dict[str, Any], options: dict[str, Any], weights: Any, seed: int, dtype: torch.dtype, difffit: bool) -> None:
        super().__init__(kwargs, options, weights, seed, dtype, difffit)
        c = self.skeleton.config
        size = square_size(c.sample_size, "model.config.sample_size")
        if size % c.patch_size:
            raise ModelConfigError(f"model.config.patch_size: got {c.patch_size}; must divide sample_size {size}")
        self.patch, self.out_channels = c.patch_size, self.skeleton.out_channels
        if self.out_channels < c.in_channels:
            raise ModelConfigError(f"model.config.out_channels: got {self.out_channels}; must be >= in_channels {c.in_channels}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ModelConfigError(f"model.config.class_dropout: got {self.class_dropout}; must be in [0, 1)")
        self.config = ImageShape(size, c.in_channels, c.num_embeds_ada_norm, self.class_dropout)
        self.blocks, self.inner = c.num_layers, self.skeleton.inner_dim
        self.tokens = (size // c.patch_size) ** 2
        self.ff_linear = self._last_linear("ff")

    def _last_linear(self, branch: str) -> str:
        """The state path (in block 0) of the last linear of a residual branch's ``ff``."""
        block = self.skeleton.transformer_blocks[0]
        names = [n for n, m in getattr(block, branch).named_modules() if isinstance(m, nn.Linear)]
        return f"{branch}.{names[-1]}"

    @property
    def num_layers(self) -> int:
        return self.blocks + 2

    def layer_name(self, index: int) -> str:
        return "stem" if index == 0 else "head" if index == self.num_layers - 1 else f"block{index - 1}"

    def _scaled(self, k: int) -> bool:
        return self.difffit and k < self.blocks // 2

    def mounts(self, index: int) -> list[tuple[str, int]]:
        if index == 0:
            return [("pos_embed", 0)]
        if index < self.num_layers - 1:
            return [(f"transformer_blocks.{index - 1}", index)]
        return [("norm_out", index), ("proj_out_1", index), ("proj_out_2", index), (EMB, 1)]

    def make_layer(self, index: int, modules: dict[str, nn.Module]) -> Layer:
        for module in modules.values():
            for sub in module.modules():
                if hasattr(sub, "dropout_prob"):  # the label embedder: drops come from drop_label instead
                    sub.dropout_prob = 0.0
        if index == 0:
            return DiTStem(self)
        if index < self.num_layers - 1:
            return DiTBlock(modules[f"transformer_blocks.{index - 1}"], index - 1, self._scaled(index - 1))
        return DiTHead(self)

    def layer_setup(self, layer: Layer, index: int) -> None:
        if self.difffit:
            apply_difffit(layer)

    @property
    def tied(self) -> list[TiedGroup]:
        """Block 0's ``norm1.emb`` and the head's copy of it."""
        names = [n for n, _ in self.skeleton.get_submodule(EMB).named_parameters()]
        return [((1, f"{EMB}.{n}"), (self.num_layers - 1, f"{EMB}.{n}")) for n in names]

    def carry_shapes(self, index: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """``(h [T, D], t, y)``: ``T D + 2`` elements per sample."""
        return [((self.tokens, self.inner), self.dtype), ((), torch.long), ((), torch.long)]

    def library_state(self, states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The layers' states with each DiffFit ``gamma`` folded into its branch's last linear."""
        folded = []
        for index, state in enumerate(states):
            state = dict(state)
            k = index - 1
            for scale, linear in (("difffit_attn", "attn1.to_out.0"), ("difffit_ff", self.ff_linear)):
                gamma = state.pop(f"{scale}.gamma", None)
                if gamma is None:
                    continue
                prefix = f"transformer_blocks.{k}.{linear}"
                state[f"{prefix}.weight"] = state[f"{prefix}.weight"] * gamma[:, None]
                state[f"{prefix}.bias"] = state[f"{prefix}.bias"] * gamma
            folded.append(state)
        return super().library_state(folded)
