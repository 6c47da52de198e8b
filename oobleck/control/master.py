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

* the policy lays the next generation out (:mod:`oobleck.control.policy`; ``oobleck``: the surviving nodes
  get the same templates instantiated again, :mod:`oobleck.control.planning`);
* each layer a worker now needs comes from a surviving holder (:mod:`oobleck.engine.transfer`); the
  master tracks who holds which layer at the committed step, updated when a generation commits its first
  step (then every worker of it holds its stage);
* if some layer has no surviving copy, the generation restores the latest complete checkpoint (the steps
  after it are lost and re-run); with fewer nodes than one pipeline needs, the master waits
  ``fault_tolerance.wait_for_nodes_s`` for nodes to join, then fails the job;
* the new generation starts at the first uncommitted step, so no committed step is lost or applied twice.

Each recovery is reported as a :class:`RecoveryRecord` (``on_recovery``) once its first step commits.

This module is the servicer and the job's lifecycle; the parts it starts live next to it: the shared state
and membership transitions (:mod:`~oobleck.control.state`), re-planning (:mod:`~oobleck.control.replan`),
the step commit (:mod:`~oobleck.control.driver`), checkpoint completion (:mod:`~oobleck.control.checkpoints`)
and the records (:mod:`~oobleck.control.records`).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import grpc

from oobleck.config import JobConfig
from oobleck.control import oobleck_pb2 as pb
from oobleck.control import oobleck_pb2_grpc
from oobleck.control.checkpoints import CheckpointCompleter
from oobleck.control.driver import CommitDriver
from oobleck.control.policy import Planner, policy_for
from oobleck.control.records import RecoveryRecord, StepRecord
from oobleck.control.replan import Replanner, natural_key
from oobleck.control.serving import bind_server, join_address, store_host
from oobleck.store_server import start_store
from oobleck.control.state import Generation, JobState, Node
from oobleck.devices import wants_cuda
from oobleck.engine.api import INPUT_ERROR_EXIT_CODE, STUCK_EXIT_CODE, Assignment
from oobleck.engine.signed_store import SignedStore, store_key
from oobleck.errors import OobleckError, one_line

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


class JobFailed(OobleckError):
    """The job stopped before finishing; the message says which node or worker and why. ``input_error``: a
    worker stopped on bad input (exit code :data:`INPUT_ERROR_EXIT_CODE`) and the message is its own line."""

    def __init__(self, message: str, input_error: bool = False) -> None:
        super().__init__(message)
        self.input_error = input_error


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


def exit_reason(who: str, code: int, said: str) -> str:
    """Why worker ``who`` is gone, from its exit code and the last line it wrote (``said``, possibly empty;
    made one line here, since it reaches the user's terminal): ``worker node1/0 exited with code 1:
    LINE``, or for bad input (:data:`INPUT_ERROR_EXIT_CODE`) the worker's own one-line error as
    ``worker node1/0: MESSAGE`` (it printed ``worker node1/0: error: MESSAGE``)."""
    said = one_line(said) if said.strip() else ""
    if code == INPUT_ERROR_EXIT_CODE and said:
        return f"{who}: {said.removeprefix(f'{who}: ').removeprefix('error: ')}"
    return f"{who} {describe_exit(code)}" + (f": {said}" if said else "")


