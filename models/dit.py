"""DiT (Peebles & Xie 2023): a class-conditional diffusion transformer as a layer list.

Layer list: ``[DiTStem, DiTBlockLayer x n_layer, DiTHead]``.

* The stem noises ``mb.data["image"]`` to ``x_t`` with the sample's ``t`` and ``noise`` (from
  :func:`models.diffusion.draw_diffusion_randomness`), embeds patches, adds the fixed sin-cos position
  table, and forms the condition ``c = t_emb + y_emb``. Carry: ``(h [N, T, D], c [N, D])``.
* Each block maps ``(h, c) -> (h', c)`` with adaLN-Zero conditioning.
* The head applies the adaLN final layer, unpatchifies to ``eps_hat`` and returns the summed
  epsilon-prediction loss ``((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)).sum()``. With ``learn_sigma``
  the head also outputs variance channels (as the published DiT shapes do); only the first ``channels``
  output channels enter the loss, which has no variational term.

The pieces every patch diffusion transformer shares (the MoE model of :mod:`models.moe` too) live here: the
config properties of :class:`PatchConfig`, the shape checks of :func:`check_patch_config`, the stem and
head bases :class:`PatchStem` and :class:`DiTHead`, and :class:`PatchDiffusionSpec`; the modules inside the
layers (embedders, blocks, initialisers) are in :mod:`models.dit_blocks`.

Initialisation follows the DiT paper (Xavier-uniform linears with zero bias, N(0, 0.02) class table and
timestep MLP, zero adaLN modulation and zero output layer), drawn from ``layer_generator(seed, i)``.
``adaln_zero=False`` draws the modulation and output layers like the other linears instead (the paper's
plain adaLN ablation; it also makes every gradient non-zero at initialisation).

With ``difffit=True`` the first ``n_layer // 2`` blocks get DiffFit scale factors on both residual
branches and every layer is frozen except what :func:`models.difffit.difffit_trainable_names` lists.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec, layer_generator
from models.difffit import POS_EMBED_NAME, apply_difffit
from models.diffusion import NoiseSchedule, draw_diffusion_randomness, sincos_pos_embed_2d
from models.dit_blocks import FREQ_DIM, DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from models.errors import ModelConfigError

@dataclass(frozen=True)
class PatchConfig:
    """The fields every patch-transformer config starts with, and the sizes derived from them (subclasses
    add ``mlp_ratio``, ``num_timesteps``, ``class_dropout`` and ``adaln_zero``)."""

    image_size: int
    channels: int
    patch: int
    d_model: int
    n_layer: int
    n_head: int
    num_classes: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def out_channels(self) -> int:
        """Channels the head outputs per pixel."""
        return self.channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.d_model * self.mlp_ratio)


@dataclass(frozen=True)
class DiTConfig(PatchConfig):
    """DiT's shape and options; the first seven fields, ``image_size`` to
    ``num_classes``, are :class:`PatchConfig`'s (positional construction keeps its order)."""

    mlp_ratio: float = 4.0
    #: also predict per-pixel variance channels (output 2 * channels); they are not trained by our loss
    learn_sigma: bool = False
    num_timesteps: int = 1000
    #: probability of replacing a sample's label by the null class (classifier-free guidance training);
    #: > 0 adds a null row to the class table
    class_dropout: float = 0.0
    #: learn the position table (initialised to sin-cos) instead of keeping it fixed
    learn_pos: bool = False
    #: zero-initialise adaLN modulation and the output layer (adaLN-Zero); False is plain adaLN
    adaln_zero: bool = True

    @property
    def out_channels(self) -> int:
        return self.channels * 2 if self.learn_sigma else self.channels


def _latent(d: int, n_layer: int, n_head: int) -> DiTConfig:
    """A published DiT shape: 32x32x4 latents (256 px images through the SD VAE), 1000 ImageNet classes."""
    return DiTConfig(32, 4, 2, d, n_layer, n_head, 1000, learn_sigma=True, class_dropout=0.1)


PRESETS: dict[str, DiTConfig] = {
    # 8x8 scikit-learn digits: 16 tokens, about 0.33M parameters
    "tiny": DiTConfig(image_size=8, channels=1, patch=2, d_model=64, n_layer=4, n_head=4, num_classes=10),
    # 28x28 Fashion-MNIST: 49 tokens
    "tiny-28": DiTConfig(image_size=28, channels=1, patch=4, d_model=96, n_layer=6, n_head=4, num_classes=10),
    "dit-s/2": _latent(384, 12, 6),
    "dit-b/2": _latent(768, 12, 12),
    "dit-l/2": _latent(1024, 24, 16),
    "dit-xl/2": _latent(1152, 28, 16),
}


