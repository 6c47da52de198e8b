"""The building blocks of DiT (Peebles & Xie 2023) that every patch diffusion transformer here shares
(:mod:`models.dit`, and the MoE model of :mod:`models.moe`): adaLN modulation, the DiT initialisers, patch,
timestep and label embedders, attention, the MLP, the adaLN-Zero block, the final layer and unpatchify.

Initialisation follows the DiT paper (Xavier-uniform linears with zero bias, N(0, 0.02) class table and
timestep MLP, zero adaLN modulation and zero output layer); every draw is in float64 from the generator
given, so that every dtype starts from the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.difffit import ScaleFactor
from models.diffusion import timestep_embedding

#: size of the sinusoidal timestep features fed to the timestep MLP (as in DiT)
FREQ_DIM = 256


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
