"""The step commit: one :class:`CommitDriver` per generation commits its steps one by one (after every rank
reported its gradients ready), records them, folds joining nodes in at step boundaries and reports the
generation's recovery at its first commit."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from oobleck.control.policy import Policy
from oobleck.control.records import Change, RecoveryRecord, StepRecord, recovery_record
from oobleck.control.state import Generation, JobState
from oobleck.engine.signed_store import SignedStore
from oobleck.progress import recovery_line

log = logging.getLogger(__name__)
#: how often the driver re-checks a step's readiness, and the varuna checkpoint it waits for
_POLL_S = 0.05


@dataclass
class CommitDriver:
    """Commits the steps of the job's generations; :meth:`run` on a thread of its own per generation.
    ``open_store(prefix)`` gives the job's signed store under a generation's prefix; ``on_step`` and
    ``on_recovery`` get every record as it is made."""

    state: JobState
    policy: Policy
    open_store: Callable[[str], SignedStore]
    on_step: Callable[[StepRecord], None] | None
    on_recovery: Callable[[RecoveryRecord], None] | None

    def run(self, gen: Generation, plan_s: float) -> None:
        """Commit steps ``[gen.start_step, training.steps)`` of ``gen`` one by one, until it ends. A broken
        store or a failing callback fails the job rather than hang it."""
        from oobleck.engine.commit import CommitCoordinator

        state, config = self.state, self.state.config
        try:
            store = self.open_store(gen.store_prefix)
            coordinator = CommitCoordinator(store, gen.placement.world_size)
            last = gen.started_at
            samples = config.training.global_batch
            for step in range(gen.start_step, config.training.steps):
                report = coordinator.wait_step(step, lambda: state.stale(gen), _POLL_S)
                if report is None:
                    return  # the generation ended; whoever ended it has recorded why
                with state.lock:
                    if state.stale(gen):
                        coordinator.abort(step)
                        return
                    # under the lock: once a generation has ended, none of its steps commits
                    coordinator.commit(step)
                    state.committed = step + 1
                    first_commit = not gen.committed_any
                    gen.committed_any = True
                    state.trained = True
                    if first_commit:
                        state.holdings = self.policy.held_layers(gen.placement)
                        state.committed_placement = gen.placement
                    if config.periodic_checkpoint_after(step):
                        state.checkpoints.append(step + 1)
                    fold = state.joins_due() and self.policy.grows_after(step, config.periodic_checkpoint_after(step))
                if fold:
                    self._await_checkpoint(step + 1, gen)
                    with state.lock:
                        if not state.stale(gen):
                            state.end(gen)  # fold joining nodes in at this step boundary
                            state.replan = True
                            state.lock.notify_all()
                now = time.monotonic()
                timings = _timings(coordinator.store, gen.placement.world_size) if first_commit else []
                startup = _startup_s(timings, now - last)
                record = StepRecord(
                    step=report.step,
                    loss=float(report.loss),
                    units=int(report.units),
                    grad_norm=float(report.grad_norm),
                    step_time_s=now - last,
                    samples_per_s=samples / max(now - last - startup, 1e-9),
                    generation=gen.number,
                    nodes_alive=state.alive_count(),
                    pipelines=len(gen.placement.pipelines),
                    redundant_s=report.redundant_s,
                    checkpoint_s=report.checkpoint_s,
                    startup_s=startup,
                    peak_bytes=list(report.peak_bytes),
                    predicted_bytes=list(report.predicted_bytes),
                    predicted_step_s=gen.placement.predicted_step_s,
                )
                last = now
                with state.lock:
                    state.records.append(record)
                if first_commit and gen.change is not None:
                    self._report_recovery(gen, gen.change, plan_s, coordinator.store)
                if self.on_step is not None:
                    self.on_step(record)
            if gen.start_step >= config.training.steps and gen.change is not None and self._joined(gen, coordinator.store):
                # nothing left to train (the change came during the final checkpoint): the recovery ends
                # once every rank has joined and taken its layers, before it writes that checkpoint again
                self._report_recovery(gen, gen.change, plan_s, coordinator.store)
            with state.lock:
                state.finish_if_done()
        except Exception as e:  # a broken store or a failing callback: end the job rather than hang it
            state.fail(f"step commit failed: {type(e).__name__}: {e}")

    def _await_checkpoint(self, step: int, gen: Generation) -> None:
        """Where the policy grows from a checkpoint, wait (lock not held) until the foreground checkpoint of
        ``step`` is complete or ``gen`` has ended, so that the restart that grows the job resumes from it."""
        if not self.policy.grows_from_checkpoint:
            return
        from oobleck import checkpoint

        ckpt = checkpoint.checkpoint_dir(self.state.config.run.dir, step)
        while not checkpoint.is_complete(ckpt) and not self.state.stale(gen):
            time.sleep(_POLL_S)

    def _joined(self, gen: Generation, store: SignedStore) -> bool:
        """Wait (lock not held) until every rank of ``gen`` has written its timing, i.e. joined and taken its
        layers; False if ``gen`` ended first."""
        from oobleck.engine.store_keys import timing_key

        while any(store.get(timing_key(r)) is None for r in range(gen.placement.world_size)):
            if self.state.stale(gen) or self.state.over():
                return False
            time.sleep(_POLL_S)
        return True

    def _report_recovery(self, gen: Generation, change: Change, plan_s: float, store: SignedStore) -> None:
        timings = _timings(store, gen.placement.world_size)
        if not timings:
            timings = [{"resumed_at": time.time(), "join_s": float("nan"), "transfer_s": float("nan")}]
        record = recovery_record(
            generation=gen.number,
            change=change,
            mode="restart" if gen.restart else gen.restore,
            start_step=gen.start_step,
            steps_lost=gen.steps_lost,
            layers_moved=len(gen.moves),
            placement=gen.placement,
            plan_s=plan_s,
            timings=timings,
        )
        with self.state.lock:
            self.state.recoveries.append(record)
        log.info("generation %d: %s", gen.number, recovery_line(record))
        if self.on_recovery is not None:
            self.on_recovery(record)


def _timings(store: SignedStore, world_size: int) -> list[dict]:
    """The generation's ranks' timing reports (:func:`~oobleck.engine.store_keys.timing_key`). Every rank
    wrote its own before its first ready report; one overwritten by a forged value since is left out (its
    own line was logged)."""
    from oobleck.engine.store_keys import timing_key

    raws = [store.get(timing_key(r)) for r in range(world_size)]
    return [json.loads(raw) for raw in raws if raw is not None]


def _startup_s(timings: list[dict], step_s: float) -> float:
    """The part of a generation's first step, ``step_s`` long and committed just now, that passed before
    its last rank was ready to train (its ``resumed_at``); 0 without timings. The ranks' clocks are the
    wall clocks of their machines (as in the recovery record), so the figure is clamped to [0, step_s]."""
    if not timings:
        return 0.0
    training = time.time() - max(t["resumed_at"] for t in timings)
    return min(max(step_s - training, 0.0), step_s)
