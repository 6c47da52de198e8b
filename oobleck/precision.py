"""Mixed precision (``training.precision``): where computation runs in 16 bits, and fp16's loss scale.

``fp32`` changes nothing: layers compute in ``model.dtype`` and no cast or scale is applied anywhere.
``bf16`` and ``fp16`` follow the torch.amp recipe: parameters, their gradients and the AdamW state stay
float32, and every layer's forward runs under ``torch.amp.autocast`` of that compute dtype on the worker's
device type (``cpu`` or ``cuda``). On CPU, torch 2.13's autocast supports both bfloat16 and float16 with the
same op lists: matrix products (linear, matmul, bmm, convolutions) run in the compute dtype, a few ops
(cross_entropy and other losses) in float32, and the rest (layer_norm, softmax, gelu included) in their
input's dtype. On CUDA, autocast's own lists apply (softmax and layer_norm in float32).

Casts at every layer boundary
    After every layer except the model's last (which returns the loss), the floating-point tensors of the
    carry are cast to the compute dtype (:func:`cast_carry`). A pipeline's stage boundaries are layer
    boundaries, so what crosses them is already in 16 bits (half the bytes of float32), and autograd sends
    the gradients of those tensors back in 16 bits too. Casting at *every* boundary, not only at the cuts,
    makes the numbers independent of where a plan cuts the model: ``oobleck train-local`` (one process,
    every layer) computes exactly the same forward and backward values as any pipeline, layer by layer.

Loss scaling (fp16 only)
    :class:`LossScale` has torch.amp.GradScaler's rule and defaults: the loss is multiplied by the scale
    before backward (start 2**16); a step whose gradients hold an inf or NaN is skipped and halves the
    scale; 2000 applied steps in a row double it. GradScaler itself is not used: its
    found-inf is per process, while here the decision must be the job's. The engine derives it from the
    global gradient norm, which one world all-reduce already computes (:mod:`oobleck.engine.worker`): a
    non-finite gradient anywhere makes that norm non-finite on every rank, so every rank skips or applies
    the same step and updates the same scale. The scale is a power of two, kept as its exponent, so
    unscaling (a multiply by ``2**-log2``) is exact. bf16 has float32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ContextManager

import torch

from models.base import Carry, Layer, MicroBatch
from oobleck.config import Precision
from oobleck.recompute import run_layer

#: the compute dtype of each mixed precision
COMPUTE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype autocast computes in and carries travel in; None for fp32 (no autocast, no casts)."""
    return COMPUTE_DTYPES.get(precision)


def autocast(precision: Precision, device: torch.device) -> ContextManager[object]:
    """``torch.amp.autocast`` to the compute dtype on ``device``'s type; a no-op context for fp32."""
    dtype = compute_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device.type, dtype=dtype)


def cast_carry(carry: Carry, dtype: torch.dtype) -> Carry:
    """``carry`` with every floating-point tensor cast to ``dtype`` (integer tensors, e.g. token ids, as they
    are). The cast is differentiable: the gradient flowing back through it is in ``dtype`` as well."""
    if isinstance(carry, tuple):
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in carry)
    return carry.to(dtype) if carry.is_floating_point() else carry


def forward_layers(
    layers: list[Layer],
    carry: Carry | None,
    mb: MicroBatch,
    precision: Precision,
    device: torch.device,
    ends_model: bool,
    recompute: bool = False,
) -> Carry:
    """Run ``layers`` in order on ``carry`` under :func:`autocast`, each through
    :func:`oobleck.recompute.run_layer` (recomputed in backward when ``recompute`` is set; the checkpoint
    re-enters the same autocast state for the recomputation). In bf16 and fp16, each layer's output is cast
    to the compute dtype (:func:`cast_carry`) unless it is the model's last layer's (``ends_model`` and the
    last of ``layers``); in fp32 the layers just run, as without this function."""
    dtype = compute_dtype(precision)
    with autocast(precision, device):
        for j, layer in enumerate(layers):
            carry = run_layer(layer, carry, mb, recompute)
            if dtype is not None and not (ends_model and j == len(layers) - 1):
                carry = cast_carry(carry, dtype)
    assert carry is not None
    return carry


@dataclass(frozen=True)
class LossScale:
    """fp16's dynamic loss scale ``2**log2`` and the applied steps since it last changed (see the module
    notes); other precisions keep ``LossScale(0)`` (a scale of 1) for good. It travels with every layer's
    state (:class:`oobleck.engine.stage.HeldLayer`), so a worker that receives layers in a recovery, or
    loads them from a checkpoint, continues with the job's scale."""

    log2: int = 0
    good_steps: int = 0

    @property
    def value(self) -> float:
        return math.ldexp(1.0, self.log2)

    def encode(self) -> list[int]:
        """``[log2, good_steps]``: how checkpoints and layer transfers carry it."""
        return [self.log2, self.good_steps]

    @classmethod
    def decode(cls, values: list[int]) -> "LossScale":
        log2, good_steps = (int(v) for v in values)
        return cls(log2, good_steps)

    def after(self, overflow: bool) -> "LossScale":
        """The scale for the next step: halved after an overflow, doubled after ``growth_interval`` applied
        steps in a row without one (torch.amp.GradScaler.update's rule, growth 2, backoff 0.5)."""
        if overflow:
            return LossScale(self.log2 - 1, 0)
        if self.good_steps + 1 >= GROWTH_INTERVAL:
            return LossScale(self.log2 + 1, 0)
        return LossScale(self.log2, self.good_steps + 1)


#: GradScaler's initial scale, 2**16, and its growth interval
INITIAL_FP16_LOG2 = 16
GROWTH_INTERVAL = 2000


def initial_scale(precision: Precision) -> LossScale:
    """The loss scale a run starts with: 2**16 for fp16, 1 otherwise."""
    return LossScale(INITIAL_FP16_LOG2 if precision == "fp16" else 0)


def skips_overflow(precision: Precision) -> bool:
    """Whether a step with a non-finite gradient norm is skipped (fp16), rather than applied as computed
    (fp32 and bf16: a diverged step is not hidden)."""
    return precision == "fp16"
