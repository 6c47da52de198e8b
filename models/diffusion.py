"""The DDPM noise schedule, per-sample diffusion randomness and the sinusoidal embeddings.

Shared by the diffusion models (``models.dit``, ``models.moe``) and by ``models.sampling``. Nothing
here holds learnable state.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """DDPM's linear beta schedule (Ho et al. 2020): ``betas`` rise linearly from ``beta_start`` to
    ``beta_end`` over ``num_timesteps`` steps; ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``.

    Both tables are float64 so that every dtype of model sees the same coefficients, rounded once.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * noise``.

        ``x0`` and ``noise`` are ``[N, ...]`` and ``t`` is ``[N]`` (or a 0-dim tensor for a single
        unbatched sample); the result has ``x0``'s dtype."""
        a = self.alphas_cumprod[t.long()]
        shape = a.shape + (1,) * (x0.dim() - a.dim())
        signal = a.sqrt().to(x0.dtype).reshape(shape)
        noise_scale = (1.0 - a).sqrt().to(x0.dtype).reshape(shape)
        return signal * x0 + noise_scale * noise.to(x0.dtype)


def draw_diffusion_randomness(
    sample: dict[str, torch.Tensor],
    gen: torch.Generator,
    schedule: NoiseSchedule,
    label_dropout: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The random inputs of one training sample, drawn only from ``gen`` in a fixed order:

    * ``"t"``: LongTensor[] uniform in ``[0, schedule.num_timesteps)``;
    * ``"noise"``: standard normal, shaped and typed like ``sample["image"]``;
    * ``"drop_label"`` (only when ``label_dropout > 0``): BoolTensor[], true with probability
      ``label_dropout``; the model then uses its null class (classifier-free guidance training).

    ``drop_label`` is drawn last, so ``t`` and ``noise`` do not depend on ``label_dropout``."""
    image = sample["image"]
    out = {
        "t": torch.randint(0, schedule.num_timesteps, (), generator=gen, dtype=torch.long),
        "noise": torch.randn(image.shape, generator=gen, dtype=image.dtype),
    }
    if label_dropout > 0:
        out["drop_label"] = torch.rand((), generator=gen, dtype=torch.float64) < label_dropout
    return out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DiT/ADM: ``[cos(t f_k), sin(t f_k)]``
    with ``f_k = max_period ** (-k / (dim // 2))`` for ``k < dim // 2``, zero-padded to ``dim`` if odd.

    ``t`` is ``[N]``; the result is float64 ``[N, dim]`` (callers cast to their dtype)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[len(positions), dim]``: ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000 ** (-k / (dim // 2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The fixed 2-D sin-cos position table of MAE/DiT, float64 ``[grid_h * grid_w, dim]``, row-major
    over patches (index ``i * grid_w + j`` is row ``i``, column ``j``). The first half of the channels
    encodes the column, the second half the row. ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
