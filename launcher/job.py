"""What every launcher does around its nodes: the job's start (initial node names, the trace schedule, the
log folder), its token and control file, supervising the master and the nodes, and trace replay.

A launcher module (``launcher.local``, ``launcher.ray``) has ``run(config, planner, **callbacks)``
(:class:`Callbacks`) and keeps the contract of :func:`launcher.local.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypedDict

from oobleck.config import JobConfig
from oobleck.control.master import JobFailed, Master
from oobleck.control.records import RecoveryRecord, StepRecord
from oobleck.control.run_files import remove_control_file
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent, load_trace, replay_schedule

#: seconds agents get to stop their workers and exit after the master's shutdown, before SIGTERM
AGENT_EXIT_S = 10.0
#: seconds between SIGTERM and SIGKILL for an agent (it stops its own workers in between)
AGENT_GRACE_S = 5.0
#: seconds a launcher gets to start one node's agent
AGENT_START_S = 60.0
LOG_DIR = "logs"


class Callbacks(TypedDict, total=False):
    """What a launcher reports while the job runs (every one optional): ``on_step`` each committed step,
    ``on_phase`` a line of progress, ``on_recovery`` each recovery."""

    on_step: Callable[[StepRecord], None] | None
    on_phase: Callable[[str], None] | None
    on_recovery: Callable[[RecoveryRecord], None] | None


@dataclasses.dataclass(frozen=True)
class JobStart:
    """How a job starts: its config (with a trace, ``cluster.nodes`` = the nodes the trace adds at time 0),
    the initial nodes' names, the trace's compressed events (empty without one), the log folder (created)
    and the progress printer."""

    config: JobConfig
    names: list[str]
    schedule: list[TraceEvent]
    log_dir: Path
    phase: Callable[[str], None]


def job_start(config: JobConfig, on_phase: Callable[[str], None] | None) -> JobStart:
    """The :class:`JobStart` of ``config``: ``node0 ... node{cluster.nodes - 1}``, or with ``trace:`` set
    the nodes the trace adds at time 0. Creates ``RUN/logs/``."""
    log_dir = Path(config.run.dir) / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = trace_schedule(config)
    names = [e.node for e in schedule if e.at_s == 0] if schedule else [node_name(i) for i in range(config.cluster.nodes)]
    if schedule:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, nodes=len(names)))
    return JobStart(config, names, schedule, log_dir, on_phase or (lambda text: None))


@dataclasses.dataclass(frozen=True)
class NodeContext:
    """What a launcher's nodes need of the job: its master, the address agents connect to, the config and
    the log folder."""

    master: Master
    address: str
    config: JobConfig
    log_dir: Path


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


def supervise(master: Master, start: Callable[[str], "Cluster"], job: JobStart) -> list[StepRecord]:
    """Start ``master``, then its nodes (``start(address)`` returns the launcher's cluster), replay the
    trace's later events if ``job`` has a schedule, and wait for the job. Whatever happens, the replay, the
    master and the cluster are stopped before this returns or raises; a failed job's error names the logs."""
    cluster: Cluster | None = None
    replay: TraceReplay | None = None
    schedule, phase = job.schedule, job.phase
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
        if e.input_error:
            raise  # the worker's own line says what to fix
        raise JobFailed(f"{e} (logs of every agent and worker in {job.log_dir})") from None
    except BaseException as e:
        master.abort(f"the run was interrupted ({type(e).__name__})" if isinstance(e, KeyboardInterrupt) else str(e))
        raise
    finally:
        if replay is not None:
            replay.stop()
        master.stop()
        remove_control_file(Path(job.config.run.dir))  # nothing left to inject into
        if cluster is not None:
            cluster.close()


class Cluster(Protocol):
    """What :func:`supervise` and :class:`TraceReplay` need of a launcher's nodes."""

    def add_node(self, name: str) -> None: ...

    def kill_node(self, name: str) -> None: ...

    def close(self) -> None: ...


class TraceReplay:
    """Replays trace events (times already compressed) against a running job from a background thread."""

    def __init__(self, cluster: Cluster, events: list[TraceEvent], phase: Callable[[str], None]) -> None:
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
