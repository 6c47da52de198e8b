"""The local launcher: the master in this process, one agent process per node on this machine.

:func:`run` is what ``oobleck run`` calls with ``cluster.launcher: local`` (the default). Each
agent starts its node's workers; agents and workers run in their own process groups (so that a Ctrl-C on
the terminal reaches only this process, which then stops them in order) and die with their parent
(PR_SET_PDEATHSIG), so no process outlives the run even if this one is killed.

The job's token, and with TLS on (``cluster.tls``) the master's certificate, are files in a mode-0700
directory of this user's, removed when the run ends; agents, workers and ``oobleck inject`` get their paths.
The master's private key stays in this process's memory.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.job import (
    AGENT_EXIT_S,
    AGENT_GRACE_S,
    AGENT_START_S,
    Callbacks,
    NodeContext,
    job_start,
    job_token,
    supervise,
)
from oobleck.config import JobConfig
from oobleck.control.master import Master
from oobleck.control.policy import Planner
from oobleck.control.procs import child_env, last_line, stop_group
from oobleck.control.records import StepRecord
from oobleck.control.run_files import write_control_file
from oobleck.control.tls import write_cert
from oobleck.errors import OobleckError
from oobleck.nodes import node_list
from oobleck.shared_cores import local_workers, threads_per_worker

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 only
    from typing_extensions import Unpack


def run(config: JobConfig, planner: Planner, **callbacks: Unpack[Callbacks]) -> list[StepRecord]:
    """Run ``config`` on ``cluster.nodes`` local agents and return the committed steps' records.

    With ``trace:`` set, the nodes the trace adds at time 0 start the job and the rest of the trace is
    replayed against it (:class:`launcher.job.TraceReplay`). Workers' and agents' output goes to
    ``RUN/logs/``. Raises :class:`oobleck.control.master.JobFailed` naming the lost worker or node when the
    job fails; every process started here has exited when this returns or raises (also on
    KeyboardInterrupt).
    """
    job = job_start(config, callbacks.get("on_phase"))
    config = job.config
    with job_token() as (token, token_file):
        master = Master(config, token, planner, on_step=callbacks.get("on_step"), on_recovery=callbacks.get("on_recovery"))

        def start(address: str) -> LocalCluster:
            cert_file = write_cert(token_file.parent, master.cert_pem) if master.cert_pem else None
            cluster = LocalCluster(NodeContext(master, address, config, job.log_dir), token_file, cert_file)
            write_control_file(Path(config.run.dir), address, token_file, cert_file)
            job.phase(f"master at {address}{' (TLS)' if cert_file else ''}; starting {len(job.names)} nodes: {node_list(job.names)}")
            for name in job.names:
                cluster.add_node(name)
            return cluster

        return supervise(master, start, job)


class LocalCluster:
    """The nodes of one job on this machine: a node is an agent process (with its workers) named ``name``."""

    def __init__(self, job: NodeContext, token_file: Path, cert_file: Path | None = None) -> None:
        self.job = job
        self.master = job.master
        self.token_file = token_file
        self.cert_file = cert_file
        self._lock = threading.Lock()
        self._agents: dict[str, subprocess.Popen] = {}
        self._all: list[subprocess.Popen] = []
        #: names killed on purpose (a node removed before it registered is not a failed start)
        self._killed: set[str] = set()
        # agents die with the *thread* that started them (PR_SET_PDEATHSIG), so one long-lived thread starts
        # them all, whoever asks (the trace replay's thread, a gRPC handler thread)
        self._requests: queue.Queue[tuple[str, Future[None]]] = queue.Queue()
        threading.Thread(target=self._starter, name="agent-starter", daemon=True).start()

    def add_node(self, name: str) -> None:
        """Start node ``name``'s agent; it registers with the master (joining a running job)."""
        done: Future[None] = Future()
        self._requests.put((name, done))
        try:
            done.result(AGENT_START_S)
        except FutureTimeout:
            raise OobleckError(f"node {name}: its agent process did not start within {AGENT_START_S:g} s") from None

    def _starter(self) -> None:
        while True:
            name, done = self._requests.get()
            try:
                proc = _start_agent(self.job, self.token_file, name, self.cert_file)
            except BaseException as e:  # handed to the caller
                done.set_exception(e)
                continue
            with self._lock:
                self._agents[name] = proc
                self._all.append(proc)
                self._killed.discard(name)
            threading.Thread(target=self._watch, args=(proc, name), daemon=True).start()
            done.set_result(None)

    def _watch(self, proc: subprocess.Popen, name: str) -> None:
        """An agent that exits is a lost node to the master; one that exits with an error before it
        registered fails the job, quoting the last line it wrote (the master would otherwise wait for the node
        forever), unless it was killed on purpose."""
        code = proc.wait()
        with self._lock:
            on_purpose = name in self._killed
        if not self.master.node_exited(name, code) and code != 0 and not on_purpose:
            self.master.abort(f"agent {name} exited with code {code}: {last_line(self.job.log_dir / f'agent-{name}.log')}")

    def kill_node(self, name: str) -> None:
        """Kill node ``name`` like a machine dies: SIGKILL to its agent (its workers die with it)."""
        with self._lock:
            proc = self._agents.pop(name, None)
            self._killed.add(name)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = proc.wait()
        self.master.node_exited(name, code)  # at once, so that the name can join again right away

    def close(self) -> None:
        """Wait for every agent to exit (they stop when the master does), forcing those that do not."""
        with self._lock:
            procs = list(self._all)
        for proc in procs:
            try:
                proc.wait(AGENT_EXIT_S)
            except subprocess.TimeoutExpired:
                stop_group(proc, AGENT_GRACE_S)


def _start_agent(job: NodeContext, token_file: Path, node: str, cert_file: Path | None = None) -> subprocess.Popen:
    config, log_dir = job.config, job.log_dir
    cmd = [
        sys.executable, "-m", "oobleck.control.agent",
        "--master", job.address, "--token-file", str(token_file),
        "--node", node, "--devices", str(config.cluster.devices_per_node),
        "--log-dir", str(log_dir),
    ]  # fmt: skip
    if cert_file is not None:
        cmd += ["--cert-file", str(cert_file)]
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
    return {"OMP_NUM_THREADS": str(threads_per_worker(local_workers(config)))}
