"""Train a job on a cluster: plan (profiling first when no matching profile is cached), start the master
and one agent per node (through the launcher ``cluster.launcher`` names), train with a live progress
line, write ``RUN/metrics.jsonl``, TensorBoard logs and the master's log (``RUN/logs/master.log``), and print
a summary. The workers write the final
checkpoint under the run directory. The data is checked before anything starts. Exits 2 with one line for
bad input (the data, or --steps not beyond the checkpoint of --resume), also when a worker stops on its
input (its own line); 1 with one line naming the lost worker or node when the job fails; Ctrl-C stops
every process the run started."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Iterator

from oobleck.bounds import MAX_NODES, MAX_STEPS, int_flag
from oobleck.config import JobConfig, load_config
from oobleck.config_checks import validate
from oobleck.errors import OobleckError

HELP = "train a job on a cluster (local processes by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config (YAML)")
    parser.add_argument("--nodes", type=int_flag(1, MAX_NODES), help="override cluster.nodes")
    parser.add_argument(
        "--steps",
        type=int_flag(1, MAX_STEPS),
        help="override training.steps: the run's total steps, counted from step 0 (with --resume, training "
        "continues from the checkpoint's step up to N)",
    )
    parser.add_argument("--run-dir", help="override run.dir (metrics, TensorBoard, checkpoints, logs)")
    parser.add_argument(
        "--launcher", choices=("local", "ray"), help="override cluster.launcher: processes on this machine, or a Ray cluster"
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="override cluster.ray_address: the Ray cluster's head (HOST:PORT, or auto); without one the ray "
        "launcher starts a Ray cluster on this machine",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")


def job_config(args: argparse.Namespace) -> JobConfig:
    """The config file with the command line's overrides applied and validated again."""
    config = load_config(args.config)
    for flag, value in (("--nodes", args.nodes), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise OobleckError(f"{flag}: got {value}; must be at least 1")
    if args.nodes is not None:
        config.cluster.nodes = args.nodes
    if args.steps is not None:
        config.training.steps = args.steps
    if args.run_dir is not None:
        config.run.dir = args.run_dir
    if args.resume:
        config.run.resume = True
    if args.launcher is not None:
        config.cluster.launcher = args.launcher
    if args.address is not None:
        if config.cluster.launcher != "ray":
            raise OobleckError("--address: names a Ray cluster; use it with --launcher ray (or cluster.launcher: ray)")
        config.cluster.ray_address = args.address
    validate(config)
    return config


def run(args: argparse.Namespace) -> int:
    config = job_config(args)
    if config.run.resume:
        check_resume(config, "--steps" if args.steps is not None else "training.steps")
    return train(config)


def check_resume(config: JobConfig, steps_field: str) -> None:
    """OobleckError unless the checkpoint a resumed run restores (the newest that verifies, as the master
    picks it) leaves steps to train: ``training.steps`` counts the run's total steps, so a checkpoint at or
    beyond it leaves none. ``steps_field`` is where the step count came from (``--steps`` or
    ``training.steps``), for the message."""
    from oobleck import checkpoint

    ckpt = checkpoint.latest_checkpoint(config.run.dir)
    if ckpt is None:
        return
    step = int(checkpoint.read_meta(ckpt)["step"])
    if step >= config.training.steps:
        raise OobleckError(
            f"{steps_field}: got {config.training.steps}, but the checkpoint to resume from ({ckpt}) is at step "
            f"{step}: the step count is the run's total, so nothing is left to train; pass --steps greater than {step}"
        )


#: the loggers of this process's part of a run: the master (oobleck.control) and the launcher
_RUN_LOGGERS = ("oobleck", "launcher")


@contextlib.contextmanager
def master_log(path: Path) -> Iterator[None]:
    """Write this process's run loggers at INFO, with times, to ``path`` (appended: a resumed run adds to it)
    for the body; warnings still reach stderr as before (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s master %(name)s: %(message)s"))
    # with a handler on their chain, Python no longer prints these loggers' warnings by its last resort
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    loggers = [logging.getLogger(name) for name in _RUN_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(to_file)
        logger.addHandler(to_stderr)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(to_file)
            logger.removeHandler(to_stderr)
            logger.setLevel(level)
        to_file.close()


def train(config: JobConfig) -> int:
    """Run ``config`` with live progress and metrics; 0 on success, 1 (with one line) on a failed job, 2
    (with the worker's own line) when a worker failed on its input. The data is checked first
    (:func:`~oobleck.model_building.check_data`), so that bad data is one line before anything starts."""
    from oobleck.model_building import check_data

    check_data(config)  # before the launcher's imports: bad data fails fast

    from launcher import launch
    from oobleck.control.master import JobFailed
    from oobleck.control.planning import job_planner
    from oobleck.metrics import MetricsWriter
    from oobleck.progress import Progress, summary

    run_dir = Path(config.run.dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    started = time.monotonic()
    recoveries: list[object] = []
    try:
        with master_log(run_dir / "logs" / "master.log"), Progress(config.training.steps, config.run.log_every) as progress, MetricsWriter(run_dir, append=config.run.resume) as metrics:

            def on_step(record: object) -> None:
                metrics.write(record)
                progress.step(record)

            def on_recovery(record: object) -> None:
                metrics.write_recovery(record)
                progress.recovery(record)
                recoveries.append(record)

            progress.phase(f"planning {config.model.family}/{config.model.preset} on {config.cluster.nodes} nodes")
            planner = job_planner(config, log=progress.phase)
            try:
                records = launch(config, planner, on_step=on_step, on_phase=progress.phase, on_recovery=on_recovery)
            except JobFailed as e:
                if e.input_error:
                    print(f"oobleck run: error: {e}", file=sys.stderr)
                    return 2
                print(f"oobleck run: failed: {e}", file=sys.stderr)
                return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(records, recoveries, time.monotonic() - started, config.training.global_batch, run_dir))
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
