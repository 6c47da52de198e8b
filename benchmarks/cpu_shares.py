"""Give each local node a fixed share of this machine's CPUs, as if it were a machine of its own.

The local launcher's nodes share the machine's cores, so a node that a plan leaves idle hands its share to
the nodes that work: a plan using 4 of 5 nodes gets the whole machine, just as one using all 5 does. On a
cluster an idle machine helps no one. Benchmarks that compare plans using different numbers of nodes (the
heterogeneous-versus-homogeneous one) therefore cap each node's processes (its agent and workers) at
``cores / nodes`` CPUs with the cgroup v1 ``cpu`` controller's CFS quota, so the nodes never compete and
an idle node's share is lost, as on a cluster.

Needs a writable ``/sys/fs/cgroup/cpu`` (root); :func:`unavailable` says why not otherwise.

The groups outlive a benchmark that is killed (SIGKILL skips every ``finally``), so their name carries the
owning process's pid (``oobleck-bench-<pid>-<hex>/<node>``) and :func:`remove_stale_groups`, called when a
benchmark starts, removes those whose owner is gone.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

import psutil

from benchmarks.jobs import Job

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
#: CFS period: short, because a step takes tens of milliseconds and throttling in the default 100 ms
#: slices would add that much jitter to a step
PERIOD_US = 10_000
#: how often :meth:`CpuShares.follow` looks for the job's new processes
_POLL_S = 0.05
#: a benchmark's group: ``PREFIX<owner pid>-<8 hex>``; the hex part keeps a process's successive groups apart
#: (one it could not remove, e.g. a process still in it, must not block the next)
PREFIX = "oobleck-bench-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[0-9a-f]{8}")


class CpuSharesError(RuntimeError):
    """The per-node groups cannot be made here; one line, saying which step failed."""


def add_cpu_share_flag(parser: argparse.ArgumentParser, share: str) -> None:
    """``--cpu-share node|shared``; ``share`` says what a node's cap is (e.g. ``cores/nodes``)."""
    parser.add_argument(
        "--cpu-share", choices=["node", "shared"], default="node",
        help=f"node (default): hold each node to {share} CPUs, as separate machines; shared: no caps",
    )  # fmt: skip


def flag_check(value: str) -> tuple[str, str, bool, str]:
    """The ``--cpu-share node|shared`` check for :func:`benchmarks.jobs.bad_flag`."""
    why = unavailable()
    rule = f"'node' needs per-node CPU caps, but {why}; pass --cpu-share shared to measure without them"
    return ("--cpu-share", value, value == "shared" or why is None, rule)


def cpus_per_node(nodes: int) -> float:
    """Each of ``nodes`` nodes' share of this machine's cores."""
    return (os.cpu_count() or 1) / nodes


def unavailable(root: Path = CGROUP_CPU) -> str | None:
    """None when per-node CPU shares can be set here, else why not (one line)."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root)"
    return None


class CpuShares:
    """One cgroup per node name, each capped at ``cpus_each`` CPUs; processes whose command line names
    ``--node NAME`` go into NAME's group. Removes the groups on :meth:`close` (once their processes ended)."""

    def __init__(self, nodes: Sequence[str], cpus_each: float, root: Path = CGROUP_CPU) -> None:
        why = unavailable(root)
        if why is not None:
            raise CpuSharesError(why)
        self._root = root
        self._base = root / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._groups = {name: self._base / name for name in nodes}
        self._placed: set[int] = set()
        quota = str(max(1000, round(PERIOD_US * cpus_each)))
        # all or nothing: the caller gets no object to close when this raises, so a failure part-way (a node
        # name the cgroupfs refuses, a quota the kernel rejects) must remove what was made already
        made: list[Path] = []
        step = self._base
        try:
            self._base.mkdir()
            made.append(self._base)
            for group in self._groups.values():
                step = group
                group.mkdir()
                made.append(group)
                for step, value in ((group / "cpu.cfs_period_us", str(PERIOD_US)), (group / "cpu.cfs_quota_us", quota)):
                    step.write_text(value)
        except OSError as e:
            for path in reversed(made):
                _remove(path, root)
            raise CpuSharesError(f"cannot make the per-node CPU groups: {step}: {e.strerror or e}") from None

    def place(self, proc: psutil.Process) -> list[str] | None:
        """Put ``proc`` (and so the children it starts later) in its node's group and return its command
        line; None when that names no node of ours or the process has ended."""
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            return None
        node = next((cmdline[i + 1] for i, arg in enumerate(cmdline[:-1]) if arg == "--node"), None)
        if node not in self._groups:
            return None
        try:
            (self._groups[node] / "cgroup.procs").write_text(str(proc.pid))
        except OSError:  # it ended meanwhile
            return None
        self._placed.add(proc.pid)
        return cmdline

    def follow(self, job: Job, workers: int | None = None, timeout_s: float = 900) -> threading.Thread:
        """Place ``job``'s agents and workers (the launcher's descendants) as they appear, from a thread that
        stops once ``workers`` workers are placed when given, else when the job ends (or after ``timeout_s``).
        A worker restarted in place (``execv``) keeps its group."""

        def loop() -> None:
            placed_workers = 0
            deadline = time.monotonic() + timeout_s
            while job.proc.poll() is None and time.monotonic() < deadline:
                try:
                    procs = psutil.Process(job.proc.pid).children(recursive=True)
                except psutil.Error:
                    return
                for proc in procs:
                    if proc.pid not in self._placed:
                        cmdline = self.place(proc)
                        placed_workers += cmdline is not None and "oobleck.worker_main" in cmdline
                if workers is not None and placed_workers >= workers:
                    return
                time.sleep(_POLL_S)  # processes appear without an event to wait on

        thread = threading.Thread(target=loop, name="cpu-shares", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for group in [*self._groups.values(), self._base]:
            _remove(group, self._root)

    def __enter__(self) -> CpuShares:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_groups(root: Path = CGROUP_CPU) -> list[Path]:
    """Remove the groups left by benchmarks that were killed before they could (see the module notes): each
    ``PREFIX<pid>-...`` group whose owner pid is no longer alive and that holds no process. A stale group
    still holding processes (the dead benchmark's nodes still running) is kept as it is, with a one-line
    warning: moving them out would uncap a job someone may still be measuring. Returns the groups removed."""
    if unavailable(root) is not None:
        return []
    removed = []
    for base in sorted(root.glob(f"{PREFIX}*")):
        match = _NAME.fullmatch(base.name)
        if match is None or not base.is_dir() or _alive(int(match[1])):
            continue
        groups = [*(g for g in base.iterdir() if g.is_dir()), base]  # the nodes' groups first: rmdir needs them gone
        busy = sum(len(_procs(g)) for g in groups)
        if busy:
            print(f"cpu_shares: warning: kept {base}: its benchmark (pid {match[1]}) is gone but {busy} of its processes still run in it", file=sys.stderr)  # fmt: skip
            continue
        for group in groups:
            try:
                group.rmdir()
            except OSError:  # another benchmark starting now removed it first
                pass
        if not base.exists():
            removed.append(base)
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its groups are as stale as those of a reaped one)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but is not ours to inspect
        return True


def _procs(group: Path) -> list[str]:
    try:
        return (group / "cgroup.procs").read_text().split()
    except OSError:  # removed meanwhile
        return []


def _remove(group: Path, root: Path) -> None:
    """rmdir a cgroup, first moving any process still in it back to ``root``."""
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
    except OSError:
        pass
    try:
        group.rmdir()
    except OSError:
        pass
