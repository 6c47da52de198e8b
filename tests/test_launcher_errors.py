"""``oobleck run`` failing cleanly: a worker dies at start-up, or the command line is wrong."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.run_helpers import start_run, tagged, tiny_gpt, write_config

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # a real job
def test_a_worker_dying_at_startup_fails_the_run_and_leaves_no_process(tmp_path: Path, profile_dir: Path) -> None:
    config = write_config(tmp_path / "job.yaml", tiny_gpt(profile_dir, nodes=2, steps=50))
    proc, tag = start_run(config, tmp_path / "run")
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        workers = [p for p in tagged(tag) if "oobleck.worker_main" in " ".join(p.cmdline())]
        victim = next((p for p in workers if "node1" in p.cmdline()), None)
        if victim is None:
            time.sleep(0.05)  # no event announces a new process; poll for it
    assert victim is not None, "no worker of node1 started"
    os.kill(victim.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    failure = [line for line in err.splitlines() if line.startswith("oobleck run: failed:")]
    assert len(failure) == 1 and "worker node1/0 was killed by SIGKILL" in failure[0], err
    assert not tagged(tag), "processes outlived the run"


def test_bad_command_line_values_are_one_line_errors(tmp_path: Path, profile_dir: Path) -> None:
    config = write_config(tmp_path / "job.yaml", tiny_gpt(profile_dir, nodes=2, steps=1))
    proc, _ = start_run(config, tmp_path / "run", "--nodes", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    # argparse bounds the flag (oobleck.bounds), so it is worded as a usage error
    assert err.strip().splitlines() == ["oobleck run: error: argument --nodes: got 0; must be in [1, 4096] (see --help)"]
