"""The CUDA path on one device: train, profile and plan a GPT preset on a GPU, in a few minutes.

``python -m benchmarks.gpu_check [--device cuda|cpu] [--preset small] [--warmup 3] [--steps 20]
[--nodes 2,4,8] [--out PATH]``

On ``--device`` (default ``cuda``) it

1. trains the preset in this process with the reference trainer (:func:`oobleck.train_local.train_local`) on
   the job of :func:`benchmarks.engine.job_config` (float32 weights, 8 microbatches of 4, clipping off,
   seed 0), once per precision: ``fp32``, and ``bf16`` where the device supports it
   (``torch.cuda.is_bf16_supported()``; always on CPU). Each run reports its steady samples/s over the
   steps after the warm-up (:func:`benchmarks.engine.steady_rate`), its first and last loss and, on CUDA,
   the allocator's peak (``torch.cuda.max_memory_allocated``, reset before the run);
2. profiles the model there with the project's profiler (:func:`oobleck.profiler.profile_model`: every
   timing is bracketed by ``torch.cuda.synchronize``; sizes are counted from the tensors, so they are the
   same on every device) and reports the per-layer forward and backward sums;
3. plans from that profile (:func:`planner.plan.make_plan`, f = 1, the job's cluster config for memory and
   bandwidths) for each node count of ``--nodes`` (one device per node), reporting the pipelines' node
   counts and the predicted step time. A node count the planner refuses reports its one-line reason.

It prints a table and, only when it ran on CUDA, writes the JSON (default ``benchmarks/results/gpu_check.json``).
Without a visible CUDA device ``--device cuda`` prints one line saying it skipped and exits 0. ``--device
cpu`` runs the whole path on the CPU (its figures are not GPU figures, so nothing is written): that is how
the code is tested without a GPU. Bad flags: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine import Bench, job_config, steady_rate
from benchmarks.jobs import bad_flag, machine_info, write_report
from models.gpt import PRESETS
from oobleck.cluster_spec import cluster_spec
from oobleck.config import JobConfig, config_from_dict
from oobleck.model_building import build_batches, build_model
from oobleck.profiler import profile_model
from oobleck.train_local import train_local
from planner.errors import PlanningError
from planner.plan import make_plan

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
PROG = "python -m benchmarks.gpu_check"
#: the planner's fault tolerance: every layer on two pipelines, Oobleck's smallest useful setting
F = 1


def precisions(device: torch.device) -> list[str]:
    """The precisions to train in on ``device``: fp32, and bf16 where it is supported."""
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    return ["fp32", "bf16"] if bf16 else ["fp32"]


def check_config(bench: Bench, preset: str, run_dir: str, device: torch.device, precision: str) -> JobConfig:
    """The engine benchmark's job of ``preset`` (:func:`benchmarks.engine.job_config`) on ``device`` in
    ``precision``."""
    raw = job_config(bench, preset, run_dir).to_dict()
    raw["cluster"]["device"] = device.type
    raw["training"]["precision"] = precision
    return config_from_dict(raw)


def train(config: JobConfig, bench: Bench, device: torch.device) -> dict[str, Any]:
    """One single-process training run: samples/s after the warm-up, first and last loss, peak bytes (CUDA
    only; None on CPU, which has no allocator peak)."""
    end_times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_local(config, on_step=lambda stats: end_times.append(time.perf_counter()))
    samples_per_s, _ = steady_rate(end_times, bench.warmup, bench.global_batch)
    return {
        "precision": config.training.precision,
        "samples_per_s": samples_per_s,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def profile_and_plan(config: JobConfig, device: torch.device, nodes: list[int]) -> dict[str, Any]:
    """Profile ``config``'s model on ``device`` and plan it on each node count of ``nodes``."""
    spec = build_model(config.model, config.training.seed)
    profile = profile_model(spec, build_batches(config, spec), config.training.microbatch, device)
    plans = []
    for n in nodes:
        try:
            plan = make_plan(
                profile, cluster_spec(config.cluster, nodes=n, devices_per_node=1), F,
                config.training.global_batch, config.training.microbatch,
            )  # fmt: skip
        except PlanningError as e:
            plans.append({"nodes": n, "error": str(e)})
            continue
        pipelines = [t.num_nodes for t, _ in plan.instantiation.pipelines]
        plans.append({"nodes": n, "pipelines": pipelines, "predicted_step_s": plan.step_time_s})
    return {
        "layers": len(profile.layers),
        "forward_s": sum(layer.forward_s for layer in profile.layers),
        "backward_s": sum(layer.backward_s for layer in profile.layers),
        "device": profile.fingerprint["device"],
        "plans": plans,
    }


