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

:class:`Receives` also tells, without blocking, whether a receive has completed (for the Bamboo-style
baseline, which fills the time a stage waits for one with redundant work). On CUDA an NCCL work says so
itself. Gloo's receive handle does not: ``is_completed()`` stays False until ``wait()`` has returned (checked
on torch 2.13) and it has no future; so on CPU a thread waits for the receive (:meth:`Receives.watch`), and
the receive has completed once that thread has finished. The thread is best started when the receive is
posted: one started by the test itself has usually not run yet when the test looks, so a receive already
complete would read as pending. The shutdown that releases a blocked receive at a generation's end
(:mod:`oobleck.engine.interrupt`) releases that thread as well, and its error is raised where the receive is
waited for.
"""

from __future__ import annotations

import _thread
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


class Receives:
    """The receives of one message (one or more tensors from one peer), posted by :func:`post` on ``stream``
    (None on CPU), to be waited for once with :meth:`wait`."""

    def __init__(self, works: list[dist.Work], stream: torch.cuda.Stream | None) -> None:
        self._works = works
        self._stream = stream
        #: CPU only, once :meth:`watch`ed: held until the thread waiting for the works has finished
        self._done: _thread.LockType | None = None
        self._error: BaseException | None = None

    def watch(self) -> None:
        """Make :meth:`ready` able to tell: on CPU, start the thread that waits for the receives (once; module
        notes); on CUDA nothing is needed."""
        if self._stream is None and self._done is None:
            self._done = _thread.allocate_lock()
            self._done.acquire()
            # _thread, not threading: Thread.start() waits until the new thread runs, a hand-shake that doubled
            # a watched receive's cost (about 60 us against 30 us more than a plain wait, gloo ping-pong)
            _thread.start_new_thread(self._wait_in_thread, (self._done,))

    def ready(self) -> bool:
        """Whether every receive has completed, without blocking (:meth:`watch`es them if not yet). A failed
        receive counts as completed; :meth:`wait` raises its error."""
        if self._stream is not None:
            return all(work.is_completed() for work in self._works)
        self.watch()
        assert self._done is not None
        return not self._done.locked()

    def _wait_in_thread(self, done: _thread.LockType) -> None:
        try:
            for work in self._works:
                work.wait()
        except BaseException as e:  # re-raised by wait(), in the thread that needs the data
            self._error = e
        finally:
            done.release()

    def wait(self) -> None:
        """Wait for every receive as :func:`wait_received` does; once :meth:`watch`ed (CPU), for its thread,
        raising the error a receive failed with."""
        if self._done is None:
            for work in self._works:
                wait_received(work, self._stream)
            return
        self._done.acquire()
        if self._error is not None:
            raise self._error
