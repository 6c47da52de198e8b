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

* Building a group (``init_process_group``, ``new_group``) connects every pair of its members. When a member
  dies after it posted its address but before its peers connected to it, a peer that waits for the dead
  member's connection waits in gloo's constructor, on no socket at all, for the group's timeout (120 s):
  nothing the sweep shuts down releases it, so the worker sat out the stuck-worker backstop (30 s) and its
  node was counted as lost (seen in the fault-tolerance benchmark; reproduced by killing a member right
  after it posted its address). :func:`build` therefore builds a group on a thread of its own and, once the
  generation has ended and ``BUILD_GRACE`` has passed without the build failing by itself (the sweep fails
  a build waiting on the store within milliseconds), abandons it: the thread is left to fail at gloo's
  timeout, holding nothing the next generation uses (that one names its groups under a new store prefix).
  A build is not started once the generation has ended: a member arriving late would connect to its
  peers' abandoned builds, which would then complete and install a stale group behind the next
  generation's back.

* Why some operations are not released. When a gloo pair fails (its socket shut down, or the peer gone),
  it tells every operation it has queued, but not the one it is in the middle of: a send whose bytes are
  partly written (the transmit queue's operation is looked up as a bound buffer, which an unbound send is
  not) and a receive whose bytes are partly read (it has left the pending queue). Both wait for the
  group's timeout. Loopback's socket buffers hold a few MB, so this takes a transfer larger than that
  whose peer stopped reading (stopped, busy leaving, or itself stuck) or died mid-send; a collective's
  ring steps are such transfers too. ``tests/test_interrupt.py`` reproduces both with a 64 MB transfer.
  A point-to-point wait cannot use slices (a timed-out gloo send or receive closes its pair for good), so
  it runs on a thread of its own (:class:`Aside`) while the calling thread looks every ``WAIT_SLICE``
  whether the generation has ended, and then abandons it the same way: the thread and the work handles
  (which hold their tensors) stay referenced until gloo's timeout finishes them.
"""

from __future__ import annotations

import _thread
import threading
import time
from datetime import timedelta
from typing import Callable, Iterable, Sequence, TypeVar

import torch.distributed as dist


class GenerationEnded(RuntimeError):
    """The master ended the generation: this worker must leave it."""


#: how often a worker waiting on a collective looks whether the generation has ended
WAIT_SLICE = timedelta(milliseconds=50)
#: how long a group's build may go on after the generation's end before it is abandoned: long enough for
#: the build to fail by itself when the sweep released it, so that an abandoned build is surely blocked
#: inside gloo's constructor rather than still running torch's Python bookkeeping
BUILD_GRACE = timedelta(milliseconds=300)

_ended: threading.Event | None = None
#: held while an operation is posted and while the watched generation is marked ended (see the module notes)
_posting = threading.Lock()
T = TypeVar("T")
#: (work, group) of collectives given up while still running; see the module notes
_abandoned: list[tuple[dist.Work, dist.ProcessGroup | None]] = []
#: threads of group builds given up while still blocked (see the module notes)
_abandoned_builds: list[threading.Thread] = []
#: point-to-point waits given up while still blocked (see the module notes)
_abandoned_asides: list[Aside] = []


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


def build(construct: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``construct(*args, **kwargs)``, a torch.distributed call that builds a process group
    (``init_process_group``, ``new_group``), run on a thread of its own while this one waits for it.
    Returns its result or raises its error; raises :class:`GenerationEnded` (abandoning the build, see the
    module notes) if the watched generation ended and the build went on ``BUILD_GRACE`` longer."""
    if _ended is None:
        return construct(*args, **kwargs)
    if _ended.is_set():  # a member that starts late would complete its peers' abandoned builds
        raise GenerationEnded("the generation ended before its process group was built")
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(construct(*args, **kwargs))
        except BaseException as e:  # handed to the waiting thread; once abandoned, nobody looks
            failure.append(e)

    thread = threading.Thread(target=run, name="group-build", daemon=True)
    thread.start()
    ended_at: float | None = None
    slice_s = WAIT_SLICE.total_seconds()
    while True:
        thread.join(slice_s)
        if not thread.is_alive():
            if failure:
                raise failure[0]
            return outcome[0]
        if _ended.is_set():
            now = time.monotonic()
            ended_at = now if ended_at is None else ended_at
            if now - ended_at >= BUILD_GRACE.total_seconds():
                _abandoned_builds[:] = [t for t in _abandoned_builds if t.is_alive()]
                _abandoned_builds.append(thread)
                raise GenerationEnded("the generation ended while its process group was being built; abandoned it")


def abandoned_builds() -> int:
    """How many abandoned group builds are still blocked."""
    return sum(t.is_alive() for t in _abandoned_builds)


class Aside:
    """Point-to-point ``works`` (sends or receives posted through :func:`post`, on the default group) waited
    for on a thread of its own, started at construction (see the module notes).

    :meth:`finished` tells without blocking whether they have all completed (a failed one counts);
    :meth:`wait` waits for them and raises the first error, or, once the watched generation has ended,
    abandons them and raises :class:`GenerationEnded`."""

    def __init__(self, works: Sequence[dist.Work]) -> None:
        self._works = list(works)
        self._error: BaseException | None = None
        self._group: dist.ProcessGroup | None = None  # kept once abandoned
        # _thread, not threading: Thread.start() waits until the new thread runs, a hand-shake that doubled
        # the cost of a receive waited for aside (about 60 us against 30 us more than a plain wait)
        self._running = _thread.allocate_lock()
        self._running.acquire()
        _thread.start_new_thread(self._wait_all, ())

    def _wait_all(self) -> None:
        try:
            for work in self._works:
                work.wait()
        except BaseException as e:  # re-raised by wait(), in the thread that needs the outcome
            self._error = e
        finally:
            self._running.release()

    def finished(self) -> bool:
        """Whether every work has completed or failed."""
        return not self._running.locked()

    def wait(self) -> None:
        """Wait for every work (module notes); raise the first error, or :class:`GenerationEnded`."""
        slice_s = WAIT_SLICE.total_seconds()
        while not self._running.acquire(timeout=slice_s):
            if _ended is not None and _ended.is_set():
                self._group = dist.group.WORLD  # as for a collective: its teardown must not wait for the works
                _abandoned_asides[:] = [a for a in _abandoned_asides if not a.finished()]
                _abandoned_asides.append(self)
                raise GenerationEnded("the generation ended during a point-to-point transfer; abandoned it")
        self._running.release()  # finished() stays True
        if self._error is not None:
            raise self._error


def abandoned_asides() -> int:
    """How many abandoned point-to-point waits are still blocked."""
    return sum(not a.finished() for a in _abandoned_asides)
