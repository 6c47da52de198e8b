"""Our pipeline engine side by side with DeepSpeed's, and a single process for reference.

``python -m benchmarks.engine [--steps N] [--warmup W] [--microbatch M] [--microbatches K] [--rounds R]
[--single-threads T] [--presets P,...] [--quick] [--out PATH]``

Every preset of ``--presets`` (default ``tiny,small``) is measured in the same invocation; then the overlap
gain: our engine on a multi-pipeline job with ``training.overlap_grad_sync`` on and off.

All three train the same model (a GPT preset, float32, seed 0) on the same deterministic batches with the
same AdamW and gradient clipping off (DeepSpeed's pipeline engine would otherwise clip, by default to 1.0,
from a norm computed on stage 0 alone). The two pipeline engines run one pipeline of four stages, one
process per stage, cut at the same layer boundaries, each doing ``K`` microbatches of ``M`` samples per
step. They run one after the other in this invocation:

* DeepSpeed: :mod:`benchmarks.ds_pipeline` (``deepspeed.pipe.PipelineModule``, gloo, 4 local processes);
* ours: ``launcher.local.run`` (the path ``oobleck run`` takes: master, four single-device node agents and
  their workers) with a planner that returns the one 4-stage pipeline;
* single process: :func:`oobleck.train_local.train_local`.

Figures: each run does ``W + N`` steps. Its throughput is ``N * global_batch`` over the time from the end
of step ``W - 1`` to the end of step ``W + N - 1``, so start-up and the first (warm-up) steps do not count.
A step's end is, for DeepSpeed, when stage 0's ``train_batch`` returns; for ours, when the master commits
the step (in the steady state both are one per step period); for the single process, when its step
returns. Every engine's per-step losses are recorded too: the three compute the same numbers, so they
must agree to rounding, which checks that the comparison is like for like.

CPU time: the CPU seconds (user + system, all threads) the engine's processes spent over the timed steps,
per step: DeepSpeed's stage processes; our stage workers plus, apart, our control plane (master, which
runs in this process, and agents). On a machine with fewer cores than stages the CPU a step costs bounds
throughput, and unlike wall time it barely moves with other work sharing the cores.

Rounds: ``--rounds R`` runs the three engines R times in turn; the median counts, and each round's ours /
DeepSpeed ratio is kept, since two runs next to each other in time see about the same load. Each pipeline
worker runs one torch thread (four workers share the cores); the single process runs ``--single-threads``.

Overlap: the last preset's job as two pipelines of two stages (the four nodes; ``K / 2`` microbatches each),
our engine only, with the gradient all-reduce overlapped with the backward pass and without, alternating
within each of the R rounds. The gain is the median of the rounds' on / off ratios; the two runs compute the
same sums, so their losses must be equal.

The results go to ``benchmarks/results/engine.json`` (or ``--out``): ``presets: {name: {partition, engines,
ratios, max_loss_diff_vs_single_process}}`` and ``overlap``, with the config, the machine (including its
load average, since other work on a shared machine skews the figures) and a timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.ds_pipeline import DSRun, run_deepspeed
from oobleck.config import JobConfig, config_from_dict
from oobleck.errors import OobleckError

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
STAGES = 4
#: seconds a whole pipeline run (start-up included) may take before it counts as hung
RUN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Bench:
    """What one benchmark invocation runs."""

    presets: tuple[str, ...] = ("tiny", "small")
    microbatch: int = 4
    microbatches: int = 8
    warmup: int = 3
    steps: int = 20
    #: torch threads of each pipeline worker (4 workers share this machine's cores)
    worker_threads: int = 1
    #: torch threads of the single-process reference. One by default: with more, OpenMP's spin-waiting
    #: threads burn whole time slices whenever other work shares the cores (measured here under load:
    #: 4.5 CPU-s per tiny-GPT step with 2 threads against ~0.25 s with 1)
    single_threads: int = 1
    rounds: int = 1

    @property
    def global_batch(self) -> int:
        return self.microbatch * self.microbatches


@dataclass(frozen=True)
class Figures:
    """One engine's run: steady-state samples/s, the timed steps' durations, every step's loss, the wall
    time of the whole run (start-up included), and the CPU time its processes spent per timed step, by
    role (``stages``: the processes running layers; ``control``: our master and agents)."""

    samples_per_s: float
    step_times_s: list[float]
    losses: list[float]
    wall_s: float
    cpu_s_per_step: dict[str, float]


def job_config(bench: Bench, preset: str, run_dir: str, overlap: bool = True) -> JobConfig:
    """The job every engine runs: ``bench.warmup + bench.steps`` steps of the GPT ``preset`` on pydoc text,
    four single-device CPU nodes, no fault tolerance (f = 0), clipping off, constant learning rate;
    ``overlap`` is ``training.overlap_grad_sync``."""
    return config_from_dict(
        {
            "model": {"family": "gpt", "preset": preset, "dtype": "float32"},
            "data": {"dataset": "pydoc"},
            "training": {
                "steps": bench.warmup + bench.steps,
                "global_batch": bench.global_batch,
                "microbatch": bench.microbatch,
                "grad_clip": None,
                "lr_schedule": "constant",
                "seed": 0,
                "overlap_grad_sync": overlap,
            },
            "cluster": {"nodes": STAGES, "devices_per_node": 1, "device": "cpu"},
            "fault_tolerance": {"f": 0},
            "run": {"dir": run_dir},
        }
    )


def stage_boundaries(num_layers: int, stages: int) -> tuple[int, ...]:
    """Cut ``[first, middle..., last]`` into ``stages`` contiguous stages: the middle layers (a GPT's
    blocks) are spread as evenly as possible, earlier stages taking the extra ones, the first layer
    joins stage 0 and the last layer joins the last stage. Returns ``(0, b_1, ..., num_layers)``."""
    middle = num_layers - 2
    if middle < stages:
        raise ValueError(f"{num_layers} layers cannot fill {stages} stages with at least one middle layer each")
    base, extra = divmod(middle, stages)
    cuts = [0]
    for s in range(stages):
        cuts.append(cuts[-1] + base + (1 if s < extra else 0) + (1 if s == 0 else 0))
    cuts[-1] += 1
    return tuple(cuts)


def steady_rate(end_times: list[float], warmup: int, global_batch: int) -> tuple[float, list[float]]:
    """Samples/s over the steps after ``warmup`` (see the module notes) and those steps' durations."""
    timed = end_times[warmup - 1 :]
    durations = [b - a for a, b in zip(timed, timed[1:])]
    return global_batch * len(durations) / (timed[-1] - timed[0]), durations


