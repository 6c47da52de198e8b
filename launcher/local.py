"""The local launcher: the master in this process, one agent process per node on this machine.

:func:`run` is what ``oobleck run`` calls with ``cluster.launcher: local`` (the default). Each
agent starts its node's workers; agents and workers run in their own process groups (so that a Ctrl-C on
the terminal reaches only this process, which then stops them in order) and die with their parent
(PR_SET_PDEATHSIG), so no process outlives the run even if this one is killed.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from oobleck.config import JobConfig
from oobleck.control.master import JobFailed, Master, Planner, StepRecord
from oobleck.control.procs import child_env, stop_group

#: seconds agents get to stop their workers and exit after the master's shutdown, before SIGTERM
AGENT_EXIT_S = 10.0
#: seconds between SIGTERM and SIGKILL for an agent (it stops its own workers in between)
AGENT_GRACE_S = 5.0
LOG_DIR = "logs"


def node_name(index: int) -> str:
    """The name of the local launcher's node ``index``."""
    return f"node{index}"


def run(
    config: JobConfig,
    planner: Planner,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> list[StepRecord]:
    """Run ``config`` on ``cluster.nodes`` local agents and return the committed steps' records.

    Workers' and agents' output goes to ``RUN/logs/``. Raises :class:`oobleck.control.master.JobFailed`
    naming the lost worker or node, with the tail of its log, when the job fails; every process started
    here has exited when this returns or raises (also on KeyboardInterrupt).
    """
    phase = on_phase or (lambda text: None)
    log_dir = Path(config.run.dir) / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    secret_dir = Path(tempfile.mkdtemp(prefix="oobleck-"))  # mkdtemp: mode 0700, only we read the token
    token = secrets.token_hex(32)
    token_file = secret_dir / "token"
    token_file.write_text(token)
    master = Master(config, token, planner, on_step=on_step)
    agents: list[subprocess.Popen] = []
    try:
        address = master.start()
        phase(f"master at {address}; starting {config.cluster.nodes} nodes")
        for index in range(config.cluster.nodes):
            agents.append(_start_agent(address, token_file, node_name(index), config, log_dir))
        for index, proc in enumerate(agents):
            threading.Thread(target=_watch_agent, args=(master, proc, node_name(index), log_dir), daemon=True).start()
        return master.wait()
    except JobFailed as e:
        raise JobFailed(f"{e} (logs of every agent and worker in {log_dir})") from None
    except BaseException as e:
        master.abort(f"the run was interrupted ({type(e).__name__})" if isinstance(e, KeyboardInterrupt) else str(e))
        raise
    finally:
        master.stop()
        for proc in agents:
            try:
                proc.wait(AGENT_EXIT_S)
            except subprocess.TimeoutExpired:
                stop_group(proc, AGENT_GRACE_S)
        shutil.rmtree(secret_dir, ignore_errors=True)


def _start_agent(address: str, token_file: Path, node: str, config: JobConfig, log_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "oobleck.control.agent",
        "--master", address, "--token-file", str(token_file),
        "--node", node, "--devices", str(config.cluster.devices_per_node),
        "--log-dir", str(log_dir),
    ]  # fmt: skip
    with open(log_dir / f"agent-{node}.log", "ab") as out:
        # the child holds its own copy of the file descriptor
        return subprocess.Popen(cmd, env=child_env(), start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def _watch_agent(master: Master, proc: subprocess.Popen, node: str, log_dir: Path) -> None:
    """An agent that exits before the job ends (e.g. it could not register) fails the job, quoting the
    last line it wrote; the master would otherwise wait for the node forever."""
    code = proc.wait()
    if code != 0:
        master.abort(f"agent {node} exited with code {code}: {last_line(log_dir / f'agent-{node}.log')}")


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, or a note that there is none."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else f"(no output in {path})"


