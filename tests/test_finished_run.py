"""What a finished run's directory answers: ``oobleck inject`` says that no job runs there, and
``oobleck run --resume`` with ``--steps`` at or below the final checkpoint's step is one line before any node
starts (``--steps`` counts the run's total steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oobleck.control.run_files import CONTROL_FILE, write_control_file
from tests.run_helpers import ROOT, run_job, tiny_gpt, write_config

pytestmark = pytest.mark.timeout(400)

STEPS = 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, profile_dir: Path) -> tuple[Path, Path]:
    """A tiny job run to the end: its config file and run directory (with the final checkpoint, of step 2)."""
    tmp = tmp_path_factory.mktemp("finished")
    raw = tiny_gpt(profile_dir, nodes=2, steps=STEPS)
    run_dir, _ = run_job(tmp, raw)
    return write_config(tmp / "job.yaml", raw), run_dir


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oobleck.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a real job
def test_inject_on_a_finished_run_says_no_job_is_running(finished: tuple[Path, Path]) -> None:
    _, run_dir = finished
    assert not (run_dir / CONTROL_FILE).exists(), "the control file outlived the job"
    out = _cli("inject", str(run_dir), "--kill", "node1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"oobleck inject: error: RUN_DIR: no job is running in {run_dir}: there is no {CONTROL_FILE} (written while a "
        "job runs, removed when it ends); pass the run directory of a running `oobleck run`"
    ]


@pytest.mark.slow  # a real job
def test_inject_on_a_control_file_whose_job_is_gone(finished: tuple[Path, Path], tmp_path: Path) -> None:
    """A control file left behind (a run that was killed, or one of an older version) names a token file that
    went with its job."""
    _, run_dir = finished
    token = tmp_path / "oobleck-gone" / "token"
    write_control_file(run_dir, "127.0.0.1:9", token)
    try:
        out = _cli("inject", str(run_dir), "--kill", "node1")
    finally:
        (run_dir / CONTROL_FILE).unlink()
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"RUN_DIR: no job is running in {run_dir}: the token folder {token.parent} that {CONTROL_FILE} names is gone" in out.stderr
    assert "--token-file" not in out.stderr


@pytest.mark.slow  # a real job
@pytest.mark.parametrize("steps", [STEPS, 1])
def test_resume_with_nothing_left_to_train_is_one_line_before_launch(finished: tuple[Path, Path], steps: int) -> None:
    config, run_dir = finished
    logs = sorted((p.name, p.stat().st_size) for p in (run_dir / "logs").iterdir())
    out = _cli("run", str(config), "--run-dir", str(run_dir), "--resume", "--steps", str(steps))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"oobleck run: error: --steps: got {steps}, but the checkpoint to resume from "
        f"({run_dir / 'checkpoints' / f'step_{STEPS:08d}'}) is at step {STEPS}: the step count is the run's total, so "
        f"nothing is left to train; pass --steps greater than {STEPS}"
    ]
    assert sorted((p.name, p.stat().st_size) for p in (run_dir / "logs").iterdir()) == logs, "nodes were started"
