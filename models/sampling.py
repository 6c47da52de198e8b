"""Image generation with a trained diffusion layer list, the moving average of weights it samples with,
and PNG grids of the results (rows optionally labelled).

The layer list must offer an inference path: its first layer an ``embed(x_t, t, labels, drop)`` method
returning the carry, its last layer a ``predict(carry)`` method returning ``eps_hat [N, C, H, W]``, and
the layers in between ``layer(carry, mb)`` as in training (``models.dit`` layers do; so may other
families that reuse them). The spec supplies ``schedule`` (a :class:`models.diffusion.NoiseSchedule`),
``config`` (``channels``, ``image_size``) and ``dtype``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from models.base import Layer, MicroBatch, ModelSpec

#: eta of the generalised DDIM update for each method (see :func:`sample_images`)
_ETA = {"ddim": 0.0, "ddpm": 1.0}


class WeightAverage:
    """An exponential moving average (EMA) of a layer list's parameters, the weights DiT samples with.

    Holds a deep copy of ``layers`` (buffers included; nothing in it requires grad). Update ``n``
    (0-based, one per optimizer step) sets every averaged parameter ``a`` to ``d a + (1 - d) p`` from the
    live parameter ``p``, with ``d = min(decay, (1 + n) / (10 + n))``: the usual warm-up of the decay, so
    that after a short run the average covers the last few dozen steps rather than the random
    initialisation (a run of ``k`` steps ends with ``d`` about ``1 - 9 / k`` when that is below
    ``decay``). ``decay`` 0 makes the average equal the last weights.
    """

    def __init__(self, layers: Sequence[Layer], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.layers: list[Layer] = [copy.deepcopy(layer).requires_grad_(False) for layer in layers]

    def decay_at(self, n: int) -> float:
        """The decay of update ``n`` (0-based)."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, layers: Sequence[Layer]) -> None:
        """Move the average towards ``layers`` (the same architecture as the averaged copy)."""
        live = [p for layer in layers for p in layer.parameters()]
        averaged = [p for layer in self.layers for p in layer.parameters()]
        torch._foreach_lerp_(averaged, live, 1.0 - self.decay_at(self.updates))
        self.updates += 1


def predict_noise(
    layers: Sequence[Layer],
    x_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """``eps_hat`` for noisy images ``x_t`` at timesteps ``t [N]`` and class ``labels [N]``."""
    mb = MicroBatch({"label": labels})
    carry = layers[0].embed(x_t, t, labels, drop)
    for layer in layers[1:-1]:
        carry = layer(carry, mb)
    return layers[-1].predict(carry)


def _guided_noise(
    layers: Sequence[Layer], x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float
) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + s (eps_c - eps_u)``; plain conditional prediction for s = 1."""
    if cfg_scale == 1.0:
        return predict_noise(layers, x_t, t, labels)
    n = labels.shape[0]
    drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    eps = predict_noise(layers, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, labels]), drop)
    cond, uncond = eps[:n], eps[n:]
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_images(
    layers: Sequence[Layer],
    spec: ModelSpec,
    labels: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    method: Literal["ddim", "ddpm"] = "ddim",
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Generate one image per label, ``[N, C, H, W]`` in the spec's dtype, clipped to [-1, 1].

    Runs ``steps`` denoising steps on the timesteps ``round(linspace(T - 1, 0, steps))`` of the spec's
    schedule with the generalised DDIM update (Song et al. 2021): from ``x_t`` predict
    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, clip it to [-1, 1], re-derive ``eps`` from it, and set
    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``. ``method="ddim"`` is eta 0
    (deterministic given the initial noise); ``"ddpm"`` is eta 1, ancestral sampling, which on the full
    schedule (``steps == T``) is exactly DDPM's posterior step. All noise comes from ``generator``.
    ``cfg_scale != 1`` applies classifier-free guidance, which needs a model trained with label dropout.
    """
    if method not in _ETA:
        raise ValueError(f"method must be one of {sorted(_ETA)}, got {method!r}")
    schedule, cfg, dtype = spec.schedule, spec.config, spec.dtype  # type: ignore[attr-defined]
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"steps must be in [1, {schedule.num_timesteps}], got {steps}")
    eta = _ETA[method]
    n = labels.shape[0]
    timesteps = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    x = torch.randn((n, cfg.channels, cfg.image_size, cfg.image_size), generator=generator, dtype=torch.float64)
    # a_prev after the last step is alpha_cumprod "at t = -1", i.e. 1: the final update returns x0
    alphas = torch.cat([schedule.alphas_cumprod[timesteps], torch.ones(1, dtype=torch.float64)])
    for i, t in enumerate(timesteps.tolist()):
        a_t, a_prev = alphas[i], alphas[i + 1]
        t_batch = torch.full((n,), t, dtype=torch.long)
        eps = _guided_noise(layers, x.to(dtype), t_batch, labels, cfg_scale).to(torch.float64)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x.clamp(-1.0, 1.0).to(dtype)


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    nrow: int,
    pad: int = 2,
    scale: int = 1,
    row_labels: Sequence[str] | None = None,
) -> tuple[int, int]:
    """Write images ``[N, C, H, W]`` in [-1, 1] (C = 1 or 3) as one PNG grid and return its (width, height).

    Tiles are placed row-major, ``nrow`` per row, ``ceil(N / nrow)`` rows, each enlarged ``scale`` times
    (nearest neighbour), with ``pad`` black pixels between tiles and around the border, so the image is
    ``nrow * (W * scale) + (nrow + 1) * pad`` pixels wide and likewise high. With ``row_labels`` (one per
    row) the grid gets one more column on the left, a tile wide, holding each row's label in white
    (Pillow's default font, sized to the tile). Parent folders are created."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels: got {len(row_labels)} labels for {rows} rows")
    pixels = ((images.detach().to(torch.float64).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale, w * scale
    first = 0 if row_labels is None else 1  # the label column takes the place of one tile
    canvas = np.zeros((rows * th + (rows + 1) * pad, (first + nrow) * tw + (first + nrow + 1) * pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        top, left = pad + r * (th + pad), pad + (first + q) * (tw + pad)
        canvas[top : top + th, left : left + tw] = pixels[k].permute(1, 2, 0).numpy()
    image = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    if row_labels is not None:
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=max(8, th * 3 // 4))
        white = 255 if c == 1 else (255, 255, 255)
        for r, label in enumerate(row_labels):
            centre = (pad + tw / 2, pad + r * (th + pad) + th / 2)
            draw.text(centre, label, fill=white, font=font, anchor="mm")
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    image.save(path, format="PNG")
    return image.width, image.height
