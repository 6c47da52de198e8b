"""Where a pipeline link posts its sends and receives, and how it waits for them: a dedicated CUDA stream.

On CPU (``stream`` None) :func:`post` is :func:`oobleck.engine.interrupt.post` and :func:`wait_sent` and
:func:`wait_received` are ``work.wait()``: the gloo path is unchanged.

On CUDA each link has its own stream (:func:`comm_stream`). NCCL runs an operation on its internal stream
after the stream current at posting, and ``work.wait()`` makes the current stream wait for the operation.
Posting and waiting with the link's stream current, rather than the compute stream, gives:

* a send or receive starts once the compute queued before its posting is done (the link's stream waits for
  the compute stream first): a send reads the finished carry, and a receive into a reused buffer starts only
  after the compute that read that buffer's previous microbatch, which the schedule queued before posting it;
* a received carry is waited for by the compute stream (:func:`wait_received`), exactly before its use;
* waiting for a send (:func:`wait_sent`, at the end of a step) holds up the link's stream only, so the next
  compute (gradient all-reduce, optimizer step) is not queued behind the last sends. The sent tensor is
  marked used on the link's stream (``record_stream``), so the caching allocator does not hand its memory
  to compute before the link's stream has passed that wait, even once the link drops the tensor.

Unverified: no GPU ran this (see docs/design.md, "Pipeline transfers on CUDA").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from oobleck.engine import interrupt

#: ``dist.isend`` or ``dist.irecv``
Operation = Callable[..., dist.Work]


def comm_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A new stream on ``device`` for one link's transfers if it is a CUDA device; None on CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def post(operation: Operation, tensor: torch.Tensor, peer: int, stream: torch.cuda.Stream | None) -> dist.Work:
    """Post ``operation(tensor, peer)`` through :func:`oobleck.engine.interrupt.post`; with ``stream``, on that
    stream after everything queued on the current stream, the tensor marked used by it (module notes)."""
    if stream is None:
        return interrupt.post(operation, tensor, peer)
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        work = interrupt.post(operation, tensor, peer)
    tensor.record_stream(stream)
    return work


def wait_sent(work: dist.Work, stream: torch.cuda.Stream | None) -> None:
    """Wait for a send posted by :func:`post`: on CUDA, only ``stream`` waits for it (module notes)."""
    if stream is None:
        work.wait()
        return
    with torch.cuda.stream(stream):
        work.wait()


def wait_received(work: dist.Work, stream: torch.cuda.Stream | None) -> None:
    """Wait for a receive posted by :func:`post`: on CUDA, ``stream`` waits for it (as for a send), then the
    current (compute) stream waits for ``stream``."""
    wait_sent(work, stream)
    if stream is not None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