class Master(oobleck_pb2_grpc.MasterServicer):
    """One job's control plane. Call :meth:`start`, then :meth:`wait`; :meth:`stop` always."""

    def __init__(
        self,
        config: JobConfig,
        token: str,
        planner: Planner,
        on_step: Callable[[StepRecord], None] | None = None,
        on_recovery: Callable[[RecoveryRecord], None] | None = None,
        layer_bytes: Sequence[int] | None = None,
        add_node: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.state = JobState(config)
        self._token = token
        #: the launcher's way to start a node (``oobleck inject --add``); None where it has none
        self._add_node = add_node
        #: the failure reason when the job failed on a worker's bad input (see JobFailed.input_error)
        self._input_failure: str | None = None
        self._expected = config.cluster.nodes
        self._devices = config.cluster.devices_per_node
        self._policy = policy_for(config.fault_tolerance.policy)
        self._driver = CommitDriver(self.state, self._policy, self._open_store, on_step, on_recovery)
        self._replanner = Replanner(self.state, self._policy, planner, layer_bytes, self._start_driver)
        self._server: grpc.Server | None = None
        self._store: Any = None
        #: the store's values the master writes and reads, MAC'd under the job token (signed_store)
        self._store_key = store_key(token)
        self._threads: list[threading.Thread] = []
        self._cuda = False
        self.address = ""
        #: the job's certificate (PEM) when the control plane runs TLS; the launcher hands it to the agents
        self.cert_pem: bytes | None = None

    @property
    def recoveries(self) -> list[RecoveryRecord]:
        """The recoveries reported so far, in order."""
        return self.state.recoveries

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
        server, address, cert_pem = bind_server(self, host, port, self._token, self.config.cluster.tls, workers)
        self._store = start_store(host)
        self.state.signed = SignedStore(self._store, self._store_key)
        log.info("store listening on %s", join_address(host, self._store.port))
        from oobleck import checkpoint

        # no writer of this run has started yet: every temporary checkpoint file is a dead writer's
        checkpoint.remove_stale_temporaries(self.config.run.dir, older_than=time.time())
        server.start()
        self._server = server
        self.cert_pem = cert_pem
        self.address = address
        self._spawn(self._monitor, "master-heartbeats")
        self._spawn(self._replanner.run, "master-replanner")
        if self.config.fault_tolerance.checkpoint_every:
            self._spawn(CheckpointCompleter(self.state).run, "master-checkpoints")
        return self.address

    def wait(self, timeout_s: float | None = None) -> list[StepRecord]:
        """Block until the job finishes and return its step records; JobFailed if it failed,
        TimeoutError if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.state.lock:
            while not self.state.finished and self.state.failure is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"the job did not finish within {timeout_s:g} s")
                self.state.lock.wait(left)
            if self.state.failure is not None:
                raise JobFailed(self.state.failure, input_error=self.state.failure == self._input_failure)
            return list(self.state.records)

    def set_node_adder(self, add_node: Callable[[str], None]) -> None:
        """How ``oobleck inject --add`` starts a node: the launcher's, once its cluster exists."""
        self._add_node = add_node

    def abort(self, reason: str) -> None:
        """Fail the job from outside (e.g. Ctrl-C): agents are told to stop their workers."""
        self.state.fail(reason)

    def node_exited(self, name: str, code: int) -> bool:
        """A launcher saw node ``name``'s agent process exit with ``code``. Returns False when the node never
        registered (the caller decides what that means); otherwise the node is lost if it was alive."""
        with self.state.lock:
            node = self.state.nodes.get(name)
            if node is None:
                return False
            if code != 0:
                self.state.lose_node(node, f"node {name} lost: its agent {describe_exit(code)}")
            return True

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (giving open streams ``grace_s`` to deliver their last events) and close the
        store. Agents still connected see their stream break and stop their workers."""
        with self.state.lock:
            self.state.stopping = True
            self.state.fail_locked("the master stopped")
            self.state.lock.notify_all()
        if self._server is not None:
            # the event is set once the grace has passed and every handler was cancelled; bounded anyway
            self._server.stop(grace_s).wait(grace_s + _JOIN_S)
            self._server = None
        for thread in self._threads:
            thread.join(_JOIN_S)
            if thread.is_alive():
                log.warning("master thread %s did not stop within %g s; leaving it behind", thread.name, _JOIN_S)
        self._store = self.state.signed = None

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
        with self.state.lock:
            if self.state.failure is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self.state.failure}")
            known = self.state.nodes.get(request.node)
            if known is not None and known.alive:
                _invalid(context, f"node: {request.node!r} is already registered; node names must be unique")
            started = self.state.membership > 0 or self.state.generation is not None
            if not started and len(self.state.nodes) >= self._expected:
                _invalid(context, f"node {request.node}: the job already has its {self._expected} nodes (cluster.nodes)")
            node = Node(request.node, request.devices, request.pid, time.monotonic())
            others = [n.registered_at for n in self.state.nodes.values() if n.alive]
            self.state.nodes[request.node] = node
            if started:
                # how far apart nodes started together register decides whether they join together (TOGETHER_S)
                gap = f"{node.registered_at - max(others):.2f} s" if others else "none"
                log.info(
                    "node %s registered mid-run (after the last registration: %s); it joins once its workers are up",
                    request.node, gap,
                )  # fmt: skip
            elif len(self.state.nodes) == self._expected:
                self.state.membership += 1
                self.state.replan = True
                self.state.lock.notify_all()
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
        with self.state.lock:
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
            with self.state.lock:
                while node.session_open and context.is_active() and not node.events:
                    left = last_sent + interval - time.monotonic()
                    if left <= 0:
                        break
                    self.state.lock.wait(min(_POLL_S, left))
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
        with self.state.lock:
            node = self._known_node(request.node, context)
            self._check_device(request.device, context)
            if not node.alive:
                return pb.Ack()  # the node is already out of the job; its workers were told to stop
            node.exits[request.device] = request.exit_code
            who = f"worker {node.name}/{request.device}"
            if request.exit_code == 0:
                if self.state.generation is None or self.state.committed < self.config.training.steps:
                    self.state.fail_locked(f"{who} exited before the last step was committed")
                else:
                    self.state.finish_if_done()
            elif self.state.result_saved():
                log.warning(
                    "%s %s after the final checkpoint was written: the job's result is complete",
                    who, describe_exit(request.exit_code),
                )  # fmt: skip
                self.state.finish_if_done()
            elif (request.exit_code > 0 and request.exit_code != STUCK_EXIT_CODE) or not self.state.recoverable():
                # a worker's own error (bad input, a bug) or a death before training started: re-planning
                # would only repeat it. A worker stuck in an ended generation is lost like a killed one.
                reason = exit_reason(who, request.exit_code, request.error)
                if request.exit_code == INPUT_ERROR_EXIT_CODE and self.state.failure is None:
                    self._input_failure = reason
                self.state.fail_locked(reason)
            else:
                self.state.lose_node(node, exit_reason(who, request.exit_code, request.error))
        return pb.Ack()

    def GetAssignment(self, request: pb.AssignmentRequest, context: grpc.ServicerContext) -> pb.AssignmentReply:
        with self.state.lock:
            node = self._known_node(request.node, context)
            self._check_device(request.device, context)
            if request.config_only:  # the worker builds its model first; it waits for work only once it asks
                return pb.AssignmentReply(generation=0, config_json=json.dumps(self.config.to_dict()))
            current = self.state.generation.number if self.state.generation else 0
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
                and len(node.waiting) == self._devices and self.state.generation is not None
            ):  # fmt: skip
                self.state.note_change(f"node {node.name} joined", joined=node.name)
                self.state.joins_ready = True
                if self.state.generation is None or self.state.generation.ended:
                    self.state.replan = True  # no generation is running: plan now, not at a step boundary
                self.state.lock.notify_all()

            def ready() -> bool:
                gen = self.state.generation
                return gen is not None and gen.number > request.after_generation and key in gen.placement.ranks

            def answer_now() -> bool:  # without a deadline, time_remaining() is practically infinite
                return context.time_remaining() <= ASSIGNMENT_ANSWER_MARGIN_S

            while self.state.failure is None and node.alive and not ready() and context.is_active() and not answer_now():
                self.state.lock.wait(_POLL_S)
            if self.state.failure is not None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self.state.failure}")
            if not node.alive:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {node.name} was removed from the job")
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            if not ready():
                return pb.AssignmentReply(generation=0)  # none yet: the worker asks again
            gen = self.state.generation
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
        with self.state.lock:
            unknown = [n for n in request.nodes if n not in self.state.nodes or not self.state.nodes[n].alive]
            if unknown:
                alive = sorted((n for n, v in self.state.nodes.items() if v.alive), key=natural_key)
                _invalid(context, f"nodes: {unknown} are not alive nodes of this job; alive: {alive}")
            for name in request.nodes:
                self.state.nodes[name].events.append(
                    pb.MasterEvent(kind=pb.MasterEvent.INJECT, action=request.action, device=request.device)
                )
            self.state.lock.notify_all()
        return pb.InjectReply(nodes=list(request.nodes))

    def _inject_add(self, request: pb.InjectRequest, context: grpc.ServicerContext) -> pb.InjectReply:
        if self._add_node is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this job's launcher cannot add nodes")
        with self.state.lock:
            taken = [n for n in request.nodes if n in self.state.nodes and self.state.nodes[n].alive]
        if taken or len(set(request.nodes)) != len(request.nodes):
            _invalid(context, f"nodes: {taken or list(request.nodes)} are already alive or repeated; name new nodes")
        for name in request.nodes:
            try:
                self._add_node(name)
            except Exception as e:  # the launcher cannot start it (e.g. no spare Ray node): the caller's problem
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot add node {name}: {e}")
        return pb.InjectReply(nodes=list(request.nodes))


    # ------------------------------------------------------------------------------------------
    # Generations

    def _start_driver(self, gen: Generation, plan_s: float) -> None:
        self._spawn(lambda: self._driver.run(gen, plan_s), f"master-driver-{gen.number}")

    def _open_store(self, prefix: str) -> SignedStore:
        return SignedStore(self._store, self._store_key, prefix)

    def _assignment(self, gen: Generation, rank: int, device: int) -> Assignment:
        cuda = self._cuda
        return Assignment(
            generation=gen.number,
            rank=rank,
            world_size=gen.placement.world_size,
            store_host=store_host(self.config.cluster.master_host),
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
            redundant=self._policy.redundant,
        )

    # ------------------------------------------------------------------------------------------
    # Membership: heartbeats and request checks

    def _read_heartbeats(self, node: Node, requests: Iterator[pb.Heartbeat]) -> None:
        """Consume ``node``'s heartbeats; the stream's end (or a malformed heartbeat) loses the node."""
        why = "its agent closed the control stream"
        try:
            for beat in requests:
                if beat.node != node.name:
                    why = f"its agent sent a heartbeat for {beat.node!r}"
                    break
                with self.state.lock:
                    node.last_heartbeat = time.monotonic()
        except Exception as e:  # a broken stream or undecodable bytes: either way the agent is gone
            why = f"its control stream broke ({type(e).__name__})"
        with self.state.lock:
            node.session_open = False
            self.state.lose_node(node, f"node {node.name} lost: {why}")
            self.state.lock.notify_all()

    def _monitor(self) -> None:
        """Lose nodes whose heartbeats stopped for ``fault_tolerance.heartbeat_timeout_s``."""
        ft = self.config.fault_tolerance
        state = self.state
        with state.lock:
            while not state.over():
                now = time.monotonic()
                for node in list(state.nodes.values()):
                    if node.alive and now - node.last_heartbeat > ft.heartbeat_timeout_s:
                        silent = now - node.last_heartbeat
                        state.lose_node(node, f"node {node.name} lost: no heartbeat for {silent:.2f} s")
                state.lock.wait(ft.heartbeat_interval_s)

    def _known_node(self, name: str, context: grpc.ServicerContext) -> Node:
        node = self.state.nodes.get(name)
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
