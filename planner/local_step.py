"""The step time of a local run: W workers (one per stage of every pipeline) sharing one machine's cores.

The templates' ``iteration_time`` (:mod:`planner.templates`) is the cluster's figure: every stage on a
device of its own, communication only the bytes over the links. A local run's workers are processes that
share the C cores this machine gives them, each with T intra-op threads, and each step pays costs the
layer profile does not see (:class:`StepCosts`, measured on the machine by :mod:`oobleck.engine.step_costs`).

:func:`local_step_time` plays one step out instead of bounding it, because the bounds miss by a wide
margin on a machine with fewer cores than workers: while a worker waits for its neighbour's activation or
gradient its core goes to the others, and in the pipelines' fill and drain fewer workers share the cores.

* **Ops.** Every worker runs its stage's 1F1B order (:func:`planner.schedule.one_f_one_b`). A forward of
  stage i costs ``f_i``, a backward ``b_i``, each plus ``message_s`` per p2p message it sends or receives
  (a forward receives from stage i-1 and sends to i+1; a backward the reverse), in seconds on T threads
  of otherwise idle cores: what the profile measures.
* **Dependencies.** The forward of microbatch j on stage i starts once stage i-1's forward of j has ended
  and half of that boundary's ``send_s`` (the link's share of the activation) has passed; the backward of
  j once stage i+1's backward of j has ended, plus the other half.
* **Cores (processor sharing).** At every moment the R workers whose next op can run share the cores
  the control plane leaves them (``C - busy_cores``): each runs at ``min(1, (C - busy_cores) / (T * R))``
  of its speed alone. Waiting workers use none.
* **Tail.** After the last backward, each worker's once-a-step work, the workers sharing the cores as
  above: its layers' ``update_s`` (the profile's packing of the gradients, their norm and the optimizer
  step; where the profile has none, AdamW's ``optimizer_byte_s * grad_bytes_i``) and, with more than one
  pipeline, where every layer has copies, the gradient all-reduce (``allreduce_s + allreduce_byte_s *
  grad_bytes_i * 2(P-1)/P`` among the P pipelines' copies: gloo's ring all-reduce sends and receives
  ``2(P-1)/P`` times the buffer per rank, and ``allreduce_byte_s`` is measured between two ranks, where
  that factor is 1). Then the gradient norm's all-reduce (``allreduce_s``, when the job has more than one
  rank) and the commit's round trip through the master's store (``commit_s``), once.

With :data:`NO_COSTS` (C infinite, no overheads) the local step is the slowest pipeline's 1F1B makespan
with a device per stage, which for equal stages is the templates' ``iteration_time``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from planner.schedule import one_f_one_b
from planner.templates import PipelineTemplate


@dataclass(frozen=True)
class StepCosts:
    """What a local run's step costs beyond the profile's layer times (see the module notes); measured on
    the machine by :mod:`oobleck.engine.step_costs`."""

    #: the cores the workers share (infinite: each has a device of its own)
    cores: float = math.inf
    #: intra-op threads per worker, with which the profile timed the layers
    threads: int = 1
    #: CPU seconds one p2p message at a stage boundary costs each side (every thread of the worker's process)
    message_s: float = 0.0
    #: seconds of one all-reduce among the local workers, fixed part
    allreduce_s: float = 0.0
    #: and per byte reduced
    allreduce_byte_s: float = 0.0
    #: seconds of the commit round trip through the master's store
    commit_s: float = 0.0
    #: seconds of AdamW's step per byte of gradient, with ``threads`` threads
    optimizer_byte_s: float = 0.0
    #: cores the run's other processes keep busy meanwhile (the control plane's heartbeats), off ``cores``
    busy_cores: float = 0.0


#: no costs beyond the profile: a local step is then the slowest pipeline's 1F1B makespan
NO_COSTS = StepCosts()

#: an op: (forward?, microbatch, seconds alone, what it waits for: (worker, forward?, microbatch) or None,
#: and the delay after that)
_Op = tuple[bool, int, float, "tuple[int, bool, int] | None", float]


def _worker_ops(template: PipelineTemplate, m: int, first: int, costs: StepCosts) -> list[list[_Op]]:
    """The ops of each stage of one pipeline whose stage 0 is worker ``first``."""
    k = template.num_stages
    workers = []
    for i, s in enumerate(template.stages):
        messages = ((i > 0) + (i < k - 1)) * costs.message_s
        ops: list[_Op] = []
        for op in one_f_one_b(i, k, m):
            if op.forward:
                after = (first + i - 1, True, op.microbatch) if i > 0 else None
                delay = template.stages[i - 1].send_s / 2 if i > 0 else 0.0
                ops.append((True, op.microbatch, s.forward_s + messages, after, delay))
            else:
                after = (first + i + 1, False, op.microbatch) if i < k - 1 else None
                ops.append((False, op.microbatch, s.backward_s + messages, after, s.send_s / 2))
        workers.append(ops)
    return workers


def _dedicated_makespan(workers: list[list[_Op]]) -> float:
    """:func:`_shared_makespan` when there are at least as many slots as workers, so none ever shares: each
    op starts once its worker's previous op and
    its dependency (plus the delay) have ended. Linear in the ops, for clusters with a device per worker."""
    ended: dict[tuple[int, bool, int], float] = {}
    position = [0] * len(workers)
    free = [0.0] * len(workers)
    left = sum(len(ops) for ops in workers)
    while left:
        progressed = False
        for w, ops in enumerate(workers):
            while position[w] < len(ops):
                forward, microbatch, seconds, after, delay = ops[position[w]]
                if after is not None and after not in ended:
                    break
                ready = ended[after] + delay if after is not None else 0.0
                free[w] = max(free[w], ready) + seconds
                ended[(w, forward, microbatch)] = free[w]
                position[w] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError("the ops wait on each other: not a 1F1B order")
    return max(free, default=0.0)


def _shared_makespan(workers: list[list[_Op]], slots: float) -> float:
    """When the last op ends, each worker running its ops in order once its dependency has ended, and the
    ``slots`` (cores over threads) shared evenly by the workers whose op can run (processor sharing)."""
    ended: dict[tuple[int, bool, int], float] = {}
    position = [0] * len(workers)
    left = [ops[0][2] if ops else 0.0 for ops in workers]
    now = 0.0
    pending = {w for w, ops in enumerate(workers) if ops}
    while pending:
        starts = {}
        for w in pending:
            _, _, _, after, delay = workers[w][position[w]]
            starts[w] = 0.0 if after is None else ended.get(after, math.inf) + delay
        running = [w for w in pending if starts[w] <= now]
        waking = min((starts[w] for w in pending if starts[w] > now), default=math.inf)
        if not running:
            if math.isinf(waking):
                raise ValueError("the ops wait on each other: not a 1F1B order")
            now = waking
            continue
        rate = min(1.0, slots / len(running))
        dt = min(min(left[w] for w in running) / rate, waking - now)
        now += dt
        for w in running:
            left[w] -= rate * dt
            if left[w] <= 1e-12 * max(1.0, now):
                forward, microbatch = workers[w][position[w]][:2]
                ended[(w, forward, microbatch)] = now
                position[w] += 1
                if position[w] == len(workers[w]):
                    pending.discard(w)
                else:
                    left[w] = workers[w][position[w]][2]
    return now


def local_step_time(pipelines: Sequence[tuple[PipelineTemplate, int]], costs: StepCosts) -> float:
    """Predicted step time of a local run of ``pipelines`` (template, microbatches per step), one worker per
    stage, whose steps cost ``costs`` (see the module notes)."""
    c = costs
    workers: list[list[_Op]] = []
    tail: list[list[_Op]] = []
    ranks = sum(t.num_stages for t, _ in pipelines)
    ring = 2 * (len(pipelines) - 1) / len(pipelines)  # bytes per rank of a ring all-reduce, over the two-rank figure
    for t, m in pipelines:
        if m < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {m}")
        workers += _worker_ops(t, m, len(workers), c)
        for s in t.stages:
            update = s.update_s or c.optimizer_byte_s * s.grad_bytes
            sync = c.allreduce_s + c.allreduce_byte_s * s.grad_bytes * ring if ring else 0.0
            tail.append([(False, 0, update + sync, None, 0.0)])
    if not 0 <= c.busy_cores < c.cores:
        raise ValueError(f"busy_cores must be in [0, cores), got {c.busy_cores} of {c.cores}")
    slots = (c.cores - c.busy_cores) / c.threads

    def makespan(ops: list[list[_Op]]) -> float:
        return _dedicated_makespan(ops) if slots >= len(ops) else _shared_makespan(ops, slots)

    norm = c.allreduce_s if ranks > 1 else 0.0
    return makespan(workers) + makespan(tail) + norm + c.commit_s
