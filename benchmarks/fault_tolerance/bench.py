"""The whole benchmark: for each schedule and seed, every policy fault-free and under the schedule, their
summaries and ratios and the simulator's check; the summary over the seeds and the JSON report (see the
package notes)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.cpu_shares import cpus_per_node, remove_stale_groups
from benchmarks.fault_tolerance.accounting import kept_rows, summarize
from benchmarks.fault_tolerance.harness import Run, job_config, measure_profile, run_policy
from benchmarks.fault_tolerance.report import plot
from benchmarks.fault_tolerance.schedule import Schedule
from benchmarks.fault_tolerance.seeds import seed_summary
from benchmarks.fault_tolerance.validation import validate_simulator
from benchmarks.jobs import SMALL_DEVICE_GIB, machine_info


@dataclass
class Options:
    nodes: int
    steps: int
    every_s: float
    failures: int
    replace_after_s: float
    trace: Path | None
    compression: float
    policies: list[str]
    seeds: list[int]
    run_timeout_s: float
    out: Path
    plot: Path | None
    keep: Path | None
    argv: list[str] = field(default_factory=list)
    cpu_share: str = "node"
    #: the generated schedules to run (names of :data:`benchmarks.fault_tolerance.schedule.UNITS`)
    schedules: list[str] = field(default_factory=lambda: ["interval"])
    every_steps: int = 20
    replace_after_steps: int = 10


def run_rows(run: Run, initial: int) -> list[dict[str, Any]]:
    """A run's rows for the JSON: commit time from the window's start and what the plot needs
    (``nodes_placed``: the nodes the step's generation trains on, ``initial`` in the first, a recovery
    record's ``nodes_alive`` after it)."""
    keep = kept_rows(run.rows)
    placed = {rec["generation"]: rec["nodes_alive"] for rec in run.records}
    return [
        {
            "t": row["commit_at"] - run.start,
            "step": row["step"],
            "generation": row["generation"],
            "nodes_alive": row["nodes_alive"],
            "nodes_placed": placed.get(row["generation"], initial),
            "pipelines": row["pipelines"],
            "step_time_s": row["step_time_s"],
            "redundant_s": row.get("redundant_s", 0.0),
            "checkpoint_s": row.get("checkpoint_s", 0.0),
            "kept": k,
        }
        for row, k in zip(run.rows, keep)
    ]


def run_bench(opts: Options, schedule: Schedule, work: Path, plot_path: Path | None) -> dict[str, Any]:
    """Every policy fault-free and under the schedule, the summaries, ratios and the simulator's check; the
    plot is written to ``plot_path`` unless None. ``passed``: each acceptance check that applies holds
    (Oobleck faster than every baseline run, when both ran; every simulator error within
    :data:`MAX_SIM_ERROR`)."""
    if opts.cpu_share == "node":
        remove_stale_groups()  # those of an earlier benchmark that was killed
    machine = machine_info()
    started = time.monotonic()
    measure_profile(job_config(work, "profile", opts.policies[0], schedule, opts.steps))
    fault_free: dict[str, Run] = {}
    failing: dict[str, Run] = {}
    for policy in opts.policies:  # a policy's pair back to back: the machine's load drifts between pairs
        capped = opts.cpu_share == "node"
        fault_free[policy] = run_policy(work, policy, schedule, opts.steps, False, opts.run_timeout_s, capped)
        failing[policy] = run_policy(work, policy, schedule, opts.steps, True, opts.run_timeout_s, capped)
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    ff = {p: summarize(r)["samples_per_s"] for p, r in fault_free.items()}
    policies: dict[str, Any] = {}
    for policy in opts.policies:
        run = failing[policy]
        policies[policy] = {
            **summarize(run),
            "fault_free": summarize(fault_free[policy]),
            "run_dir": str(run.run_dir),
            "recovery_records": run.records,
            "replayed": [dataclasses.asdict(e) | {"at": e.at - run.start} for e in run.replayed],
            "rows": run_rows(run, len(schedule.initial)),
        }
    ratios = {}
    if "oobleck" in policies:
        for policy in opts.policies:
            if policy != "oobleck":
                theirs, theirs_ff = policies[policy]["samples_per_s"], ff[policy]
                ratios[f"oobleck/{policy}"] = {
                    "failures": policies["oobleck"]["samples_per_s"] / theirs if theirs > 0 else None,
                    "fault_free": ff["oobleck"] / theirs_ff if theirs_ff > 0 else None,
                }
    simulator = validate_simulator(failing, fault_free, schedule)
    acceptance = {
        "oobleck_faster_than_baselines": (
            all(r["failures"] is None or r["failures"] > 1 for r in ratios.values()) if ratios else None
        ),
        "simulator_within_20pct": all(v["within_bound"] for v in simulator["policies"].values()),
    }
    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.fault_tolerance " + " ".join(opts.argv),
        "config": {
            "model": "gpt tiny (d_model 32, n_head 2, seq_len 16), float64, global batch 16, microbatch 2",
            "device_memory_gib": SMALL_DEVICE_GIB,
            "f": 1,
            "global_batch": next(iter(failing.values())).global_batch,
            "steps": opts.steps,
            "policies": opts.policies,
            "schedule": schedule.description,
            "initial_nodes": list(schedule.initial),
            "events": [dataclasses.asdict(e) for e in schedule.events],
            "run_timeout_s": opts.run_timeout_s,
            "cpus_per_node": cpus_per_node(schedule.capacity) if opts.cpu_share == "node" else None,
        },
        "machine": machine,
        "wall_s": time.monotonic() - started,
        "policies": policies,
        "ratios": ratios,
        "simulator": simulator,
        "acceptance": acceptance,
        "passed": all(ok is not False for ok in acceptance.values()),
        "plot": str(plot_path) if plot_path is not None else None,
    }
    if plot_path is not None:
        plot(report, plot_path)
    return report


def plot_path(opts: Options, name: str, seed: int, runs: int) -> Path | None:
    """Where the plot of one run goes: ``--plot`` itself when the invocation makes one run, else
    ``STEM-NAME-seedS.SUFFIX`` beside it."""
    if opts.plot is None or runs == 1:
        return opts.plot
    return opts.plot.with_name(f"{opts.plot.stem}-{name}-seed{seed}{opts.plot.suffix}")


def run_schedules(opts: Options, schedules: dict[str, dict[int, Schedule]], work: Path) -> dict[str, Any]:
    """:func:`run_bench` for each schedule (name -> seed -> schedule; a trace is one schedule of seed 0),
    one after the other in ``WORK/NAME-seedS``, and per schedule the summary over its seeds
    (:func:`~benchmarks.fault_tolerance.seeds.seed_summary`). ``passed``: every run passed."""
    started = time.monotonic()
    runs = sum(len(by_seed) for by_seed in schedules.values())
    out: dict[str, Any] = {}
    for name, by_seed in schedules.items():
        reports = {}
        for seed, schedule in by_seed.items():
            run_dir = work / f"{name}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            reports[seed] = run_bench(opts, schedule, run_dir, plot_path(opts, name, seed, runs))
        out[name] = {**seed_summary(reports), "seeds": {str(seed): r for seed, r in reports.items()}}
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.fault_tolerance " + " ".join(opts.argv),
        "wall_s": time.monotonic() - started,
        "schedules": out,
        "passed": all(r["passed"] for s in out.values() for r in s["seeds"].values()),
    }
