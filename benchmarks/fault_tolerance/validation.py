"""The simulator checked against the measured runs: the costs, node start times and throughputs measured,
and each policy's run under failures predicted from them (see the package notes)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from benchmarks.fault_tolerance.accounting import recovery_moments, summarize
from benchmarks.fault_tolerance.harness import Run
from benchmarks.fault_tolerance.schedule import Schedule
from benchmarks.jobs import median
from benchmarks.sim.measured import MeasuredRun, predict
from benchmarks.sim.model import Costs
from oobleck.trace import TraceEvent
from oobleck.config import load_config

#: acceptance bound of the simulator's relative error
MAX_SIM_ERROR = 0.20
#: stands for "never" in the simulator's checkpoint intervals (a policy run without checkpoints) and
#: Bamboo's re-partition threshold
NEVER = 10**9
#: the copy of layers is inside the measured recovery times; the simulator's copy term is made negligible
COPY_BANDWIDTH = 1e18


def recovery_durations(run: Run) -> list[tuple[dict[str, Any], float]]:
    """Each recovery record of the run with its duration as the simulator costs it: from its generation's
    start (the last membership change it recovers from, re-planned; for a Varuna-style grow, the checkpoint
    written) to every worker ready. Detection and planning take milliseconds here and are left out; the
    record's own ``total_s`` also counts time the job kept training (a join noticed steps before the boundary
    it folds in at), or several restarts when a loss cut the previous one."""
    moments = recovery_moments(run.rows, run.records, run.gen_starts)
    by_gen = {rec["generation"]: rec for rec in run.records}
    return [(by_gen[g], ready - run.gen_starts[g]) for g, (_, ready) in moments.items()]


def node_ready_times(run: Run) -> tuple[list[float], list[float]]:
    """Seconds from a node's add (``oobleck inject --add`` returned) to its join's notice (all its workers
    up and waiting), over the run's join-only recoveries; and, for each added node that had not joined when
    the window ended, the lower bound ``end - add``."""
    added = {e.node: e.at for e in run.replayed if e.kind == "add" and e.note is None and e.at <= run.end}
    moments = recovery_moments(run.rows, run.records, run.gen_starts)
    seen, joined = [], set()
    for record in run.records:
        joined.update(record["joined"])
        times = [added[n] for n in record["joined"] if n in added]
        if times and not record["lost"] and record["generation"] in moments:
            seen.append(moments[record["generation"]][0] - min(times))
    return seen, [run.end - at for node, at in added.items() if node not in joined]


def node_ready_s(runs: dict[str, Run]) -> tuple[dict[str, float], str]:
    """``node_ready_s`` for each run's simulation, and how it was found. A node's start (an agent and a worker
    importing torch) competes for this machine's cores with the job, so it is taken per run: the median of
    the run's own joins; without one, the median over all runs' joins, raised to the run's largest lower
    bound (a node that never joined in the window took at least that long); with neither, that bound (0
    when nothing was added)."""
    found = {policy: node_ready_times(run) for policy, run in runs.items()}
    pooled = [t for seen, _ in found.values() for t in seen]
    out = {}
    for policy, (seen, censored) in found.items():
        bound = max(censored, default=0.0)
        out[policy] = median(seen) if seen else (max(median(pooled), bound) if pooled else bound)
    how = f"per run: its joins' median (add to notice), else the median of all {len(pooled)} joins raised to its never-joined nodes' lower bound"
    return out, how


def checkpoint_every(config: Path) -> int:
    """The checkpoint interval a run used (its policy's default unless the config sets one), :data:`NEVER`
    for none."""
    every = load_config(config).fault_tolerance.checkpoint_every
    return every or NEVER


def measured_costs(runs: dict[str, Run]) -> tuple[Costs, dict[str, str]]:
    """The simulator's :class:`~benchmarks.sim.model.Costs` from the runs under failures (by policy), and
    where each figure came from. Medians of :func:`recovery_durations`: Oobleck's
    recoveries (``recovery_fixed_s``; the layer copy is inside, so ``copy_bandwidth`` is made negligible),
    restarts of any policy (``restart_s``, also Bamboo's restart after a fatal loss), Bamboo's takeovers (losses) and its re-plans for joins (its
    ``reconfigure``); the largest of the restart records' ``leave_s + assign_s`` (``restart_join_s``: until
    the restarted processes ask for their place, a loss joins the restart; a record whose restart took in a
    later loss times it from that loss's re-plan, so each record is a lower bound, and a median of them came
    out at 5.4 s where uninterrupted restarts took 8-9 s); the median foreground checkpoint write; each policy's checkpoint interval. A figure no
    run produced is 0 (no event of that kind happened, so the simulator should not need it either). The
    simulator's Bamboo re-partitions after a takeover once 2 x overloaded / active nodes exceeds a threshold
    (the Oobleck artifact's rule); the engine's never does, so the threshold is :data:`NEVER`, and it
    re-plans for every joining node instead (``bamboo_replans_on_join``)."""
    durations = {policy: recovery_durations(run) for policy, run in runs.items()}

    def pick(policies: Sequence[str], keep: Any) -> list[float]:
        return [d for p in policies if p in durations for record, d in durations[p] if keep(record)]

    not_restart = lambda r: r["mode"] != "restart"  # noqa: E731
    figures = {
        "recovery_fixed_s": (pick(["oobleck"], not_restart), "Oobleck recoveries"),
        "restart_s": (pick(list(runs), lambda r: r["mode"] == "restart"), "restarts (process restart + checkpoint load)"),
        "bamboo_takeover_s": (pick(["bamboo"], lambda r: bool(r["lost"]) and not_restart(r)), "Bamboo takeovers"),
        "bamboo_reconfigure_s": (
            pick(["bamboo"], lambda r: bool(r["joined"]) and not r["lost"] and not_restart(r)),
            "Bamboo re-plans for joining nodes",
        ),
        "restart_join_s": (
            [r.get("leave_s", 0.0) + r.get("assign_s", 0.0) for run in runs.values() for r in run.records if r["mode"] == "restart"],
            "restarts' process starts (leave + assign: until the last restarted worker held its place in the plan)",
            max,
        ),
        "checkpoint_write_s": (
            [r.get("checkpoint_s", 0.0) for run in runs.values() for r in run.rows if r.get("checkpoint_s", 0.0) > 0],
            "foreground checkpoint writes",
        ),
    }
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (samples, what, *how) in figures.items():
        pick_one = how[0] if how else median
        values[key] = pick_one(samples) if samples else 0.0
        sources[key] = f"{pick_one.__name__} of {len(samples)} {what}" if samples else f"none measured ({what}): 0"
    values["copy_bandwidth"] = COPY_BANDWIDTH
    sources["copy_bandwidth"] = "negligible: the copies are inside the measured recovery times"
    for key, policy in (("checkpoint_every", "varuna"), ("oobleck_checkpoint_every", "oobleck"), ("bamboo_checkpoint_every", "bamboo")):
        if policy in runs:
            values[key] = checkpoint_every(runs[policy].config)
            sources[key] = f"the {policy} run's interval" + (" (none)" if values[key] == NEVER else "")
    # the engine's Bamboo restarts after a fatal loss exactly as Varuna restarts: a process restart
    values["bamboo_restart_s"] = values["restart_s"]
    sources["bamboo_restart_s"] = "the restarts' figure (restart_s): the engine restarts Bamboo's processes as Varuna's"
    values["varuna_grows_only_if_faster"] = False
    sources["varuna_grows_only_if_faster"] = "no: the engine's Varuna-style master restarts for every joining node"
    values["bamboo_replans_on_join"] = True
    sources["bamboo_replans_on_join"] = "yes: the engine's Bamboo-style master re-plans for every joining node"
    values["bamboo_reconfigure_threshold"] = float(NEVER)
    sources["bamboo_reconfigure_threshold"] = (
        "never: the engine's Bamboo keeps its taken-over pipelines until nodes join (no overload rule)"
    )
    return Costs(**values), sources


def measured_events(run: Run, schedule: Schedule) -> list[TraceEvent]:
    """The run's schedule as replayed, in seconds from its window's start: the initial nodes at 0, then
    the losses and adds that happened inside the window."""
    events = [TraceEvent(0.0, "add", name) for name in schedule.initial]
    for e in run.replayed:
        if e.note is None and run.start < e.at <= run.end:
            events.append(TraceEvent(e.at - run.start, "remove" if e.kind == "remove" else "add", e.node))
    return events


def steady_samples_per_s(*runs: Run) -> float:
    """The fault-free throughput as the simulator means it (all nodes, no failure, no checkpoint), over the
    given runs' first generations pooled: their steps after each run's first, over their step times less
    foreground checkpoint writes (Bamboo's redundant work stays in: it is part of its step)."""
    rows = [r for run in runs for r in run.rows[1:] if r["generation"] == run.rows[0]["generation"]]
    seconds = sum(r["step_time_s"] - r.get("checkpoint_s", 0.0) for r in rows)
    return len(rows) * runs[0].global_batch / seconds if seconds > 0 else math.nan


def validate_simulator(runs: dict[str, Run], fault_free: dict[str, Run], schedule: Schedule) -> dict[str, Any]:
    """Predict each policy's run under failures with :func:`benchmarks.sim.measured.predict` and compare with
    the measurement. The policy's step times are scaled to the throughput of its starting configuration
    measured over every fault-free step of the policy's pair of runs (:func:`steady_samples_per_s`): its
    fault-free run and the failure run's first generation, before the first failure. This machine's speed
    drifts by up to a third between two runs a minute apart (other work shares it), and the pooled steps
    estimate the speed of the hour better than either run alone. As checks on that drift, the prediction is
    also made with each of the two alone (``_fault_free_run``, ``_in_run``)."""
    from oobleck.cluster_spec import cluster_spec
    from oobleck.profiler import ensure_profile

    costs, sources = measured_costs(runs)
    ready, sources["node_ready_s"] = node_ready_s(runs)
    out: dict[str, Any] = {"costs": costs.to_dict(), "cost_sources": sources, "policies": {}}
    for policy, run in runs.items():
        config = load_config(run.config)
        t = config.training
        measured = summarize(run)["samples_per_s"]
        entry: dict[str, Any] = {"measured_samples_per_s": measured, "node_ready_s": ready[policy]}
        calibrations = (
            ("", steady_samples_per_s(fault_free[policy], run)),
            ("_fault_free_run", steady_samples_per_s(fault_free[policy])),
            ("_in_run", steady_samples_per_s(run)),
        )
        for key, calibration in calibrations:
            measured_run = MeasuredRun(
                profile=ensure_profile(config),
                cluster=cluster_spec(config.cluster).with_nodes(schedule.capacity),
                f=config.fault_tolerance.f,
                global_batch=t.global_batch,
                microbatch=t.microbatch,
                costs=costs,
                events=measured_events(run, schedule),
                duration_s=run.end - run.start,
                node_ready_s=ready[policy],
                fault_free_samples_per_s={policy: calibration},
            )
            result = predict(measured_run, [policy])[policy]
            error = (result.samples_per_s - measured) / measured if measured > 0 else math.inf
            entry |= {
                f"calibration{key}_samples_per_s": calibration,
                f"predicted{key}_samples_per_s": result.samples_per_s,
                f"relative_error{key}": error,
                f"simulated{key}": result.to_dict(),
            }
        entry |= {
            "within_bound": abs(entry["relative_error"]) <= MAX_SIM_ERROR,
            "events": [dataclasses.asdict(e) for e in measured_run.events],
            "duration_s": measured_run.duration_s,
        }
        out["policies"][policy] = entry
    return out
