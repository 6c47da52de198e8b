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
"""

from __future__ import annotations

import argparse
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
