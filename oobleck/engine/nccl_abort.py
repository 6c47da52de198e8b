"""Free a worker blocked inside an NCCL operation of an ended generation: abort the generation's communicators.

This is the NCCL counterpart of :mod:`oobleck.engine.release` (shutting down gloo's sockets). An NCCL
operation runs as a kernel that waits for its peers on the GPU; a dead or departed peer leaves it spinning,
and the worker with it, wherever it next synchronises with the device. ``ncclCommAbort`` (torch's
``ProcessGroupNCCL.abort``) stops that kernel and makes the pending work fail, from any thread. The
generation watch (:class:`oobleck.engine.elastic.GenerationWatch`) calls :func:`abort_nccl_communicators`
when the master ends a generation whose backend is ``nccl``; a gloo generation never comes here.

Which groups are the generation's? Every group this process holds: the previous generation's were destroyed
before this one was joined (``oobleck.engine.elastic._leave_group``), so the default group and the gradient
groups of :class:`oobleck.engine.gradsync.GradSync` are all there is. A group created after the end gets no
communicator: NCCL creates one at a group's first operation, and :func:`oobleck.engine.interrupt.post`
refuses every operation from the end on. The watch only aborts; torch's bookkeeping of the groups is left
to the worker's own thread, which destroys them when it leaves the generation (changing it from the watch's
thread would race with that thread's use of it).

Unverified: this build has no NCCL, and one GPU cannot host several NCCL ranks; only the selection (gloo
groups are never touched, a group without a CUDA backend is skipped) is tested (tests/test_cuda_path.py).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend

_CUDA = torch.device("cuda")


def nccl_backends(groups: Iterable[dist.ProcessGroup]) -> list[Backend]:
    """The NCCL backends of ``groups``: for each group, the backend that carries its CUDA tensors, if that
    backend is NCCL. A gloo group (gloo serves CUDA tensors too) and a group with no CUDA backend
    (``cpu:gloo``) give none."""
    found = []
    for group in groups:
        try:
            backend = group._get_backend(_CUDA)
        except RuntimeError:  # no backend for CUDA tensors in this group
            continue
        if backend.name() == "nccl":
            found.append(backend)
    return found


def abort_nccl_communicators(groups: Iterable[dist.ProcessGroup] | None = None) -> int:
    """Abort the NCCL communicators of ``groups`` (None: every process group this process holds) and
    return how many were aborted; any operation pending on them fails rather than waiting for its peers.
    The aborted groups cannot be used again: their owner must destroy them. Callable from any thread.
    The aborts run inside one NCCL group call, as torch's own ``_abort_process_group`` does, so that an
    abort does not wait on another communicator's kernel (pytorch/pytorch#119797)."""
    if groups is None:
        groups = list(dist.distributed_c10d._world.pg_map)  # a copy: the owner's thread may add groups
    backends = nccl_backends(groups)
    if not backends:
        return 0
    backends[0]._group_start()  # type: ignore[attr-defined]  # ProcessGroupNCCL's own
    try:
        for backend in backends:
            backend.abort()
    finally:
        backends[0]._group_end()  # type: ignore[attr-defined]
    return len(backends)
