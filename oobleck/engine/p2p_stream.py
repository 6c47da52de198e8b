"""Where a pipeline link posts its sends and receives, and how it waits for them: a dedicated CUDA stream.

On CPU (``stream`` None) :func:`post` is :func:`oobleck.engine.interrupt.post`, and sends
(:func:`wait_all_sent`) and receives (:class:`Receives`) are waited for on a thread of their own
(:class:`oobleck.engine.interrupt.Aside`), so that a transfer the generation's end did not release is
abandoned rather than waited out. Gloo leaves exactly those unreleased: a send whose bytes are partly
written (its peer stopped reading) and a receive whose bytes are partly read (its peer died mid-send) are
not told of their pair's error, and wait out the group's timeout (:mod:`oobleck.engine.interrupt`).

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

:class:`Receives` also tells, without blocking, whether a receive has completed (for the Bamboo-style
baseline, which fills the time a stage waits for one with redundant work). On CUDA an NCCL work says so
itself. Gloo's receive handle does not: ``is_completed()`` stays False until ``wait()`` has returned (checked
on torch 2.13) and it has no future; the thread that waits for a receive on CPU tells instead: the receive
has completed once that thread has finished. The thread starts when the receive is posted, not when it is
needed: one started by the test itself has usually not run yet when the test looks, so a receive already
complete would read as pending; and one started at the wait puts a thread hop on the critical path (the
tiny GPT with four workers on two cores lost 7-15% of its throughput that way, against about 3%, within
the runs' noise, when started at the posting). The shutdown that releases a blocked receive at a
generation's end releases that thread as well, and its error is raised where the receive is waited for.
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


def wait_sent(work: dist.Work, stream: torch.cuda.Stream) -> None:
    """Wait for a send posted by :func:`post` on CUDA: only ``stream`` waits for it (module notes)."""
    with torch.cuda.stream(stream):
        work.wait()


def wait_all_sent(works: list[dist.Work], stream: torch.cuda.Stream | None) -> None:
    """Wait for sends posted by :func:`post`: on CPU on a thread of their own, so that a send the generation's
    end did not release is abandoned (:class:`oobleck.engine.interrupt.Aside`); on CUDA as :func:`wait_sent`."""
    if stream is None:
        interrupt.Aside(works).wait()
        return
    for work in works:
        wait_sent(work, stream)


def wait_received(work: dist.Work, stream: torch.cuda.Stream) -> None:
    """Wait for a receive posted by :func:`post` on CUDA: ``stream`` waits for it (as for a send), then the
    current (compute) stream waits for ``stream``."""
    wait_sent(work, stream)
    torch.cuda.current_stream(stream.device).wait_stream(stream)


class Receives:
    """The receives of one message (one or more tensors from one peer), posted by :func:`post` on ``stream``
    (None on CPU), to be waited for once with :meth:`wait`."""

    def __init__(self, works: list[dist.Work], stream: torch.cuda.Stream | None) -> None:
        self._works = works
        self._stream = stream
        #: CPU only: the thread waiting for the works, started now (module notes)
        self._aside = interrupt.Aside(works) if stream is None else None

    def ready(self) -> bool:
        """Whether every receive has completed, without blocking. A failed receive counts as completed;
        :meth:`wait` raises its error."""
        if self._aside is None:
            return all(work.is_completed() for work in self._works)
        return self._aside.finished()

    def wait(self) -> None:
        """Wait for every receive: on CUDA as :func:`wait_received` does; on CPU through its thread
        (:meth:`oobleck.engine.interrupt.Aside.wait`), raising the error a receive failed with, or
        :class:`~oobleck.engine.interrupt.GenerationEnded` once the generation has ended."""
        if self._aside is not None:
            self._aside.wait()
            return
        assert self._stream is not None
        for work in self._works:
            wait_received(work, self._stream)
