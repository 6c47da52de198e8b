"""Shared by the ``oobleck run`` tests: tiny job configs and a scan for processes a run left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.jobs import tagged as tagged_by

ROOT = Path(__file__).resolve().parents[1]
TAG_ENV = "OOBLECK_TEST_RUN_TAG"


def tiny_gpt(profile_dir: Path, nodes: int, steps: int, f: int = 1) -> dict[str, Any]:
    """A float64 GPT small enough for 5 CPU processes on 2 cores: 6 layers, 8 microbatches a step."""
    return {
        "model": {"family": "gpt", "preset": "tiny", "dtype": "float64", "overrides": {"d_model": 32, "n_head": 2, "seq_len": 16}},
        "data": {"dataset": "pydoc"},
        "training": {"steps": steps, "global_batch": 16, "microbatch": 2, "lr": 1e-3, "seed": 3},
        "cluster": {"nodes": nodes, "devices_per_node": 1, "device": "cpu"},
        "fault_tolerance": {"f": f, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 5.0},
        "profile": {"cache_dir": str(profile_dir), "warmup": 0, "repeats": 1},
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def start_run(config: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``oobleck run CONFIG --run-dir RUN_DIR EXTRA...`` in the background, tagged so that every process
    it starts can be found later (children inherit the environment)."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_ENV: tag})
    cmd = [sys.executable, "-m", "oobleck.cli", "run", str(config), "--run-dir", str(run_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, tag


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``tag`` (see :func:`start_run`)."""
    return tagged_by(tag, TAG_ENV)
