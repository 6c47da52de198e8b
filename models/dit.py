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

Initialisation follows the DiT paper (Xavier-uniform linears with zero bias, N(0, 0.02) class table and
timestep MLP, zero adaLN modulation and zero output layer), drawn from ``layer_generator(seed, i)``.
``adaln_zero=False`` draws the modulation and output layers like the other linears instead (the paper's
plain adaLN ablation; it also makes every gradient non-zero at initialisation).

With ``difffit=True`` the first ``n_layer // 2`` blocks get DiffFit scale factors on both residual
branches and every layer is frozen except what :func:`models.difffit.difffit_trainable_names` lists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec, layer_generator
from models.difffit import POS_EMBED_NAME, ScaleFactor, apply_difffit
from models.diffusion import NoiseSchedule, draw_diffusion_randomness, sincos_pos_embed_2d, timestep_embedding
from oobleck.errors import ConfigError

#: size of the sinusoidal timestep features fed to the timestep MLP (as in DiT)
FREQ_DIM = 256


@dataclass(frozen=True)
class DiTConfig:
    image_size: int
    channels: int
    patch: int
    d_model: int
    n_layer: int
    n_head: int
    num_classes: int
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
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def out_channels(self) -> int:
        return self.channels * 2 if self.learn_sigma else self.channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.d_model * self.mlp_ratio)


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


