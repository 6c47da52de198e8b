"""Leave an ended generation's communication promptly: refuse new operations, and stop waiting on collectives.

The generation watch (:class:`oobleck.engine.elastic.GenerationWatch`) releases operations blocked at the
generation's end by shutting down its sockets. Two gaps remain, and this module closes both:

* An operation a worker *posts* on a socket already shut down may be queued by gloo and never completed,
  so the worker would wait out the collective timeout (measured: a send posted ~20 ms after the shutdown
  waited 120 s). The engine therefore posts every operation through :func:`post`, and the watch sets its
  event through :func:`end` before it shuts anything down: both hold one lock, so an operation is either
  posted before the shutdown (and released by it) or refused. (Checking the event just before posting,
  without the lock, left a window: a worker that had checked was preempted, the watch set the event and
  shut the sockets down, and the worker then posted on them and hung until the stuck-worker backstop. The
  window opened wide once the release took well under a millisecond.)
* A collective (all-reduce, barrier) runs on its process group's own threads, and now and then one of them
  is not released by the shutdown (seen about once in ten CI runs, in the gradient all-reduce after a node
  was killed): the worker then hung until the 30 s stuck-worker backstop ended the process and the master
  counted its node as lost. :func:`wait` waits on a collective in short slices and, once the generation has
  ended, gives up on it: the operation is *abandoned*, not cancelled (nothing cancels a running gloo
  operation). Its work handle and process group are kept referenced here, because destroying a gloo group
  joins its threads, which would block until the stuck operation times out; once the operation has
  finished (with gloo's timeout at the latest) the next :func:`abandon` lets both go.

Point-to-point waits cannot use slices: a timed-out gloo send or receive closes its pair for good. Those
run in the calling thread, are released by the shutdown, and keep the stuck-worker backstop as their last
resort.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Callable, Iterable, TypeVar

import torch.distributed as dist


class GenerationEnded(RuntimeError):
    """The master ended the generation: this worker must leave it."""


#: how often a worker waiting on a collective looks whether the generation has ended
WAIT_SLICE = timedelta(milliseconds=50)

_ended: threading.Event | None = None
#: held while an operation is posted and while the watched generation is marked ended (see the module notes)
_posting = threading.Lock()
T = TypeVar("T")
#: (work, group) of collectives given up while still running; see the module notes
_abandoned: list[tuple[dist.Work, dist.ProcessGroup | None]] = []


def watch(ended: threading.Event | None) -> None:
    """Make :func:`post` refuse operations, and :func:`wait` give up on them, once ``ended`` is set (None:
    never)."""
    global _ended
    _ended = ended


def end(ended: threading.Event) -> None:
    """Set ``ended`` (a generation's end), waiting for an operation being posted through :func:`post` to be
    posted first. The caller shuts the generation's sockets down after this returns."""
    with _posting:
        ended.set()


def post(operation: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``operation(*args, **kwargs)``, a torch.distributed call that posts an operation and returns without
    waiting for it (``isend``, ``irecv``, a collective with ``async_op=True``), unless the watched generation
    has ended: then :class:`GenerationEnded` is raised instead. See the module notes."""
    with _posting:
        if _ended is not None and _ended.is_set():
            raise GenerationEnded("the generation ended; not starting another operation in it")
        return operation(*args, **kwargs)


def wait(work: dist.Work, group: dist.ProcessGroup | None) -> None:
    """Wait for ``work``, a collective posted with ``async_op=True`` on ``group`` (None: the default group).
    Returns when it completed; raises its error if it failed; raises :class:`GenerationEnded` (abandoning the
    operation) if the watched generation ended while it was still running."""
    if _ended is None:
        work.wait()
        return
    while True:
        try:
            work.wait(WAIT_SLICE)
            return
        except RuntimeError:
            if work.is_completed():
                # it finished between the slice's timeout and this look (seen under load: the timeout was
                # raised as the job's error), or it failed (e.g. its sockets were shut down): a wait on a
                # completed work returns, or raises its own error
                work.wait()
                return
        if _ended.is_set():
            abandon([(work, group)])
            raise GenerationEnded("the generation ended during a collective; abandoned it")


def abandon(works: Iterable[tuple[dist.Work | None, dist.ProcessGroup | None]]) -> None:
    """Keep every still-running ``(work, group)`` referenced (see the module notes) and release those given
    up earlier that have finished since."""
    _abandoned[:] = [(w, g) for w, g in _abandoned if not w.is_completed()]
    _abandoned.extend((w, g or dist.group.WORLD) for w, g in works if w is not None and not w.is_completed())


def abandoned() -> int:
    """How many abandoned collectives are still running."""
    return sum(not w.is_completed() for w, _ in _abandoned)