class PatchStem(Layer):
    """Layer 0 of a patch diffusion transformer: noises ``mb.data["image"]`` to ``x_t`` with the sample's
    ``t`` and ``noise`` and embeds it with :meth:`embed`. It holds the patch and timestep embedders;
    subclasses register their condition's embedder after them (every child has ``reset_parameters(gen)``)
    and a ``pos_embed`` table of ``config.tokens`` rows."""

    def __init__(self, config: PatchConfig, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule
        self.x_embedder = PatchEmbed(config.channels, config.patch, config.d_model)
        self.t_embedder = TimestepEmbedder(config.d_model)

    def reset_parameters(self, gen: torch.Generator) -> None:
        for embedder in self.children():  # in registration order, which fixes the draws from gen
            embedder.reset_parameters(gen)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.d_model, self.config.grid, self.config.grid))

    def patch_tokens(self, x_t: torch.Tensor) -> torch.Tensor:
        """``h [N, T, D]``: the patches of ``x_t`` embedded, plus the position table."""
        return self.x_embedder(x_t.to(self.pos_embed.dtype)) + self.pos_embed

    @abc.abstractmethod
    def embed(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None
    ) -> Carry:
        """The carry for noisy images ``x_t [N, C, H, W]`` at timesteps ``t [N]`` (the inference path);
        ``drop [N]`` (bool) replaces those labels by the null class."""

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        dtype = self.pos_embed.dtype
        x_t = self.schedule.q_sample(mb.data["image"].to(dtype), mb.data["t"], mb.data["noise"].to(dtype))
        return self.embed(x_t, mb.data["t"], mb.data["label"], mb.data.get("drop_label"))


