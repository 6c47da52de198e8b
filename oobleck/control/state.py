"""The master's shared state, and the membership transitions every part of it makes, under one lock.

The servicer (:mod:`oobleck.control.master`), the re-planner (:mod:`oobleck.control.replan`), the commit
driver (:mod:`oobleck.control.driver`) and the checkpoint completer (:mod:`oobleck.control.checkpoints`)
all read and change one :class:`JobState` while holding its ``lock`` (a Condition: every change that
someone may wait for notifies it). Methods say when they take the lock themselves; the others expect it held.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from oobleck import checkpoint
from oobleck.config import JobConfig
from oobleck.control import oobleck_pb2 as pb
from oobleck.control.placement import Placement
from oobleck.control.policy import Holdings
from oobleck.control.records import Change, RecoveryRecord, StepRecord
from oobleck.control.sources import Move
from oobleck.engine.api import Restore
from oobleck.engine.signed_store import SignedStore
from oobleck.engine.store_keys import ended_key, fault_key

log = logging.getLogger(__name__)


@dataclass
class Node:
    name: str
    devices: int
    pid: int
    last_heartbeat: float
    alive: bool = True
    session_open: bool = False
    #: events for the node's agent, read by its Session stream
    events: list[pb.MasterEvent] = field(default_factory=list)
    #: device -> exit code of its worker in the current generation
    exits: dict[int, int] = field(default_factory=dict)
    #: devices whose worker has asked for an assignment (it is up, with the engine loaded)
    waiting: set[int] = field(default_factory=set)
    #: whether some generation placed this node (a node that joins later is placed once all its workers wait)
    in_job: bool = False
    #: when it registered (time.time())
    registered_at: float = field(default_factory=time.time)


@dataclass
class Generation:
    number: int
    placement: Placement
    store_prefix: str
    start_step: int
    started_at: float
    restore: Restore = Restore.INIT
    moves: tuple[Move, ...] = ()
    #: set when the generation ends early (a node lost or joining); no step of it commits after that
    ended: bool = False
    committed_any: bool = False
    #: the membership change this generation recovers from (reported at its first commit)
    change: Change | None = None
    steps_lost: int = 0
    #: the workers restart their processes before joining (the baselines' stop-everything restart)
    restart: bool = False


#: nodes that register within this many seconds of each other were started together (one ``oobleck inject
#: --add``, one trace instant, one autoscaler batch): a ready join waits for the others (see :func:`joins_due`).
#: Agents started at one instant register up to a second or more apart on a loaded machine (each imports its
#: libraries under contention): at 0.5 s, two nodes one trace instant added joined a CI run apart
TOGETHER_S = 2.0
#: how long, at most, a ready join waits for the nodes started together with it. Nodes whose workers come
#: up within this of each other fold into one generation (one re-plan, one pause of the job instead of
#: two); a node whose partner starts later does not wait for it, so that a ready node trains within about
#: half a second (this wait, the next step boundary and the fold). The job trains meanwhile.
GATHER_S = 0.25


def joins_due(ready: Sequence[tuple[float, float]], starting: Sequence[float], now: float) -> bool:
    """Whether the ready joins fold in at a step boundary at ``now``. ``ready``: each ready joining node's
    (registration, workers-ready) instants; ``starting``: the registration instants of the nodes whose
    workers are still starting (alive, some not yet asking for work). All instants are ``time.time()``.

    They fold in at once (every node ready by then in one generation: one re-plan, one rebuild, one record)
    unless a starting node registered within :data:`TOGETHER_S` of one of them: then they wait for it, up to
    :data:`GATHER_S` after the first of them was ready. A ready node whose instant was reported with an
    earlier change (``ready`` empty) folds in at once.
    """
    if not ready or not any(abs(s - r) <= TOGETHER_S for s in starting for r, _ in ready):
        return True
    return now - min(at for _, at in ready) >= GATHER_S


class JobState:
    """One job's membership, generation and commit progress (see the module notes for the locking)."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.lock = threading.Condition()
        self.nodes: dict[str, Node] = {}
        self.generation: Generation | None = None
        self.failure: str | None = None
        self.finished = False
        self.stopping = False
        #: steps [0, committed) are committed; a worker's exit 0 is normal only once all are
        self.committed = 0
        self.records: list[StepRecord] = []
        self.recoveries: list[RecoveryRecord] = []
        #: (node, device) -> the layers that worker holds at the committed step
        self.holdings: Holdings = {}
        #: the placement of the last generation that committed a step (what ``holdings`` describes)
        self.committed_placement: Placement | None = None
        #: bamboo: the stages' layer ranges of the last plan (a stage outside them took another over)
        self.planned_ranges: set[tuple[int, int]] = set()
        #: bumped on every loss or join; a re-plan made for an older membership is discarded
        self.membership = 0
        self.replan = False
        #: a joining node's workers are all up: fold it in at the next step boundary
        self.joins_ready = False
        self.change: Change | None = None
        #: periodic checkpoints whose layer files are being written (workers write them in the background)
        self.checkpoints: list[int] = []
        #: set while too few nodes are left to plan: when the wait began (time.monotonic())
        self.waiting_since: float | None = None
        self.waiting_reason = ""
        #: whether any step was ever committed: before that, a lost node fails the job (see the master's notes)
        self.trained = False
        #: the job's store under the job token; None before the master started and once it stopped
        self.signed: SignedStore | None = None

    def over(self) -> bool:
        """The job stopped, finished or failed: background loops end."""
        return self.stopping or self.finished or self.failure is not None

    def stale(self, gen: Generation) -> bool:
        """``gen`` may commit no more steps: the job failed, it ended, or a newer generation replaced it."""
        return self.failure is not None or gen.ended or self.generation is not gen

    def recoverable(self) -> bool:
        """Whether a lost node is re-planned around: only once training has started (a step committed)."""
        return self.trained

    def lose_node(self, node: Node, reason: str) -> None:
        """Take ``node`` out of the job (its agent is told to stop its workers) and end the generation."""
        if not node.alive or self.finished or self.failure is not None:
            return
        node.alive = False
        node.events.append(pb.MasterEvent(kind=pb.MasterEvent.SHUTDOWN, failed=False, reason=f"removed from the job: {reason}"))
        gen = self.generation
        if gen is not None and not any(name == node.name for name, _ in gen.placement.ranks):
            log.warning("%s (it had no stage: a spare or a node still joining)", reason)
            return  # nothing runs there: no re-plan
        if not self.recoverable():
            self.fail_locked(reason)
            return
        if self.result_saved():
            log.warning("%s after the final checkpoint was written: the job's result is complete", reason)
            self.finish_if_done()
            return
        log.warning("%s", reason)
        self.note_change(reason, lost=node.name)
        if self.generation is not None:
            self.end(self.generation)
        self.replan = True
        self.lock.notify_all()

    def note_change(self, reason: str, lost: str | None = None, joined: str | None = None) -> None:
        """Record a membership change for the next recovery record (a lost node's kill time, when an
        injected fault wrote one to the store; a joined node's ready time: now, when its workers are all up)."""
        self.membership += 1
        now = time.time()
        if self.change is None:
            self.change = Change(noticed_at=now)
        self.change.reasons.append(reason)
        if lost is not None:
            self.change.lost.append(lost)
            kill_time = self.signed.get(fault_key(lost)) if self.signed is not None else None
            if kill_time is not None:
                self.change.kill_times.append(float(kill_time))
        if joined is not None:
            self.change.joined.append(joined)
            self.change.ready_at.append(now)

    def joins_due(self) -> bool:
        """Whether the joins ready now fold in at this step boundary (:func:`joins_due`)."""
        if not self.joins_ready:
            return False
        change = self.change or Change(noticed_at=0.0)
        ready = [(self.nodes[n].registered_at, at) for n, at in zip(change.joined, change.ready_at)]
        starting = [n.registered_at for n in self.nodes.values() if n.alive and len(n.waiting) < n.devices]
        return joins_due(ready, starting, time.time())

    def end(self, gen: Generation) -> None:
        """End ``gen``: its workers leave it (they watch this key); none of its steps commits after this."""
        if gen.ended:
            return

        gen.ended = True
        if self.change is not None and self.change.ended_at is None:
            # the recovery record's end of "end", taken before the write: a worker may leave before it returns
            self.change.ended_at = time.time()
        if self.signed is not None:  # None once the master stopped
            self.signed.set(ended_key(gen.number), b"1")

    def result_saved(self) -> bool:
        """Every step is committed and the final checkpoint is complete: the job's result is on disk, so a
        worker or node lost from now on costs nothing (the checkpoint's own cheap check; it reads
        ``meta.json`` only once the last step is committed)."""
        steps = self.config.training.steps
        if self.committed < steps:
            return False
        return checkpoint.is_complete(checkpoint.checkpoint_dir(self.config.run.dir, steps))

    def finish_if_done(self) -> None:
        """Finish the job once the last step is committed and every worker of the generation exited 0; once
        the final checkpoint is complete (:meth:`result_saved`), a worker that died or whose node was lost
        counts as done too."""
        gen = self.generation
        if gen is None or self.finished or self.failure is not None or gen.ended:
            return
        if self.committed < self.config.training.steps:
            return
        if all(self.nodes[n].exits.get(d) == 0 for n, d in gen.placement.ranks) or (
            self.result_saved()
            and all(d in self.nodes[n].exits or not self.nodes[n].alive for n, d in gen.placement.ranks)
        ):
            self.finished = True
            self.broadcast_shutdown(failed=False, reason="the job finished")
            self.lock.notify_all()

    def fail(self, reason: str) -> None:
        """:meth:`fail_locked`, taking the lock."""
        with self.lock:
            self.fail_locked(reason)

    def fail_locked(self, reason: str) -> None:
        """Fail the job with ``reason`` (the first failure counts; a finished job stays finished)."""
        if self.failure is not None or self.finished:
            return
        log.info("job failed: %s", reason)  # info: the caller reports it (Master.wait raises JobFailed)
        self.failure = reason
        self.broadcast_shutdown(failed=True, reason=reason)
        self.lock.notify_all()

    def broadcast_shutdown(self, failed: bool, reason: str) -> None:
        for node in self.nodes.values():
            node.events.append(pb.MasterEvent(kind=pb.MasterEvent.SHUTDOWN, failed=failed, reason=reason))
        self.lock.notify_all()

    def alive_count(self) -> int:
        """How many nodes are alive (takes the lock)."""
        with self.lock:
            return sum(node.alive for node in self.nodes.values())