def run_check(bench: Bench, preset: str, device: torch.device, nodes: list[int]) -> dict[str, Any]:
    """Train in each precision, profile and plan; the report :func:`main` prints (and writes on CUDA)."""
    with tempfile.TemporaryDirectory(prefix="oobleck-gpu-check-") as run_dir:
        configs = [check_config(bench, preset, run_dir, device, p) for p in precisions(device)]
        runs = [train(config, bench, device) for config in configs]
        profiled = profile_and_plan(configs[0], device, nodes)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {"preset": preset, "warmup": bench.warmup, "steps": bench.steps,
                   "global_batch": bench.global_batch, "microbatch": bench.microbatch, "f": F},  # fmt: skip
        "runs": runs,
        "profile": profiled,
        "machine": machine_info(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one row per precision, the profile's sums, one row per planned node count."""
    c, p = report["config"], report["profile"]
    lines = [
        f"{c['preset']} GPT on {report['device']}: {c['steps']} timed steps after {c['warmup']} warm-up, "
        f"global batch {c['global_batch']} in microbatches of {c['microbatch']}",
        f"{'precision':<10}{'samples/s':>11}{'loss first':>12}{'loss last':>11}{'peak MiB':>10}",
    ]
    for r in report["runs"]:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        lines.append(f"{r['precision']:<10}{r['samples_per_s']:>11.1f}{r['loss_first']:>12.4f}{r['loss_last']:>11.4f}{peak:>10}")
    lines.append(
        f"profile ({p['device']}, {p['layers']} layers, microbatch {c['microbatch']}): "
        f"forward {p['forward_s'] * 1000:.2f} ms, backward {p['backward_s'] * 1000:.2f} ms"
    )
    lines.append(f"{'nodes':<7}{'pipelines (nodes each)':<30}{'predicted step (ms)':>20}   (f = {c['f']})")
    for plan in p["plans"]:
        if "error" in plan:
            lines.append(f"{plan['nodes']:<7}no plan: {plan['error']}")
        else:
            shape = " + ".join(str(n) for n in plan["pipelines"])
            lines.append(f"{plan['nodes']:<7}{shape:<30}{plan['predicted_step_s'] * 1000:>20.2f}")
    return "\n".join(lines)


def _node_counts(text: str) -> list[int] | None:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        return None
    return counts if counts and all(n >= 1 for n in counts) else None


def main(argv: list[str] | None = None) -> int:
    """Run the check (see the module notes). Exit status 0 (also when skipped), 2 for a bad flag."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the whole path on the CPU; writes nothing)")
    parser.add_argument("--preset", default="small", help="GPT preset (default small)")
    parser.add_argument("--warmup", type=int, default=Bench.warmup, help=f"untimed steps first, at least 1 (default {Bench.warmup})")
    parser.add_argument("--steps", type=int, default=Bench.steps, help=f"timed steps, at least 1 (default {Bench.steps})")
    parser.add_argument("--nodes", default="2,4,8", help="node counts to plan for, comma-separated (default 2,4,8)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON, written on CUDA only (default {RESULTS})")
    args = parser.parse_args(argv)
    nodes = _node_counts(args.nodes)
    if bad_flag(PROG, [
        ("--device", args.device, args.device in ("cuda", "cpu"), "use cuda or cpu"),
        ("--preset", args.preset, args.preset in PRESETS, f"use one of {', '.join(PRESETS)}"),
        ("--warmup", args.warmup, args.warmup >= 1, "must be at least 1 (the first step includes start-up)"),
        ("--steps", args.steps, args.steps >= 1, "must be at least 1"),
        ("--nodes", args.nodes, nodes is not None, "give positive node counts separated by commas, e.g. 2,4,8"),
    ]):  # fmt: skip
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: skipped: no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda})")
        return 0
    assert nodes is not None
    device = torch.device(args.device)
    report = run_check(Bench(warmup=args.warmup, steps=args.steps), args.preset, device, nodes)
    print(format_table(report))
    if device.type == "cuda":
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
