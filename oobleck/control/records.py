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
    #: :mod:`planner.templates`, "Local runs")
    predicted_step_s: float = 0.0


@dataclass(frozen=True)
class RecoveryRecord:
    """One membership change, from the master's notice to training running again in the new generation.

    ``mode``: ``memory`` (layers copied from surviving replicas), ``checkpoint`` (restored from the latest
    checkpoint), ``init`` (restarted from step 0: no copy and no checkpoint) or ``restart`` (the baselines:
    every worker process restarted, then the latest checkpoint loaded). Times in seconds:
    ``detect_s`` from the kill to the master's notice (when the kill time is known: injected faults record
    it), ``plan_s`` re-planning, ``rebuild_s`` the slowest worker's join of the new process groups,
    ``transfer_s`` the slowest worker's layer copies, ``resume_s`` from the notice until every worker was
    ready to train, ``total_s`` = detect + resume (the notice when detect is unknown)."""

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


@dataclass
class Change:
    """What happened since the last generation started: for its recovery record."""

    noticed_at: float  # time.time()
    reasons: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)

    def merged(self, later: "Change | None") -> "Change":
        """This change followed by ``later`` (which happened before this one's recovery finished)."""
        if later is None:
            return self
        return Change(
            self.noticed_at,
            self.reasons + later.reasons,
            self.lost + later.lost,
            self.joined + later.joined,
            self.kill_times + later.kill_times,
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
    the ranks' own reports (``resumed_at``, a ``time.time()``, ``join_s`` and ``transfer_s``), at least one;
    the slowest rank's figures count, ``detect_s`` is None when no kill time is known."""
    resumed_at = max(t["resumed_at"] for t in timings)
    detect = change.noticed_at - min(change.kill_times) if change.kill_times else None
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
        rebuild_s=max(t["join_s"] for t in timings),
        transfer_s=max(t["transfer_s"] for t in timings),
        resume_s=resume,
        total_s=resume + (detect or 0.0),
    )
