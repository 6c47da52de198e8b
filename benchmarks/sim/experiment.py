"""The simulator's experiment: for one GPT-3 shape on the published setup, the policies over fixed-interval
timelines and a trace, fault-free and under failures, with the tuned-Varuna sensitivity row (see
:mod:`benchmarks.sim`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from benchmarks.sim.model import A100_40G_1GPU, POLICIES, Setup, SimulatorError, describe_config, published_costs
from benchmarks.sim.simulate import PolicyConfigs, simulate
from benchmarks.sim.timeline import fixed_interval_trace, parse_interval
from oobleck.trace import TraceEvent, load_trace, summary
from planner.analytic import DEVICES, DeviceSpec, analytic_profile, shape_named
from planner.cluster import ClusterSpec

INTERVALS = ("6h", "1h", "30m", "10m", "5m")
#: global batch per model: the Oobleck artifact's samples per step
MODELS: dict[str, int] = {"gpt3-2.7b": 512, "gpt3-6.7b": 1024}
FIXED_DURATION_S = 24 * 3600.0
REPLACEMENT_DELAY_S = 300.0


def device_named(name: str) -> DeviceSpec:
    if name == A100_40G_1GPU.name:
        return A100_40G_1GPU
    if name in DEVICES:
        return DEVICES[name]
    raise SimulatorError(f"device: got {name!r}; known: {', '.join([A100_40G_1GPU.name, *DEVICES])}")


def build_setup(
    model: str,
    nodes: int = 30,
    gpus_per_node: int = 1,
    device: str = A100_40G_1GPU.name,
    f: int = 1,
    global_batch: int | None = None,
    microbatch: int = 1,
    recompute: bool = False,
    **cost_overrides: Any,
) -> Setup:
    """The shared setup for one GPT-3 shape: analytic profile on ``device``, cluster, published costs."""
    shape = shape_named(model)
    spec = device_named(device)
    profile = analytic_profile(shape, microbatch, spec, recompute=recompute)
    cluster = ClusterSpec(nodes, gpus_per_node, spec.memory_bytes, spec.intra_node_bandwidth, spec.inter_node_bandwidth)
    batch = global_batch if global_batch is not None else MODELS.get(model, 512)
    return Setup(profile, cluster, f, batch, microbatch, published_costs(model, profile, cluster, **cost_overrides))


def scenarios(
    nodes: int,
    intervals: Sequence[str],
    trace: Path | None,
    duration_s: float,
    replacement_delay_s: float,
    seed: int,
) -> list[tuple[str, list[TraceEvent], float, str]]:
    """(label, events, duration, description) for each fixed interval and the trace."""
    out = []
    for label in intervals:
        interval = parse_interval(label)
        events = fixed_interval_trace(nodes, interval, duration_s, replacement_delay_s, seed)
        removes = sum(1 for e in events if e.kind == "remove")
        what = f"a node lost every {label} ({removes} over {duration_s / 3600:g} h), replaced after {replacement_delay_s:g} s"
        out.append((label, events, duration_s, what))
    if trace is not None:
        events = load_trace(trace)
        s = summary(events)
        out.append((trace.stem, events, s.duration_s, s.describe()))
    return out


#: checkpoint intervals (steps) tried for the tuned-Varuna sensitivity row
TUNED_CHECKPOINT_EVERY = (10, 30, 100, 300, 1000)


def run_model(
    setup: Setup,
    cases: Sequence[tuple[str, list[TraceEvent], float, str]],
    node_ready_s: float,
    policies: Sequence[str] = POLICIES,
    tuned_intervals: Sequence[int] = TUNED_CHECKPOINT_EVERY,
) -> dict[str, Any]:
    """Every policy on every timeline for one setup, plus Varuna with its best checkpoint interval among
    ``tuned_intervals`` (``varuna_tuned``, a sensitivity row: the default interval is Varuna's published one)."""
    configs = PolicyConfigs(setup)
    n = setup.cluster.nodes
    fault_free: dict[str, tuple[float, str]] = {}
    for policy, table in (("oobleck", configs.oobleck), ("varuna", configs.varuna), ("bamboo", configs.bamboo)):
        cfg = table.config(n)
        if cfg is None:
            raise SimulatorError(f"{policy}: no configuration fits {n} nodes")
        fault_free[policy] = (setup.global_batch / cfg.step_time_s, describe_config(policy, cfg))
    bamboo_cfg = configs.bamboo.config(n)
    reference = fault_free["oobleck"][0]
    out: dict[str, Any] = {
        "setup": {
            "nodes": n,
            "devices_per_node": setup.cluster.devices_per_node,
            "device_memory_bytes": setup.cluster.device_memory_bytes,
            "inter_node_bandwidth": setup.cluster.inter_node_bandwidth,
            "f": setup.f,
            "global_batch": setup.global_batch,
            "microbatch": setup.microbatch,
            "profile": setup.profile.fingerprint,
            "n0": {"oobleck": configs.oobleck.n0, "varuna": configs.varuna.n0, "bamboo": configs.bamboo.n0},
            "costs": setup.costs.to_dict(),
            "node_ready_s": node_ready_s,
        },
        "fault_free": {
            p: {"samples_per_s": v, "relative": v / reference, "config": d} for p, (v, d) in fault_free.items()
        },
        "bamboo_redundancy_overhead": (
            1 - bamboo_cfg.no_redundancy_step_s / bamboo_cfg.step_time_s if bamboo_cfg is not None else None
        ),
        "scenarios": {},
    }
    for label, events, duration, description in cases:
        results = {p: simulate(p, configs, events, duration, node_ready_s) for p in policies}
        if "varuna" in results and tuned_intervals:
            # sensitivity: Varuna with the checkpoint interval that suits this timeline best
            tries = []
            for k in tuned_intervals:
                costs = dataclasses.replace(setup.costs, checkpoint_every=k)
                tries.append((simulate("varuna", configs, events, duration, node_ready_s, costs=costs), k))
            best, best_k = max(tries, key=lambda rk: rk[0].samples_per_s)
            best.policy = "varuna_tuned"
            best.counts["checkpoint_every"] = best_k
            results["varuna_tuned"] = best
        entry: dict[str, Any] = {"description": description, "duration_s": duration, "policies": {}}
        for p, r in results.items():
            d = r.to_dict()
            d["relative"] = r.samples_per_s / reference
            entry["policies"][p] = d
        oob = results.get("oobleck")
        if oob is not None:
            entry["ratios"] = {
                f"oobleck/{p}": (oob.samples_per_s / r.samples_per_s if r.samples_per_s > 0 else None)
                for p, r in results.items()
                if p != "oobleck"
            }
        out["scenarios"][label] = entry
    return out