def run_deepspeed_side(bench: Bench, job: JobConfig, parts: tuple[int, ...]) -> Figures:
    """DeepSpeed's pipeline engine, one process per stage; times and losses as stage 0 saw them."""
    start = time.perf_counter()
    ranks = run_deepspeed(
        DSRun(
            config=job.to_dict(),
            parts=parts,
            warmup=bench.warmup,
            steps=bench.steps,
            threads=bench.worker_threads,
            timeout_s=RUN_TIMEOUT_S,
        )
    )
    wall = time.perf_counter() - start
    rate, durations = steady_rate(ranks[0]["step_end_times"], bench.warmup, bench.global_batch)
    cpu = sum(r["step_end_cpu"][-1] - r["step_end_cpu"][bench.warmup - 1] for r in ranks)
    return Figures(rate, durations, ranks[0]["losses"], wall, {"stages": cpu / bench.steps})


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (which hosts our master) and by its
    descendants, by role: ``stages`` (worker processes) and ``control`` (this process and the agents)."""
    import psutil

    me = psutil.Process()
    totals = {"stages": 0.0, "control": sum(me.cpu_times()[:2])}
    for proc in me.children(recursive=True):
        try:
            role = "stages" if "oobleck.worker_main" in proc.cmdline() else "control"
            totals[role] += sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue  # a process that exited (or is exiting) has nothing left to count in this window
    return totals


def run_oobleck_side(bench: Bench, job: JobConfig, parts: tuple[int, ...]) -> Figures:
    """Our engine through the local launcher as one pipeline cut at ``parts``."""
    return run_oobleck_pipelines(bench, job, [parts])


def run_oobleck_pipelines(bench: Bench, job: JobConfig, pipelines: list[tuple[int, ...]]) -> Figures:
    """Our engine through the local launcher, one pipeline per cut list of ``pipelines`` sharing the step's
    microbatches equally, one single-device node per stage; a step ends when the master commits it."""
    from launcher import local
    from oobleck.control.placement import PipelineShape

    shapes = [
        PipelineShape(layer_ranges=tuple(zip(parts, parts[1:])), num_microbatches=bench.microbatches // len(pipelines))
        for parts in pipelines
    ]
    end_times: list[float] = []
    losses: list[float] = []
    cpu_marks: list[dict[str, float]] = []
    marked_steps = (bench.warmup - 1, bench.warmup + bench.steps - 1)

    def on_step(record: Any) -> None:
        end_times.append(time.perf_counter())
        losses.append(record.loss)
        if record.step in marked_steps:  # only twice: reading /proc steals CPU from the run
            cpu_marks.append(cpu_by_role())

    # workers inherit this environment through the agents; OMP_NUM_THREADS sets their torch threads
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(bench.worker_threads)
    start = time.perf_counter()
    try:
        local.run(job, lambda nodes: shapes, on_step=on_step)
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    wall = time.perf_counter() - start
    rate, durations = steady_rate(end_times, bench.warmup, bench.global_batch)
    first, last = cpu_marks
    return Figures(rate, durations, losses, wall, {role: (last[role] - first[role]) / bench.steps for role in first})


def run_single_side(bench: Bench, job: JobConfig, parts: tuple[int, ...]) -> Figures:
    """The single-process reference trainer in this process (``parts`` is unused: there are no stages)."""
    from oobleck.train_local import train_local

    end_times: list[float] = []
    end_cpu: list[float] = []

    def on_step(stats: Any) -> None:
        end_times.append(time.perf_counter())
        end_cpu.append(time.process_time())

    saved = torch.get_num_threads()
    torch.set_num_threads(bench.single_threads)
    start = time.perf_counter()
    try:
        result = train_local(job, on_step=on_step)
    finally:
        torch.set_num_threads(saved)
    wall = time.perf_counter() - start
    rate, durations = steady_rate(end_times, bench.warmup, bench.global_batch)
    cpu = (end_cpu[-1] - end_cpu[bench.warmup - 1]) / bench.steps
    return Figures(rate, durations, result.losses, wall, {"stages": cpu})


#: the engines in the order they run within a round
ENGINES: dict[str, Callable[[Bench, JobConfig, tuple[int, ...]], Figures]] = {
    "deepspeed": run_deepspeed_side,
    "oobleck": run_oobleck_side,
    "single_process": run_single_side,
}


def machine_info() -> dict[str, Any]:
    import deepspeed

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


def run_bench(bench: Bench) -> dict[str, Any]:
    """Run every preset's engines, then the overlap pair, ``bench.rounds`` times each (engines alternating
    within each round, so slow drift in the machine's load hits all of them), and return the report that
    :func:`main` writes."""
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="oobleck-bench-") as run_dir:
        presets = {preset: run_preset(bench, preset, f"{run_dir}/{preset}") for preset in bench.presets}
        overlap = run_overlap(bench, bench.presets[-1], f"{run_dir}/overlap")
    machine["loadavg_1m_at_end"] = os.getloadavg()[0]
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**asdict(bench), "global_batch": bench.global_batch, "stages": STAGES, "dtype": "float32"},
        "machine": machine,
        "presets": presets,
        "overlap": overlap,
    }


def num_layers(job: JobConfig) -> int:
    from oobleck.model_building import build_model

    return build_model(job.model, job.training.seed).num_layers


def run_preset(bench: Bench, preset: str, run_dir: str) -> dict[str, Any]:
    """Every engine on ``preset``'s job, ``bench.rounds`` times: figures, ratios and loss agreement."""
    job = job_config(bench, preset, run_dir)
    parts = stage_boundaries(num_layers(job), STAGES)
    runs: dict[str, list[Figures]] = {name: [] for name in ENGINES}
    for _ in range(bench.rounds):
        for name, measure in ENGINES.items():
            runs[name].append(measure(bench, job, parts))
    engines = {}
    for name, figures in runs.items():
        rates = [f.samples_per_s for f in figures]
        engines[name] = {
            "samples_per_s": statistics.median(rates),
            "samples_per_s_per_round": rates,
            "mean_step_s": statistics.median(statistics.fmean(f.step_times_s) for f in figures),
            "wall_s_per_round": [f.wall_s for f in figures],
            "cpu_ms_per_step": {
                role: 1000 * statistics.median(f.cpu_s_per_step[role] for f in figures)
                for role in figures[0].cpu_s_per_step
            },
            "losses": figures[0].losses,
        }
    reference = engines["single_process"]["losses"]
    return {
        "partition": [list(r) for r in zip(parts, parts[1:])],
        "engines": engines,
        "ratios": {
            "oobleck_over_deepspeed": engines["oobleck"]["samples_per_s"] / engines["deepspeed"]["samples_per_s"],
            "oobleck_over_single_process": engines["oobleck"]["samples_per_s"]
            / engines["single_process"]["samples_per_s"],
            # runs next to each other in time share the machine's load: their ratio is the steadier figure
            "oobleck_over_deepspeed_per_round": [
                ours.samples_per_s / theirs.samples_per_s for ours, theirs in zip(runs["oobleck"], runs["deepspeed"])
            ],
            "oobleck_over_deepspeed_cpu": sum(engines["oobleck"]["cpu_ms_per_step"].values())
            / engines["deepspeed"]["cpu_ms_per_step"]["stages"],
        },
        "max_loss_diff_vs_single_process": {
            name: max(abs(a - b) for a, b in zip(engines[name]["losses"], reference)) for name in ("deepspeed", "oobleck")
        },
    }


