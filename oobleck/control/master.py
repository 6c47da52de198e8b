"""The job's master: membership, the plan, the generation number and the step commit.

It serves the ``Master`` gRPC service (see ``oobleck.proto``) behind the token gate of
:mod:`oobleck.control.auth`, and hosts the torch.distributed TCPStore every generation's workers meet
in, so that no worker is the store's host. The store listens on ``cluster.master_host`` only, and every
value of the job's own protocol in it carries a MAC under the job token (:mod:`oobleck.engine.signed_store`).

Life of a job: agents ``Register`` until ``cluster.nodes`` have joined; the master then plans (through
the ``planner`` callable), places the pipelines on the nodes (:mod:`oobleck.control.placement`), bumps
the generation and answers every worker's ``GetAssignment``. A driver thread then runs the step commit:
for each step it waits until every rank reported its gradients ready, commits the step and hands a
:class:`StepRecord` to ``on_step``. The job succeeds when the last step is committed and every worker has
exited with code 0.

Membership changes go through one path. A node is lost when its agent's stream breaks, its heartbeats
stop, its agent process exits, or one of its workers is killed or gives up on an ended generation it
cannot leave (``STUCK_EXIT_CODE``); a worker's own error exit, or any loss before the first step is
committed, fails the job instead: replanning cannot fix a broken setup. A node
joins when an agent registers after the job started. Either way the master ends the current generation (it
writes ``ended/gen{g}``, after which it never commits a step of ``g``; a lost node's in-flight step is
aborted, a joining node waits for the next step boundary), and the recovery thread re-plans:

* the surviving nodes get the same templates instantiated again (:mod:`oobleck.control.planning`);
* each layer a worker now needs comes from a surviving holder (:mod:`oobleck.engine.transfer`); the
  master tracks who holds which layer at the committed step, updated when a generation commits its first
  step (then every worker of it holds its stage);
* if some layer has no surviving copy, the generation restores the latest complete checkpoint (the steps
  after it are lost and re-run); with fewer nodes than one pipeline needs, the master waits
  ``fault_tolerance.wait_for_nodes_s`` for nodes to join, then fails the job;
* the new generation starts at the first uncommitted step, so no committed step is lost or applied twice.

Each recovery is reported as a :class:`RecoveryRecord` (``on_recovery``) once its first step commits.
"""

from __future__ import annotations

import json
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
from oobleck.control import tls
from oobleck.control.channel import SERVER_OPTIONS
from oobleck.control.placement import Placement, PipelineShape, place
from oobleck.control.policies import shadow_holdings, stage_nodes, takeover
from oobleck.devices import wants_cuda
from oobleck.engine.api import STUCK_EXIT_CODE, Assignment, Restore
from oobleck.engine.signed_store import SignedStore, store_key
from oobleck.engine.store_keys import fault_key, generation_prefix
from oobleck.errors import OobleckError
from planner.errors import PlanningError

log = logging.getLogger(__name__)

#: node names: what a hostname or "node3" looks like; anything else is a malformed request
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
#: how often blocking handlers re-check whether their client is still there
_POLL_S = 0.2
#: a GetAssignment with a deadline is answered "none yet" (generation 0) this long before it, so that only a
#: master that stopped answering lets a worker's call run into its deadline
ASSIGNMENT_ANSWER_MARGIN_S = 3.0
#: how long stop() waits for each background thread (they all watch the stopping flag; one stuck in a
#: callback or a store call is left behind as a daemon rather than hanging the caller)
_JOIN_S = 5.0


def master_timeout_s(heartbeat_timeout_s: float) -> float:
    """How long an agent waits for a sign of life from the master on its Session stream before it gives the
    master up (hung or cut off) and stops its workers: a few heartbeat timeouts, at least 5 s."""
    return max(3 * heartbeat_timeout_s, 5.0)

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
    #: the slowest rank's seconds of redundant work in the step (Bamboo-style baseline; 0 otherwise)
    redundant_s: float = 0.0
    #: the slowest rank's seconds of foreground checkpoint writing before the step (the baselines)
    checkpoint_s: float = 0.0


@dataclass(frozen=True)
class RecoveryRecord:
    """One membership change, from the master's notice to training running again in the new generation.

    ``mode``: ``memory`` (layers copied from surviving replicas), ``checkpoint`` (restored from the latest
    checkpoint), ``init`` (restarted from step 0: no copy and no checkpoint) or ``restart`` (the baselines:
    every worker process restarted, then the latest checkpoint loaded). Times in seconds:
    ``detect_s`` from the kill to the master's notice (when the kill time is known: injected faults record
    it), ``plan_s`` re-planning, ``rebuild_s`` the slowest worker's join of the new process groups,
    ``transfer_s`` the slowest worker's layer copies, ``resume_s`` from the notice until every worker was
    ready to train, ``total_s`` = detect + resume (the notice when detect is unknown)."""

    generation: int
    reason: str
    lost: tuple[str, ...]
    joined: tuple[str, ...]
    mode: str
    start_step: int
    steps_lost: int
    layers_moved: int
    nodes_alive: int
    pipelines: int
    detect_s: float | None
    plan_s: float
    rebuild_s: float
    transfer_s: float
    resume_s: float
    total_s: float


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
    #: devices whose worker has asked for an assignment (it is up, with the engine loaded)
    waiting: set[int] = field(default_factory=set)
    #: whether some generation placed this node (a node that joins later is placed once all its workers wait)
    in_job: bool = False


