"""Process hygiene for agents and workers: no process outlives the one that started it; and what a process
last wrote to its log, which says why it exited."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1
#: how much of the end of a log :func:`last_line` reads (a log may have grown large over a long run)
TAIL_BYTES = 64 * 1024
#: names the pid of the process that must not be outlived; set by whoever starts an agent or a worker
PARENT_PID_ENV = "OOBLECK_PARENT_PID"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when the process named by ``$OOBLECK_PARENT_PID``
    dies, and exit at once if it already has. No effect when the variable is unset or off Linux."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl (not Linux): the parent's stream-break handling still stops us
    # the parent may have died before prctl took effect; then we were re-parented already
    if os.getppid() != int(expected):
        os._exit(1)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, naming this process as the child's parent."""
    env = dict(os.environ)
    env.update(extra or {})
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def stop_group(proc: subprocess.Popen, grace_s: float) -> int:
    """Stop ``proc`` and its process group (it must have been started with ``start_new_session=True``):
    SIGTERM, then SIGKILL after ``grace_s`` seconds. Reaps ``proc`` and returns its exit code."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            continue
    code = proc.wait()
    # the leader is gone; its group may still hold helpers it forked
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return code


def last_line(path: Path) -> str:
    """The last non-empty line among the final :data:`TAIL_BYTES` of a log file (stripped; bytes that are
    not UTF-8 replaced), or a note that there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES).decode("utf-8", errors="replace")
    except OSError:
        tail = ""
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"(no output in {path})"
