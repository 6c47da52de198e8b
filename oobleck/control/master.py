"""The job's master: membership, the plan, the generation number and the step commit.

It serves the ``Master`` gRPC service (see ``oobleck.proto``) behind the token gate of
:mod:`oobleck.control.auth`, and hosts the torch.distributed TCPStore every generation's workers meet
in, so that no worker is the store's host.

Life of a job: agents ``Register`` until ``cluster.nodes`` have joined; the master then plans (through
the ``planner`` callable), places the pipelines on the nodes (:mod:`oobleck.control.placement`), bumps
the generation and answers every worker's ``GetAssignment``. A driver thread then runs the step commit:
for each step it waits until every rank reported its gradients ready, commits the step and hands a
:class:`StepRecord` to ``on_step``. The job succeeds when the last step is committed and every worker has
exited with code 0.

Membership loss (a worker's non-zero exit, an agent's closed stream or missed heartbeats) goes through
:meth:`Master._membership_lost`. In this version it fails the job; recovery plugs in there (replan the
survivors, bump the generation, hand out new assignments).
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from oobleck.config import JobConfig
from oobleck.control import oobleck_pb2 as pb
from oobleck.control import oobleck_pb2_grpc
from oobleck.control.auth import TokenInterceptor
from oobleck.control.channel import GRPC_OPTIONS
from oobleck.control.placement import Placement, PipelineShape, place
from oobleck.engine.api import Assignment
from oobleck.errors import OobleckError

log = logging.getLogger(__name__)

#: node names: what a hostname or "node3" looks like; anything else is a malformed request
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
#: how often blocking handlers re-check whether their client is still there
_POLL_S = 0.2

#: the node names (in placement order) -> the planned pipelines
Planner = Callable[[list[str]], list[PipelineShape]]


class JobFailed(OobleckError):
    """The job stopped before finishing; the message says which node or worker and why."""


@dataclass(frozen=True)
class StepRecord:
    """One committed step, as the master saw it."""

    step: int
    #: the step's loss as the workers reported it (summed loss / loss units over the global batch)
    loss: float
    units: int
    grad_norm: float
    #: wall time from the previous commit (or from the generation's start) to this one
    step_time_s: float
    samples_per_s: float
    generation: int
    nodes_alive: int
    pipelines: int


@dataclass
class _Node:
    name: str
    devices: int
    pid: int
    last_heartbeat: float
    alive: bool = True
    session_open: bool = False
    #: events for the node's agent, read by its Session stream
    events: list[pb.MasterEvent] = field(default_factory=list)
    #: device -> exit code of its worker in the current generation
    exits: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Generation:
    number: int
    placement: Placement
    store_prefix: str
    start_step: int
    started_at: float


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL`` for a Popen-style return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Master(oobleck_pb2_grpc.MasterServicer):
    """One job's control plane. Call :meth:`start`, then :meth:`wait`; :meth:`stop` always."""

    def __init__(
        self,
        config: JobConfig,
        token: str,
        planner: Planner,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self.config = config
        self._token = token
        self._planner = planner
        self._on_step = on_step
        self._expected = config.cluster.nodes
        self._devices = config.cluster.devices_per_node
        self._lock = threading.Condition()
        self._nodes: dict[str, _Node] = {}
        self._generation: _Generation | None = None
        self._failure: str | None = None
        self._finished = False
        #: steps [0, committed) are committed; a worker's exit 0 is normal only once all are
        self._committed = 0
        self._records: list[StepRecord] = []
        self._server: grpc.Server | None = None
        self._store: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._cuda = False
        self.address = ""

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> str:
        """Bind ``cluster.master_host:cluster.master_port`` (0 = a free port), start the TCPStore and
        the heartbeat monitor; return the address agents connect to. OobleckError if the port is taken."""
        host, port = self.config.cluster.master_host, self.config.cluster.master_port
        self._cuda = _use_cuda(self.config.cluster.device)
        # one thread per agent stream and per waiting worker, plus room for short calls
        workers = self._expected * (self._devices + 1) + 16
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="master-rpc"),
            interceptors=[TokenInterceptor(self._token)],
            # SO_REUSEPORT would let two masters share a port silently
            options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)],
        )
        oobleck_pb2_grpc.add_MasterServicer_to_server(self, server)
        try:
            bound = server.add_insecure_port(_join(host, port))
        except RuntimeError:
            raise OobleckError(
                f"cluster.master_port: cannot bind {_join(host, port)} (in use or not a local address); "
                "choose a free port, or 0 for any free port"
            ) from None
        self._store = _start_store(host)
        server.start()
        self._server = server
        self.address = _join(host, bound)
        self._spawn(self._monitor, "master-heartbeats")
        return self.address

    def wait(self, timeout_s: float | None = None) -> list[StepRecord]:
        """Block until the job finishes and return its step records; JobFailed if it failed,
        TimeoutError if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while not self._finished and self._failure is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the job did not finish within {timeout_s:g} s")
                self._lock.wait(left)
            if self._failure is not None:
                raise JobFailed(self._failure)
            return list(self._records)

    def abort(self, reason: str) -> None:
        """Fail the job from outside (e.g. Ctrl-C): agents are told to stop their workers."""
        self._fail(reason)

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (giving open streams ``grace_s`` to deliver their last events) and close the
        store. Agents still connected see their stream break and stop their workers."""
        with self._lock:
            self._stopping = True
            self._fail_locked("the master stopped")
            self._lock.notify_all()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        for thread in self._threads:
            thread.join()
        self._store = None

    # ------------------------------------------------------------------------------------------
    # Service methods

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        if not NODE_NAME.match(request.node):
            _invalid(context, f"node: got {request.node!r}; use letters, digits and ._:- (at most 128)")
        if request.devices != self._devices:
            _invalid(
                context,
                f"devices: got {request.devices} for node {request.node}; the job expects cluster.devices_per_node = {self._devices}",
            )
        with self._lock:
            if self._failure is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self._failure}")
            if request.node in self._nodes:
                _invalid(context, f"node: {request.node!r} is already registered; node names must be unique")
            if len(self._nodes) >= self._expected:
                _invalid(context, f"node {request.node}: the job already has its {self._expected} nodes (cluster.nodes)")
            self._nodes[request.node] = _Node(request.node, request.devices, request.pid, time.monotonic())
            complete = len(self._nodes) == self._expected
        log.info("node %s registered (%d devices, pid %d)", request.node, request.devices, request.pid)
        if complete:
            self._spawn(self._plan_and_drive, "master-driver")
        return pb.RegisterReply(
            nodes_expected=self._expected, heartbeat_interval_s=self.config.fault_tolerance.heartbeat_interval_s
        )

    def Session(self, requests: Iterator[pb.Heartbeat], context: grpc.ServicerContext) -> Iterator[pb.MasterEvent]:
        try:
            first = next(requests)
        except Exception:  # the stream ended or broke before its first heartbeat: nothing to serve
            return
        with self._lock:
            node = self._known_node(first.node, context)
            if node.session_open:
                _invalid(context, f"node {node.name}: a session is already open")
            node.session_open = True
            node.last_heartbeat = time.monotonic()
        reader = threading.Thread(
            target=self._read_heartbeats, args=(node, requests), name=f"heartbeats-{node.name}", daemon=True
        )
        reader.start()
        yield pb.MasterEvent(kind=pb.MasterEvent.SESSION_OPEN)
        while True:
            with self._lock:
                while not node.events and node.session_open and context.is_active():
                    self._lock.wait(_POLL_S)
                events, node.events = node.events, []
                open_ = node.session_open and context.is_active()
            for event in events:
                yield event
            if not open_ or any(e.kind == pb.MasterEvent.SHUTDOWN for e in events):
                return

    def ReportWorkerExit(self, request: pb.WorkerExit, context: grpc.ServicerContext) -> pb.Ack:
        with self._lock:
            node = self._known_node(request.node, context)
            self._check_device(request.device, context)
            node.exits[request.device] = request.exit_code
            who = f"worker {node.name}/{request.device}"
            if request.exit_code != 0:
                self._membership_lost(f"{who} {describe_exit(request.exit_code)}")
            elif self._generation is None or self._committed < self.config.training.steps:
                self._membership_lost(f"{who} exited before the last step was committed")
            else:
                self._finish_if_done()
        return pb.Ack()

    def GetAssignment(self, request: pb.AssignmentRequest, context: grpc.ServicerContext) -> pb.AssignmentReply:
        with self._lock:
            node = self._known_node(request.node, context)
            self._check_device(request.device, context)
            current = self._generation.number if self._generation else 0
            if not 0 <= request.after_generation <= current:
                _invalid(
                    context,
                    f"after_generation: got {request.after_generation}; the current generation is {current}",
                )
            while (
                self._failure is None
                and (self._generation is None or self._generation.number <= request.after_generation)
                and context.is_active()
            ):
                self._lock.wait(_POLL_S)
            if self._failure is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self._failure}")
            if not context.is_active() or self._generation is None:
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            gen = self._generation
            rank = gen.placement.ranks.get((node.name, request.device))
            if rank is None:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {node.name}/{request.device} has no stage in generation {gen.number}",
                )
            assignment = self._assignment(gen, rank, request.device)
        return pb.AssignmentReply(generation=gen.number, assignment_json=assignment.to_json())

    # ------------------------------------------------------------------------------------------
    # Planning and the step commit

    def _plan_and_drive(self) -> None:
        with self._lock:
            names = sorted(self._nodes, key=_natural_key)
        try:
            placement = place(self._planner(names), names, self._devices)
        except Exception as e:  # any planning failure ends the job with its one-line reason
            self._fail(f"planning failed: {e}")
            return
        with self._lock:
            if self._failure is not None:
                return
            number = (self._generation.number if self._generation else 0) + 1
            self._generation = _Generation(number, placement, f"gen{number}/", self._committed, time.monotonic())
            self._lock.notify_all()
        log.info("generation %d: %d pipelines on %d ranks", number, len(placement.pipelines), placement.world_size)
        try:
            self._drive(self._generation)
        except Exception as e:  # a broken store or a failing on_step: end the job rather than hang it
            self._fail(f"step commit failed: {type(e).__name__}: {e}")

    def _drive(self, gen: _Generation) -> None:
        """Commit steps ``[gen.start_step, training.steps)`` of ``gen`` one by one."""
        from torch.distributed import PrefixStore

        from oobleck.engine.commit import CommitCoordinator

        coordinator = CommitCoordinator(PrefixStore(gen.store_prefix, self._store), gen.placement.world_size)
        last = gen.started_at
        samples = self.config.training.global_batch
        for step in range(gen.start_step, self.config.training.steps):
            report = coordinator.wait_step(step, lambda: self._stale(gen), _POLL_S / 4)
            if report is None:
                return  # the generation ended; whoever ended it has recorded why
            with self._lock:
                if self._stale(gen):
                    return
                self._committed = step + 1
            coordinator.commit(step)
            now = time.monotonic()
            record = StepRecord(
                step=report.step,
                loss=float(report.loss),
                units=int(report.units),
                grad_norm=float(report.grad_norm),
                step_time_s=now - last,
                samples_per_s=samples / max(now - last, 1e-9),
                generation=gen.number,
                nodes_alive=self._alive_count(),
                pipelines=len(gen.placement.pipelines),
            )
            last = now
            with self._lock:
                self._records.append(record)
            if self._on_step is not None:
                self._on_step(record)
        with self._lock:
            self._finish_if_done()

    def _stale(self, gen: _Generation) -> bool:
        return self._failure is not None or self._generation is not gen

    def _assignment(self, gen: _Generation, rank: int, device: int) -> Assignment:
        cuda = self._cuda
        return Assignment(
            generation=gen.number,
            rank=rank,
            world_size=gen.placement.world_size,
            store_host=self._store_host(),
            store_port=self._store.port,
            store_prefix=gen.store_prefix,
            backend="nccl" if cuda else "gloo",
            device=f"cuda:{device}" if cuda else "cpu",
            pipelines=gen.placement.pipelines,
            config=self.config.to_dict(),
            start_step=gen.start_step,
        )

    def _store_host(self) -> str:
        host = self.config.cluster.master_host
        # a wildcard bind is reachable at this machine's name, not at the wildcard itself
        return socket.gethostname() if host in ("0.0.0.0", "::", "") else host

    # ------------------------------------------------------------------------------------------
    # Membership (call with the lock held unless stated)

    def _membership_lost(self, reason: str) -> None:
        """A worker or a node is gone. Recovery (replan the survivors into a new generation) plugs in
        here; until then the job fails, unless it already finished or failed."""
        if self._finished or self._failure is not None:
            return
        self._fail_locked(reason)

    def _finish_if_done(self) -> None:
        gen = self._generation
        if gen is None or self._finished or self._failure is not None:
            return
        if self._committed < self.config.training.steps:
            return
        if all(self._nodes[n].exits.get(d) == 0 for n, d in gen.placement.ranks):
            self._finished = True
            self._broadcast_shutdown(failed=False, reason="the job finished")
            self._lock.notify_all()

    def _fail(self, reason: str) -> None:
        with self._lock:
            self._fail_locked(reason)

    def _fail_locked(self, reason: str) -> None:
        if self._failure is not None or self._finished:
            return
        log.error("job failed: %s", reason)
        self._failure = reason
        self._broadcast_shutdown(failed=True, reason=reason)
        self._lock.notify_all()

    def _broadcast_shutdown(self, failed: bool, reason: str) -> None:
        for node in self._nodes.values():
            node.events.append(pb.MasterEvent(kind=pb.MasterEvent.SHUTDOWN, failed=failed, reason=reason))
        self._lock.notify_all()

    def _read_heartbeats(self, node: _Node, requests: Iterator[pb.Heartbeat]) -> None:
        """Consume ``node``'s heartbeats; the stream's end (or a malformed heartbeat) loses the node."""
        why = "its agent closed the control stream"
        try:
            for beat in requests:
                if beat.node != node.name:
                    why = f"its agent sent a heartbeat for {beat.node!r}"
                    break
                with self._lock:
                    node.last_heartbeat = time.monotonic()
        except Exception as e:  # a broken stream or undecodable bytes: either way the agent is gone
            why = f"its control stream broke ({type(e).__name__})"
        with self._lock:
            node.session_open = False
            if node.alive:
                node.alive = False
                self._membership_lost(f"node {node.name} lost: {why}")
            self._lock.notify_all()

    def _monitor(self) -> None:
        """Lose nodes whose heartbeats stopped for ``fault_tolerance.heartbeat_timeout_s``."""
        ft = self.config.fault_tolerance
        with self._lock:
            while not (self._stopping or self._finished or self._failure is not None):
                now = time.monotonic()
                for node in self._nodes.values():
                    if node.alive and now - node.last_heartbeat > ft.heartbeat_timeout_s:
                        node.alive = False
                        silent = now - node.last_heartbeat
                        self._membership_lost(f"node {node.name} lost: no heartbeat for {silent:.2f} s")
                self._lock.wait(ft.heartbeat_interval_s)

    def _alive_count(self) -> int:
        with self._lock:
            return sum(node.alive for node in self._nodes.values())

    def _known_node(self, name: str, context: grpc.ServicerContext) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            _invalid(context, f"node: {name!r} is not registered; call Register first")
        return node

    def _check_device(self, device: int, context: grpc.ServicerContext) -> None:
        if not 0 <= device < self._devices:
            _invalid(context, f"device: got {device}; must be in [0, {self._devices - 1}]")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()


def _invalid(context: grpc.ServicerContext, message: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _natural_key(name: str) -> list[Any]:
    """node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _use_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise OobleckError("cluster.device: got 'cuda' but no CUDA device is visible; use cpu or auto")
    return device == "cuda" or torch.cuda.is_available()


def _start_store(host: str) -> Any:
    """The job's TCPStore on a free port of ``host``; workers of every generation meet under prefixes."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, is_master=True, wait_for_workers=False)
