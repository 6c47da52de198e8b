"""Train the configured model in this one process (no pipelines, no failures): the reference run whose
losses the distributed engine reproduces. Writes metrics.jsonl and a final per-layer checkpoint to the run
directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from oobleck.bounds import MAX_STEPS, int_flag
from oobleck.config import load_config
from oobleck.errors import ConfigError
from oobleck.train_local import check_samples, train_local, write_samples

HELP = "train in a single process (the reference run)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config (YAML)")
    parser.add_argument("--steps", type=int_flag(1, MAX_STEPS), metavar="N", help="override training.steps (the total steps)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (default: run.dir of the config)")
    parser.add_argument("--samples", metavar="PNG", help="DiT/MoE: write a grid of generated samples at the end")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps: got {args.steps}; must be at least 1")
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, steps=args.steps))
    if args.samples and config.model.family == "gpt":
        raise ConfigError("--samples: a sample grid needs a diffusion model (family dit or moe); drop --samples")
    if args.run_dir is not None and not args.run_dir.strip():
        raise ConfigError("--run-dir: got ''; must not be empty; name the run directory")
    run_dir = Path(args.run_dir or config.run.dir)
    if args.samples:
        check_samples(config)
    ema_decay = config.sampling.ema if args.samples else None  # the average is kept only to sample from
    result = train_local(config, run_dir=run_dir, progress=True, ema_decay=ema_decay)
    last = result.stats[-1]
    aux = f", aux loss {last.aux_loss:.4f}" if last.aux_loss else ""
    print(f"final loss {last.loss:.4f}{aux} after {len(result.losses)} steps")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    print(f"checkpoint: {result.checkpoint}")
    if args.samples:
        print(f"samples: {write_samples(result, args.samples, config.sampling, classes=config.data.classes)}")
    return 0
