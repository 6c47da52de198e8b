"""The local launcher: the master in this process, one agent process per node on this machine.

:func:`run` is what ``oobleck run`` calls with ``cluster.launcher: local`` (the default). Each
agent starts its node's workers; agents and workers run in their own process groups (so that a Ctrl-C on
the terminal reaches only this process, which then stops them in order) and die with their parent
(PR_SET_PDEATHSIG), so no process outlives the run even if this one is killed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from oobleck.config import JobConfig
from oobleck.control.master import JobFailed, Master, Planner, RecoveryRecord, StepRecord
from oobleck.control.procs import child_env, stop_group

#: seconds agents get to stop their workers and exit after the master's shutdown, before SIGTERM
AGENT_EXIT_S = 10.0
#: seconds between SIGTERM and SIGKILL for an agent (it stops its own workers in between)
AGENT_GRACE_S = 5.0
LOG_DIR = "logs"
CONTROL_FILE = "control.json"


def node_name(index: int) -> str:
    """The name of the local launcher's node ``index``."""
    return f"node{index}"


def run(
    config: JobConfig,
    planner: Planner,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
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
    master = Master(config, token, planner, on_step=on_step, on_recovery=on_recovery)
    agents: list[subprocess.Popen] = []
    try:
        address = master.start()
        write_control_file(Path(config.run.dir), address, token_file)
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
        return subprocess.Popen(
            cmd, env=child_env(worker_threads(config)), start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )


def worker_threads(config: JobConfig) -> dict[str, str]:
    """Torch threads per worker when every worker shares this machine: the cores divided among the workers
    (at least 1), unless ``OMP_NUM_THREADS`` is set already. Oversubscribed OpenMP threads spin against each
    other and can make tiny steps ten times slower."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    workers = config.cluster.nodes * config.cluster.devices_per_node
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


def _watch_agent(master: Master, proc: subprocess.Popen, node: str, log_dir: Path) -> None:
    """An agent that exits is a lost node to the master; one that exits with an error before it registered
    fails the job, quoting the last line it wrote (the master would otherwise wait for the node forever)."""
    code = proc.wait()
    if not master.node_exited(node, code) and code != 0:
        master.abort(f"agent {node} exited with code {code}: {last_line(log_dir / f'agent-{node}.log')}")


def write_control_file(run_dir: Path, address: str, token_file: Path) -> Path:
    """``RUN/control.json``: where ``oobleck inject RUN`` finds the running job's master and token (the token
    file itself stays in a directory only this user can read)."""
    path = run_dir / CONTROL_FILE
    path.write_text(json.dumps({"master": address, "token_file": str(token_file)}))
    return path


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, or a note that there is none."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else f"(no output in {path})"


