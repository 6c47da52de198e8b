"""Where a step's time goes in our engine: per phase, per rank, on the engine benchmark's job.

``python -m benchmarks.engine_profile [--preset tiny] [--pipelines 1] [--overlap on|off] [--steps 20]
[--warmup 2]``

Runs :mod:`benchmarks.engine`'s job (four single-device CPU nodes, one torch thread per worker) as
``--pipelines`` pipelines of ``4 / pipelines`` stages through the local launcher, with every worker's step
phases timed by ``benchmarks/phase_hook/sitecustomize.py``: forward and backward compute, p2p receive waits
and posts, the gradient sync's own work and its all-reduce wait, the norm all-reduce wait, the commit wait,
the optimizer, the schedule loop and the rest of the step. Each phase gets its wall time and its main-thread
CPU time, exclusive of the phases it calls, per timed step. Waits are where a worker idles: the pipeline
bubble and, on a machine with fewer cores than workers, the time other workers hold the cores.

The timeline (:func:`concurrency`) then says how many workers were working (in a phase that is not a wait)
at each moment of the timed steps, and what the others were waiting on while at most one worked: on a
machine with C cores, the time fewer than C work is where cores idle.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.engine import STAGES, Bench, job_config, num_layers, run_oobleck_pipelines, stage_boundaries

HOOK_DIR = Path(__file__).resolve().parent / "phase_hook"


def profile(bench: Bench, preset: str, pipelines: int, overlap: bool) -> tuple[list[dict[str, Any]], float]:
    """Every worker's phase record (rank order) and the run's samples/s."""
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "OOBLECK_PHASE_DIR", "OOBLECK_PHASE_WARMUP")}
    with tempfile.TemporaryDirectory(prefix="oobleck-profile-") as tmp:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK_DIR), saved["PYTHONPATH"]) if p)
        os.environ["OOBLECK_PHASE_DIR"] = tmp
        os.environ["OOBLECK_PHASE_WARMUP"] = str(bench.warmup)
        try:
            job = job_config(bench, preset, f"{tmp}/run", overlap)
            parts = stage_boundaries(num_layers(job), STAGES // pipelines)
            figures = run_oobleck_pipelines(bench, job, [parts] * pipelines)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        records = [json.loads(p.read_text()) for p in Path(tmp).glob("*.json")]
    return sorted(records, key=lambda r: r["rank"]), figures.samples_per_s


def format_profile(records: list[dict[str, Any]]) -> str:
    """ms per step, wall / CPU, per phase and rank, largest first, with each phase's share of all the ranks'
    wall and CPU time."""
    phases = sorted({p for r in records for p in r["phases"]}, key=lambda p: -sum(r["phases"].get(p, [0])[0] for r in records))
    totals = [sum(sum(v[i] for v in r["phases"].values()) / r["steps"] for r in records) for i in (0, 1)]
    lines = [f"{'ms per step: wall / CPU':<28}" + "".join(f"{'rank ' + str(r['rank']):>15}" for r in records) + f"{'share wall / CPU':>20}"]
    for phase in phases + ["total"]:
        cells, sums = "", [0.0, 0.0]
        for r in records:
            wall, cpu = (
                [sum(v[i] for v in r["phases"].values()) for i in (0, 1)] if phase == "total" else r["phases"].get(phase, [0.0, 0.0])
            )
            cells += f"{1000 * wall / r['steps']:>8.1f} /{1000 * cpu / r['steps']:>5.1f}"
            sums[0] += wall / r["steps"]
            sums[1] += cpu / r["steps"]
        lines.append(f"{phase:<28}{cells}{100 * sums[0] / totals[0]:>12.1f}% /{100 * sums[1] / totals[1]:>5.1f}%")
    return "\n".join(lines)


#: the phases in which a worker waits for others (every other phase is work on its core)
WAITS = frozenset({"p2p receive wait", "grad all-reduce wait", "norm all-reduce wait", "commit wait"})


def innermost(events: list[list[Any]]) -> list[tuple[float, float, str]]:
    """One rank's timeline as ``(start, end, phase)`` pieces, each labelled with the innermost phase running
    then (phases nest: a phase's callees lie within it); gaps between phases are left out."""
    # at a shared instant, ends come before starts, and an outer phase starts before the ones it calls
    marks = sorted([(a, 1, -b, label) for label, a, b in events] + [(b, 0, 0.0, label) for label, a, b in events])
    pieces: list[tuple[float, float, str]] = []
    stack: list[str] = []
    last = None
    for t, is_start, _, label in marks:
        if stack and last is not None and t > last:
            pieces.append((last, t, stack[-1]))
        if is_start:
            stack.append(label)
        else:  # the innermost open phase of that name: the top one, unless clock ties reordered the marks
            del stack[len(stack) - 1 - stack[::-1].index(label)]
        last = t
    return pieces


def concurrency(records: list[dict[str, Any]]) -> tuple[dict[int, float], list[tuple[float, tuple[str, ...]]]]:
    """Over the timed steps of ``records``: the share of the time during which k workers worked, per k, and
    the commonest phase combinations (share, every rank's phase, sorted) while at most one worked. A rank
    outside every phase (between steps) counts as working."""
    timelines = [innermost(r["events"]) for r in records]
    cuts = sorted({t for pieces in timelines for a, b, _ in pieces for t in (a, b)})
    if len(cuts) < 2:
        return {}, []
    at = [0] * len(timelines)
    shares: dict[int, float] = collections.Counter()
    idle: dict[tuple[str, ...], float] = collections.Counter()
    for a, b in zip(cuts, cuts[1:]):
        phases = []
        for i, pieces in enumerate(timelines):
            while at[i] < len(pieces) and pieces[at[i]][1] <= a:
                at[i] += 1
            inside = at[i] < len(pieces) and pieces[at[i]][0] <= a
            phases.append(pieces[at[i]][2] if inside else "between steps")
        working = sum(p not in WAITS for p in phases)
        shares[working] += b - a
        if working <= 1:
            idle[tuple(sorted(phases))] += b - a
    total = cuts[-1] - cuts[0]
    return (
        {k: v / total for k, v in sorted(shares.items())},
        [(v / total, k) for k, v in sorted(idle.items(), key=lambda kv: -kv[1])[:5]],
    )


def format_concurrency(records: list[dict[str, Any]]) -> str:
    shares, idle = concurrency(records)
    lines = ["share of the timed steps with k workers working (not waiting): "
             + ", ".join(f"{k}: {v:.1%}" for k, v in shares.items())]
    lines += ["while at most one worked, commonest:"] + [f"  {share:6.1%}  " + ", ".join(phases) for share, phases in idle]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="GPT preset (default tiny)")
    parser.add_argument("--pipelines", type=int, choices=(1, 2, 4), default=1, help="pipelines over the 4 nodes")
    parser.add_argument("--overlap", choices=("on", "off"), default="on", help="training.overlap_grad_sync")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (at least 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        print(f"benchmarks.engine_profile: error: --steps and --warmup must be at least 1, got {args.steps}, {args.warmup}", file=sys.stderr)
        return 2
    bench = Bench(presets=(args.preset,), steps=args.steps, warmup=args.warmup)
    records, rate = profile(bench, args.preset, args.pipelines, args.overlap == "on")
    print(f"{args.preset} GPT, {args.pipelines} pipeline(s) of {STAGES // args.pipelines} stages, overlap {args.overlap}: {rate:.1f} samples/s")
    print(format_profile(records))
    print(format_concurrency(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
