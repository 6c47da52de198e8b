"""The plan's local step-time prediction against the measured step time, with and without recomputation.

The runs are :mod:`benchmarks.memory`'s: the ``tiny`` and ``small`` GPT presets (float32, microbatch 4,
global batch 32) with ``training.recompute`` ``none`` and ``full``, each one ``oobleck run`` on 4 local CPU
nodes (f = 1, device memory that makes two-node pipelines, so stage boundaries and the gradient all-reduce
both cost). Every step record carries the measured ``step_time_s`` (and its ``startup_s``) next to the
plan's ``predicted_step_s`` (:mod:`planner.local_step`). The table shows the median of the
steady-state steps (all but the first ``WARM_STEPS``: the first one's time is mostly start-up, and the
next few run slower while the allocator and the caches warm up) and the ratio predicted / measured.
Each run measures its profile just before it (``profile.seconds`` of timed rounds, the default), so the
prediction and the run see the machine within seconds of each other. This machine's speed drifts by tens
of percent over minutes, so one run of a job says little: each job runs ``--repeats`` times, in rounds
over the jobs, and its row is the median of its runs' ratios with their range. Run it when the machine
is otherwise idle.

``python -m benchmarks.step_time [--steps N] [--repeats R] [--out benchmarks/results/step_time.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.jobs import ROOT
from benchmarks.memory import DEVICE_GIB, MODES, run_rows

OUT = ROOT / "benchmarks" / "results" / "step_time.json"
#: the steps left out of the median
WARM_STEPS = 5


def measure(preset: str, recompute: str, steps: int, workdir: Path) -> dict[str, Any]:
    """One run: the predicted and the median measured steady-state step time, their ratio, the pipelines."""
    rows = run_rows(preset, recompute, steps, workdir)[WARM_STEPS:]
    if not rows:
        raise ValueError(f"{steps} steps leave no steady-state step; use --steps {WARM_STEPS + 1} or more")
    measured = statistics.median(r["step_time_s"] - r["startup_s"] for r in rows)
    predicted = rows[-1]["predicted_step_s"]
    return {"pipelines": rows[-1]["pipelines"], "predicted_s": predicted, "measured_s": measured,
            "ratio": predicted / measured}  # fmt: skip


def summary(preset: str, recompute: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's row: its runs, and the median and range of their ratios (each run's prediction against its
    own measurement, the two taken within seconds of each other)."""
    ratios = [r["ratio"] for r in runs]
    return {"preset": preset, "recompute": recompute, "pipelines": runs[-1]["pipelines"], "runs": runs,
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job, in rounds over the jobs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: got {args.repeats}; must be at least 1")
    jobs = [(preset, recompute) for preset in DEVICE_GIB for recompute in MODES]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {job: [] for job in jobs}
    results: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    print(f"{'round':>5} {'preset':<6} {'recompute':<9} {'pipelines':>9} {'predicted s':>11} {'measured s':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="oobleck-step-time-") as tmp:
        # rounds over the jobs rather than one job's runs in a row, so a slow spell of the machine spreads
        # over every job; each run measures its own profile just before it (see the module notes)
        for round_index in range(args.repeats):
            for preset, recompute in jobs:
                run = measure(preset, recompute, args.steps, Path(tmp) / f"{preset}-{recompute}-{round_index}")
                runs[(preset, recompute)].append(run)
                print(
                    f"{round_index + 1:>5} {preset:<6} {recompute:<9} {run['pipelines']:>9} "
                    f"{run['predicted_s']:>11.4f} {run['measured_s']:>10.4f} {run['ratio']:>6.2f}",
                    flush=True,
                )
    results["jobs"] = [summary(preset, recompute, runs[(preset, recompute)]) for preset, recompute in jobs]
    results["worst_error"] = max(abs(j["median_ratio"] - 1) for j in results["jobs"])
    results["load_after"] = os.getloadavg()[0]
    print(f"\n{'preset':<6} {'recompute':<9} {'median ratio':>12} {'range':>11}")
    for j in results["jobs"]:
        print(f"{j['preset']:<6} {j['recompute']:<9} {j['median_ratio']:>12.2f} {j['min_ratio']:>5.2f}-{j['max_ratio']:.2f}")
    print(f"largest |median ratio - 1|: {results['worst_error']:.1%}; load average (1 min) "
          f"{results['load_before']:.1f} before, {results['load_after']:.1f} after, on {results['cores']} cores")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
