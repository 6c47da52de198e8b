"""In-memory recovery against a restart from a checkpoint, on local nodes with the tiny float64 GPT.

``python -m benchmarks.recovery [--nodes N] [--steps S] [--restarts R] [--rounds K] [--keep DIR] [--out PATH]``

Recovery: one ``oobleck run`` of the tiny GPT on ``N`` (default 8) single-device local nodes, planned with
2 MiB devices so that n0 = 2 (two-stage pipelines: a lost node's stage must be copied to a survivor, so
layers move), f = 1. The config's ``faults:`` kill (SIGKILL of the node's agent and workers, a machine's
death) five nodes at different steps and phases (forward, backward, gradient sync, optimizer, backward),
one at a time. Each kill is a recovery record in ``RUN/recoveries.jsonl``; the figures are its fields:

* ``total_s``: from the kill (the victim writes its last moment into the master's store just before it
  SIGKILLs itself) until every worker of the new generation was ready to train: joined the new process
  group and holds its stage's layers at the committed step, copied from surviving replicas when missing;
* its phases, one after the other on the way to the worker ready last (exact definitions in
  :class:`oobleck.control.records.RecoveryRecord`): ``detect_s`` (kill to the master's notice), ``end_s``
  (notice to ``ended/gen{g}`` written), ``leave_s`` (that worker out of the old generation: sockets released,
  old group destroyed), ``assign_s`` (waiting for its new assignment), ``rebuild_s`` (its
  ``init_process_group`` and ``new_group`` calls), ``transfer_s`` (its layer copies) and ``setup_s`` (the rest
  of its way to ready). They add up to ``total_s``; the JSON's ``phases_add_up`` checks every record (within
  :data:`SUM_TOLERANCE_S`). ``plan_s`` (re-planning, during end, leave and assign) and ``resume_s`` (notice
  to ready) are reported too.

The run must also compute exactly what one process computes: its losses and final parameters are compared
with ``oobleck train-local`` (float64, relative difference < 1e-9).

Restart (Varuna-style: every process starts again and loads the last checkpoint): ``oobleck run --resume``
of the same config on the ``N - 1`` nodes that survive a kill, in a fresh run directory holding a copy of the
recovery run's final checkpoint (step ``S``, every layer's parameters and AdamW state), trained ``RESTART_STEPS``
steps further. Its time runs from the launch of ``oobleck run`` until every worker of its first generation was
ready to train (the same end point as ``total_s``, read from the ``gen1/timing/r*`` keys the workers write
into the master's store): Python start-up and imports, planning (the profile is cached already: no
profiling), the master, the agents' registration, the workers' start and torch imports, the process group,
building the layers and loading the checkpoint. What the figure leaves out favours the restart: detecting the
failure and tearing the old job down, and re-computing the steps since the last checkpoint (in-memory
recovery loses none). It runs ``R`` times (default 2); the median counts. The time until the restarted job's
first step was committed is reported too, and the resumed steps are checked against the reference as well.

The JSON (``benchmarks/results/recovery.json`` or ``--out``) holds every record, the restarts, the
comparison with the reference, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.jobs import (
    compare_with_reference,
    first_generation_ready,
    launch,
    machine_info,
    matches,
    median,
    read_jsonl,
    tiny_gpt,
    train_reference,
    write_config,
)
from oobleck.nodes import node_name

RESULTS = Path(__file__).resolve().parent / "results" / "recovery.json"
#: the phases that add up to total_s, in order
PATH = ("detect_s", "end_s", "leave_s", "assign_s", "rebuild_s", "transfer_s", "setup_s")
PHASES = (*PATH, "plan_s", "resume_s", "total_s")
#: how far the phases' sum may be from total_s (float rounding only: they are differences of the same instants)
SUM_TOLERANCE_S = 0.001
#: (step, phase, node index): five kills, one at a time, in different phases of a step
KILLS = ((2, "forward", 1), (4, "backward", 3), (6, "sync", 5), (8, "optimizer", 7), (10, "backward", 2))
RUN_TIMEOUT_S = 900.0
#: steps a restart trains after resuming (it must run on after its first step to be measured)
RESTART_STEPS = 20
TARGET_TOTAL_S = 0.3
TARGET_RATIO = 10.0


def kill_schedule(nodes: int, steps: int) -> list[tuple[int, str, int]]:
    """The kills that fit ``nodes`` nodes and ``steps`` steps, keeping at least 3 nodes alive."""
    kills = [k for k in KILLS if k[2] < nodes and k[0] < steps - 1]
    return kills[: max(0, nodes - 3)]


def reference_run(work: Path, nodes: int, steps: int) -> Path:
    """``oobleck train-local`` of the job for ``steps + RESTART_STEPS`` steps with a checkpoint after
    ``steps`` (the recovery runs end there; the restarts resume from there)."""
    raw = tiny_gpt(work / "profiles", nodes, steps + RESTART_STEPS)
    raw["fault_tolerance"]["checkpoint_every"] = steps
    return train_reference(write_config(work / "reference.yaml", raw), work / "reference")


def recovery_round(work: Path, nodes: int, steps: int, index: int, reference: Path) -> dict[str, Any]:
    """One job with the kills of :func:`kill_schedule`; returns its records and the reference comparison."""
    kills = kill_schedule(nodes, steps)
    faults = [{"step": s, "phase": p, "kind": "kill", "target": "node", "nodes": [n]} for s, p, n in kills]
    raw = tiny_gpt(work / "profiles", nodes, steps, faults=faults)
    config = write_config(work / f"recovery-{index}.yaml", raw)
    job = launch(config, work / f"recovery-{index}")
    code = job.wait(RUN_TIMEOUT_S)
    leftover = job.reap()
    if code != 0:
        raise RuntimeError(f"the recovery run failed ({code}):\n{job.output()[-3000:]}")
    records = read_jsonl(job.run_dir / "recoveries.jsonl")
    by_node = {node_name(n): (s, p) for s, p, n in kills}
    for record in records:
        lost = record["lost"]
        record["killed_at"] = [{"node": n, "step": by_node[n][0], "phase": by_node[n][1]} for n in lost if n in by_node]
    comparison = compare_with_reference(job.run_dir, reference, steps)
    return {
        "config": str(config),
        "run_dir": str(job.run_dir),
        "kills": [{"step": s, "phase": p, "node": node_name(n)} for s, p, n in kills],
        "records": records,
        "reference": comparison,
        "processes_left": leftover,
    }


def restart(work: Path, nodes: int, steps: int, checkpoint_dir: Path, index: int, reference: Path) -> dict[str, Any]:
    """``oobleck run --resume`` on ``nodes`` nodes from a copy of ``checkpoint_dir`` (see the module notes)."""
    run_dir = work / f"restart-{index}"
    shutil.copytree(checkpoint_dir, run_dir / "checkpoints" / checkpoint_dir.name)
    raw = tiny_gpt(work / "profiles", nodes, steps + RESTART_STEPS)
    config = write_config(work / f"restart-{index}.yaml", raw)
    job = launch(config, run_dir, "--resume")
    try:
        figures = first_generation_ready(job, RUN_TIMEOUT_S)
        code = job.wait(RUN_TIMEOUT_S)
    finally:
        job.stop()
    if code != 0:
        raise RuntimeError(f"the restart run failed ({code}):\n{job.output()[-3000:]}")
    comparison = compare_with_reference(run_dir, reference, steps + RESTART_STEPS, first_step=steps)
    return {"nodes": nodes, "resumed_at_step": steps, **figures, "reference": comparison}


def run_bench(nodes: int, steps: int, rounds: int, restarts: int, work: Path) -> dict[str, Any]:
    machine = machine_info()
    started = time.monotonic()
    reference = reference_run(work, nodes, steps)
    runs = [recovery_round(work, nodes, steps, i, reference) for i in range(rounds)]
    checkpoint = Path(runs[0]["reference"]["final_checkpoint"])
    restart_runs = [restart(work, nodes - 1, steps, checkpoint, i, reference) for i in range(restarts)]
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    records = [r for run in runs for r in run["records"]]
    kills = [r for r in records if r["lost"]]
    summary = {name: median([r[name] for r in kills if r[name] is not None]) for name in PHASES}
    unaccounted = max(abs(sum(r[name] or 0.0 for name in PATH) - r["total_s"]) for r in records)
    restart_ready = median([r["ready_s"] for r in restart_runs])
    ratio = restart_ready / summary["total_s"]
    exact = all(matches(run["reference"]) for run in runs) and all(matches(r["reference"]) for r in restart_runs)
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "model": "gpt tiny (d_model 32, n_head 2, seq_len 16), float64, global batch 16, microbatch 2",
            "nodes": nodes,
            "steps": steps,
            "n0": 2,
            "f": 1,
            "rounds": rounds,
            "restarts": restarts,
        },
        "machine": machine,
        "wall_s": time.monotonic() - started,
        "recoveries": records,
        "recovery_median_s": summary,
        "phases_add_up": unaccounted <= SUM_TOLERANCE_S,
        "max_unaccounted_s": unaccounted,
        "recoveries_all_in_memory": all(r["mode"] == "memory" and r["steps_lost"] == 0 for r in kills),
        "restart": {
            "how": "`oobleck run --resume` on the survivors from a copy of the recovery run's final checkpoint; "
            "launch until every gen-1 worker was ready to train",
            "runs": restart_runs,
            "ready_median_s": restart_ready,
            "first_commit_median_s": median([r["first_commit_seen_s"] for r in restart_runs]),
        },
        "restart_over_recovery": ratio,
        "targets": {
            "recovery_median_below_s": TARGET_TOTAL_S,
            "met_recovery": summary["total_s"] < TARGET_TOTAL_S,
            "ratio_at_least": TARGET_RATIO,
            "met_ratio": ratio >= TARGET_RATIO,
        },
        "reference": [run["reference"] for run in runs],
        "matches_reference": exact,
        "processes_left": [pid for run in runs for pid in run["processes_left"]],
        "runs": [{k: v for k, v in run.items() if k != "records"} for run in runs],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


#: the table's columns: (header, record field)
COLUMNS = (
    ("detect", "detect_s"), ("end", "end_s"), ("leave", "leave_s"), ("assign", "assign_s"), ("plan", "plan_s"),
    ("rebuild", "rebuild_s"), ("transfer", "transfer_s"), ("setup", "setup_s"), ("total", "total_s"),
)  # fmt: skip


def _row(record: dict[str, Any]) -> str:
    return "".join(f"{_ms(record[field]):>{len(header) + 2}}" for header, field in COLUMNS)


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"recovery: tiny GPT (float64) on {c['nodes']} local nodes, n0={c['n0']}, f={c['f']}; "
        f"{len(report['recoveries'])} node kills through faults:, {c['rounds']} run(s); times in ms",
        f"{'gen':>4} {'killed (step/phase)':<26}" + "".join(f"{h:>{len(h) + 2}}" for h, _ in COLUMNS)
        + f"  {'layers':>6} {'nodes':>5} {'pipes':>5}  mode",
    ]
    for r in report["recoveries"]:
        killed = ", ".join(f"{k['node']} {k['step']}/{k['phase']}" for k in r["killed_at"]) or ",".join(r["lost"])
        lines.append(
            f"{r['generation']:>4} {killed:<26}{_row(r)}  {r['layers_moved']:>6} "
            f"{r['nodes_alive']:>5} {r['pipelines']:>5}  {r['mode']}"
        )
    lines.append(f"{'':>4} {'median':<26}{_row(report['recovery_median_s'])}")
    lines.append(
        f"phases (detect to setup) add up to the total: {'yes' if report['phases_add_up'] else 'NO'} "
        f"(largest difference {report['max_unaccounted_s'] * 1000:.3f} ms); plan lies within end, leave and assign"
    )
    m = report["recovery_median_s"]
    rs = report["restart"]
    per_run = ", ".join(f"{r['ready_s']:.2f}" for r in rs["runs"])
    lines.append(
        f"restart (oobleck run --resume from step {rs['runs'][0]['resumed_at_step']}, {len(rs['runs'])} runs on "
        f"{rs['runs'][0]['nodes']} nodes): every worker ready "
        f"{rs['ready_median_s']:.2f} s after launch (median; runs: {per_run}); first step committed "
        f"{rs['first_commit_median_s']:.2f} s after launch"
    )
    t = report["targets"]
    lines.append(
        f"recovery median {m['total_s'] * 1000:.0f} ms (target < {t['recovery_median_below_s'] * 1000:.0f} ms: "
        f"{'met' if t['met_recovery'] else 'MISSED'}); restart / recovery = {report['restart_over_recovery']:.1f}x "
        f"(target >= {t['ratio_at_least']:.0f}x: {'met' if t['met_ratio'] else 'MISSED'})"
    )
    compared = report["reference"] + [r["reference"] for r in report["restart"]["runs"]]
    worst_loss = max(r["max_loss_rel_diff"] for r in compared)
    worst_param = max(r["max_param_rel_diff"] for r in compared)
    lines.append(
        f"vs train-local (recovery runs and resumed restarts): max relative difference {worst_loss:.1e} (losses), "
        f"{worst_param:.1e} (parameters): "
        f"{'exact' if report['matches_reference'] else 'MISMATCH'}; processes left after the runs: "
        f"{len(report['processes_left'])}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8, help="local nodes (default 8; 4 to 8)")
    parser.add_argument("--steps", type=int, default=14, help="training steps of the recovery run (default 14)")
    parser.add_argument("--rounds", type=int, default=1, help="recovery runs (each kills nodes - 3, at most 5)")
    parser.add_argument("--restarts", type=int, default=2, help="restart runs; the median counts")
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    for flag, value, ok, rule in (
        ("--nodes", args.nodes, 4 <= args.nodes <= 8, "must be in [4, 8]"),
        ("--steps", args.steps, args.steps >= 12, "must be at least 12 (kills run up to step 10)"),
        ("--rounds", args.rounds, args.rounds >= 1, "must be at least 1"),
        ("--restarts", args.restarts, args.restarts >= 1, "must be at least 1"),
    ):
        if not ok:
            print(f"benchmarks.recovery: error: {flag}: got {value}; {rule}", file=sys.stderr)
            return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="oobleck-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_bench(args.nodes, args.steps, args.rounds, args.restarts, work)
    except (RuntimeError, TimeoutError) as e:
        print(f"benchmarks.recovery: error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report["matches_reference"] and report["phases_add_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
