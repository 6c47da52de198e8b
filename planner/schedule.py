"""The 1F1B order of one pipeline stage.

Stage ``s`` of ``S`` runs ``w = min(S - s - 1, m)`` warm-up forwards, then alternates one forward and one
backward until all ``m`` forwards are done, then drains the remaining backwards. So at most
``min(S - s, m)`` microbatches are in flight on the stage (forwarded, not yet backwarded), which bounds the
activations it keeps, and every stage's sends are consumed in the order its neighbour expects them.
"""

from __future__ import annotations

from typing import NamedTuple


class Op(NamedTuple):
    forward: bool
    microbatch: int


def one_f_one_b(stage: int, num_stages: int, num_microbatches: int) -> list[Op]:
    """The ops of ``stage`` (0-based) in a pipeline of ``num_stages`` running ``num_microbatches``
    microbatches (indices local to the pipeline, 0-based), in execution order."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range [0, {num_stages})")
    if num_microbatches < 1:
        raise ValueError(f"a pipeline needs at least one microbatch, got {num_microbatches}")
    warmup = min(num_stages - stage - 1, num_microbatches)
    ops = [Op(True, k) for k in range(warmup)]
    for j in range(num_microbatches - warmup):
        ops += [Op(True, warmup + j), Op(False, j)]
    ops += [Op(False, j) for j in range(num_microbatches - warmup, num_microbatches)]
    return ops


def max_in_flight(stage: int, num_stages: int, num_microbatches: int) -> int:
    """The most microbatches ``stage`` holds activations for at once under :func:`one_f_one_b`."""
    return min(num_stages - stage, num_microbatches)
