"""The command line: ``python -m benchmarks.fault_tolerance`` (see the package notes)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import benchmarks.fault_tolerance
from benchmarks.cpu_shares import add_cpu_share_flag, flag_check
from benchmarks.fault_tolerance.bench import Options, run_schedules
from benchmarks.fault_tolerance.report import format_report
from benchmarks.fault_tolerance.schedule import MAX_NODES, UNITS, Schedule, fixed_schedule, trace_schedule
from benchmarks.jobs import bad_flag, run_and_report
from benchmarks.sim.model import POLICIES
from oobleck.errors import OobleckError

PROG = "benchmarks.fault_tolerance"
RESULTS = Path(__file__).resolve().parents[1] / "results"


class UsageError(ValueError):
    """A bad command line; the message names the flag and what is allowed."""


def parse_args(argv: list[str]) -> Options:
    """The command line. argparse exits 2 on what it checks itself; the rest raises :class:`UsageError`
    (flags that do not go together) or is left to :func:`flag_checks`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fault_tolerance", description=benchmarks.fault_tolerance.__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=None, help="nodes of the generated schedules (default 6; 4 to 8)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of every run (default 250)")
    parser.add_argument(
        "--schedule", nargs="+", choices=list(UNITS), default=None,
        help="generated schedules to run, each with every seed: interval (default; losses in wall seconds), steps (in committed steps)",
    )  # fmt: skip
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--every-s", type=float, default=None, help="interval: a node lost every S wall seconds (default 6)")
    how.add_argument("--trace", type=Path, help="replay this node-availability trace instead")
    parser.add_argument("--compression", type=float, default=None, help="with --trace: trace seconds per wall second")
    parser.add_argument("--failures", type=int, default=None, help="generated schedules: losses in all (default 3)")
    parser.add_argument(
        "--replace-after-s", type=float, default=None, help="interval: a replacement is added S s after each loss (default 1.5)"
    )
    parser.add_argument("--every-steps", type=int, default=None, help="steps: a node lost every N committed steps (default 20)")
    parser.add_argument(
        "--replace-after-steps", type=int, default=None, help="steps: a replacement is added N steps after each loss (default 10)"
    )
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["oobleck", "bamboo", "varuna"])
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="which nodes the generated schedules kill (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="run each generated schedule once per seed")
    parser.add_argument("--run-timeout-s", type=float, default=300.0, help="stop a run this long after its launch (default 300)")
    add_cpu_share_flag(parser, "cores/capacity")
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_tolerance.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "fault_tolerance.png", help="PNG path; 'none' to skip")
    args = parser.parse_args(argv)
    fixed = args.trace is None
    schedules = list(dict.fromkeys(args.schedule or ["interval"]))
    seed_flag, seeds = ("--seeds", args.seeds) if args.seeds is not None else ("--seed", [args.seed or 0])
    only = {
        "--every-s": ("interval", args.every_s),
        "--replace-after-s": ("interval", args.replace_after_s),
        "--every-steps": ("steps", args.every_steps),
        "--replace-after-steps": ("steps", args.replace_after_steps),
    }
    if fixed and args.compression is not None:
        raise UsageError("--compression: applies to --trace only")
    if not fixed:
        generated_only = {
            "--schedule": args.schedule, "--nodes": args.nodes, "--failures": args.failures, "--seed": args.seed, "--seeds": args.seeds,
        }  # fmt: skip
        for flag, value in [*generated_only.items(), *((f, v) for f, (_, v) in only.items())]:
            if value is not None:
                raise UsageError(f"{flag}: applies to the generated schedules only (the trace names its nodes and events)")
        if args.compression is None:
            raise UsageError("--trace: needs --compression C (trace seconds per wall second)")
    for flag, (name, value) in only.items():
        if value is not None and name not in schedules:
            raise UsageError(f"{flag}: applies to --schedule {name} only")
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise UsageError(f"{seed_flag}: got {' '.join(map(str, seeds))}; each must be at least 0, and given once")
    return Options(
        nodes=6 if args.nodes is None else args.nodes,
        steps=args.steps,
        every_s=6.0 if args.every_s is None else args.every_s,
        failures=3 if args.failures is None else args.failures,
        replace_after_s=1.5 if args.replace_after_s is None else args.replace_after_s,
        trace=args.trace,
        compression=1.0 if args.compression is None else args.compression,
        policies=list(dict.fromkeys(args.policies)),
        seeds=seeds,
        run_timeout_s=args.run_timeout_s,
        out=args.out,
        plot=None if str(args.plot).lower() == "none" else args.plot,
        keep=args.keep,
        argv=list(argv),
        cpu_share=args.cpu_share,
        schedules=schedules if fixed else ["trace"],
        every_steps=20 if args.every_steps is None else args.every_steps,
        replace_after_steps=10 if args.replace_after_steps is None else args.replace_after_steps,
    )


