"""A worker across generations: train until the master ends the generation, then join the next one.

:func:`run_elastic` is the worker process's main loop. Each generation it

1. arms a :class:`GenerationWatch` on the master's ``ended/gen{g}`` key;
2. joins the generation's process group, takes its stage's layers (kept from the last generation, copied
   from other workers by the plan's moves, or loaded from a checkpoint) and trains
   (:class:`~oobleck.engine.worker.StageWorker`);
3. when the generation ends early, leaves it: whatever operation was blocked fails at once (the watch shuts
   down the generation's sockets), the process group is destroyed, and the next assignment comes from the
   ``next_assignment`` callback, which blocks until the master has re-planned. An assignment that restarts
   every worker (the Varuna- and Bamboo-style baselines) raises :class:`RestartRequested` instead: the
   process starts over (:mod:`oobleck.worker_main`) and everything it held is gone.

What survives a generation's end, exactly:

* layers are at the last committed step. A step is applied only after the master committed it; a worker
  that reported a step ready but lost its store connection before reading the decision applies it on
  learning that the next generation starts right after it (:meth:`StageWorker.settle`), else drops it;
* the layers the worker offers as a source are those of its last generation that committed a step (the
  master counts on exactly those); layers copied in a generation that then ended before its first commit
  are discarded.

Errors that are not a generation's end (a bad config, a missing checkpoint, a bug) are re-raised: when a
worker fails without the master ending its generation within ``END_GRACE_S``, it raises the error it saw.

A worker still inside an ended generation ``fault_tolerance.stuck_after_s`` after its end is stuck in an
operation that shutting the sockets down did not release and :mod:`oobleck.engine.interrupt` could not
abandon (seen once: a gloo send under the Varuna-style baseline, which waited out the 120 s collective
timeout). Nothing frees such a call in-process, so the
watch hands the worker to its ``on_stuck`` callback, which restarts or ends the process (see
:mod:`oobleck.worker_main`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Collection

import torch.distributed as dist

from models.base import ModelSpec
from models.data import BatchSource
from oobleck.config import JobConfig, config_from_dict
from oobleck.engine import interrupt
from oobleck.engine.api import Assignment, Restore
from oobleck.engine.nccl_abort import abort_nccl_communicators
from oobleck.engine.release import SocketSnapshot, socket_inodes
from oobleck.engine.signed_store import SignedStore
from oobleck.engine.stage import HeldLayer
from oobleck.engine.store_keys import ended_key, timing_key
from oobleck.engine.worker import COLLECTIVE_TIMEOUT, PhaseHook, StageWorker, join_world, settle_imports
from oobleck.errors import OobleckError
from oobleck.model_building import build_batches, build_model

log = logging.getLogger(__name__)

#: how long a worker that saw an operation fail waits for the master to end the generation before it treats
#: the failure as its own (a dead peer is reported to the master within milliseconds)
END_GRACE_S = 30.0
#: how long the watch waits for a generation's end (a backstop: it is released when the process exits)
_WATCH_TIMEOUT = timedelta(days=7)
#: how often an ended generation's watch looks for sockets opened after its first sweep
_SWEEP_INTERVAL_S = 0.02
#: called, from the watch's thread, with a one-line account when the worker is stuck in an ended generation;
#: the worker's callback restarts or ends the process (the stuck call cannot be unwound)
OnStuck = Callable[[str], None]

#: blocks until the master has a generation newer than the argument for this worker, and returns it
NextAssignment = Callable[[int], Assignment]


class RestartRequested(Exception):
    """The next generation restarts every worker process (``Assignment.restart``: the baselines' restart);
    the process must start afresh, and ask for its assignment again, rather than join it."""

    def __init__(self, generation: int) -> None:
        super().__init__(f"generation {generation} restarts every worker")
        self.generation = generation


class GenerationWatch:
    """Shuts down every TCP socket this process opened for generation ``generation`` (its store client and
    gloo pairs) the moment the master writes ``ended/gen{generation}``, unless :meth:`finish` came first.

    Construct it just before joining the generation: the sockets opened after that are the generation's
    (``exclude_ports``, e.g. the control plane's, are never touched; nor is the watch's own connection).
    Only the master's authentic end counts (a value with a valid MAC under ``store_key``, see
    :mod:`oobleck.engine.signed_store`): a forged ``ended/gen{g}`` is ignored until the master writes its own.
    After the end it keeps sweeping until :meth:`close`: a worker that was between two operations when the
    generation ended (about to connect to the store, or to a gloo peer) opens its socket after the first
    sweep, and would otherwise block on it until the collective timeout. If :meth:`close` has not come
    ``stuck_after_s`` after the end, the watch logs where the constructing thread is and calls ``on_stuck``.
    With ``backend`` ``nccl`` it first aborts the generation's NCCL communicators
    (:mod:`oobleck.engine.nccl_abort`), which frees an operation blocked on the GPU; the sweep still frees
    waits on the store.
    """

    def __init__(
        self,
        base: dist.TCPStore,
        generation: int,
        store_key: bytes,
        exclude_ports: Collection[int] = (),
        on_stuck: OnStuck | None = None,
        stuck_after_s: float = 30.0,
        backend: str = "gloo",
    ) -> None:
        self.generation = generation
        self._aborts_nccl = backend == "nccl"
        self.ended = threading.Event()
        self._exclude = tuple(exclude_ports)
        self._on_stuck = on_stuck
        self._stuck_after_s = stuck_after_s
        self._owner = threading.current_thread()  # the thread that must leave the generation
        self._finished = False
        self._closed = threading.Event()
        self._sweeping = threading.Lock()
        # before the snapshot, so the watch's own connection stays open
        self._store = SignedStore(base.clone(), store_key)
        self._before = socket_inodes()
        threading.Thread(target=self._watch, name=f"watch-gen{generation}", daemon=True).start()

    def finish(self) -> None:
        """The generation ended normally (training finished): never release its sockets."""
        self._finished = True

    def close(self) -> None:
        """The worker has left the generation: stop sweeping (the next generation's sockets are not ours)."""
        self._closed.set()
        with self._sweeping:  # a sweep under way ends before the next generation opens its sockets
            pass

    def _watch(self) -> None:
        try:
            ended = self._store.wait(
                [ended_key(self.generation)], _WATCH_TIMEOUT, stop=lambda: self._finished or self._closed.is_set()
            )
        except Exception:  # the master's store is gone: the job is over, and so is this process soon
            return
        if ended is None or self._finished:
            return
        interrupt.end(self.ended)  # no operation is posted from here on (see oobleck.engine.interrupt)
        ended_at = time.monotonic()
        if self._aborts_nccl:
            log.info("generation %d ended: aborted %d NCCL communicators", self.generation, abort_nccl_communicators())
        released: set[int] = set()
        while True:
            with self._sweeping:
                if self._closed.is_set():
                    return
                fresh = SocketSnapshot.take(self._exclude, self._before | released)
                if fresh.release():
                    log.info("generation %d ended: released %d sockets", self.generation, len(fresh.sockets))
                released.update(s.inode for s in fresh.sockets)
            if self._on_stuck is not None and time.monotonic() - ended_at > self._stuck_after_s:
                self._give_up(len(released))
                return
            if self._closed.wait(_SWEEP_INTERVAL_S):
                return

    def _give_up(self, released: int) -> None:
        assert self._on_stuck is not None
        frame = sys._current_frames().get(self._owner.ident or -1)
        where = "".join(traceback.format_stack(frame)[-3:]) if frame is not None else "(thread gone)\n"
        log.warning(
            "generation %d: still inside it %.0f s after its end; the stuck thread is at:\n%s",
            self.generation, self._stuck_after_s, where.rstrip(),
        )  # fmt: skip
        self._on_stuck(
            f"stuck in generation {self.generation} {self._stuck_after_s:.0f} s after its end "
            f"(an operation that shutting its {released} sockets down did not release)"
        )


@dataclass(frozen=True)
class Prepared:
    """What a worker builds from the job's config before it asks for work, so that a worker that asks is
    ready to join at once: a node joining a running job would otherwise hold up every rank's rendezvous
    while it builds its model and collects its garbage (:func:`settle_imports`, 150-500 ms)."""

    config: JobConfig
    spec: ModelSpec
    batches: BatchSource


def prepare(raw_config: dict[str, Any]) -> Prepared:
    """Build the model spec and the batch source of the job whose config (``JobConfig.to_dict()``) is
    ``raw_config``, then settle the imports; the spec's layers are built later, per stage."""
    config = config_from_dict(raw_config)
    spec = build_model(config.model, config.training.seed)
    batches = build_batches(config, spec)  # imports the model's and the dataset's modules, before the freeze
    settle_imports()
    return Prepared(config, spec, batches)


def run_elastic(
    first: Assignment,
    prepared: Prepared,
    next_assignment: NextAssignment,
    on_phase: PhaseHook | None = None,
    exclude_ports: Collection[int] = (),
    on_stuck: OnStuck | None = None,
    *,
    store_key: bytes,
) -> None:
    """Train from ``first`` through every later generation until training finishes (see the module notes),
    with the model ``prepared`` from the job's config. ``store_key`` signs and verifies this worker's store
    values (:func:`~oobleck.engine.signed_store.store_key` of the job's token)."""
    config, spec, batches = prepared.config, prepared.spec, prepared.batches
    stuck_after_s = config.fault_tolerance.stuck_after_s
    stuck = on_stuck if stuck_after_s > 0 else None  # 0: no backstop
    base = dist.TCPStore(first.store_host, first.store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    pool: dict[int, HeldLayer] = {}
    assignment = first
    # the instants of the recovery record's worker phases, in time.time() as the master's instants are
    left_at: float | None = None  # None: this process held no earlier generation
    assigned_at = time.time()  # the first assignment has just arrived
    while True:
        watch = GenerationWatch(
            base, assignment.generation, store_key, exclude_ports, stuck, stuck_after_s, backend=assignment.backend
        )
        interrupt.watch(watch.ended)
        worker: StageWorker | None = None
        try:
            joining = time.perf_counter()
            store = join_world(assignment, store_key)
            join_s = time.perf_counter() - joining
            worker = StageWorker(assignment, config, store, spec, batches, pool, on_phase)
            timing = {
                "left_at": left_at,
                "assigned_at": assigned_at,
                "join_s": join_s,
                "groups_s": worker.sync.groups_s,
                "transfer_s": worker.transfer_s,
                "resumed_at": time.time(),
            }
            store.set(timing_key(assignment.rank), json.dumps(timing))
            worker.train()
            if on_phase is not None:
                on_phase(config.training.steps, "exit")
            watch.finish()
            return
        except OobleckError:
            raise
        except Exception as e:
            log.info("generation %d: %s: %s", assignment.generation, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if not watch.ended.wait(END_GRACE_S):
                raise
            log.info("generation %d ended", assignment.generation)
        finally:
            if worker is not None:
                worker.close()
            _leave_group()
            watch.close()
        left_at = time.time()
        assignment = next_assignment(assignment.generation)
        assigned_at = time.time()
        log.info(
            "generation %d: rank %d of %d from step %d (%s, %d moves)",
            assignment.generation, assignment.rank, assignment.world_size, assignment.start_step,
            assignment.restore, len(assignment.moves),
        )  # fmt: skip
        if assignment.restart:
            raise RestartRequested(assignment.generation)
        if worker is not None:
            worker.settle(assignment.start_step)
            if worker.committed_any:
                pool = {held.index: held for held in worker.held}
        if assignment.restore != Restore.MEMORY:
            pool = {}


def _leave_group() -> None:
    """Destroy the generation's process group, whatever state its sockets are in."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a group whose peers died may fail to tear down cleanly; it is gone either way
            log.info("destroying the process group: %s", e)
    # an init_process_group that failed half way has counted its group already; every rank must name the
    # next generation's groups alike, so the count starts again from zero as after a destroy
    dist.distributed_c10d._world.group_count = 0
