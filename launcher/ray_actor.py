"""The Ray launcher's actor: :class:`AgentActor` runs in a Ray worker process on its node and starts and
watches that node's agent (``python -m oobleck.control.agent``), with a guard process that makes sure the
agent does not outlive the actor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from oobleck.control.procs import child_env, stop_group
from oobleck.control.tls import write_cert

#: seconds an agent gets to stop its workers after its actor died, before the guard kills it (SIGKILL)
GUARD_GRACE_S = 10.0


class AgentActor:
    """Starts and watches one agent process on its Ray node. Its methods run on the worker's main thread
    (max_concurrency=1), so the agent's PR_SET_PDEATHSIG is tied to the actor process itself."""

    def __init__(
        self,
        argv: list[str],
        token: str,
        cert: bytes | None,
        env: dict[str, str],
        workers_on_host: int,
        node_ip: str,
        cwd: str,
        pythonpath: str,
        log_path: str,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="oobleck-agent-")  # mode 0700
        token_file = os.path.join(self._dir, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        if cert is not None:  # the master's certificate (public; the key stays with the master)
            argv = [*argv, "--cert-file", str(write_cert(Path(self._dir), cert))]
        extra = dict(env)
        # Ray sets OMP_NUM_THREADS for its workers; give each of this machine's oobleck workers its share of
        # the cores instead (oversubscribed OpenMP threads spin against each other)
        extra.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, workers_on_host))))
        nic = _interface_of(node_ip)
        if nic is not None:
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if key not in os.environ:
                    extra[key] = nic
        if os.path.isdir(os.path.join(pythonpath, "oobleck")):
            extra["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, *argv, "--token-file", token_file],
                env=child_env(extra),
                cwd=cwd if os.path.isdir(cwd) else None,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # the agent stops its workers on SIGTERM when this process dies (PR_SET_PDEATHSIG); the guard makes
        # sure it is gone GUARD_GRACE_S later even if it hangs in doing so
        subprocess.Popen(
            [sys.executable, "-c", _GUARD, str(self._proc.pid), str(os.getpid()), str(GUARD_GRACE_S)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def started(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "agent_pid": self._proc.pid, "token_dir": self._dir}

    def wait(self, timeout_s: float) -> int | None:
        """The agent's exit code, or None when it still runs after ``timeout_s``."""
        try:
            code = self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._cleanup()
        return code

    def stop(self, exit_s: float, grace_s: float) -> int:
        """Give the agent ``exit_s`` to exit by itself, then stop it (SIGTERM, SIGKILL after ``grace_s``)."""
        try:
            code = self._proc.wait(exit_s)
        except subprocess.TimeoutExpired:
            code = stop_group(self._proc, grace_s)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


#: the agent's guard (``python -c _GUARD AGENT_PID ACTOR_PID GRACE_S``): once the actor process is gone, give
#: the agent GRACE_S seconds to exit, then SIGKILL it (its workers die with it); exits as soon as the agent
#: does. SIGTERM is ignored: whoever cleans up the actor's children must not take the guard first.
_GUARD = """# oobleck ray launcher: agent guard
import os, signal, sys, time
import psutil
signal.signal(signal.SIGTERM, signal.SIG_IGN)
agent_pid, actor_pid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
try:
    agent = psutil.Process(agent_pid)
except psutil.NoSuchProcess:
    sys.exit(0)
def gone():
    try:
        return not agent.is_running() or agent.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
while os.getppid() == actor_pid:
    if gone():
        sys.exit(0)
    time.sleep(0.5)
deadline = time.monotonic() + grace
while time.monotonic() < deadline:
    if gone():
        sys.exit(0)
    time.sleep(0.1)
try:
    agent.kill()  # psutil checks that the pid still names the same process
except psutil.NoSuchProcess:
    pass
"""


def _interface_of(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this machine, or None."""
    try:
        import psutil

        for name, addresses in psutil.net_if_addrs().items():
            if any(a.address.split("%")[0] == ip for a in addresses):
                return name
    except Exception:
        pass
    return None
