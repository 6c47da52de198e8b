"""Activation recomputation of a layer: the one place where the engine and the reference trainer wrap a
layer in :func:`torch.utils.checkpoint.checkpoint`.

Granularity: one layer. A recomputed layer keeps only its input carry from its forward pass to its
backward pass; in backward its forward runs again, and only that one layer's activations of one microbatch
are alive at a time. Wrapping a whole stage instead would keep only the stage's input, but then the
recomputation would rebuild every activation of the stage at once, so the peak would hardly drop for the
stages the planner wants it on (the long ones). Per layer is also what the planner's memory model assumes
(:mod:`planner.templates`: the bytes kept per microbatch are each layer's input).

Exactness: ``use_reentrant=False`` with ``preserve_rng_state=True`` restores the CPU (and CUDA) generator
state of the original forward before recomputing, so anything a layer draws from the global generator
(dropout masks) is drawn again identically; draws from the layers' own generators, seeded by (seed, step,
sample), are functions of their seeds anyway. Every operation is deterministic on CPU, so the recomputed
saved tensors are bitwise the original ones and so are the gradients. An auxiliary loss a layer appends
to ``mb.aux_losses`` is appended again by the recomputation; callers read the list right after the
forward pass, before any backward, so the extra entry is never used.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from models.base import Carry, Layer, MicroBatch, carry_tensors


def run_layer(layer: Layer, carry: Carry | None, mb: MicroBatch, recompute: bool) -> Carry:
    """``layer(carry, mb)``, recomputed in backward when ``recompute`` is set (see the module notes).

    The carry's tensors are passed to the checkpoint one by one, so that checkpoint saves each of them
    through autograd (saved-tensor hooks see them: :mod:`oobleck.engine.memory` counts them) rather than
    holding a tuple by reference."""
    if not recompute or not torch.is_grad_enabled():
        return layer(carry, mb)
    packed = isinstance(carry, tuple)
    tensors = carry_tensors(carry)

    def forward(*received: torch.Tensor) -> Carry:
        again: Carry | None = tuple(received) if packed else (received[0] if received else None)
        return layer(again, mb)

    return checkpoint(forward, *tensors, use_reentrant=False, preserve_rng_state=True)

