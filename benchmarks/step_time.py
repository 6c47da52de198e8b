"""The plan's local step-time prediction against the measured step time, with and without recomputation.

The runs are :mod:`benchmarks.memory`'s: the ``tiny`` and ``small`` GPT presets (float32, microbatch 4,
global batch 32) with ``training.recompute`` ``none`` and ``full``, each one ``oobleck run`` on 4 local CPU
nodes (f = 1, device memory that makes two-node pipelines, so stage boundaries and the gradient all-reduce
both cost). Every step record carries the measured ``step_time_s`` (and its ``startup_s``) next to the
plan's ``predicted_step_s`` (:mod:`planner.local_step`). The table shows the median of the
steady-state steps (all but the first ``WARM_STEPS``: the first one's time is mostly start-up, and the
next few run slower while the allocator and the caches warm up) and the ratio predicted / measured.
Timing on a shared machine is noisy: run it when the machine is idle, and more than once.

``python -m benchmarks.step_time [--steps N] [--out benchmarks/results/step_time.json]``
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
    return {
        "preset": preset,
        "recompute": recompute,
        "pipelines": rows[-1]["pipelines"],
        "predicted_s": predicted,
        "measured_s": measured,
        "ratio": predicted / measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0], "runs": []}
    print(f"{'preset':<6} {'recompute':<9} {'pipelines':>9} {'predicted s':>11} {'measured s':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="oobleck-step-time-") as tmp:
        for preset in DEVICE_GIB:
            for recompute in MODES:
                row = measure(preset, recompute, args.steps, Path(tmp))
                results["runs"].append(row)
                print(
                    f"{preset:<6} {recompute:<9} {row['pipelines']:>9} {row['predicted_s']:>11.4f} "
                    f"{row['measured_s']:>10.4f} {row['ratio']:>6.2f}"
                )
    worst = max(abs(r["ratio"] - 1) for r in results["runs"])
    results["worst_error"] = worst
    results["load_after"] = os.getloadavg()[0]
    print(f"largest |predicted / measured - 1|: {worst:.1%}; load average (1 min) {results['load_before']:.1f} before, "
          f"{results['load_after']:.1f} after, on {results['cores']} cores")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
