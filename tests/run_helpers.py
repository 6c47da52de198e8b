"""Shared by the ``oobleck run`` tests: the test-specific bindings of :mod:`benchmarks.jobs` (the one home
of the tiny job, config writing and tagged launches; the tests' processes carry their own tag variable)
and the assertions a finished run must pass."""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks import jobs
from benchmarks.jobs import ROOT, write_config
from oobleck import checkpoint
from oobleck.metrics import RECOVERIES_FILE, read_metrics
from oobleck.train_local import LocalResult

__all__ = [
    "ROOT",
    "TAG_ENV",
    "ReferenceRun",
    "assert_close",
    "assert_matches_reference",
    "gpt_job",
    "kill_tagged",
    "recoveries",
    "run_job",
    "start_run",
    "tagged",
    "tiny_gpt",
    "write_config",
]

TAG_ENV = "OOBLECK_TEST_RUN_TAG"


def tiny_gpt(profile_dir: Path, nodes: int, steps: int, f: int = 1) -> dict[str, Any]:
    """:func:`benchmarks.jobs.tiny_gpt` on devices of unbounded memory (the planner picks its own n0)."""
    return jobs.tiny_gpt(profile_dir, nodes, steps, layers_move=False, f=f)


def start_run(config: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``oobleck run CONFIG --run-dir RUN_DIR EXTRA...`` in the background, its output in pipes (text),
    tagged in :data:`TAG_ENV` so that every process it starts can be found later."""
    return jobs.start_tagged(
        jobs.run_command(config, run_dir, *extra), TAG_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``tag`` (see :func:`start_run`)."""
    return jobs.tagged(tag, TAG_ENV)


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL and reap the processes :func:`tagged` finds; returns their pids."""
    return jobs.kill_tagged(tag, TAG_ENV, timeout_s=30)


def gpt_job(profile_dir: Path, nodes: int, steps: int, f: int, faults: list[dict[str, Any]], **ft: Any) -> dict[str, Any]:
    """:func:`benchmarks.jobs.tiny_gpt` with its profiles in ``profile_dir``, on 2 MiB devices (n0 = 2), a 2 s
    heartbeat timeout, the ``fault_tolerance`` settings ``ft`` and the list ``faults`` (written even when empty)."""
    raw = jobs.tiny_gpt(profile_dir, nodes, steps, f=f, heartbeat_timeout_s=2.0)
    raw["fault_tolerance"].update(ft)
    raw["faults"] = faults
    return raw


def run_job(tmp_path: Path, raw: dict[str, Any]) -> tuple[Path, str]:
    """Run ``raw`` to the end (it must succeed and leave no process); returns the run directory and its
    output: stdout (the summary line), then stderr (progress and logs)."""
    run_dir = tmp_path / "run"
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    out, err = proc.communicate(timeout=360)
    assert proc.returncode == 0, err[-3000:]
    assert not tagged(tag), "processes outlived the run"
    return run_dir, out + err


#: the ``reference_run`` fixture (tests/conftest.py): ``train_local``'s result for a job config dict
ReferenceRun = Callable[[dict[str, Any]], LocalResult]


def assert_matches_reference(run_dir: Path, raw: dict[str, Any], reference: LocalResult) -> None:
    """Losses of every step and the final parameters and optimizer moments equal ``reference``'s (1e-9), the
    ``train_local`` result of ``raw`` (the ``reference_run`` fixture computes it)."""
    # a step re-run after a checkpoint restore is written again; the later row is the one that counts
    rows = list({r["step"]: r for r in read_metrics(run_dir)}.values())
    assert [r["step"] for r in rows] == list(range(raw["training"]["steps"])), "a step is missing"
    for row, expected in zip(rows, reference.losses):
        assert math.isclose(row["loss"], expected, rel_tol=1e-9), (row["step"], row["loss"], expected)
    final = checkpoint.latest_checkpoint(run_dir)
    assert final is not None and final.name == f"step_{raw['training']['steps']:08d}"
    moments = {id(p): s for opt in reference.optimizers for p, s in opt.state.items()}
    for index, layer in enumerate(reference.layers):
        saved = checkpoint.load_layer_state(final, index)
        for name, tensor in layer.state_dict().items():
            assert_close(saved["params"][name], tensor, f"layer {index} {name}")
        # optimizer state is keyed by position among the optimizer's parameters, named by param_names
        by_name = {saved["param_names"][k]: v for k, v in saved["optimizer"]["state"].items()}
        for name, param in layer.named_parameters(remove_duplicate=False):
            if name in by_name and id(param) in moments:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_close(by_name[name][key], moments[id(param)][key], f"layer {index} {name} {key}")
                assert float(by_name[name]["step"]) == float(moments[id(param)]["step"])


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item() or 1.0
    assert (got - want).abs().max().item() <= 1e-9 * scale, what


def recoveries(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir, RECOVERIES_FILE)


def stuck_nodes(records: list[dict[str, Any]]) -> list[str]:
    """The nodes whose worker the stuck-worker backstop ended, as the recovery records' reasons name them
    (docs/fault-tolerance.md#limitations)."""
    return sorted(
        node
        for r in records
        for node in r["lost"]
        if re.search(rf"worker {node}/\d+ exited with code 75 \(stuck in an ended generation\)", r["reason"])
    )