@dataclass
class _Generation:
    number: int
    placement: Placement
    store_prefix: str
    start_step: int
    started_at: float
    restore: Restore = Restore.INIT
    moves: tuple[tuple[int, int, int], ...] = ()
    #: set when the generation ends early (a node lost or joining); no step of it commits after that
    ended: bool = False
    committed_any: bool = False
    #: the membership change this generation recovers from (reported at its first commit)
    change: "_Change | None" = None
    steps_lost: int = 0
    #: the workers restart their processes before joining (the baselines' stop-everything restart)
    restart: bool = False


@dataclass
class _Change:
    """What happened since the last generation started: for its recovery record."""

    noticed_at: float  # time.time()
    reasons: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)

    def merged(self, later: "_Change | None") -> "_Change":
        """This change followed by ``later`` (which happened before this one's recovery finished)."""
        if later is None:
            return self
        return _Change(
            self.noticed_at,
            self.reasons + later.reasons,
            self.lost + later.lost,
            self.joined + later.joined,
            self.kill_times + later.kill_times,
        )


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL`` for a Popen-style return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == STUCK_EXIT_CODE:
        return f"exited with code {code} (stuck in an ended generation)"
    return f"exited with code {code}"


class Master(oobleck_pb2_grpc.MasterServicer):
    """One job's control plane. Call :meth:`start`, then :meth:`wait`; :meth:`stop` always."""

    def __init__(
        self,
        config: JobConfig,
        token: str,
        planner: Planner,
        on_step: Callable[[StepRecord], None] | None = None,
        on_recovery: Callable[[RecoveryRecord], None] | None = None,
        layer_bytes: list[int] | None = None,
        add_node: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._token = token
        self._planner = planner
        self._on_step = on_step
        self._on_recovery = on_recovery
        self._layer_bytes = layer_bytes
        #: the launcher's way to start a node (``oobleck inject --add``); None where it has none
        self._add_node = add_node
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
        #: (node, device) -> the layers that worker holds at the committed step
        self._holdings: dict[tuple[str, int], frozenset[int]] = {}
        #: the placement of the last generation that committed a step (what ``_holdings`` describes)
        self._committed_placement: Placement | None = None
        #: bamboo: the stages' layer ranges of the last plan (a stage outside them took another over)
        self._planned_ranges: set[tuple[int, int]] = set()
        #: bumped on every loss or join; a re-plan made for an older membership is discarded
        self._membership = 0
        self._replan = False
        #: a joining node's workers are all up: fold it in at the next step boundary
        self._joins_ready = False
        self._change: _Change | None = None
        #: periodic checkpoints whose layer files are being written (workers write them in the background)
        self._checkpoints: list[int] = []
        #: set while too few nodes are left to plan: when the wait began (time.monotonic())
        self._waiting_since: float | None = None
        self._waiting_reason = ""
        #: whether any step was ever committed: before that, a lost node fails the job (see the notes)
        self._trained = False
        self.recoveries: list[RecoveryRecord] = []
        self._server: grpc.Server | None = None
        self._store: Any = None
        #: the store's values the master writes and reads, MAC'd under the job token (signed_store)
        self._store_key = store_key(token)
        self._signed: SignedStore | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._cuda = False
        self.address = ""
        #: the job's certificate (PEM) when the control plane runs TLS; the launcher hands it to the agents
        self.cert_pem: bytes | None = None

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> str:
        """Bind ``cluster.master_host:cluster.master_port`` (0 = a free port), start the TCPStore and
        the heartbeat monitor; return the address agents connect to. OobleckError if the port is taken.
        With TLS on (``cluster.tls``) it serves TLS with a fresh key and certificate (:attr:`cert_pem`)."""
        host, port = self.config.cluster.master_host, self.config.cluster.master_port
        self._cuda = wants_cuda(self.config.cluster.device)
        # one thread per agent stream and per waiting worker, with room for many nodes joining later
        workers = 8 * self._expected * (self._devices + 1) + 64
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="master-rpc"),
            interceptors=[TokenInterceptor(self._token)],
            # SO_REUSEPORT would let two masters share a port silently
            options=SERVER_OPTIONS + [("grpc.so_reuseport", 0)],
        )
        oobleck_pb2_grpc.add_MasterServicer_to_server(self, server)
        material = tls.make_material(host) if tls.wanted(self.config.cluster.tls, host) else None
        if material is None and not tls.is_loopback(host):
            log.warning("cluster.tls is off: the control plane (and its token) to %s travels in plaintext", host)
        try:
            if material is None:
                bound = server.add_insecure_port(_join(host, port))
            else:
                credentials = grpc.ssl_server_credentials([(material.key_pem, material.cert_pem)])
                bound = server.add_secure_port(_join(host, port), credentials)
        except RuntimeError:
            raise OobleckError(
                f"cluster.master_port: cannot bind {_join(host, port)} (in use or not a local address); "
                "choose a free port, or 0 for any free port"
            ) from None
        self._store = _start_store(host)
        self._signed = SignedStore(self._store, self._store_key)
        log.info("store listening on %s", _join(host, self._store.port))
        from oobleck import checkpoint

        # no writer of this run has started yet: every temporary checkpoint file is a dead writer's
        checkpoint.remove_stale_temporaries(self.config.run.dir, older_than=time.time())
        server.start()
        self._server = server
        self.cert_pem = material.cert_pem if material is not None else None
        self.address = _join(host, bound)
        self._spawn(self._monitor, "master-heartbeats")
        self._spawn(self._replanner, "master-replanner")
        if self.config.fault_tolerance.checkpoint_every:
            self._spawn(self._complete_checkpoints, "master-checkpoints")
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

    def set_node_adder(self, add_node: Callable[[str], None]) -> None:
        """How ``oobleck inject --add`` starts a node: the launcher's, once its cluster exists."""
        self._add_node = add_node

    def abort(self, reason: str) -> None:
        """Fail the job from outside (e.g. Ctrl-C): agents are told to stop their workers."""
        self._fail(reason)

    def node_exited(self, name: str, code: int) -> bool:
        """A launcher saw node ``name``'s agent process exit with ``code``. Returns False when the node never
        registered (the caller decides what that means); otherwise the node is lost if it was alive."""
        with self._lock:
            node = self._nodes.get(name)
            if node is None:
                return False
            if code != 0:
                self._lose_node(node, f"node {name} lost: its agent {describe_exit(code)}")
            return True

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (giving open streams ``grace_s`` to deliver their last events) and close the
        store. Agents still connected see their stream break and stop their workers."""
        with self._lock:
            self._stopping = True
            self._fail_locked("the master stopped")
            self._lock.notify_all()
        if self._server is not None:
            # the event is set once the grace has passed and every handler was cancelled; bounded anyway
            self._server.stop(grace_s).wait(grace_s + _JOIN_S)
            self._server = None
        for thread in self._threads:
            thread.join(_JOIN_S)
            if thread.is_alive():
                log.warning("master thread %s did not stop within %g s; leaving it behind", thread.name, _JOIN_S)
        self._store = self._signed = None

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
            known = self._nodes.get(request.node)
            if known is not None and known.alive:
                _invalid(context, f"node: {request.node!r} is already registered; node names must be unique")
            started = self._membership > 0 or self._generation is not None
            if not started and len(self._nodes) >= self._expected:
                _invalid(context, f"node {request.node}: the job already has its {self._expected} nodes (cluster.nodes)")
            self._nodes[request.node] = _Node(request.node, request.devices, request.pid, time.monotonic())
            if started:
                log.info("node %s registered mid-run; it joins once its workers are up", request.node)
            elif len(self._nodes) == self._expected:
                self._membership += 1
                self._replan = True
                self._lock.notify_all()
        log.info("node %s registered (%d devices, pid %d)", request.node, request.devices, request.pid)
        ft = self.config.fault_tolerance
        return pb.RegisterReply(
            nodes_expected=self._expected,
            heartbeat_interval_s=ft.heartbeat_interval_s,
            worker_timeout_s=ft.worker_timeout_s,
            master_timeout_s=master_timeout_s(ft.heartbeat_timeout_s),
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
        # a quiet stream still carries an ALIVE event every heartbeat interval: the agent's sign that the
        # master is there (it gives the master up after RegisterReply.master_timeout_s of silence)
        interval = self.config.fault_tolerance.heartbeat_interval_s
        last_sent = time.monotonic()
        while True:
            with self._lock:
                while node.session_open and context.is_active() and not node.events:
                    left = last_sent + interval - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(min(_POLL_S, left))
                events, node.events = node.events, []
                open_ = node.session_open and context.is_active()
            if open_ and not events:
                events = [pb.MasterEvent(kind=pb.MasterEvent.ALIVE)]
            for event in events:
                yield event
            last_sent = time.monotonic()
            if not open_ or any(e.kind == pb.MasterEvent.SHUTDOWN for e in events):
                return

    def ReportWorkerExit(self, request: pb.WorkerExit, context: grpc.ServicerContext) -> pb.Ack:
        with self._lock:
            node = self._known_node(request.node, context)
            self._check_device(request.device, context)
            if not node.alive:
                return pb.Ack()  # the node is already out of the job; its workers were told to stop
            node.exits[request.device] = request.exit_code
            who = f"worker {node.name}/{request.device}"
            if request.exit_code == 0:
                if self._generation is None or self._committed < self.config.training.steps:
                    self._fail_locked(f"{who} exited before the last step was committed")
                else:
                    self._finish_if_done()
            elif (request.exit_code > 0 and request.exit_code != STUCK_EXIT_CODE) or not self._recoverable():
                # a worker's own error (bad input, a bug) or a death before training started: re-planning
                # would only repeat it. A worker stuck in an ended generation is lost like a killed one.
                self._fail_locked(f"{who} {describe_exit(request.exit_code)}")
            else:
                self._lose_node(node, f"{who} {describe_exit(request.exit_code)}")
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
            key = (node.name, request.device)
            # a worker asks again after each "none yet" answer; only its first call is news
            newly = request.device not in node.waiting
            node.waiting.add(request.device)
            if (
                newly and not node.in_job and node.alive
                and len(node.waiting) == self._devices and self._generation is not None
            ):  # fmt: skip
                self._note_change(f"node {node.name} joined", joined=node.name)
                self._joins_ready = True
                if self._generation is None or self._generation.ended:
                    self._replan = True  # no generation is running: plan now, not at a step boundary
                self._lock.notify_all()

            def ready() -> bool:
                gen = self._generation
                return gen is not None and gen.number > request.after_generation and key in gen.placement.ranks

            def answer_now() -> bool:  # without a deadline, time_remaining() is practically infinite
                return context.time_remaining() <= ASSIGNMENT_ANSWER_MARGIN_S

            while self._failure is None and node.alive and not ready() and context.is_active() and not answer_now():
                self._lock.wait(_POLL_S)
            if self._failure is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self._failure}")
            if not node.alive:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {node.name} was removed from the job")
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            if not ready():
                return pb.AssignmentReply(generation=0)  # none yet: the worker asks again
            gen = self._generation
            assignment = self._assignment(gen, gen.placement.ranks[key], request.device)
        return pb.AssignmentReply(generation=gen.number, assignment_json=assignment.to_json())

    def Inject(self, request: pb.InjectRequest, context: grpc.ServicerContext) -> pb.InjectReply:
        if request.action not in ("kill", "hang", "add"):
            _invalid(context, f"action: got {request.action!r}; use kill, hang or add")
        if not request.nodes:
            _invalid(context, "nodes: none given; name at least one node")
        bad = [n for n in request.nodes if not NODE_NAME.match(n)]
        if bad:
            _invalid(context, f"nodes: {bad} are not node names; use letters, digits and ._:-")
        if request.action == "add":
            return self._inject_add(request, context)
        if request.device != -1:
            self._check_device(request.device, context)
        with self._lock:
            unknown = [n for n in request.nodes if n not in self._nodes or not self._nodes[n].alive]
            if unknown:
                alive = sorted((n for n, v in self._nodes.items() if v.alive), key=_natural_key)
                _invalid(context, f"nodes: {unknown} are not alive nodes of this job; alive: {alive}")
            for name in request.nodes:
                self._nodes[name].events.append(
                    pb.MasterEvent(kind=pb.MasterEvent.INJECT, action=request.action, device=request.device)
                )
            self._lock.notify_all()
        return pb.InjectReply(nodes=list(request.nodes))

    def _inject_add(self, request: pb.InjectRequest, context: grpc.ServicerContext) -> pb.InjectReply:
        if self._add_node is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this job's launcher cannot add nodes")
        with self._lock:
            taken = [n for n in request.nodes if n in self._nodes and self._nodes[n].alive]
        if taken or len(set(request.nodes)) != len(request.nodes):
            _invalid(context, f"nodes: {taken or list(request.nodes)} are already alive or repeated; name new nodes")
        for name in request.nodes:
            try:
                self._add_node(name)
            except Exception as e:  # the launcher cannot start it (e.g. no spare Ray node): the caller's problem
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot add node {name}: {e}")
        return pb.InjectReply(nodes=list(request.nodes))

    # ------------------------------------------------------------------------------------------
    # Planning and the step commit

    def _replanner(self) -> None:
        """Form a new generation whenever the membership changed (see the module notes)."""
        wait_limit = self.config.fault_tolerance.wait_for_nodes_s
        while True:
            with self._lock:
                while not (self._replan or self._stopping or self._failure is not None or self._finished):
                    if self._waiting_since is not None and time.monotonic() - self._waiting_since > wait_limit:
                        self._fail_locked(f"{self._waiting_reason}; no node joined within {wait_limit:g} s")
                        return
                    self._lock.wait(_POLL_S)
                if self._stopping or self._failure is not None or self._finished:
                    return
                self._replan = False
                self._joins_ready = False
                membership = self._membership
                first = self._generation is None
                # a node that registered mid-run is placed once its workers are up (they wait for work)
                usable = [n for n, v in self._nodes.items() if v.alive and (first or v.in_job or len(v.waiting) == self._devices)]
                names = sorted(usable, key=_natural_key)
            try:
                self._new_generation(names, membership)
            except Exception as e:  # a planner or store failure: end the job with its one-line reason
                self._fail(f"planning failed: {e}")
                return

    def _new_generation(self, names: list[str], membership: int) -> None:
        started = time.perf_counter()
        first = self._generation is None and not self.recoveries and self._change is None
        try:
            shapes, names, restart = self._layout(names, first)
            used = sum(len(shape.layer_ranges) for shape in shapes) // self._devices
            if used < len(names):
                # too few nodes for the guarantee, and the templates cannot use them all: the spares wait
                # (their workers stay up) and are placed again at the next re-plan
                names = self._choose_nodes(names, used)
            placement = place(shapes, names, self._devices)
        except PlanningError as e:
            if first:
                raise
            with self._lock:
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                    log.warning("cannot train on %d nodes (%s); waiting for nodes to join", len(names), e)
                self._waiting_reason = f"{len(names)} nodes left: {e}"
            return
        with self._lock:
            if membership != self._membership or self._failure is not None:
                return  # the membership changed again meanwhile; that change re-plans
            restore, moves, start = self._sources(placement, first, restart)
            if first:
                self._committed = start  # a resumed run starts at its checkpoint
            steps_lost = self._committed - start
            if steps_lost:
                log.warning("restoring step %d: %d committed steps are lost and will be re-run", start, steps_lost)
                self._records = [r for r in self._records if r.step < start]
                self._committed = start
                self._holdings = {}
                self._committed_placement = None
            old = self._generation
            if old is not None:
                self._end(old)
            for name in names:
                self._nodes[name].in_job = True
            number = (old.number if old else 0) + 1
            change, self._change = self._change, None
            if old is not None and not old.committed_any and old.change is not None:
                # the last recovery was interrupted by this change: report both as one, timed from the first
                change = old.change.merged(change)
                steps_lost += old.steps_lost
            gen = _Generation(
                number,
                placement,
                generation_prefix(number),
                start,
                time.monotonic(),
                restore,
                moves,
                change=change,
                steps_lost=steps_lost,
                restart=restart,
            )
            self._generation = gen
            self._waiting_since = None
            self._lock.notify_all()
        log.info(
            "generation %d: %d pipelines on %d ranks from step %d (%s)",
            number, len(placement.pipelines), placement.world_size, start, restore,
        )  # fmt: skip
        plan_s = time.perf_counter() - started
        self._spawn(lambda: self._drive(gen, plan_s), f"master-driver-{number}")

    def _layout(self, names: list[str], first: bool) -> tuple[list[PipelineShape], list[str], bool]:
        """The next generation's pipelines, its nodes in placement order, and whether its workers restart.

        ``oobleck`` re-plans from the templates. ``varuna`` re-plans homogeneous pipelines and restarts
        everything from the checkpoint. ``bamboo`` keeps its pipelines when nodes are lost and lets the
        lost stages' neighbours take them over (:func:`~oobleck.control.policies.takeover`); a fatal loss
        (next to an earlier one) re-plans and restarts from the checkpoint, and joins re-plan from memory."""
        policy = self.config.fault_tolerance.policy
        if policy == "bamboo":
            return self._bamboo_layout(names, first)
        if policy == "oobleck" or first:
            return self._planner(names), names, False
        return self._planner(names), names, True  # varuna

    def _bamboo_layout(self, names: list[str], first: bool) -> tuple[list[PipelineShape], list[str], bool]:
        """``_layout`` under ``bamboo``: takeovers while they are allowed, else a re-plan."""

        def replan(restart: bool) -> tuple[list[PipelineShape], list[str], bool]:
            shapes = self._planner(names)
            self._planned_ranges = {r for shape in shapes for r in shape.layer_ranges}
            return shapes, names, restart

        if first:
            return replan(False)
        with self._lock:
            # takeovers start from the layout the holdings describe: the last one that committed a step
            # (two losses seen one after the other must count as adjacent if they are)
            base = self._committed_placement
            joins = self._change is not None and bool(self._change.joined)
        if base is None:  # nothing held since the last restart: restart again
            return replan(True)
        if not joins:
            placed = stage_nodes(base).values()
            taken = takeover(base, set(placed) - set(names), self._planned_ranges)
            if taken is not None:
                return taken[0], taken[1], False
            log.warning("bamboo: a lost stage has no neighbour left that may take it over; restarting from the checkpoint")
            return replan(True)
        return replan(False)

    def _layers_placed(self, placement: Placement) -> dict[tuple[str, int], frozenset[int]]:
        """(node, device) -> the layers its worker holds under ``placement``: its stage's, and under
        ``bamboo`` also the shadow of its successor's."""
        held = _stage_layers(placement)
        if self.config.fault_tolerance.policy == "bamboo":
            for key, layers in shadow_holdings(placement).items():
                held[key] = held[key] | layers
        return held

    def _choose_nodes(self, names: list[str], count: int) -> list[str]:
        """``count`` of ``names`` for a plan that cannot use them all, chosen greedily to keep as many distinct
        layers in memory as possible (then fewer need copying, and none may be lost for want of a placed
        holder); returned in placement order."""
        with self._lock:
            held: dict[str, set[int]] = {}
            for (name, _), layers in self._holdings.items():
                held.setdefault(name, set()).update(layers)
        chosen: list[str] = []
        covered: set[int] = set()
        for _ in range(count):
            best = max(
                (n for n in names if n not in chosen),
                key=lambda n: (len(held.get(n, set()) - covered), -names.index(n)),
            )
            chosen.append(best)
            covered |= held.get(best, set())
        idle = [n for n in names if n not in chosen]
        log.warning("the plan uses %d of %d nodes; idle as spares: %s", count, len(names), ", ".join(idle))
        return [n for n in names if n in chosen]

    def _sources(
        self, placement: Placement, first: bool, restart: bool
    ) -> tuple[Restore, tuple[tuple[int, int, int], ...], int]:
        """Where the new generation's layers come from: (restore mode, moves, start step). Lock held."""
        from oobleck.engine.transfer import LayerLost, plan_transfers

        if first:
            if self.config.run.resume:
                return self._latest_checkpoint("resuming the run")
            return Restore.INIT, (), 0
        if restart:
            return self._latest_checkpoint(f"{self.config.fault_tolerance.policy}: restarting every worker")
        needs: dict[int, set[int]] = {}
        holders: dict[int, set[int]] = {}
        for key, layers in self._layers_placed(placement).items():
            needs[placement.ranks[key]] = set(layers)
        for key, rank in placement.ranks.items():
            for layer in self._holdings.get(key, ()):
                holders.setdefault(layer, set()).add(rank)
        sizes = self._layer_bytes or [1] * (1 + max(layer for wanted in needs.values() for layer in wanted))
        try:
            plan = plan_transfers(holders, needs, dict(enumerate(sizes)))
        except LayerLost as e:
            return self._latest_checkpoint(str(e))
        return Restore.MEMORY, tuple((t.layer, t.source, t.receiver) for t in plan.transfers), self._committed

    def _latest_checkpoint(self, why: str) -> tuple[Restore, tuple[tuple[int, int, int], ...], int]:
        """Restore the run's latest complete checkpoint (or restart from step 0 when there is none)."""
        from oobleck import checkpoint

        # a periodic checkpoint whose layer files are all written but not yet marked complete by the
        # background completer counts: complete it now rather than fall back to an older one. The newest
        # checkpoint that verifies is chosen and the folders of later steps are removed (a re-run must not
        # complete a checkpoint that mixes their files with its own)
        gen = self._generation
        num_layers = max(b for p in gen.placement.pipelines for _, b in p.layer_ranges) if gen is not None else 0
        pending = self._checkpoints if gen is not None else []
        started = time.monotonic()
        ckpt = checkpoint.restore_latest(self.config.run.dir, pending, num_layers, self.config.to_dict())
        self._checkpoints = []  # older ones are superseded, later ones were removed
        if time.monotonic() - started > self.config.fault_tolerance.heartbeat_interval_s:
            # hashing a large checkpoint held the lock: heartbeats that arrived meanwhile could not be
            # recorded, and must not make the monitor lose every node (a closed stream still does)
            for node in self._nodes.values():
                node.last_heartbeat = max(node.last_heartbeat, time.monotonic())
        if ckpt is None:
            log.warning("%s; no checkpoint exists: starting from step 0", why)
            return Restore.INIT, (), 0
        step = int(checkpoint.read_meta(ckpt)["step"])
        log.warning("%s; restoring the checkpoint of step %d", why, step)
        return Restore.CHECKPOINT, (), step

    def _drive(self, gen: _Generation, plan_s: float) -> None:
        """Commit steps ``[gen.start_step, training.steps)`` of ``gen`` one by one, until it ends."""
        from oobleck.engine.commit import CommitCoordinator

        try:
            store = SignedStore(self._store, self._store_key, gen.store_prefix)
            coordinator = CommitCoordinator(store, gen.placement.world_size)
            last = gen.started_at
            samples = self.config.training.global_batch
            for step in range(gen.start_step, self.config.training.steps):
                report = coordinator.wait_step(step, lambda: self._stale(gen), _POLL_S / 4)
                if report is None:
                    return  # the generation ended; whoever ended it has recorded why
                with self._lock:
                    if self._stale(gen):
                        coordinator.abort(step)
                        return
                    # under the lock: once a generation has ended, none of its steps commits
                    coordinator.commit(step)
                    self._committed = step + 1
                    first_commit = not gen.committed_any
                    gen.committed_any = True
                    self._trained = True
                    if first_commit:
                        self._holdings = self._layers_placed(gen.placement)
                        self._committed_placement = gen.placement
                    if self.config.periodic_checkpoint_after(step):
                        self._checkpoints.append(step + 1)
                    fold = self._joins_ready and self._grows_after(step)
                if fold:
                    self._await_checkpoint(step + 1, gen)
                    with self._lock:
                        if not self._stale(gen):
                            self._end(gen)  # fold joining nodes in at this step boundary
                            self._replan = True
                            self._lock.notify_all()
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
                    redundant_s=report.redundant_s,
                    checkpoint_s=report.checkpoint_s,
                )
                last = now
                with self._lock:
                    self._records.append(record)
                if first_commit and gen.change is not None:
                    self._report_recovery(gen, gen.change, plan_s, coordinator.store)
                if self._on_step is not None:
                    self._on_step(record)
            with self._lock:
                self._finish_if_done()
        except Exception as e:  # a broken store or a failing callback: end the job rather than hang it
            self._fail(f"step commit failed: {type(e).__name__}: {e}")

    def _grows_after(self, step: int) -> bool:
        """Whether joining nodes fold in after committed ``step``. Always, except under ``varuna``: it
        restarts every worker to grow, so it grows only at a checkpoint (the one of ``step + 1``, written in
        the foreground) and loses no step."""
        return self.config.fault_tolerance.policy != "varuna" or self.config.periodic_checkpoint_after(step)

    def _await_checkpoint(self, step: int, gen: _Generation) -> None:
        """Under ``varuna``, wait (lock not held) until the foreground checkpoint of ``step`` is complete or
        ``gen`` has ended, so that the restart that grows the job resumes from it."""
        if self.config.fault_tolerance.policy != "varuna":
            return
        from oobleck import checkpoint

        ckpt = checkpoint.checkpoint_dir(self.config.run.dir, step)
        while not checkpoint.is_complete(ckpt) and not self._stale(gen):
            time.sleep(_POLL_S / 4)

    def _complete_checkpoints(self) -> None:
        """Mark periodic checkpoints complete (``meta.json``) once all their layer files exist. A checkpoint
        whose writer died stays incomplete and is dropped once a later one completes."""
        from oobleck import checkpoint

        while True:
            with self._lock:
                if self._stopping or self._finished or self._failure is not None:
                    return
                self._lock.wait(_POLL_S / 2)
                gen, pending = self._generation, list(self._checkpoints)
            if gen is None:
                continue
            num_layers = max(b for p in gen.placement.pipelines for _, b in p.layer_ranges)
            for step in pending:  # file checks and the fsync of meta.json happen outside the lock
                ckpt = checkpoint.checkpoint_dir(self.config.run.dir, step)
                if checkpoint.complete_if_written(ckpt, step, num_layers, self.config.to_dict()):
                    log.info("checkpoint of step %d complete", step)
                    with self._lock:
                        self._checkpoints = [s for s in self._checkpoints if s > step]
                    restored = checkpoint.checkpoint_dir(self.config.run.dir, gen.start_step)
                    checkpoint.prune(self.config.run.dir, self.config.fault_tolerance.checkpoint_keep, verified=ckpt, protect=[restored])

    def _report_recovery(self, gen: _Generation, change: _Change, plan_s: float, store: SignedStore) -> None:
        from oobleck.engine.store_keys import timing_key

        # every rank wrote its timing before its first ready report; one overwritten by a forged value since
        # is left out (its own line was logged)
        raws = [store.get(timing_key(r)) for r in range(gen.placement.world_size)]
        timings = [json.loads(raw) for raw in raws if raw is not None]
        if not timings:
            timings = [{"resumed_at": time.time(), "join_s": float("nan"), "transfer_s": float("nan")}]
        resumed_at = max(t["resumed_at"] for t in timings)
        detect = change.noticed_at - min(change.kill_times) if change.kill_times else None
        resume = resumed_at - change.noticed_at
        record = RecoveryRecord(
            generation=gen.number,
            reason="; ".join(change.reasons),
            lost=tuple(change.lost),
            joined=tuple(change.joined),
            mode="restart" if gen.restart else gen.restore,
            start_step=gen.start_step,
            steps_lost=gen.steps_lost,
            layers_moved=len(gen.moves),
            nodes_alive=len({node for node, _ in gen.placement.ranks}),
            pipelines=len(gen.placement.pipelines),
            detect_s=detect,
            plan_s=plan_s,
            rebuild_s=max(t["join_s"] for t in timings),
            transfer_s=max(t["transfer_s"] for t in timings),
            resume_s=resume,
            total_s=resume + (detect or 0.0),
        )
        with self._lock:
            self.recoveries.append(record)
        log.info("recovered into generation %d: %s", gen.number, record)
        if self._on_recovery is not None:
            self._on_recovery(record)

    def _stale(self, gen: _Generation) -> bool:
        return self._failure is not None or gen.ended or self._generation is not gen

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
            restore=gen.restore,
            moves=gen.moves,
            restart=gen.restart,
            redundant=self.config.fault_tolerance.policy == "bamboo",
        )

    def _store_host(self) -> str:
        host = self.config.cluster.master_host
        # a wildcard bind is reachable at this machine's name, not at the wildcard itself
        return socket.gethostname() if host in ("0.0.0.0", "::", "") else host

    # ------------------------------------------------------------------------------------------
    # Membership (call with the lock held unless stated)

    def _recoverable(self) -> bool:
        """Whether a lost node is re-planned around: only once training has started (a step committed)."""
        return self._trained

    def _lose_node(self, node: _Node, reason: str) -> None:
        """Take ``node`` out of the job (its agent is told to stop its workers) and end the generation."""
        if not node.alive or self._finished or self._failure is not None:
            return
        node.alive = False
        node.events.append(pb.MasterEvent(kind=pb.MasterEvent.SHUTDOWN, failed=False, reason=f"removed from the job: {reason}"))
        gen = self._generation
        if gen is not None and not any(name == node.name for name, _ in gen.placement.ranks):
            log.warning("%s (it had no stage: a spare or a node still joining)", reason)
            return  # nothing runs there: no re-plan
        if not self._recoverable():
            self._fail_locked(reason)
            return
        log.warning("%s", reason)
        self._note_change(reason, lost=node.name)
        if self._generation is not None:
            self._end(self._generation)
        self._replan = True
        self._lock.notify_all()

    def _note_change(self, reason: str, lost: str | None = None, joined: str | None = None) -> None:
        self._membership += 1
        if self._change is None:
            self._change = _Change(noticed_at=time.time())
        self._change.reasons.append(reason)
        if lost is not None:
            self._change.lost.append(lost)
            kill_time = self._signed.get(fault_key(lost)) if self._signed is not None else None
            if kill_time is not None:
                self._change.kill_times.append(float(kill_time))
        if joined is not None:
            self._change.joined.append(joined)

    def _end(self, gen: _Generation) -> None:
        """End ``gen``: its workers leave it (they watch this key); none of its steps commits after this."""
        if gen.ended:
            return
        from oobleck.engine.store_keys import ended_key

        gen.ended = True
        if self._signed is not None:  # None once the master stopped
            self._signed.set(ended_key(gen.number), b"1")

    def _finish_if_done(self) -> None:
        gen = self._generation
        if gen is None or self._finished or self._failure is not None or gen.ended:
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
            self._lose_node(node, f"node {node.name} lost: {why}")
            self._lock.notify_all()

    def _monitor(self) -> None:
        """Lose nodes whose heartbeats stopped for ``fault_tolerance.heartbeat_timeout_s``."""
        ft = self.config.fault_tolerance
        with self._lock:
            while not (self._stopping or self._finished or self._failure is not None):
                now = time.monotonic()
                for node in list(self._nodes.values()):
                    if node.alive and now - node.last_heartbeat > ft.heartbeat_timeout_s:
                        silent = now - node.last_heartbeat
                        self._lose_node(node, f"node {node.name} lost: no heartbeat for {silent:.2f} s")
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


def _stage_layers(placement: Placement) -> dict[tuple[str, int], frozenset[int]]:
    """(node, device) -> the layers of the stage it runs under ``placement``."""
    by_rank = {
        rank: frozenset(range(a, b))
        for pipeline in placement.pipelines
        for rank, (a, b) in zip(pipeline.ranks, pipeline.layer_ranges)
    }
    return {key: by_rank[rank] for key, rank in placement.ranks.items()}


def _invalid(context: grpc.ServicerContext, message: str) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _natural_key(name: str) -> list[Any]:
    """node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _start_store(host: str) -> Any:
    """The job's TCPStore on a free port of ``host``, listening on that address only (torch's own bind
    would take every interface); workers of every generation meet under prefixes. The socket is bound
    here and handed over: the store owns (and closes) it from then on."""
    from torch.distributed import TCPStore

    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
        store = TCPStore(
            host, listener.getsockname()[1], is_master=True, wait_for_workers=False,
            master_listen_fd=listener.fileno(), use_libuv=True,
        )  # fmt: skip
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store closes the descriptor when it is destroyed
    return store
