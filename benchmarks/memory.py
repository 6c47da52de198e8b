"""The plan's memory prediction against each stage's measured peak, with and without recomputation.

For the ``tiny`` and ``small`` GPT presets (float32, microbatch 4, global batch 32), each with
``training.recompute`` ``none`` and ``full``, one ``oobleck run`` on 4 local CPU nodes (f = 1) trains a few
steps. Device memory is set per preset so that the plan without recomputation needs two-node pipelines
(stages then hold different numbers of microbatches in flight), and the same memory is used with
recomputation. Every step record carries, per rank, the measured ``peak_bytes`` of its stage
(:mod:`oobleck.engine.memory`) and the plan's ``predicted_bytes``; the table shows the last step's (step 0
has no optimizer state yet). The ratio is predicted / measured.

``python -m benchmarks.memory [--steps N] [--out benchmarks/results/memory.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.jobs import ROOT, launch, non_step_lines, write_config
from oobleck.metrics import read_metrics

#: per preset, a device memory (GiB) under which the plan without recomputation needs 2-node pipelines
DEVICE_GIB = {"tiny": 0.015, "small": 0.06}
MODES = ("none", "full")
OUT = ROOT / "benchmarks" / "results" / "memory.json"


def job(preset: str, recompute: str, steps: int, profile_dir: Path) -> dict[str, Any]:
    return {
        "model": {"family": "gpt", "preset": preset, "dtype": "float32"},
        "data": {"dataset": "pydoc"},
        "training": {"steps": steps, "global_batch": 32, "microbatch": 4, "recompute": recompute},
        "cluster": {"nodes": 4, "devices_per_node": 1, "device": "cpu", "device_memory_gib": DEVICE_GIB[preset]},
        "fault_tolerance": {"f": 1},
        "profile": {"cache_dir": str(profile_dir)},
    }


def run_rows(preset: str, recompute: str, steps: int, workdir: Path) -> list[dict[str, Any]]:
    """One ``oobleck run`` of :func:`job` in ``workdir`` (its profiles in ``workdir/profiles``); the rows of
    its ``metrics.jsonl``."""
    raw = job(preset, recompute, steps, workdir / "profiles")
    run_dir = workdir / f"{preset}-{recompute}"
    run = launch(write_config(workdir / f"{preset}-{recompute}.yaml", raw), run_dir)
    try:
        if run.wait(600) != 0:
            raise RuntimeError(f"{preset}/{recompute} failed: " + "\n".join(non_step_lines(run.output(), 20)))
    finally:
        run.reap()
    return read_metrics(run_dir)


def measure(preset: str, recompute: str, steps: int, workdir: Path) -> list[dict[str, Any]]:
    """One run; per rank: predicted and measured bytes of the last step and their ratio."""
    last = run_rows(preset, recompute, steps, workdir)[-1]
    return [
        {"rank": rank, "predicted_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured}
        for rank, (predicted, measured) in enumerate(zip(last["predicted_bytes"], last["peak_bytes"]))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"device_gib": DEVICE_GIB, "runs": []}
    print(f"{'preset':<6} {'recompute':<9} {'rank':>4} {'predicted MiB':>13} {'measured MiB':>12} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="oobleck-memory-") as tmp:
        for preset in DEVICE_GIB:
            for recompute in MODES:
                stages = measure(preset, recompute, args.steps, Path(tmp))
                results["runs"].append({"preset": preset, "recompute": recompute, "stages": stages})
                for s in stages:
                    print(
                        f"{preset:<6} {recompute:<9} {s['rank']:>4} {s['predicted_bytes'] / 2**20:>13.2f} "
                        f"{s['measured_bytes'] / 2**20:>12.2f} {s['ratio']:>6.2f}"
                    )
    worst = max(abs(s["ratio"] - 1) for run in results["runs"] for s in run["stages"])
    results["worst_error"] = worst
    print(f"largest |predicted / measured - 1|: {worst:.1%}")
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
