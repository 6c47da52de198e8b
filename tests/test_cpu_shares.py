"""benchmarks.cpu_shares never leaves a cgroup behind: creation is all or nothing, the fault-tolerance
harness removes the groups when its launch fails, and the groups of a benchmark that was SIGKILLed are
removed by the next one (unless processes still run in them). On the real cgroup v1 ``cpu`` controller;
skipped where it is not writable. Every node name here starts with this test process's pid, so that the
groups of other benchmarks or tests on the machine are never looked at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from benchmarks.cpu_shares import CGROUP_CPU, unavailable

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    unavailable() is not None, reason=f"per-node CPU caps unavailable here: {unavailable()}"
)


def node(name: str) -> str:
    return f"t{os.getpid()}-{name}"


def groups_of(*nodes: str) -> list[Path]:
    """Every benchmark group (any naming) holding a group of one of ``nodes``."""
    return sorted({g.parent for n in nodes for g in CGROUP_CPU.glob(f"oobleck-bench-*/{n}")})


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Remove what a failing test (or the code before this fix) left of this process's groups."""
    yield
    from benchmarks.cpu_shares import _remove

    for base in sorted({g.parent for g in CGROUP_CPU.glob(f"oobleck-bench-*/{node('*')}")}):
        for group in [*base.glob(node("*")), base]:
            _remove(group, CGROUP_CPU)


def test_a_failure_part_way_through_creation_leaves_no_group() -> None:
    from benchmarks.cpu_shares import CpuShares

    made = [node("a"), node("b")]
    # the third node's group would go where the cgroupfs has its own control file: mkdir fails (EEXIST)
    # after two groups were made
    with pytest.raises((OSError, RuntimeError)) as refused:
        CpuShares([*made, "cpu.shares"], cpus_each=0.5)
    assert groups_of(*made) == []
    assert refused.type.__name__ == "CpuSharesError"  # a RuntimeError: the benchmarks report it in one line
    assert "\n" not in str(refused.value) and "cpu.shares" in str(refused.value)
    # the quota write fails (EINVAL: above the kernel's limit) after the base group and a node's group exist
    with pytest.raises((OSError, RuntimeError)) as refused:
        CpuShares(made, cpus_each=1e10)
    assert groups_of(*made) == []
    assert "\n" not in str(refused.value) and "cpu.cfs_quota_us" in str(refused.value)


def test_fault_tolerance_removes_the_groups_when_its_launch_fails(tmp_path: Path) -> None:
    from benchmarks import fault_tolerance as ft

    nodes = tuple(node(f"n{i}") for i in range(1, 5))
    schedule = ft.Schedule(nodes, (), "test")
    (tmp_path / "oobleck-fault-free").write_text("")  # where the launch makes the run directory: it fails
    with pytest.raises(FileExistsError):
        ft.run_policy(tmp_path, "oobleck", schedule, 10, False, 60.0, capped=True)
    assert groups_of(*nodes) == []


CHILD = """
import sys, time
import psutil
from benchmarks.cpu_shares import CpuShares
shares = CpuShares([sys.argv[1]], 0.5)
for pid in sys.argv[2:]:  # a process of the node (it outlives this one)
    assert shares.place(psutil.Process(int(pid))) is not None
print(shares._base, flush=True)
time.sleep(120)
"""


def test_stale_groups_of_a_killed_benchmark_are_removed_and_live_ones_kept(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cpu_shares import remove_stale_groups

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--node", node("busy")])
    children: dict[str, subprocess.Popen[str]] = {}
    bases: dict[str, Path] = {}
    try:
        # three benchmarks that made groups: one keeps running, two are SIGKILLed, one of these while a
        # process of its node still runs in its group
        for name, extra in (("live", []), ("dead", []), ("busy", [str(worker.pid)])):
            children[name] = subprocess.Popen(
                [sys.executable, "-c", CHILD, node(name), *extra],
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        for name, child in children.items():
            assert child.stdout is not None
            bases[name] = Path(child.stdout.readline().strip())
            assert (bases[name] / node(name)).is_dir(), f"{name}: no group made"
        for name in ("dead", "busy"):
            children[name].send_signal(signal.SIGKILL)
            children[name].wait()
        capsys.readouterr()

        removed = remove_stale_groups()
        assert bases["dead"] in removed and not bases["dead"].exists()
        assert bases["live"].exists() and bases["busy"].exists()
        # the busy group is kept untouched (its process stays capped), with one line saying why
        assert (bases["busy"] / node("busy") / "cgroup.procs").read_text().split() == [str(worker.pid)]
        warned = [line for line in capsys.readouterr().err.splitlines() if str(bases["busy"]) in line]
        assert len(warned) == 1 and "warning" in warned[0]

        worker.kill()
        worker.wait()
        assert bases["busy"] in remove_stale_groups() and not bases["busy"].exists()
        assert bases["live"].exists()
    finally:
        for proc in [worker, *children.values()]:
            proc.kill()
            proc.wait()