def run_overlap(bench: Bench, preset: str, run_dir: str) -> dict[str, Any]:
    """Our engine on ``preset``'s job as two pipelines of two stages, with ``training.overlap_grad_sync``
    on and off alternating, ``bench.rounds`` times (see the module notes)."""
    jobs = {on: job_config(bench, preset, run_dir, overlap=on) for on in (True, False)}
    parts = stage_boundaries(num_layers(jobs[True]), 2)
    runs: dict[bool, list[Figures]] = {True: [], False: []}
    for _ in range(bench.rounds):
        for on, job in jobs.items():
            runs[on].append(run_oobleck_pipelines(bench, job, [parts, parts]))
    gains = [on.samples_per_s / off.samples_per_s for on, off in zip(runs[True], runs[False])]
    return {
        "preset": preset,
        "pipelines": [[list(r) for r in zip(parts, parts[1:])]] * 2,
        "microbatches_per_pipeline": bench.microbatches // 2,
        "samples_per_s": {key: statistics.median(f.samples_per_s for f in runs[on]) for key, on in (("on", True), ("off", False))},
        "cpu_ms_per_step": {
            key: 1000 * statistics.median(sum(f.cpu_s_per_step.values()) for f in runs[on])
            for key, on in (("on", True), ("off", False))
        },
        "gain": statistics.median(gains),
        "gain_per_round": gains,
        "max_loss_diff_on_vs_off": max(abs(a - b) for a, b in zip(runs[True][0].losses, runs[False][0].losses)),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a few lines of text: per preset one row per engine, then the ratios; then the overlap."""
    c = report["config"]
    lines = []
    for preset, r in report["presets"].items():
        lines += [
            f"{preset} GPT, {c['stages']} stages {r['partition']}, {c['microbatches']} x {c['microbatch']} "
            f"samples per step, {c['steps']} timed steps after {c['warmup']} warm-up, {c['rounds']} round(s)",
            f"{'engine':<16}{'samples/s':>12}{'step (ms)':>12}{'CPU ms/step':>20}{'wall (s)':>10}{'loss diff':>12}",
        ]
        diffs = r["max_loss_diff_vs_single_process"]
        for name, e in r["engines"].items():
            diff = f"{diffs[name]:.1e}" if name in diffs else "-"
            wall = statistics.median(e["wall_s_per_round"])
            cpu = " + ".join(f"{v:.0f}" for v in e["cpu_ms_per_step"].values())
            lines.append(
                f"{name:<16}{e['samples_per_s']:>12.1f}{e['mean_step_s'] * 1000:>12.1f}{cpu:>20}{wall:>10.1f}{diff:>12}"
            )
        ratios = r["ratios"]
        per_round = ", ".join(f"{x:.2f}" for x in ratios["oobleck_over_deepspeed_per_round"])
        lines.append(
            f"ours / DeepSpeed = {ratios['oobleck_over_deepspeed']:.2f}x (per round: {per_round}); "
            f"ours / single process = {ratios['oobleck_over_single_process']:.2f}x; "
            f"CPU per step, ours / DeepSpeed = {ratios['oobleck_over_deepspeed_cpu']:.2f}"
        )
    o = report["overlap"]
    rates, cpu = o["samples_per_s"], o["cpu_ms_per_step"]
    lines.append(
        f"overlap ({o['preset']} GPT, 2 pipelines {o['pipelines'][0]}): on {rates['on']:.1f} samples/s "
        f"({cpu['on']:.0f} CPU ms/step), off {rates['off']:.1f} ({cpu['off']:.0f}); gain {o['gain']:.2f}x "
        f"(per round: {', '.join(f'{g:.2f}' for g in o['gain_per_round'])}); loss diff {o['max_loss_diff_on_vs_off']:.1e}"
    )
    return "\n".join(lines)


def parse_bench(argv: list[str] | None) -> tuple[Bench, Path]:
    """The benchmark and output path from the command line; ValueError names a bad flag."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="timed steps per engine (default 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them, at least 1 (default 3; 1 with --quick)")
    parser.add_argument("--microbatch", type=int, default=Bench.microbatch, help="samples per microbatch")
    parser.add_argument("--microbatches", type=int, help="microbatches per step, at least 4 (default 8; 4 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every engine; the median counts")
    parser.add_argument("--single-threads", type=int, default=Bench.single_threads, help="torch threads of the single process")
    parser.add_argument("--presets", default=",".join(Bench.presets), help="GPT presets, comma-separated (default tiny,small)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up and 2 timed steps of 4 microbatches")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    quick = args.quick
    bench = Bench(
        presets=tuple(p for p in args.presets.split(",") if p),
        microbatch=args.microbatch,
        microbatches=args.microbatches or (4 if quick else Bench.microbatches),
        warmup=args.warmup if args.warmup is not None else (1 if quick else Bench.warmup),
        steps=args.steps or (2 if quick else Bench.steps),
        rounds=args.rounds,
        single_threads=args.single_threads,
    )
    checks = [
        ("--steps", bench.steps, bench.steps >= 1, "must be at least 1"),
        ("--warmup", bench.warmup, bench.warmup >= 1, "must be at least 1 (the first step includes start-up)"),
        ("--microbatch", bench.microbatch, bench.microbatch >= 1, "must be at least 1"),
        ("--microbatches", bench.microbatches, bench.microbatches >= STAGES, f"must be at least {STAGES} (1F1B over {STAGES} stages)"),
        ("--microbatches", bench.microbatches, bench.microbatches % 2 == 0, "must be even (the overlap job has 2 pipelines)"),
        ("--presets", args.presets, bool(bench.presets), "must name at least one preset"),
        ("--rounds", bench.rounds, bench.rounds >= 1, "must be at least 1"),
        ("--single-threads", bench.single_threads, bench.single_threads >= 1, "must be at least 1"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{flag}: got {value}; {rule}")
    return bench, args.out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; exit code 2 with one line for a bad flag, a bad
    preset or a failed job."""
    try:
        bench, out = parse_bench(argv)
    except ValueError as e:
        print(f"benchmarks.engine: error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_bench(bench)
    except OobleckError as e:  # a bad preset, or our engine's job failing (the message names the worker)
        print(f"benchmarks.engine: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
