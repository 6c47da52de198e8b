"""Train the tiny GPT of ``examples/gpt-tiny.yaml`` (4 nodes, f=1, Python's own docs as text) with the
local launcher: planning, profiling, pipelines and the step commit end to end in a few minutes. Half way,
the last node is killed (SIGKILL to its agent, in the middle of a backward pass) and the job recovers on
the survivors without losing a step; ``--no-failure`` trains without it."""

from __future__ import annotations

import argparse
from pathlib import Path

from oobleck.commands.run import train
from oobleck.config import FaultConfig, load_config
from oobleck.errors import OobleckError

HELP = "train a tiny GPT on 4 local nodes, end to end"

#: the repository's examples folder (the demo runs from a source checkout)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpt-tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--no-failure", action="store_true", help="do not kill a node half way")


def run(args: argparse.Namespace) -> int:
    if not EXAMPLE.exists():
        raise OobleckError(f"demo config {EXAMPLE} is missing; run the demo from a source checkout of Oobleck")
    config = load_config(EXAMPLE)
    config.run.dir = args.run_dir
    if not args.no_failure:
        victim = config.cluster.nodes - 1
        step = config.training.steps // 2
        config.faults = [FaultConfig(step=step, phase="backward", kind="kill", target="node", nodes=[victim])]
        print(f"demo: node{victim} will be killed (SIGKILL) during the backward pass of step {step + 1}")
    return train(config)
