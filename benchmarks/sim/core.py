"""The discrete-event core of the simulator: the result of one policy on one timeline and the event loop
and accounting every policy shares (pure Python, never imports torch). The rules are described in
:mod:`benchmarks.sim`'s docstring; the policies are in :mod:`benchmarks.sim.oobleck_policy` and
:mod:`benchmarks.sim.baselines`.

Time advances from event to event: between two membership changes a policy either trains (steps of a
known length, several committed at once), is busy (a recovery, restart, takeover, reconfiguration or a
foreground checkpoint, which may be cut short or restarted by the next change), or waits for nodes. Every
second of the simulated duration lands in exactly one bucket of the breakdown:

* ``useful``: steps that were committed and never rolled back (for Bamboo without its redundant part),
* ``redundant``: Bamboo's redundant forward passes inside those steps,
* ``recovery``: Oobleck's recoveries, Bamboo's takeovers and reconfigurations, every restart,
* ``checkpoint``: foreground checkpoint writes (Varuna, Bamboo),
* ``lost``: partial steps cut by a failure, steps rolled back to a checkpoint, the unfinished last step,
* ``waiting``: too few nodes for the policy to train at all.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from benchmarks.sim.model import Setup, SimulatorError
from benchmarks.sim.timeline import Change

CATEGORIES = ("useful", "redundant", "recovery", "checkpoint", "lost", "waiting")


@dataclass
class SimResult:
    """One policy on one timeline. ``breakdown`` in seconds (sums to ``duration_s``); ``samples`` committed
    and kept; ``fault_free_samples_per_s``: the policy's throughput on all ``capacity`` nodes without
    failures or checkpoints."""

    policy: str
    duration_s: float
    samples: float
    steps: int
    breakdown: dict[str, float]
    counts: dict[str, int]
    fault_free_samples_per_s: float
    fault_free_config: str

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.duration_s if self.duration_s > 0 else 0.0

    def shares(self) -> dict[str, float]:
        total = sum(self.breakdown.values())
        return {k: (v / total if total > 0 else 0.0) for k, v in self.breakdown.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "samples_per_s": self.samples_per_s,
            "duration_s": self.duration_s,
            "samples": self.samples,
            "steps": self.steps,
            "breakdown_s": dict(self.breakdown),
            "breakdown_share": self.shares(),
            "counts": dict(self.counts),
            "fault_free_samples_per_s": self.fault_free_samples_per_s,
            "fault_free_config": self.fault_free_config,
        }


@dataclass
class Snapshot:
    step: int = 0
    samples: float = 0.0
    useful: float = 0.0
    redundant: float = 0.0


class PolicySim:
    """Accounting and the event loop; subclasses supply the policy's rules."""

    policy = ""

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float) -> None:
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise SimulatorError(f"duration: got {duration_s!r}; must be a positive number of seconds")
        if not (math.isfinite(step_scale) and step_scale > 0):
            raise SimulatorError(f"step_scale: got {step_scale!r}; must be a positive factor")
        self.setup = setup
        self.costs = setup.costs
        self.changes = list(changes)
        self.duration = float(duration_s)
        self.scale = float(step_scale)
        self.batch = setup.global_batch
        self.t = 0.0
        self.mode = "wait"  # run | busy | wait
        self.busy_kind = ""
        self.busy_cat = ""
        self.busy_until = 0.0
        self.busy_since = 0.0
        self.started = False
        self.acc = dict.fromkeys(CATEGORIES, 0.0)
        self.samples = 0.0
        self.step = 0
        self.ckpt = Snapshot()
        self.alive: dict[str, None] = {}
        self.counts: Counter[str] = Counter()
        self.step_s = math.inf
        self.redundant_s = 0.0

    # -- hooks -------------------------------------------------------------------------------------------
    def min_nodes(self) -> int:
        raise NotImplementedError

    def begin(self, now: float) -> None:
        """Start training on the alive nodes (job start or after a restart); mode becomes run or wait."""
        raise NotImplementedError

    def on_changes(self, now: float, lost: list[str], ready: list[str]) -> None:
        raise NotImplementedError

    def on_busy_done(self, now: float, kind: str) -> None:
        raise NotImplementedError

    def at_boundary(self, now: float) -> None:
        """After committed steps: start a checkpoint or a reconfiguration if one is due."""

    def steps_until_boundary(self) -> float:
        return math.inf

    def fault_free(self) -> tuple[float, str]:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------
    def set_step(self, step_s: float, redundant_s: float = 0.0) -> None:
        self.step_s = step_s * self.scale
        self.redundant_s = redundant_s * self.scale

    def steps_to_multiple(self, every: float) -> float:
        """Steps until the step count is next a multiple of ``every`` (a checkpoint interval)."""
        return every - self.step % every if self.step % every else every

    def interrupt(self, now: float) -> None:
        """A failure cuts the step in progress: its time so far is lost."""
        if self.mode == "run":
            self.acc["lost"] += max(0.0, now - self.t)
            self.t = now

    def start_busy(self, now: float, kind: str, category: str, seconds: float) -> None:
        self.t = now
        self.mode = "busy"
        self.busy_kind = kind
        self.busy_cat = category
        self.busy_since = now
        self.busy_until = now + seconds

    def restart_after_loss(self, now: float, seconds: float, newcomers: bool = False) -> None:
        """A node in the job was lost during the process restart under way (busy ``restart``, ``seconds``
        long when begun anew). Within ``costs.restart_join_s`` of its start the restarted processes are
        still starting and have not asked for their place in the plan: they take the newer plan when they
        do, so the loss joins the restart (counted in ``restart_joins``), which ends when it would have,
        unless the newer plan brings in ``newcomers``: nodes the restart had left out (spares), whose
        processes restart only now, ``seconds`` from ``now``. Later the restarted processes hold the older
        plan and, as in the engine, restart again: a whole new restart from ``now``."""
        if now < self.busy_since + self.costs.restart_join_s:
            self.counts["restart_joins"] += 1
            if newcomers:
                self.busy_until = max(self.busy_until, now + seconds)
        else:
            self.start_busy(now, "restart", "recovery", seconds)

    def wait(self, now: float) -> None:
        self.t = now
        self.mode = "wait"

    def snapshot(self) -> Snapshot:
        return Snapshot(self.step, self.samples, self.acc["useful"], self.acc["redundant"])

    def rollback(self) -> None:
        """Back to the latest complete checkpoint: the steps since are lost."""
        c = self.ckpt
        self.acc["lost"] += (self.acc["useful"] - c.useful) + (self.acc["redundant"] - c.redundant)
        self.acc["useful"], self.acc["redundant"] = c.useful, c.redundant
        self.counts["steps_lost"] += self.step - c.step
        self.step, self.samples = c.step, c.samples

    def commit(self, k: int) -> None:
        self.acc["useful"] += k * (self.step_s - self.redundant_s)
        self.acc["redundant"] += k * self.redundant_s
        self.samples += k * self.batch
        self.step += k

    # -- loop --------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        changes = self.changes
        i = 0
        n = len(changes)
        while True:
            next_t = changes[i].at_s if i < n else math.inf
            horizon = min(next_t, self.duration)
            if self.mode == "run":
                k = math.floor((horizon - self.t) / self.step_s * (1 + 1e-12)) if self.step_s > 0 else 0
                k = int(min(k, self.steps_until_boundary()))
                if k >= 1:
                    self.commit(k)
                    self.t = min(self.t + k * self.step_s, horizon)
                    self.at_boundary(self.t)
                    continue
            elif self.mode == "busy" and self.busy_until <= horizon:
                self.acc[self.busy_cat] += self.busy_until - self.t
                self.t = self.busy_until
                self.mode = "run"  # the hook sets the real mode
                self.on_busy_done(self.t, self.busy_kind)
                continue
            if next_t > self.duration or i >= n:
                # nothing more happens before the end
                end = self.duration
                bucket = {"run": "lost", "busy": self.busy_cat, "wait": "waiting"}[self.mode]
                self.acc[bucket] += max(0.0, end - self.t)
                self.t = end
                break
            # changes at next_t (all of them together)
            lost, ready = [], []
            while i < n and changes[i].at_s == next_t:
                (lost if changes[i].kind == "lost" else ready).append(changes[i].node)
                i += 1
            if self.mode == "busy":
                self.acc[self.busy_cat] += next_t - self.t
                self.t = next_t
            elif self.mode == "wait":
                self.acc["waiting"] += next_t - self.t
                self.t = next_t
            for node in lost:
                self.alive.pop(node, None)
            for node in ready:
                self.alive[node] = None
            if not self.started:
                if len(self.alive) >= self.min_nodes():
                    self.started = True
                    self.t = next_t
                    self.begin(next_t)
                continue
            self.on_changes(next_t, lost, ready)
        counts = {k: int(v) for k, v in sorted(self.counts.items())}
        ff, desc = self.fault_free()
        return SimResult(self.policy, self.duration, self.samples, self.step, dict(self.acc), counts, ff, desc)
