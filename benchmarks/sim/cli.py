"""The simulator's command line: ``python -m benchmarks.simulator`` (see :mod:`benchmarks.sim`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import benchmarks.sim
from benchmarks.sim.experiment import FIXED_DURATION_S, INTERVALS, MODELS, REPLACEMENT_DELAY_S, build_setup, run_model, scenarios
from benchmarks.sim.model import A100_40G_1GPU, NODE_READY_S, PUBLISHED, SimulatorError
from benchmarks.sim.report import format_tables, plot
from oobleck.errors import OobleckError
from planner.errors import PlanningError

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
P3_TRACE = ROOT.parent / "shared" / "traces" / "p3-trace.csv"

SOURCES = [
    "Oobleck SOSP'23 artifact simulators: github.com/SymbioticLab/Oobleck branch sosp23-artifact, "
    "tools/simulator/{oobleck,varuna,bamboo}_simulator.py (reconfiguration 6 s / 10 s; Varuna restart 515 s / "
    "701 s, checkpoint 50 s / 120 s every 10 iterations; Bamboo reconfiguration 230 s / 450 s, 5% rule; "
    "45 s instance start; batch 512 / 1024 for GPT-3 2.7B / 6.7B)",
    "Varuna (EuroSys'22) example: github.com/microsoft/varuna Megatron-LM/examples/pretrain_gpt2_varuna.sh "
    "(--save-interval 10)",
    "Oobleck (SOSP'23) abstract: up to 13.9x higher throughput than Bamboo and Varuna",
    "Bamboo (NSDI'23): redundant computation, a stage runs its successor's forward; EC2 p3 trace from "
    "github.com/uclasystem/bamboo (MIT)",
    "GCP a2-highgpu-1g: 1x A100 40 GB, 24 Gb/s network; A100 312 TFLOP/s 16-bit peak",
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description=benchmarks.sim.__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="analytic GPT shapes (planner.analytic.SHAPES)")
    ap.add_argument("--nodes", type=int, default=30, help="nodes in the job (default 30)")
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--device", default=A100_40G_1GPU.name, help=f"device spec (default {A100_40G_1GPU.name})")
    ap.add_argument("--f", type=int, default=1, help="Oobleck's simultaneous failures tolerated (default 1)")
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--intervals", nargs="*", default=list(INTERVALS), help="fixed failure intervals (6h 1h 30m ...)")
    ap.add_argument("--trace", default=str(P3_TRACE), help="a node-availability trace file; 'none' to skip")
    ap.add_argument("--duration-h", type=float, default=FIXED_DURATION_S / 3600, help="length of the fixed-interval runs")
    ap.add_argument("--replacement-delay-s", type=float, default=REPLACEMENT_DELAY_S)
    ap.add_argument("--node-ready-s", type=float, default=NODE_READY_S)
    ap.add_argument("--checkpoint-every", type=int, default=None, help="Varuna's checkpoint interval in steps (default 10)")
    ap.add_argument("--bamboo-checkpoint-every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "simulator.json"))
    ap.add_argument("--plot", default=str(RESULTS / "simulator.png"), help="PNG path; 'none' to skip")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    try:
        trace = None if args.trace.lower() == "none" else Path(args.trace)
        if trace is not None and not trace.exists():
            print(f"trace {trace} not found; skipping the trace runs", file=sys.stderr)
            trace = None
        cases = scenarios(args.nodes, args.intervals, trace, args.duration_h * 3600, args.replacement_delay_s, args.seed)
        overrides = {}
        if args.checkpoint_every is not None:
            overrides["checkpoint_every"] = args.checkpoint_every
        if args.bamboo_checkpoint_every is not None:
            overrides["bamboo_checkpoint_every"] = args.bamboo_checkpoint_every
        results = {}
        for model in args.models:
            setup = build_setup(model, args.nodes, args.gpus_per_node, args.device, args.f, None, args.microbatch, **overrides)
            results[model] = run_model(setup, cases, args.node_ready_s)
            print(format_tables(model, results[model]))
            print()
    except (SimulatorError, ValueError, OobleckError, PlanningError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    doc = {
        "format": "oobleck-simulator/1",
        "command": "python -m benchmarks.simulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sources": SOURCES,
        "published_costs": PUBLISHED,
        "timelines": {
            "fixed_interval": {
                "duration_s": args.duration_h * 3600,
                "replacement_delay_s": args.replacement_delay_s,
                "seed": args.seed,
            },
            "trace": str(trace) if trace is not None else None,
            "node_ready_s": args.node_ready_s,
        },
        "models": results,
        "runtime_s": elapsed,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")
    if args.plot.lower() != "none":
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")
    print(f"simulated in {elapsed:.1f} s")
    return 0
