"""The master's side of periodic checkpoints: choosing the one a generation restores
(:func:`restore_latest`), and marking the ones the workers wrote complete, pruning older ones
(:class:`CheckpointCompleter`). The files themselves are :mod:`oobleck.checkpoint`'s."""

from __future__ import annotations

import logging
import time

from oobleck.control.placement import Placement
from oobleck.control.sources import FRESH, Sources
from oobleck.control.state import JobState
from oobleck.engine.api import Restore

log = logging.getLogger(__name__)
#: how often the completer looks at the pending checkpoints
_POLL_S = 0.1


def layer_count(placement: Placement) -> int:
    """The model's number of layers: the end of the last stage's range."""
    return max(b for p in placement.pipelines for _, b in p.layer_ranges)


def restore_latest(state: JobState, why: str) -> Sources:
    """Restore the run's latest complete checkpoint (or restart from step 0 when there is none); ``why``
    starts the log line. Lock held.

    A periodic checkpoint whose layer files are all written but not yet marked complete by the completer
    counts: it is completed now rather than falling back to an older one. The newest checkpoint that
    verifies is chosen and the folders of later steps are removed (a re-run must not complete a checkpoint
    that mixes their files with its own); the pending list is emptied."""
    from oobleck import checkpoint

    config = state.config
    gen = state.generation
    num_layers = layer_count(gen.placement) if gen is not None else 0
    pending = state.checkpoints if gen is not None else []
    started = time.monotonic()
    ckpt = checkpoint.restore_latest(config.run.dir, pending, num_layers, config.to_dict())
    state.checkpoints = []  # older ones are superseded, later ones were removed
    if time.monotonic() - started > config.fault_tolerance.heartbeat_interval_s:
        # hashing a large checkpoint held the lock: heartbeats that arrived meanwhile could not be
        # recorded, and must not make the monitor lose every node (a closed stream still does)
        for node in state.nodes.values():
            node.last_heartbeat = max(node.last_heartbeat, time.monotonic())
    if ckpt is None:
        log.warning("%s; no checkpoint exists: starting from step 0", why)
        return FRESH
    step = int(checkpoint.read_meta(ckpt)["step"])
    log.warning("%s; restoring the checkpoint of step %d", why, step)
    return Sources(Restore.CHECKPOINT, (), step)


class CheckpointCompleter:
    """Marks periodic checkpoints complete (``meta.json``) once all their layer files exist; run :meth:`run`
    on a thread of its own until the job is over. A checkpoint whose writer died stays incomplete and is
    dropped once a later one completes; after each completion, older checkpoints beyond
    ``fault_tolerance.checkpoint_keep`` are pruned (never the one the current generation restored)."""

    def __init__(self, state: JobState) -> None:
        self.state = state

    def run(self) -> None:
        from oobleck import checkpoint

        state, config = self.state, self.state.config
        while True:
            with state.lock:
                if state.over():
                    return
                state.lock.wait(_POLL_S)
                gen, pending = state.generation, list(state.checkpoints)
            if gen is None:
                continue
            num_layers = layer_count(gen.placement)
            for step in pending:  # file checks and the fsync of meta.json happen outside the lock
                ckpt = checkpoint.checkpoint_dir(config.run.dir, step)
                if checkpoint.complete_if_written(ckpt, step, num_layers, config.to_dict()):
                    log.info("checkpoint of step %d complete", step)
                    with state.lock:
                        state.checkpoints = [s for s in state.checkpoints if s > step]
                    restored = checkpoint.checkpoint_dir(config.run.dir, gen.start_step)
                    checkpoint.prune(config.run.dir, config.fault_tolerance.checkpoint_keep, verified=ckpt, protect=[restored])