def _xavier(linear: nn.Linear | nn.Conv2d, gen: torch.Generator) -> None:
    """Xavier-uniform weight (over the flattened fan-in for convolutions) and zero bias."""
    w = linear.weight
    fan_out, fan_in = w.shape[0], w[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.copy_(torch.empty(w.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))
        linear.bias.zero_()


def _normal(w: torch.Tensor, std: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * std)


def _init_modulation(linear: nn.Linear, gen: torch.Generator, zero: bool) -> None:
    if zero:
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
    else:
        _xavier(linear, gen)


class PatchEmbed(nn.Module):
    """``[N, C, H, W] -> [N, (H/p)*(W/p), D]`` by a stride-``p`` convolution, patches row-major."""

    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def reset_parameters(self, gen: torch.Generator) -> None:
        _xavier(self.proj, gen)

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
        _xavier(self.qkv, gen)
        _xavier(self.proj, gen)

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
        _xavier(self.fc1, gen)
        _xavier(self.fc2, gen)

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
        _init_modulation(self.adaLN_modulation[1], gen, adaln_zero)
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
        _init_modulation(self.adaLN_modulation[1], gen, adaln_zero)
        _init_modulation(self.linear, gen, adaln_zero)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``[N, T, p*p*C]`` (patches row-major on a square grid) -> ``[N, C, H, W]``."""
    n, t, _ = x.shape
    g = math.isqrt(t)
    x = x.reshape(n, g, g, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, g * patch, g * patch)


class DiTStem(Layer):
    """Layer 0: noising, patch embedding, positions and the condition ``c = t_emb + y_emb``."""

    def __init__(self, config: DiTConfig, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule
        d = config.d_model
        self.x_embedder = PatchEmbed(config.channels, config.patch, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, with_null=config.class_dropout > 0)
        table = torch.zeros(config.tokens, d)
        if config.learn_pos:
            self.register_parameter(POS_EMBED_NAME, nn.Parameter(table))
        else:  # a pure function of the config: recomputed by every build, never checkpointed
            self.register_buffer(POS_EMBED_NAME, table, persistent=False)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.x_embedder.reset_parameters(gen)
        self.t_embedder.reset_parameters(gen)
        self.y_embedder.reset_parameters(gen)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.d_model, self.config.grid, self.config.grid))

    def embed(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, c)`` for noisy images ``x_t [N, C, H, W]`` at timesteps ``t [N]`` (the inference path)."""
        h = self.x_embedder(x_t.to(self.pos_embed.dtype)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(labels, drop)
        return h, c

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        dtype = self.pos_embed.dtype
        x_t = self.schedule.q_sample(mb.data["image"].to(dtype), mb.data["t"], mb.data["noise"].to(dtype))
        return self.embed(x_t, mb.data["t"], mb.data["label"], mb.data.get("drop_label"))


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
    """Last layer: final adaLN layer, unpatchify, and the summed epsilon-prediction loss."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.final = FinalLayer(config.d_model, config.patch, config.out_channels)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.final.reset_parameters(gen, self.config.adaln_zero)

    def predict(self, carry: Carry) -> torch.Tensor:
        """``eps_hat [N, C, H, W]``: the noise prediction (the variance channels are dropped)."""
        h, c = carry
        out = unpatchify(self.final(h, c), self.config.patch, self.config.out_channels)
        return out[:, : self.config.channels]

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        eps_hat = self.predict(carry)
        noise = mb.data["noise"].to(eps_hat.dtype)
        return ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)).sum()


def _check_config(c: DiTConfig) -> None:
    """One-line ConfigErrors for shapes the model cannot take."""
    positive = ("image_size", "channels", "patch", "d_model", "n_layer", "n_head", "num_classes", "num_timesteps")
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"model.overrides.{name}: got {getattr(c, name)}; must be >= 1")
    if c.image_size % c.patch:
        raise ConfigError(f"model.overrides.patch: got {c.patch}; must divide image_size {c.image_size}")
    if c.d_model % c.n_head:
        raise ConfigError(f"model.overrides.n_head: got {c.n_head}; must divide d_model {c.d_model}")
    if c.d_model % 4:
        raise ConfigError(f"model.overrides.d_model: got {c.d_model}; must be a multiple of 4 (2-D sin-cos positions)")
    if not 0.0 <= c.class_dropout < 1.0:
        raise ConfigError(f"model.overrides.class_dropout: got {c.class_dropout}; must be in [0, 1)")


class DiTSpec(ModelSpec):
    """A DiT as ``n_layer + 2`` independently buildable layers (see the module docstring)."""

    def __init__(
        self, config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32, difffit: bool = False
    ) -> None:
        _check_config(config)
        self.config = config
        self.seed = seed
        self.dtype = dtype
        self.difffit = difffit
        self.schedule = NoiseSchedule(config.num_timesteps)

    @property
    def num_layers(self) -> int:
        return self.config.n_layer + 2

    def _construct(self, index: int) -> Layer:
        """Layer ``index`` on the meta device (shapes only, no memory, no random draws)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        with torch.device("meta"):
            if index == 0:
                layer: Layer = DiTStem(self.config, self.schedule)
            elif index == self.num_layers - 1:
                layer = DiTHead(self.config)
            else:  # DiffFit scales the first half of the blocks
                layer = DiTBlockLayer(self.config, difffit_scale=self.difffit and index - 1 < self.config.n_layer // 2)
        layer = layer.to(self.dtype)
        if self.difffit:
            apply_difffit(layer)
        return layer

    def build_layer(self, index: int) -> Layer:
        layer = self._construct(index).to_empty(device="cpu")
        layer.reset_parameters(layer_generator(self.seed, index))
        return layer

    def layer_meta(self, index: int) -> LayerMeta:
        """Parameter counts (from a meta-device build) and forward FLOPs of one sample.

        FLOPs count a multiply-add as 2, with ``T`` tokens, width ``D``, MLP width ``M``: the stem costs
        the patch convolution ``2 T C p^2 D`` plus the timestep MLP ``2 (256 D + D^2)``; a block costs
        ``T (8 D^2 + 4 D M)`` for its linears, ``4 T^2 D`` for ``QK^T`` and ``AV``, and ``12 D^2`` for its
        modulation; the head ``2 T D p^2 C_out + 4 D^2``. Stem and blocks send ``(h, c)``, ``T D + D``
        elements; the head's output is the loss, which crosses no boundary (0)."""
        layer = self._construct(index)
        params = sum(p.numel() for p in layer.parameters())
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        c = self.config
        t, d, carry = c.tokens, c.d_model, c.tokens * c.d_model + c.d_model
        if index == 0:
            name, out = "stem", carry
            flops = 2.0 * t * c.channels * c.patch**2 * d + 2.0 * (FREQ_DIM * d + d * d)
        elif index == self.num_layers - 1:
            name, out = "head", 0
            flops = 2.0 * t * d * c.patch**2 * c.out_channels + 4.0 * d * d
        else:
            name, out = f"block{index - 1}", carry
            flops = t * (8.0 * d * d + 4.0 * d * c.mlp_hidden) + 4.0 * t * t * d + 12.0 * d * d
        return LayerMeta(name, params, trainable, flops, out)

    def loss_units(self, mb: MicroBatch) -> int:
        """The number of samples in ``mb`` (the loss sums per-sample mean squared errors)."""
        return mb.size

    def sample_randomness(self, sample: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return draw_diffusion_randomness(sample, gen, self.schedule, label_dropout=self.config.class_dropout)

    def fingerprint(self) -> dict:
        return {
            "family": "dit",
            **dataclasses.asdict(self.config),
            "difffit": self.difffit,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
