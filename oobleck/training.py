"""Optimizer, learning-rate schedule and gradient clipping shared by every trainer.

The single-process reference trainer (:mod:`oobleck.train_local`) and the pipeline engine both build
their optimizers, learning rates and clipping from this module, so that a distributed run reproduces the
reference run's numbers.

One optimizer per layer
    :func:`make_optimizer` returns AdamW with ``foreach=False``: every parameter is updated on its own,
    from its own gradient and its own two moments. The only thing an update shares with the other
    parameters is the step's learning rate, set from outside by :func:`set_lr`. So one optimizer per
    layer produces exactly the same parameters as one optimizer over the whole model, which lets the
    engine keep one optimizer per layer and move a layer (with its optimizer state) between workers.

Weight decay
    Two parameter groups, always both present (possibly empty) and always in this order, so every
    optimizer's ``state_dict()`` has the same shape: group 0 holds parameters with ``dim >= 2``
    (matrices, embedding tables) and gets ``cfg.weight_decay``; group 1 holds biases, norm weights and
    other vectors or scalars (e.g. DiffFit's per-block scale factors) and gets no decay. Parameters with
    ``requires_grad=False`` (DiffFit's frozen weights) are left out and get no optimizer state.

Clipping
    The global gradient norm is the 2-norm over all trainable parameters, each logical parameter counted
    once (a tied group once, a layer held by several pipelines once). :func:`grad_square_sum` gives one
    layer's share; the trainer adds the shares, takes the square root, and multiplies every gradient by
    :func:`clip_coefficient`.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable

import torch
from torch import nn

from models.base import Layer
from oobleck.config import DType, TrainingConfig
from oobleck.errors import ConfigError

#: config dtype names -> torch dtypes: the names :data:`oobleck.config.DType` allows, each torch's dtype of that name
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in typing.get_args(DType)}

#: the denominator guard torch.nn.utils.clip_grad_norm_ uses
CLIP_EPS = 1e-6


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name (a key of :data:`DTYPES`); ConfigError naming ``model.dtype``
    and the allowed names for any other."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype: got {name!r}; allowed: {', '.join(DTYPES)}") from None


def make_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``named_params`` (see the module notes for the groups).

    The learning rate starts at ``lr_at(0, cfg)``; trainers call :func:`set_lr` before every step.
    A parameter listed twice (a tied weight seen under two names) is included once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr_at(0, cfg),
        betas=tuple(cfg.betas),
        eps=1e-8,
        foreach=False,
    )


def layer_optimizers(layers: list[Layer], cfg: TrainingConfig) -> list[torch.optim.AdamW]:
    """One AdamW per layer. A Parameter that several layers share (a tied group under ``build_all``)
    belongs to the first layer holding it; later layers' optimizers leave it out, so it steps once."""
    owned: set[int] = set()
    optimizers = []
    for layer in layers:
        named = [(name, p) for name, p in layer.named_parameters() if id(p) not in owned]
        owned.update(id(p) for _, p in named)
        optimizers.append(make_optimizer(named, cfg))
    return optimizers


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """The learning rate of step ``step`` (0-based).

    Warm-up: steps ``0 .. warmup_steps - 1`` rise linearly, ``lr * (step + 1) / warmup_steps``, so the last
    warm-up step reaches ``lr``. After warm-up, with ``t = (step - warmup_steps) / (steps - warmup_steps)``
    clamped to [0, 1]: ``constant`` keeps ``lr``; ``cosine`` gives
    ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2``; ``linear`` gives ``lr - (lr - min_lr) * t``.
    Steps at or past ``steps`` get ``min_lr`` under cosine and linear decay.
    """
    if step < 0:
        raise ValueError(f"step must be at least 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * t
    raise ConfigError(f"training.lr_schedule: got {cfg.lr_schedule!r}; allowed: constant, cosine, linear")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """The factor to multiply every gradient by: 1.0 when clipping is off (``max_norm`` None) or the norm is
    within the limit, else ``max_norm / (total_norm + 1e-6)`` (what ``torch.nn.utils.clip_grad_norm_``
    applies). A NaN norm gives a NaN coefficient (as in torch), so a diverged step is not hidden."""
    if max_norm is None:
        return 1.0
    coefficient = max_norm / (total_norm + CLIP_EPS)
    return coefficient if coefficient < 1.0 or math.isnan(coefficient) else 1.0


def grad_square_sum(params: Iterable[nn.Parameter]) -> float:
    """Sum of squared gradient entries of ``params``, accumulated in float64; each distinct Parameter once,
    parameters without a gradient skipped. The global norm is the square root of the sum of these over
    every logical parameter."""
    total = 0.0
    seen: set[int] = set()
    for p in params:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        total += float(p.grad.detach().double().square().sum())
    return total


def scale_grads(params: Iterable[nn.Parameter], coefficient: float) -> None:
    """Multiply every gradient by ``coefficient`` in place (each distinct Parameter once; no-op at 1.0)."""
    if coefficient == 1.0:
        return
    seen: set[int] = set()
    for p in params:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        p.grad.mul_(coefficient)
