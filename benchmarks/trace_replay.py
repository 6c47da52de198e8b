"""Replay a node-availability trace against a running job and check it computes what one process computes.

``python -m benchmarks.trace_replay [--trace PATH] [--mod 4] [--residue 2] [--cap 8] [--compression 120]
[--startup-s 30] [--steps N] [--checkpoint-every 100] [--keep DIR] [--out PATH]``

What runs: ``oobleck run`` of the tiny float64 GPT (n0 = 2 through 2 MiB devices, f = 1) with
``trace: {path, compression}``; the local launcher starts the nodes the trace adds at time 0 and replays the
rest (a ``remove`` SIGKILLs the node's agent and workers, an ``add`` starts a node under the trace's name).

Scaling. The default trace, ``p3-trace.csv`` (AWS p3 spot instances over 11.4 h, 344 events, peak 32 nodes),
does not fit this machine: 32 nodes are 64 processes of which 32 import torch and train (~300 MB each) on 2
cores shared with other work, where local runs stay at 8 nodes or fewer. The replay keeps the real
timings of a subset of the trace's nodes: the nodes whose number is ``residue`` modulo ``mod`` (default
every 4th: 2, 6, 10, ...), and of those, an ``add`` that would make more than ``cap`` (8) nodes alive is
dropped together with the same node's later ``remove`` (4 of the subset's 44 nodes with the defaults). With
the defaults that leaves 77 events (40 adds, 37 removes; 5 nodes at the start, alive 2 to 8), 11.33 trace
hours. Two adjustments of time, both in the trace file written next to the run (``scaled-trace.csv``):
every event after time 0 is delayed by ``--startup-s`` wall seconds (the p3 cluster was training at time
0, while this job needs ~10-25 s to start its workers, and ``oobleck run`` fails a job that loses a node
before its first step is committed), and the config's ``compression`` (default 120 trace seconds per wall
second) makes the 11.33 h last 340 s. The shortest node life of the subset, 180 trace seconds, is then
1.5 s: long enough for the node's agent to start (a node removed before its agent registers no longer fails
the job).

The sentinel (``--no-sentinel`` turns it off): one ``add`` of ``node999999`` ten wall hours after the last
event. It is never due (the job ends first and the launcher stops the replay), so the launcher reports
``N of N + 1`` events replayed, and the check is that the N real events were. It kept the replay thread
alive to the end of the job when agents died with the thread that started them (PR_SET_PDEATHSIG is per
thread); the local launcher now starts every agent from one long-lived thread, so the replay no longer
needs it, and it stays on by default so that the committed results' event counts reproduce.

``--window-h H`` replays only the events of the first H trace hours (nodes added in it and removed later
stay to the end).

``training.steps`` (default: 20 per wall second of the replay, more than the 4-16 the job commits per
second while the trace churns, so training outlasts the trace) and ``fault_tolerance.checkpoint_every`` (default 100: when the trace leaves a layer without a
surviving copy, with 2-3 nodes alive, the job restores the latest checkpoint instead of step 0) are set.

Results: with the defaults the whole scaled trace replays and passes every check
(``--out benchmarks/results/trace_replay_p3_full.json``: 72 events, 36 recoveries of which 4 from a
checkpoint, exact against train-local); the first two trace hours at ``--window-h 2 --compression 30`` give
``benchmarks/results/trace_replay.json``. A worker whose generation ends while it is inside
``init_process_group`` resets torch's group counter, so later generations' groups are named alike on every
rank.

Checks: the job completes; the launcher reports every event replayed ("trace: replayed N of N events");
nodes left and joined (recovery records with lost and joined nodes); training outlasted the trace; the
losses of every step and the final parameters equal ``oobleck train-local``'s (float64, relative
difference < 1e-9). Writes ``benchmarks/results/trace_replay.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.jobs import (
    Sampler,
    bad_flag,
    compare_with_reference,
    launch,
    machine_info,
    matches,
    non_step_lines,
    read_jsonl,
    recovery_figures,
    recovery_lines,
    run_and_report,
    tiny_gpt,
    train_reference,
    verdict_lines,
    write_config,
)
from oobleck.trace import TraceEvent, load_trace, summary

RESULTS = Path(__file__).resolve().parent / "results" / "trace_replay.json"
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "p3-trace.csv"
#: steps per wall second of trace when sizing training.steps: faster than the job trains while the trace
#: runs, so training outlasts the trace. The job committed about 4 steps per second during the p3 replay on
#: this machine's slow days and 16 on its fast ones (session 17, where 7 ended training 135 s before the trace)
STEPS_PER_WALL_S = 20.0
REPLAYED = re.compile(r"trace: replayed (\d+) of (\d+) events")
#: the sentinel event (see the module notes): never replayed, since training ends long before it
SENTINEL_NODE = "node999999"
SENTINEL_AFTER_WALL_S = 36000.0


def node_number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def scale(events: list[TraceEvent], mod: int, residue: int, cap: int) -> tuple[list[TraceEvent], list[str]]:
    """The events of nodes numbered ``residue`` modulo ``mod``, without adds that would exceed ``cap`` alive
    nodes (nor those nodes' removes); returns the events and the dropped nodes."""
    kept: list[TraceEvent] = []
    alive: set[str] = set()
    dropped: list[str] = []
    for event in events:
        if node_number(event.node) % mod != residue:
            continue
        if event.kind == "add":
            if len(alive) >= cap:
                dropped.append(event.node)
                continue
            alive.add(event.node)
        else:
            if event.node in dropped:
                continue
            alive.discard(event.node)
        kept.append(event)
    return kept, dropped


def write_trace(path: Path, events: list[TraceEvent], delay_ms: int) -> Path:
    """Write ``events`` in the trace format, every event after time 0 delayed by ``delay_ms`` trace ms."""
    lines = [f"{round(e.at_s * 1000) + (delay_ms if e.at_s > 0 else 0)},{e.kind},{e.node}" for e in events]
    path.write_text("\n".join(lines) + "\n")
    return path


def lifetimes(events: list[TraceEvent]) -> list[float]:
    added: dict[str, float] = {}
    lives = []
    for e in events:
        if e.kind == "add":
            added[e.node] = e.at_s
        else:
            lives.append(e.at_s - added[e.node])
    return sorted(lives)


def run_replay(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    machine = machine_info()
    original = load_trace(args.trace)
    events, dropped = scale(original, args.mod, args.residue, args.cap)
    if args.window_h is not None:
        events = [e for e in events if e.at_s <= args.window_h * 3600]
    if not any(e.at_s == 0 for e in events):
        raise RuntimeError(f"the scaled trace adds no node at time 0 (mod {args.mod}, residue {args.residue})")
    delay_ms = round(args.startup_s * args.compression * 1000)
    written = list(events)
    if args.sentinel:
        # an add long after training ends: the replay thread, which starts the agents of the nodes the trace
        # adds, then lives until the job ends (see the module notes)
        last_s = events[-1].at_s + args.startup_s * args.compression
        written.append(TraceEvent(last_s + SENTINEL_AFTER_WALL_S * args.compression, "add", SENTINEL_NODE))
    trace_path = write_trace(work / "scaled-trace.csv", written, delay_ms)
    replayed_events = [e for e in load_trace(trace_path) if e.node != SENTINEL_NODE]  # validates the file
    after_start = [e for e in replayed_events if e.at_s > 0]
    wall_trace_s = replayed_events[-1].at_s / args.compression
    steps = args.steps or math.ceil(wall_trace_s * STEPS_PER_WALL_S)
    initial = sum(1 for e in events if e.at_s == 0)
    raw = tiny_gpt(
        work / "profiles",
        initial,
        steps,
        trace={"path": str(trace_path), "compression": args.compression},
    )
    raw["fault_tolerance"]["checkpoint_every"] = args.checkpoint_every
    config = write_config(work / "trace.yaml", raw)
    print(
        f"trace_replay: {len(events)} events of {args.trace} (nodes = {args.residue} mod {args.mod}, at most "
        f"{args.cap} alive; {len(dropped)} nodes dropped); {initial} nodes at start, {len(after_start)} events "
        f"over {wall_trace_s:.0f} s of wall time; {steps} steps; runs in {work}",
        flush=True,
    )
    job = launch(config, work / "trace")
    sampler = Sampler(job.tag, 2.0)
    try:
        code = job.wait(args.timeout)
    finally:
        samples = sampler.stop()
    ended_at = time.time()
    leftover = job.reap()
    output = job.output()
    failure = None
    if code != 0:
        failure = non_step_lines(output, 12)
        print(f"trace_replay: the job failed ({code}):\n" + "\n".join(failure), flush=True)
    found = REPLAYED.findall(output)
    replayed, of = (int(found[-1][0]), int(found[-1][1])) if found else (0, -1)
    records = read_jsonl(job.run_dir / "recoveries.jsonl")
    rows = read_jsonl(job.run_dir / "metrics.jsonl")
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    if failure is None:
        print("trace_replay: training done; running the single-process reference", flush=True)
        reference = train_reference(config, work / "reference")
        comparison = compare_with_reference(job.run_dir, reference, steps)
    else:  # no final checkpoint to compare; the steps committed so far are compared by the caller's choice
        comparison = {"steps_compared": 0, "missing_steps": list(range(steps)), "max_loss_rel_diff": math.inf,
                      "max_param_rel_diff": math.inf, "tensors_compared": 0, "final_checkpoint": None}
    lost = sorted({n for r in records for n in r["lost"]}, key=node_number)
    joined = sorted({n for r in records for n in r["joined"]}, key=node_number)
    removed = [e.node for e in after_start if e.kind == "remove"]
    added = [e.node for e in after_start if e.kind == "add"]
    totals = sorted(r["total_s"] for r in records)
    slow = [r for r in records if r["total_s"] > 5.0]
    outlasted_s = (ended_at - job.launched_at) - wall_trace_s
    checks = {
        "completed": code == 0,
        "every_event_replayed": replayed == len(after_start) and of == len(after_start) + bool(args.sentinel),
        "nodes_left": bool(lost),
        "nodes_joined": bool(joined) or not added,  # a trace without adds after the start has none to join
        "training_outlasted_trace": outlasted_s > 0,
        "matches_reference": matches(comparison),
        "no_process_left": not leftover,
    }
    trace_summary = summary(events)
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trace": {
            "source": str(args.trace),
            "source_summary": summary(original).describe(),
            "scaling": f"nodes numbered {args.residue} mod {args.mod}; adds beyond {args.cap} alive dropped"
            + (f"; only the first {args.window_h:g} trace hours" if args.window_h is not None else ""),
            "dropped_nodes": dropped,
            "replayed_file": str(trace_path),
            "replayed_summary": trace_summary.describe(),
            "compression": args.compression,
            "startup_delay_wall_s": args.startup_s,
            "sentinel": f"add {SENTINEL_NODE} {SENTINEL_AFTER_WALL_S:g} wall s after the last event" if args.sentinel else None,
            "wall_duration_s": wall_trace_s,
            "shortest_node_life_wall_s": (lifetimes(events)[0] / args.compression) if lifetimes(events) else None,
        },
        "config": {
            "model": "gpt tiny (d_model 32, n_head 2, seq_len 16), float64, global batch 16, microbatch 2",
            "steps": steps,
            "initial_nodes": initial,
            "n0": 2,
            "f": 1,
            "checkpoint_every": args.checkpoint_every,
        },
        "machine": machine,
        "events_after_start": len(after_start),
        "launcher_reported": {"replayed": replayed, "of": of},
        "removes": len(removed),
        "adds": len(added),
        "nodes_lost_in_records": lost,
        "nodes_joined_in_records": joined,
        "added_but_never_joined": sorted(set(added) - set(joined), key=node_number),
        "recoveries": records,
        "recovery_count": len(records),
        "recovery_modes": {m: sum(r["mode"] == m for r in records) for m in sorted({r["mode"] for r in records})},
        "steps_lost": sum(r["steps_lost"] for r in records),
        "recovery_total_s": {
            "min": totals[0] if totals else None,
            "median": totals[len(totals) // 2] if totals else None,
            "max": totals[-1] if totals else None,
            "over_5s": len(slow),
        },
        **recovery_figures(records),
        "nodes_alive_in_metrics": {
            "min": min((r["nodes_alive"] for r in rows), default=0),
            "max": max((r["nodes_alive"] for r in rows), default=0),
        },
        "pipelines_in_metrics": {
            "min": min((r["pipelines"] for r in rows), default=0),
            "max": max((r["pipelines"] for r in rows), default=0),
        },
        "generations": 1 + len(records),
        "run_wall_s": ended_at - job.launched_at,
        "training_outlasted_trace_s": outlasted_s,
        "processes": {
            "min": min((s.processes for s in samples if s.processes), default=0),
            "max": max((s.processes for s in samples), default=0),
        },
        "sockets": {
            "min": min((s.sockets for s in samples if s.processes), default=0),
            "max": max((s.sockets for s in samples), default=0),
        },
        "reference": comparison,
        "processes_left": leftover,
        "checks": checks,
        "passed": all(checks.values()),
        "failure": failure,
        "launcher_lines": non_step_lines(output, 200),
    }


def format_summary(report: dict[str, Any]) -> str:
    t, c = report["trace"], report["config"]
    rt = report["recovery_total_s"]
    lines = [
        f"trace replay: {t['source_summary']}",
        f"replayed: {t['replayed_summary']}",
        f"  ({t['scaling']}; compression {t['compression']:g}, events after t=0 delayed {t['startup_delay_wall_s']:g} s; "
        f"{t['wall_duration_s']:.0f} s of wall time; shortest node life {t['shortest_node_life_wall_s']:.1f} s)",
        f"job: tiny GPT float64, n0={c['n0']}, f={c['f']}, {c['steps']} steps, checkpoint every {c['checkpoint_every']}; "
        f"ran {report['run_wall_s']:.0f} s, outlasting the trace by {report['training_outlasted_trace_s']:.0f} s",
        (
            f"launcher: trace: replayed {report['launcher_reported']['replayed']} of {report['launcher_reported']['of']} "
            "events after the start"
            if report["launcher_reported"]["of"] >= 0
            else "launcher: printed no replay count (it does only when the job succeeds)"
        )
        + f" (the trace: {report['removes']} removes, {report['adds']} adds"
        + (", plus the sentinel add, never due)" if t["sentinel"] else ")"),
        f"recoveries: {report['recovery_count']} ({', '.join(f'{n} {m}' for m, n in report['recovery_modes'].items())}); "
        f"{len(report['nodes_lost_in_records'])} nodes lost, {len(report['nodes_joined_in_records'])} joined, "
        f"{len(report['added_but_never_joined'])} added but removed (or still starting) before they joined; "
        f"{report['steps_lost']} steps lost",
    ]
    if rt["median"] is not None:
        lines.append(
            f"recovery total_s: min {rt['min'] * 1000:.0f} ms, median {rt['median'] * 1000:.0f} ms, "
            f"max {rt['max'] * 1000:.0f} ms; {rt['over_5s']} over 5 s"
        )
    lines.extend(recovery_lines(report))
    na, pp = report["nodes_alive_in_metrics"], report["pipelines_in_metrics"]
    lines.append(
        f"nodes alive per step {na['min']}-{na['max']}, pipelines {pp['min']}-{pp['max']}; processes "
        f"{report['processes']['min']}-{report['processes']['max']}, TCP sockets {report['sockets']['min']}-{report['sockets']['max']}"
    )
    lines.extend(verdict_lines(report))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace_replay", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help=f"trace file (default {DEFAULT_TRACE})")
    parser.add_argument("--mod", type=int, default=4, help="keep nodes whose number is RESIDUE modulo MOD (default 4)")
    parser.add_argument("--residue", type=int, default=2, help="(default 2)")
    parser.add_argument("--cap", type=int, default=8, help="at most this many nodes alive (default 8)")
    parser.add_argument("--window-h", type=float, help="replay only the events of the first H trace hours")
    parser.add_argument("--compression", type=float, default=120.0, help="trace seconds per wall second (default 120)")
    parser.add_argument("--startup-s", type=float, default=30.0, help="wall seconds added before every later event")
    parser.add_argument("--steps", type=int, help="training steps (default: 20 per wall second of the replay)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    parser.add_argument(
        "--sentinel", action=argparse.BooleanOptionalAction, default=True,
        help="append an add long after the end, keeping the replay thread alive (default on; see the notes)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run counts as hung")
    parser.add_argument("--keep", type=Path, help="keep the run in this directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if bad_flag(
        "benchmarks.trace_replay",
        [
            ("--mod", args.mod, args.mod >= 1, "must be at least 1"),
            ("--residue", args.residue, 0 <= args.residue < args.mod, "must be in [0, --mod)"),
            ("--cap", args.cap, 2 <= args.cap <= 8, "must be in [2, 8] on this machine"),
            ("--compression", args.compression, args.compression > 0, "must be positive"),
            ("--startup-s", args.startup_s, args.startup_s >= 0, "must be at least 0"),
        ],
    ):
        return 2
    return run_and_report(
        "benchmarks.trace_replay", "oobleck-trace-", args.keep, args.out, lambda work: run_replay(args, work), format_summary
    )


if __name__ == "__main__":
    sys.exit(main())
