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

The pieces every patch diffusion transformer shares (the MoE model of :mod:`models.moe` too) live here:
the initialisers :func:`xavier_init` and :func:`init_modulation`, the config properties of
:class:`PatchConfig`, the shape checks of :func:`check_patch_config`, the stem and head bases
:class:`PatchStem` and :class:`DiTHead`, and :class:`PatchDiffusionSpec`.

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
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec, layer_generator
from models.difffit import POS_EMBED_NAME, ScaleFactor, apply_difffit
from models.diffusion import NoiseSchedule, draw_diffusion_randomness, sincos_pos_embed_2d, timestep_embedding
from models.errors import ModelConfigError

#: size of the sinusoidal timestep features fed to the timestep MLP (as in DiT)
FREQ_DIM = 256


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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift, scale [N, D]`` broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def xavier_init(linear: nn.Linear | nn.Conv2d, gen: torch.Generator) -> None:
    """Xavier-uniform weight (over the flattened fan-in for convolutions) and zero bias (if any), drawn
    in float64 from ``gen`` so that every dtype starts from the same numbers."""
    w = linear.weight
    fan_out, fan_in = w.shape[0], w[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.copy_(torch.empty(w.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))
        if linear.bias is not None:
            linear.bias.zero_()


def _normal(w: torch.Tensor, std: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * std)


def init_modulation(linear: nn.Linear, gen: torch.Generator, zero: bool) -> None:
    """An adaLN modulation (or output) layer: all zeros with ``zero`` (adaLN-Zero, no draw from ``gen``),
    else Xavier like the other linears (plain adaLN)."""
    if zero:
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
    else:
        xavier_init(linear, gen)


class PatchEmbed(nn.Module):
    """``[N, C, H, W] -> [N, (H/p)*(W/p), D]`` by a stride-``p`` convolution, patches row-major."""

    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def reset_parameters(self, gen: torch.Generator) -> None:
        xavier_init(self.proj, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``t`` (``FREQ_DIM`` wide) through Linear-SiLU-Linear to ``dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def reset_parameters(self, gen: torch.Generator) -> None:
        for linear in (self.mlp[0], self.mlp[2]):
            _normal(linear.weight, 0.02, gen)
            with torch.no_grad():
                linear.bias.zero_()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, FREQ_DIM).to(dtype))


class LabelEmbedder(nn.Module):
    """Class label -> ``[N, dim]`` from a table of ``num_classes`` rows, plus a null row at index
    ``num_classes`` when ``with_null`` (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int, with_null: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.with_null = with_null
        self.embedding_table = nn.Embedding(num_classes + int(with_null), dim)

    def reset_parameters(self, gen: torch.Generator) -> None:
        _normal(self.embedding_table.weight, 0.02, gen)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop`` (bool ``[N]``) replaces those labels by the null class."""
        if drop is not None:
            if not self.with_null:
                raise ValueError("label dropout needs a null class: build the model with class_dropout > 0")
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention without masking (all patches see each other)."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self, gen: torch.Generator) -> None:
        xavier_init(self.qkv, gen)
        xavier_init(self.proj, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Linear - GELU(tanh) - Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def reset_parameters(self, gen: torch.Generator) -> None:
        xavier_init(self.fc1, gen)
        xavier_init(self.fc2, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A transformer block conditioned by adaLN-Zero: ``c`` gives per-sample shift, scale and gate for
    the attention and the MLP branch. With ``difffit_scale`` each branch is also multiplied by a
    DiffFit per-channel ``gamma``: ``x + gamma * gate * branch(modulate(norm(x), shift, scale))``."""

    def __init__(self, dim: int, n_head: int, mlp_hidden: int, difffit_scale: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, n_head)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.scale_attn = ScaleFactor(dim) if difffit_scale else None
        self.scale_mlp = ScaleFactor(dim) if difffit_scale else None

    def reset_parameters(self, gen: torch.Generator, adaln_zero: bool = True) -> None:
        self.attn.reset_parameters(gen)
        self.mlp.reset_parameters(gen)
        init_modulation(self.adaLN_modulation[1], gen, adaln_zero)
        for scale in (self.scale_attn, self.scale_mlp):
            if scale is not None:
                scale.reset_parameters()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + (self.scale_attn(attn) if self.scale_attn is not None else attn)
        mlp = gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x + (self.scale_mlp(mlp) if self.scale_mlp is not None else mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its ``patch * patch * out`` pixels."""

    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def reset_parameters(self, gen: torch.Generator, adaln_zero: bool = True) -> None:
        init_modulation(self.adaLN_modulation[1], gen, adaln_zero)
        init_modulation(self.linear, gen, adaln_zero)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``[N, T, p*p*C]`` (patches row-major on a square grid) -> ``[N, C, H, W]``."""
    n, t, _ = x.shape
    g = math.isqrt(t)
    x = x.reshape(n, g, g, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, g * patch, g * patch)


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
