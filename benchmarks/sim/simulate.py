"""One policy simulated over one node-availability timeline: the policies' configuration tables and the
dispatch to their state machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from benchmarks.sim.baselines import BambooSim, VarunaSim
from benchmarks.sim.core import PolicySim, SimResult
from benchmarks.sim.model import POLICIES, BambooConfigs, Costs, OobleckConfigs, Setup, SimulatorError, VarunaConfigs
from benchmarks.sim.oobleck_policy import OobleckSim
from benchmarks.sim.timeline import usable_timeline
from oobleck.trace import TraceEvent


@dataclass
class PolicyConfigs:
    """The three policies' configuration tables for one :class:`Setup` (built once, reused across
    timelines)."""

    setup: Setup
    oobleck: OobleckConfigs = field(init=False)
    varuna: VarunaConfigs = field(init=False)
    bamboo: BambooConfigs = field(init=False)

    def __post_init__(self) -> None:
        self.oobleck = OobleckConfigs(self.setup)
        self.varuna = VarunaConfigs(self.setup)
        self.bamboo = BambooConfigs(self.setup)


def check_policies(policies: Iterable[str]) -> list[str]:
    out = list(policies)
    for p in out:
        if p not in POLICIES:
            raise SimulatorError(f"policy: got {p!r}; known policies: {', '.join(POLICIES)}")
    if not out:
        raise SimulatorError(f"no policy given; known policies: {', '.join(POLICIES)}")
    return out


def simulate(
    policy: str,
    configs: PolicyConfigs,
    events: Sequence[TraceEvent],
    duration_s: float | None = None,
    node_ready_s: float = 0.0,
    step_scale: float = 1.0,
    costs: Costs | None = None,
) -> SimResult:
    """Run ``policy`` over the node-availability trace ``events`` for ``duration_s`` (default: until the
    trace's last event) with at most ``configs.setup.cluster.nodes`` nodes in the job. ``step_scale``
    multiplies every step time (calibration); ``costs`` replaces ``configs.setup.costs``."""
    check_policies([policy])
    if not events:
        raise SimulatorError("trace has no events; expected lines like 0,add,node1 (a node-availability trace)")
    if duration_s is None:
        duration_s = events[-1].at_s
        if duration_s <= 0:
            raise SimulatorError("trace lasts 0 s (every event at time 0); give a duration")
    changes = usable_timeline(events, configs.setup.cluster.nodes, node_ready_s)
    sim: PolicySim
    if policy == "oobleck":
        sim = OobleckSim(configs.setup, changes, duration_s, step_scale, configs.oobleck)
    elif policy == "varuna":
        sim = VarunaSim(configs.setup, changes, duration_s, step_scale, configs.varuna)
    else:
        sim = BambooSim(configs.setup, changes, duration_s, step_scale, configs.bamboo)
    if costs is not None:
        sim.costs = costs
    return sim.run()
