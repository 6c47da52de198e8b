"""Train the tiny GPT of ``examples/gpt-tiny.yaml`` (4 nodes, f=1, Python's own docs as text) with the
local launcher: planning, profiling, pipelines and the step commit end to end in a few minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from oobleck.commands.run import train
from oobleck.config import load_config
from oobleck.errors import OobleckError

HELP = "train a tiny GPT on 4 local nodes, end to end"

#: the repository's examples folder (the demo runs from a source checkout)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt-tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")


def run(args: argparse.Namespace) -> int:
    if not EXAMPLE.exists():
        raise OobleckError(f"demo config {EXAMPLE} is missing; run the demo from a source checkout of Oobleck")
    config = load_config(EXAMPLE)
    config.run.dir = args.run_dir
    return train(config)
