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

import contextlib
import dataclasses
import os
import queue
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, Iterator, Protocol

from oobleck.config import JobConfig
from oobleck.control.master import JobFailed, Master, Planner, RecoveryRecord, StepRecord
from oobleck.control.procs import child_env, stop_group
from oobleck.control.run_files import write_control_file
from oobleck.control.tls import write_cert
from oobleck.errors import OobleckError
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent, load_trace, replay_schedule

#: seconds agents get to stop their workers and exit after the master's shutdown, before SIGTERM
AGENT_EXIT_S = 10.0
#: seconds between SIGTERM and SIGKILL for an agent (it stops its own workers in between)
AGENT_GRACE_S = 5.0
#: seconds the agent-starter thread gets to start an agent process (a fork and exec)
AGENT_START_S = 60.0
LOG_DIR = "logs"


def run(
    config: JobConfig,
    planner: Planner,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
) -> list[StepRecord]:
    """Run ``config`` on ``cluster.nodes`` local agents and return the committed steps' records.

    With ``trace:`` set, the nodes the trace adds at time 0 start the job and the rest of the trace is
    replayed against it (:class:`TraceReplay`). Workers' and agents' output goes to ``RUN/logs/``. Raises
    :class:`oobleck.control.master.JobFailed` naming the lost worker or node when the job fails; every process
    started here has exited when this returns or raises (also on KeyboardInterrupt).
    """
    phase = on_phase or (lambda text: None)
    log_dir = Path(config.run.dir) / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = trace_schedule(config)
    names = [e.node for e in schedule if e.at_s == 0] if schedule else [node_name(i) for i in range(config.cluster.nodes)]
    if schedule:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, nodes=len(names)))
    with job_token() as (token, token_file):
        master = Master(config, token, planner, on_step=on_step, on_recovery=on_recovery)

        def start(address: str) -> LocalCluster:
            cert_file = write_cert(token_file.parent, master.cert_pem) if master.cert_pem else None
            cluster = LocalCluster(master, address, token_file, config, log_dir, cert_file)
            write_control_file(Path(config.run.dir), address, token_file, cert_file)
            phase(f"master at {address}{' (TLS)' if cert_file else ''}; starting {len(names)} nodes")
            for name in names:
                cluster.add_node(name)
            return cluster

        return supervise(master, start, schedule, phase, log_dir)


@contextlib.contextmanager
def job_token() -> Iterator[tuple[str, Path]]:
    """A fresh control-plane token and the file holding it (in a mode-0700 directory, removed afterwards;
    ``oobleck inject`` reads it there)."""
    secret_dir = Path(tempfile.mkdtemp(prefix="oobleck-"))
    try:
        token = secrets.token_hex(32)
        token_file = secret_dir / "token"
        # 0600: `oobleck inject` refuses a token file that others can read
        with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(token)
        yield token, token_file
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def supervise(
    master: Master,
    start: Callable[[str], "Cluster"],
    schedule: list[TraceEvent],
    phase: Callable[[str], None],
    log_dir: Path,
) -> list[StepRecord]:
    """Start ``master``, then its nodes (``start(address)`` returns the launcher's cluster), replay the
    trace's later events if there is a ``schedule``, and wait for the job. Whatever happens, the replay, the
    master and the cluster are stopped before this returns or raises; a failed job's error names the logs."""
    cluster: Cluster | None = None
    replay: TraceReplay | None = None
    try:
        address = master.start()
        cluster = start(address)
        master.set_node_adder(cluster.add_node)
        if schedule:
            replay = TraceReplay(cluster, [e for e in schedule if e.at_s > 0], phase)
        records = master.wait()
        if replay is not None:
            phase(replay.describe())
        return records
    except JobFailed as e:
        raise JobFailed(f"{e} (logs of every agent and worker in {log_dir})") from None
    except BaseException as e:
        master.abort(f"the run was interrupted ({type(e).__name__})" if isinstance(e, KeyboardInterrupt) else str(e))
        raise
    finally:
        if replay is not None:
            replay.stop()
        master.stop()
        if cluster is not None:
            cluster.close()


class Cluster(Protocol):
    """What :func:`supervise` and :class:`TraceReplay` need of a launcher's nodes."""

    def add_node(self, name: str) -> None: ...

    def kill_node(self, name: str) -> None: ...

    def close(self) -> None: ...


class LocalCluster:
    """The nodes of one job on this machine: a node is an agent process (with its workers) named ``name``."""

    def __init__(
        self,
        master: Master,
        address: str,
        token_file: Path,
        config: JobConfig,
        log_dir: Path,
        cert_file: Path | None = None,
    ) -> None:
        self.master = master
        self.address = address
        self.token_file = token_file
        self.cert_file = cert_file
        self.config = config
        self.log_dir = log_dir
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
                proc = _start_agent(self.address, self.token_file, name, self.config, self.log_dir, self.cert_file)
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
            self.master.abort(f"agent {name} exited with code {code}: {last_line(self.log_dir / f'agent-{name}.log')}")

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


class TraceReplay:
    """Replays trace events (times already compressed) against a running job from a background thread."""

    def __init__(self, cluster: LocalCluster, events: list[TraceEvent], phase: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.events = events
        self.done = 0
        self._phase = phase
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trace-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for event in self.events:
            if self._stop.wait(max(0.0, self._started + event.at_s - time.monotonic())):
                return
            if event.kind == "add":
                self.cluster.add_node(event.node)
            else:
                self.cluster.kill_node(event.node)
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(AGENT_START_S + 5)  # it may be starting an agent (add_node waits that long)

    def describe(self) -> str:
        return f"trace: replayed {self.done} of {len(self.events)} events after the start"


def trace_schedule(config: JobConfig) -> list[TraceEvent]:
    """The compressed events of ``config.trace`` (empty without one)."""
    if config.trace is None:
        return []
    return replay_schedule(load_trace(config.trace.path), config.trace.compression)


def _start_agent(
    address: str, token_file: Path, node: str, config: JobConfig, log_dir: Path, cert_file: Path | None = None
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "oobleck.control.agent",
        "--master", address, "--token-file", str(token_file),
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
    workers = config.cluster.nodes * config.cluster.devices_per_node
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


def last_line(path: Path) -> str:
    """The last non-empty line of a log file, or a note that there is none."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else f"(no output in {path})"