def flag_checks(opts: Options) -> list[tuple[str, Any, bool, str]]:
    """``(flag, value, ok, rule)`` for :func:`benchmarks.jobs.bad_flag`."""
    finite = math.isfinite
    last_step = opts.failures * opts.every_steps + opts.replace_after_steps
    return [
        ("--nodes", opts.nodes, 4 <= opts.nodes <= MAX_NODES, f"must be in [4, {MAX_NODES}]"),
        ("--steps", opts.steps, opts.steps >= 10, "must be at least 10"),
        ("--every-s", opts.every_s, finite(opts.every_s) and opts.every_s > 0, "must be a positive number of seconds"),
        ("--failures", opts.failures, opts.failures >= 1, "must be at least 1"),
        ("--replace-after-s", opts.replace_after_s, finite(opts.replace_after_s) and opts.replace_after_s >= 0, "must be at least 0"),
        ("--compression", opts.compression, finite(opts.compression) and opts.compression > 0, "must be positive"),
        ("--run-timeout-s", opts.run_timeout_s, finite(opts.run_timeout_s) and opts.run_timeout_s > 0, "must be positive"),
        ("--every-steps", opts.every_steps, opts.every_steps >= 1, "must be at least 1"),
        ("--replace-after-steps", opts.replace_after_steps, opts.replace_after_steps >= 0, "must be at least 0"),
        (
            "--steps", opts.steps, "steps" not in opts.schedules or opts.steps > last_step,
            f"--schedule steps adds its last node after step {last_step} (--failures x --every-steps + "
            "--replace-after-steps): give more steps or fewer failures",
        ),
        flag_check(opts.cpu_share),
    ]


def build_schedules(opts: Options) -> dict[str, dict[int, Schedule]]:
    """Name -> seed -> schedule: each of ``opts.schedules`` with each seed, or the trace (seed 0)."""
    if opts.trace is not None:
        return {"trace": {0: trace_schedule(opts.trace, opts.compression)}}
    spacing = {"interval": (opts.every_s, opts.replace_after_s), "steps": (opts.every_steps, opts.replace_after_steps)}
    return {
        name: {
            seed: fixed_schedule(opts.nodes, spacing[name][0], opts.failures, spacing[name][1], seed, UNITS[name])
            for seed in opts.seeds
        }
        for name in opts.schedules
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when the acceptance checks pass, 1 when they do not or a run broke, 2 on a bad
    command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
        if bad_flag(PROG, flag_checks(opts)):
            return 2
        schedules = build_schedules(opts)
    except (UsageError, OobleckError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return run_and_report(
        PROG,
        "oobleck-ft-",
        opts.keep,
        opts.out,
        lambda work: run_schedules(opts, schedules, work),
        format_report,
        announce=lambda work: "fault_tolerance: "
        + "; ".join(s.description for by_seed in schedules.values() for s in by_seed.values())
        + f"; {opts.steps} steps per run; runs in {work}",
    )
