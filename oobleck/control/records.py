"""What the master reports: one :class:`StepRecord` per committed step and one :class:`RecoveryRecord` per
membership change (built by :func:`recovery_record` from the change and the workers' timings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from oobleck.control.placement import Placement


@dataclass(frozen=True)
class StepRecord:
    """One committed step, as the master saw it."""

    step: int
    #: the step's loss as the workers reported it (summed loss / loss units over the global batch)
    loss: float
    units: int
    grad_norm: float
    #: wall time from the previous commit (or from the generation's start) to this one
    step_time_s: float
    #: global batch / (step_time_s - startup_s): the training rate, without start-up
    samples_per_s: float
    generation: int
    #: the nodes the master counts alive when it commits the step: a node lost after the step's work was
    #: done, before its commit, is already left out (the step itself ran on the generation's nodes)
    nodes_alive: int
    pipelines: int
    #: the slowest rank's seconds of redundant work in the step (Bamboo-style baseline; 0 otherwise)
    redundant_s: float = 0.0
    #: the slowest rank's seconds of foreground checkpoint writing before the step (the baselines)
    checkpoint_s: float = 0.0
    #: the part of step_time_s before every worker of the generation was ready to train: on a generation's
    #: first step, the workers' start-up (or a recovery's rebuild and layer copies); 0 on the other steps
    startup_s: float = 0.0
    #: per rank (a rank is its stage's global index): the stage's measured peak memory in the step, in bytes
    #: (CUDA: the allocator's peak; CPU: parameters, gradients, optimizer state and the saved activations
    #: of the microbatches in flight; :mod:`oobleck.engine.memory`)
    peak_bytes: list[int] = field(default_factory=list)
    #: per rank: the plan's prediction of that peak (0 where the plan made none)
    predicted_bytes: list[int] = field(default_factory=list)
    #: the plan's prediction of ``step_time_s - startup_s`` for a local run (0 where it made none;
    #: :mod:`planner.local_step`)
    predicted_step_s: float = 0.0


@dataclass(frozen=True)
class RecoveryRecord:
    """One membership change, from the kill (or the master's notice) to training running again in the new
    generation.

    ``mode``: ``memory`` (layers copied from surviving replicas), ``checkpoint`` (restored from the latest
    checkpoint), ``init`` (restarted from step 0: no copy and no checkpoint) or ``restart`` (the baselines:
    every worker process restarted, then the latest checkpoint loaded).

    Times in seconds. The phases follow one path, from the kill to the moment the last worker of the new
    generation was ready to train (joined its groups and holds its stage's layers at the committed step); the
    worker phases are those of that last worker, so ``detect + end + leave + assign + rebuild + transfer +
    setup = total`` exactly (up to float rounding). A phase that waits for other workers (joining the
    group, receiving a layer) includes their delays. The master's and the workers' instants are their
    machines' wall clocks (``time.time()``), so clock skew between machines shifts time between phases.

    * ``detect_s``: from the kill to the master's notice, when the kill time is known (injected faults
      record it); None otherwise, and the path starts at the notice;
    * ``end_s``: from the notice to the moment the master writes ``ended/gen{g}`` (a joining node's change
      is noticed when its workers ask for work and ends the generation at the next step boundary);
    * ``leave_s``: from that moment until the last worker had left the old generation: its watch saw the
      key and released the sockets, the blocked operation failed, its loader stopped and the old process
      group was destroyed (0 for a worker new to the job);
    * ``assign_s``: from leaving (or the end, for a new worker) until the worker held its new assignment:
      the wait for the re-plan and the ``GetAssignment`` round trip;
    * ``rebuild_s``: its ``init_process_group`` (store connection and gloo pairs) and the gradient-sync
      groups' ``new_group`` calls;
    * ``transfer_s``: its layer copies (sends, receives and the stage's layers taken or built);
    * ``setup_s``: the rest of its way from the assignment to ready: applying or dropping the pending step,
      arming the new generation's watch, building the stage's executor, buffers and loader, and writing its
      timing;
    * ``plan_s``: re-planning in the master; it runs during ``end``, ``leave`` and ``assign`` and is not
      added to the total;
    * ``resume_s``: from the notice until the last worker was ready (``total - detect``);
    * ``total_s``: from the kill (the notice when the kill time is unknown) until the last worker was ready;
    * ``joined_ready_s``: for each node of ``joined``, in that order, from the moment its workers were
      ready (the last of them asked for work, with its model built) until the last worker of the new
      generation was ready: the join's ready-to-training time. The first joined node's is ``resume_s``
      when no loss came before it.
    """

    generation: int
    reason: str
    lost: tuple[str, ...]
    joined: tuple[str, ...]
    mode: str
    start_step: int
    steps_lost: int
    layers_moved: int
    nodes_alive: int
    pipelines: int
    detect_s: float | None
    plan_s: float
    rebuild_s: float
    transfer_s: float
    resume_s: float
    total_s: float
    end_s: float = 0.0
    leave_s: float = 0.0
    assign_s: float = 0.0
    setup_s: float = 0.0
    joined_ready_s: tuple[float, ...] = ()


@dataclass
class Change:
    """What happened since the last generation started: for its recovery record."""

    noticed_at: float  # time.time()
    reasons: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)
    #: when each node of ``joined`` had its workers ready (time.time(), in the same order)
    ready_at: list[float] = field(default_factory=list)
    #: when the master ended the generation (time.time(), just before writing ``ended/gen{g}``; None until then)
    ended_at: float | None = None

    def merged(self, later: "Change | None") -> "Change":
        """This change followed by ``later`` (which happened before this one's recovery finished): noticed at
        this one's notice, ended at the later end (the interrupted recovery counts as part of ``end``)."""
        if later is None:
            return self
        return Change(
            self.noticed_at,
            self.reasons + later.reasons,
            self.lost + later.lost,
            self.joined + later.joined,
            self.kill_times + later.kill_times,
            self.ready_at + later.ready_at,
            later.ended_at if later.ended_at is not None else self.ended_at,
        )


def recovery_record(
    *,
    generation: int,
    change: Change,
    mode: str,
    start_step: int,
    steps_lost: int,
    layers_moved: int,
    placement: Placement,
    plan_s: float,
    timings: Sequence[dict[str, Any]],
) -> RecoveryRecord:
    """The record of recovering from ``change`` into ``generation``, placed as ``placement``. ``timings`` are
    the ranks' own reports (:func:`~oobleck.engine.store_keys.timing_key`), at least one; the phases are
    those of the rank ready last (see :class:`RecoveryRecord`). ``detect_s`` is None when no kill time is
    known."""
    last = max(timings, key=lambda t: t["resumed_at"])
    resumed_at = last["resumed_at"]
    detect = change.noticed_at - min(change.kill_times) if change.kill_times else None
    ended_at = change.noticed_at if change.ended_at is None else change.ended_at
    # a worker new to the job left no generation (nor does a report without the instants): it starts at the end
    left_at = last.get("left_at") or ended_at
    assigned_at = last.get("assigned_at") or left_at
    rebuild = last["join_s"] + last.get("groups_s", 0.0)
    resume = resumed_at - change.noticed_at
    return RecoveryRecord(
        generation=generation,
        reason="; ".join(change.reasons),
        lost=tuple(change.lost),
        joined=tuple(change.joined),
        mode=mode,
        start_step=start_step,
        steps_lost=steps_lost,
        layers_moved=layers_moved,
        nodes_alive=len({node for node, _ in placement.ranks}),
        pipelines=len(placement.pipelines),
        detect_s=detect,
        plan_s=plan_s,
        rebuild_s=rebuild,
        transfer_s=last["transfer_s"],
        resume_s=resume,
        total_s=resume + (detect or 0.0),
        end_s=ended_at - change.noticed_at,
        leave_s=left_at - ended_at,
        assign_s=assigned_at - left_at,
        setup_s=resumed_at - assigned_at - rebuild - last["transfer_s"],
        joined_ready_s=tuple(resumed_at - ready for ready in change.ready_at),
    )
