"""The simulator's hook for measured runs: a run's inputs (profile, nodes, schedule, measured costs and
fault-free throughput) and each policy's predicted throughput on them; used by
:mod:`benchmarks.fault_tolerance.validation`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from benchmarks.sim.core import SimResult
from benchmarks.sim.model import POLICIES, Setup, SimulatorError
from benchmarks.sim.simulate import PolicyConfigs, check_policies, simulate
from oobleck.trace import TraceEvent


@dataclass(frozen=True)
class MeasuredRun(Setup):
    """A measured run's inputs, as the simulator needs them to predict its throughput: the :class:`Setup`
    it ran with (its fields first, in their order) and its timeline.

    ``profile``: the profile the run was planned with (e.g. the tiny GPT's measured profile);
    ``cluster.nodes``: the nodes in the job; ``costs``: the run's measured recovery, restart and checkpoint
    figures and checkpoint intervals; ``events``: the failure schedule as replayed (wall-clock seconds, i.e.
    after compression); ``duration_s``: the measured wall time over which throughput was averaged;
    ``fault_free_samples_per_s``: optional measured fault-free throughput per policy, which scales that
    policy's step times so that its fault-free prediction equals the measurement (the cost model's absolute
    step time is then not part of the error)."""

    events: Sequence[TraceEvent]
    duration_s: float
    node_ready_s: float = 0.0
    fault_free_samples_per_s: Mapping[str, float] | None = None


def predict(run: MeasuredRun, policies: Sequence[str] = POLICIES) -> dict[str, SimResult]:
    """Simulate a measured run for each policy (see :class:`MeasuredRun`)."""
    policies = check_policies(policies)
    configs = PolicyConfigs(Setup(run.profile, run.cluster, run.f, run.global_batch, run.microbatch, run.costs))
    out = {}
    for policy in policies:
        scale = 1.0
        if run.fault_free_samples_per_s and policy in run.fault_free_samples_per_s:
            measured = run.fault_free_samples_per_s[policy]
            if not (math.isfinite(measured) and measured > 0):
                raise SimulatorError(f"fault_free_samples_per_s[{policy!r}]: got {measured!r}; must be > 0")
            model = simulate(policy, configs, run.events, run.duration_s, run.node_ready_s).fault_free_samples_per_s
            scale = model / measured
        out[policy] = simulate(policy, configs, run.events, run.duration_s, run.node_ready_s, step_scale=scale)
    return out


def predict_throughput(run: MeasuredRun, policies: Sequence[str] = POLICIES) -> dict[str, float]:
    """Predicted average samples/s of each policy on a measured run (see :class:`MeasuredRun`)."""
    return {p: r.samples_per_s for p, r in predict(run, policies).items()}
