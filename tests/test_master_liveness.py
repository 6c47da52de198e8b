"""A master that stops answering (hung, or its machine cut off) ends the job's agents and workers in bounded
time, as a dead one does."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from oobleck.control.master import master_timeout_s
from tests.run_helpers import kill_tagged, start_run, tagged, tiny_gpt, write_config

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # every test runs a real job

HEARTBEAT_TIMEOUT_S = 2.0
#: the agents give the master up after master_timeout_s (6 s here), then stop their workers (SIGTERM, SIGKILL
#: 2 s later): everything must be gone well within this
EXIT_BOUND_S = 15.0


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:
            out.append(f"pid {p.pid}")
    return out


def test_agents_and_workers_exit_when_the_master_hangs(tmp_path: Path, profile_dir: Path) -> None:
    raw = tiny_gpt(profile_dir, nodes=2, steps=100_000)
    raw["fault_tolerance"].update({"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S})
    assert master_timeout_s(HEARTBEAT_TIMEOUT_S) + 2.0 + 3.0 < EXIT_BOUND_S
    run_dir = tmp_path / "run"
    # the master runs in the `oobleck run` process; the agents and workers are its descendants
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # nothing announces a step; poll
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        others = [p for p in tagged(tag) if p.pid != proc.pid]
        commands = [" ".join(p.cmdline()) for p in others]
        assert sum("oobleck.control.agent" in c for c in commands) == 2, commands
        assert sum("oobleck.worker_main" in c for c in commands) == 2, commands

        os.kill(proc.pid, signal.SIGSTOP)  # the master hangs: its sockets stay open, nothing answers
        stopped_at = time.monotonic()
        # the agents stay zombies until their (stopped) parent reaps them: exited is enough
        alive = others
        while alive and time.monotonic() - stopped_at < EXIT_BOUND_S:
            time.sleep(0.1)  # no event reaches this process when a grandchild exits; poll
            alive = [p for p in alive if running(p)]
        took = time.monotonic() - stopped_at
        print(f"agents and workers gone {took:.1f} s after the master hung")
        assert not alive, f"still running {took:.1f} s after the master hung: {describe(alive)}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # SIGKILL ends a stopped process too
        proc.communicate(timeout=60)
        kill_tagged(tag)
    assert not tagged(tag)
    for node in ("node0", "node1"):
        lines = [line for line in (run_dir / "logs" / f"agent-{node}.log").read_text().splitlines() if line.strip()]
        last = lines[-1]
        assert last.startswith(f"agent {node}: the master 127.0.0.1:"), lines[-5:]
        assert "sent nothing for" in last and "hung or cut off" in last and "oobleck run" in last, last