class DiTStem(PatchStem):
    """Layer 0: noising, patch embedding, positions and the condition ``c = t_emb + y_emb``."""

    def __init__(self, config: DiTConfig, schedule: NoiseSchedule) -> None:
        super().__init__(config, schedule)
        d = config.d_model
        self.y_embedder = LabelEmbedder(config.num_classes, d, with_null=config.class_dropout > 0)
        table = torch.zeros(config.tokens, d)
        if config.learn_pos:
            self.register_parameter(POS_EMBED_NAME, nn.Parameter(table))
        else:  # a pure function of the config: recomputed by every build, never checkpointed
            self.register_buffer(POS_EMBED_NAME, table, persistent=False)

    def embed(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, c)`` for noisy images ``x_t [N, C, H, W]`` at timesteps ``t [N]`` (the inference path)."""
        return self.patch_tokens(x_t), self.t_embedder(t) + self.y_embedder(labels, drop)


class DiTBlockLayer(Layer):
    """One :class:`DiTBlock` on the carry: ``(h, c) -> (block(h, c), c)``."""

    def __init__(self, config: DiTConfig, difffit_scale: bool) -> None:
        super().__init__()
        self.block = DiTBlock(config.d_model, config.n_head, config.mlp_hidden, difffit_scale)
        self.adaln_zero = config.adaln_zero

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.block.reset_parameters(gen, self.adaln_zero)

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        h, c = carry
        return self.block(h, c), c


class DiTHead(Layer):
    """Last layer: final adaLN layer, unpatchify, and the summed epsilon-prediction loss. It reads ``h``
    and ``c``, the first two entries of the carry, so other patch transformers use it too."""

    def __init__(self, config: PatchConfig) -> None:
        super().__init__()
        self.config = config
        self.final = FinalLayer(config.d_model, config.patch, config.out_channels)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.final.reset_parameters(gen, self.config.adaln_zero)

    def predict(self, carry: Carry) -> torch.Tensor:
        """``eps_hat [N, C, H, W]``: the noise prediction (any variance channels are dropped)."""
        h, c = carry[0], carry[1]
        out = unpatchify(self.final(h, c), self.config.patch, self.config.out_channels)
        return out[:, : self.config.channels]

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        eps_hat = self.predict(carry)
        noise = mb.data["noise"].to(eps_hat.dtype)
        return ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)).sum()


def check_patch_config(c: PatchConfig, positive: Sequence[str]) -> None:
    """One-line ConfigErrors for shapes no patch transformer can take: the fields named in ``positive``
    below 1, a patch that does not divide the image, heads that do not divide ``d_model``, a ``d_model``
    the 2-D sin-cos table cannot split, and a ``class_dropout`` outside [0, 1)."""
    for name in positive:
        if getattr(c, name) < 1:
            raise ModelConfigError(f"model.overrides.{name}: got {getattr(c, name)}; must be >= 1")
    if c.image_size % c.patch:
        raise ModelConfigError(f"model.overrides.patch: got {c.patch}; must divide image_size {c.image_size}")
    if c.d_model % c.n_head:
        raise ModelConfigError(f"model.overrides.n_head: got {c.n_head}; must divide d_model {c.d_model}")
    if c.d_model % 4:
        raise ModelConfigError(f"model.overrides.d_model: got {c.d_model}; must be a multiple of 4 (2-D sin-cos positions)")
    if not 0.0 <= c.class_dropout < 1.0:
        raise ModelConfigError(f"model.overrides.class_dropout: got {c.class_dropout}; must be in [0, 1)")


#: the config fields of every patch transformer that must be at least 1
PATCH_POSITIVE = ("image_size", "channels", "patch", "d_model", "n_layer", "n_head", "num_classes", "num_timesteps")


class PatchDiffusionSpec(ModelSpec):
    """A patch diffusion transformer as ``n_layer + 2`` independently buildable layers: a stem, the
    blocks and a head. Subclasses say which layer stands at an index (:meth:`_make_layer`), the FLOPs of
    a block and the carry's size; building, sizes and diffusion randomness are shared."""

    #: the ``family`` entry of the fingerprint
    family: str

    def __init__(self, config: PatchConfig, seed: int, dtype: torch.dtype) -> None:
        self.config = config
        self.seed = seed
        self.dtype = dtype
        self.schedule = NoiseSchedule(config.num_timesteps)

    @property
    def num_layers(self) -> int:
        return self.config.n_layer + 2

    @abc.abstractmethod
    def _make_layer(self, index: int) -> Layer:
        """Layer ``index`` (called on the meta device, in the default dtype)."""

    @abc.abstractmethod
    def _block_flops(self) -> float:
        """Forward FLOPs of one block for one sample."""

    @abc.abstractmethod
    def _carry_numel(self) -> int:
        """Elements per sample of the carry the stem and each block send downstream."""

    def _construct(self, index: int) -> Layer:
        """Layer ``index`` on the meta device (shapes only, no memory, no random draws)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        with torch.device("meta"):
            layer = self._make_layer(index)
        return layer.to(self.dtype)

    def build_layer(self, index: int) -> Layer:
        layer = self._construct(index).to_empty(device="cpu")
        layer.reset_parameters(layer_generator(self.seed, index))
        return layer

    def layer_meta(self, index: int) -> LayerMeta:
        """Parameter counts (from a meta-device build) and forward FLOPs of one sample.

        FLOPs count a multiply-add as 2, with ``T`` tokens and width ``D``: the stem costs the patch
        convolution ``2 T C p^2 D`` plus the timestep MLP ``2 (256 D + D^2)``; the head
        ``2 T D p^2 C_out + 4 D^2``; a block what :meth:`_block_flops` says. The head's output is the
        loss, which crosses no boundary (0)."""
        layer = self._construct(index)
        params = sum(p.numel() for p in layer.parameters())
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        c = self.config
        t, d = c.tokens, c.d_model
        if index == 0:
            name, out = "stem", self._carry_numel()
            flops = 2.0 * t * c.channels * c.patch**2 * d + 2.0 * (FREQ_DIM * d + d * d)
        elif index == self.num_layers - 1:
            name, out = "head", 0
            flops = 2.0 * t * d * c.patch**2 * c.out_channels + 4.0 * d * d
        else:
            name, out = f"block{index - 1}", self._carry_numel()
            flops = self._block_flops()
        return LayerMeta(name, params, trainable, flops, out)

    def loss_units(self, mb: MicroBatch) -> int:
        """The number of samples in ``mb`` (the loss sums per-sample mean squared errors)."""
        return mb.size

    def sample_randomness(self, sample: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Diffusion randomness: ``t``, ``noise``, and ``drop_label`` with class dropout."""
        return draw_diffusion_randomness(sample, gen, self.schedule, label_dropout=self.config.class_dropout)

    def _fingerprint_extra(self) -> dict:
        return {}

    def fingerprint(self) -> dict:
        return {
            "family": self.family,
            **dataclasses.asdict(self.config),
            **self._fingerprint_extra(),
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


class DiTSpec(PatchDiffusionSpec):
    """A DiT as ``n_layer + 2`` independently buildable layers (see the module docstring)."""

    family = "dit"

    def __init__(
        self, config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32, difffit: bool = False
    ) -> None:
        check_patch_config(config, PATCH_POSITIVE)
        super().__init__(config, seed, dtype)
        self.difffit = difffit

    def _make_layer(self, index: int) -> Layer:
        if index == 0:
            return DiTStem(self.config, self.schedule)
        if index == self.num_layers - 1:
            return DiTHead(self.config)
        # DiffFit scales the first half of the blocks
        return DiTBlockLayer(self.config, difffit_scale=self.difffit and index - 1 < self.config.n_layer // 2)

    def _construct(self, index: int) -> Layer:
        layer = super()._construct(index)
        if self.difffit:
            apply_difffit(layer)
        return layer

    def _block_flops(self) -> float:
        """``T (8 D^2 + 4 D M)`` for the linears (MLP width ``M``), ``4 T^2 D`` for ``QK^T`` and ``AV``,
        and ``12 D^2`` for the modulation."""
        c = self.config
        t, d = c.tokens, c.d_model
        return t * (8.0 * d * d + 4.0 * d * c.mlp_hidden) + 4.0 * t * t * d + 12.0 * d * d

    def _carry_numel(self) -> int:
        """``(h, c)``: ``T D + D``."""
        return self.config.tokens * self.config.d_model + self.config.d_model

    def _fingerprint_extra(self) -> dict:
        return {"difffit": self.difffit}
