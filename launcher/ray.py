"""The Ray launcher: the master in this process (the Ray driver), one agent per node of a Ray cluster.

:func:`run` is what ``oobleck run`` calls with ``cluster.launcher: ray``; it keeps the contract of
:func:`launcher.local.run`. With ``cluster.ray_address`` set (``HOST:PORT`` of the head's GCS, or ``auto``)
it connects to that cluster; without one it starts a throwaway Ray cluster of ``cluster.nodes`` nodes on this
machine (``ray.cluster_utils.Cluster``, on loopback when this process is the first to import Ray) and shuts
it down at the end. A process already connected to Ray (``ray.init`` called before) keeps its connection.

Placement: every node is a Ray node. The launcher pins one :class:`_AgentActor` to each node it uses
(``NodeAffinitySchedulingStrategy``, hard), reserving ``cluster.devices_per_node`` GPUs when the job runs on
CUDA (Ray then sets the actor's ``CUDA_VISIBLE_DEVICES``, which the agent and its workers inherit) or up to
``devices_per_node`` CPUs otherwise. A Ray node that cannot hold that (e.g. a head started with
``--num-cpus 0``, or a CPU-only node in a CUDA job) is not used. The actor starts the existing agent
(``python -m oobleck.control.agent``) as a child process that dies with the actor (PR_SET_PDEATHSIG), and
the agent's workers die with the agent, so a Ray node's death (or ``ray.kill`` of the actor) is the death of
the node's agent and workers: the master sees the agent's stream break, and this process sees the actor die
and reports it to the master at once (``Master.node_exited``).

Node names: ``node0, node1, ...`` in the order the launcher takes the Ray nodes: the driver's own Ray node
first (when it can hold an agent), then the others by IP address and Ray node id; nodes that join later get
the next numbers. ``RUN/ray_nodes.json`` maps each name to its Ray node id and IP address. So ``faults:``
(which name nodes by index) work on Ray as they do locally.

Membership: a Ray node that appears in the cluster after training started (``ray.nodes()`` is polled every
:data:`POLL_S` seconds) gets an agent and joins the job. Nodes that were alive at the start but not needed
(more than ``cluster.nodes``) stay spare: ``oobleck inject RUN --add NAME`` (and ``trace:`` replay) start
agents on spare nodes, and a node whose agent died (an injected kill) becomes spare again. With a trace
the replay alone decides membership (new Ray nodes do not join by themselves).

Addresses: the master binds ``cluster.master_host``; when that is left at its default (loopback) and some
Ray node is not on loopback, it binds the driver's node IP address (``ray.util.get_node_ip_address()``), which
the agents and workers then use for the control plane and the TCPStore. Each agent gets the job's token
(and, with TLS on, the master's certificate, never its key) as an actor argument and writes it to a private
file (mode 0600 in a 0700 directory) on its node. Unless set
already, ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` are set to the interface that carries the Ray
node's IP address, so that torch.distributed uses the same network as Ray. Paths in the config (run
directory, data) are made absolute; the run directory must be on a filesystem every node shares
(checkpoints and logs are written there).

Bad input (an unreachable ``cluster.ray_address``, fewer usable Ray nodes than ``cluster.nodes``, an agent
that Ray cannot place) raises :class:`oobleck.errors.OobleckError` with one line; every process and actor
started here is gone when :func:`run` returns or raises.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from launcher.local import (
    AGENT_EXIT_S,
    AGENT_GRACE_S,
    LOG_DIR,
    job_token,
    last_line,
    supervise,
    trace_schedule,
)
from oobleck.config import ClusterConfig, JobConfig
from oobleck.control.master import Master, Planner, RecoveryRecord, StepRecord, describe_exit
from oobleck.control.procs import child_env, stop_group
from oobleck.control.run_files import write_control_file
from oobleck.control.tls import write_cert
from oobleck.devices import wants_cuda
from oobleck.errors import OobleckError
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent, peak_nodes

#: seconds between looks at the Ray cluster's node list (new nodes join the job)
POLL_S = 0.5
#: seconds Ray gets to place an agent actor and start its agent process
PLACE_TIMEOUT_S = 60.0
#: seconds to wait for a TCP connection to the Ray address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0
#: how long one call to an agent actor blocks waiting for its agent to exit
WAIT_POLL_S = 1.0
#: seconds an agent gets to stop its workers after its actor died, before the guard kills it (SIGKILL)
GUARD_GRACE_S = 10.0
#: RUN/ray_nodes.json: node name -> Ray node id and IP address
NODES_FILE = "ray_nodes.json"
#: environment defaults for the Ray cluster this launcher starts itself (set only where unset, and the
#: first only when Ray is not imported yet: Ray reads it at import)
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

log = logging.getLogger(__name__)


def run(
    config: JobConfig,
    planner: Planner,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
) -> list[StepRecord]:
    """Run ``config`` on ``cluster.nodes`` nodes of a Ray cluster and return the committed steps' records
    (see the module notes and :func:`launcher.local.run`)."""
    phase = on_phase or (lambda text: None)
    config = _absolute_paths(config)
    run_dir = Path(config.run.dir)
    log_dir = run_dir / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    schedule = trace_schedule(config)
    names = [e.node for e in schedule if e.at_s == 0] if schedule else [node_name(i) for i in range(config.cluster.nodes)]
    if schedule:
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, nodes=len(names)))
    cuda = wants_cuda(config.cluster.device, visible_here=False)
    session = RaySession.open(config, cuda, local_nodes=peak_nodes(schedule) if schedule else len(names), phase=phase)
    try:
        usable, alive = session.usable_nodes(cuda, config.cluster.devices_per_node)
        if len(usable) < len(names):
            raise OobleckError(
                f"cluster.nodes: the job needs {len(names)} nodes but the Ray cluster at {session.address} has "
                f"{len(usable)} alive nodes that can hold an agent ({_need_text(cuda, config.cluster.devices_per_node)}) "
                f"of {len(alive)} alive; add Ray nodes or lower cluster.nodes"
            )
        chosen = usable[: len(names)]
        host = _master_host(config.cluster.master_host, chosen, session.driver_ip)
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, master_host=host))
        return _run_job(config, planner, names, chosen, alive, schedule, session, cuda, log_dir, on_step, phase, on_recovery)
    finally:
        session.close()


def _run_job(
    config: JobConfig,
    planner: Planner,
    names: list[str],
    chosen: list[dict[str, Any]],
    alive: list[dict[str, Any]],
    schedule: list[TraceEvent],
    session: "RaySession",
    cuda: bool,
    log_dir: Path,
    on_step: Callable[[StepRecord], None] | None,
    phase: Callable[[str], None],
    on_recovery: Callable[[RecoveryRecord], None] | None,
) -> list[StepRecord]:
    run_dir = Path(config.run.dir)
    training = threading.Event()

    def step(record: StepRecord) -> None:
        training.set()
        if on_step is not None:
            on_step(record)

    with job_token() as (token, token_file):
        master = Master(config, token, planner, on_step=step, on_recovery=on_recovery)

        def start(address: str) -> RayCluster:
            cluster = RayCluster(master, address, token, config, log_dir, cuda, session, training, phase)
            cert_file = write_cert(token_file.parent, master.cert_pem) if master.cert_pem else None
            cluster.known(alive)
            write_control_file(run_dir, address, token_file, cert_file)
            phase(f"master at {address}{' (TLS)' if cert_file else ''}; starting {len(names)} agents on the Ray cluster at {session.address}")
            cluster.start(list(zip(names, chosen)))
            if not schedule:
                cluster.follow_new_nodes()
            return cluster

        return supervise(master, start, schedule, phase, log_dir)


# ---------------------------------------------------------------------------------------------------
# The Ray connection


class RaySession:
    """This process's connection to a Ray cluster, and the local cluster when the launcher started one."""

    def __init__(self, address: str, local: Any = None, connected: bool = False) -> None:
        self.address = address
        #: the ray.cluster_utils.Cluster started for this job (None when connected to an existing cluster)
        self.local = local
        #: whether this session called ray.init (and so calls ray.shutdown)
        self.connected = connected
        self.driver_ip = ""
        self.driver_node = ""

    @classmethod
    def open(cls, config: JobConfig, cuda: bool, local_nodes: int, phase: Callable[[str], None]) -> "RaySession":
        """Connect to ``cluster.ray_address`` (or start a local cluster of ``local_nodes`` nodes)."""
        address = config.cluster.ray_address
        if address is None and "ray" not in sys.modules:
            for key, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(key, value)
        import ray

        if ray.is_initialized():
            session = cls(_gcs_address(ray) or "the connected Ray cluster")
        elif address is None:
            session = cls._start_local(config, cuda, local_nodes, phase)
        else:
            _check_reachable(address)
            session = cls(address)
            session._init(address)
        try:
            session.driver_ip = ray.util.get_node_ip_address()
            session.driver_node = ray.get_runtime_context().get_node_id()
        except BaseException:
            session.close()
            raise
        return session

    @classmethod
    def _start_local(cls, config: JobConfig, cuda: bool, nodes: int, phase: Callable[[str], None]) -> "RaySession":
        from ray.cluster_utils import Cluster

        devices = config.cluster.devices_per_node
        if cuda and nodes > 1:
            raise OobleckError(
                "cluster.ray_address: not set, so the ray launcher would start a Ray cluster on this machine, "
                f"which cannot split its GPUs among {nodes} nodes; start Ray nodes (ray start) and set "
                "cluster.ray_address (--address), or use device cpu"
            )
        resources = {"num_cpus": devices, "num_gpus": devices if cuda else 0}
        phase(f"starting a Ray cluster of {nodes} nodes on this machine")
        local = Cluster(initialize_head=False, shutdown_at_exit=True)
        session = cls("", local)
        try:
            local.add_node(include_dashboard=False, **resources)
            for _ in range(nodes - 1):
                local.add_node(**resources)
            session.address = local.address
            session._init(local.address)
        except BaseException:
            session.close()
            raise
        return session

    def _init(self, address: str) -> None:
        import ray

        # ray.init replaces the SIGTERM handler (with sys.exit); keep the caller's
        previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        except Exception as e:
            raise OobleckError(
                f"cluster.ray_address: cannot connect to the Ray cluster at {address} ({type(e).__name__}: "
                f"{_first_line(e)}); start it with `ray start --head` or fix the address"
            ) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.connected = True

    def usable_nodes(self, cuda: bool, devices: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the alive Ray nodes that can hold an agent in placement order, every alive Ray node)."""
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        usable = [n for n in alive if _fits(n, cuda, devices)]
        usable.sort(key=lambda n: (n["NodeID"] != self.driver_node, _ip_key(n["NodeManagerAddress"]), n["NodeID"]))
        return usable, alive

    def close(self) -> None:
        """Disconnect (when this session connected) and stop the local cluster (when it started one)."""
        import ray

        if self.connected:
            ray.shutdown()
            self.connected = False
        if self.local is not None:
            try:
                self.local.shutdown()
            finally:
                self.local = None


def _gcs_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return ""


def _check_reachable(address: str) -> None:
    """Fail fast (one line) when ``address``'s host:port takes no TCP connection; ray.init would retry for
    minutes. ``auto`` and addresses without a port are left to Ray."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise OobleckError(f"cluster.ray_address: got {address!r}; use HOST:PORT of the Ray head (port 6379 by default) or auto")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise OobleckError(
            f"cluster.ray_address: cannot reach the Ray cluster at {address} ({why}); "
            "start it with `ray start --head` or fix the address"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def _fits(node: dict[str, Any], cuda: bool, devices: int) -> bool:
    resources = node.get("Resources", {})
    if cuda:
        return resources.get("GPU", 0) >= devices
    return resources.get("CPU", 0) >= 1


def _actor_resources(node: dict[str, Any], cuda: bool, devices: int) -> dict[str, float]:
    if cuda:
        return {"num_gpus": devices, "num_cpus": 0}
    return {"num_cpus": min(devices, node.get("Resources", {}).get("CPU", 0))}


def _need_text(cuda: bool, devices: int) -> str:
    return f"{devices} GPUs each" if cuda else "at least 1 CPU each"


def _ip_key(ip: str) -> tuple[int, Any]:
    try:
        return (0, ipaddress.ip_address(ip))
    except ValueError:
        return (1, ip)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _master_host(configured: str, nodes: list[dict[str, Any]], driver_ip: str) -> str:
    """The address the master binds: the configured one, unless it is the loopback default and some node is
    elsewhere; then the driver's node IP address (which every Ray node reaches)."""
    if configured != ClusterConfig().master_host:
        return configured
    if all(_is_loopback(n["NodeManagerAddress"]) for n in nodes):
        return configured
    return driver_ip


def _absolute_paths(config: JobConfig) -> JobConfig:
    """The config with its relative paths made absolute: workers run in other directories (and machines)."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().absolute())

    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, dir=absolute(config.run.dir)),
        data=dataclasses.replace(config.data, path=absolute(config.data.path)),
        model=dataclasses.replace(config.model, init_checkpoint=absolute(config.model.init_checkpoint)),
        profile=dataclasses.replace(config.profile, cache_dir=absolute(config.profile.cache_dir)),
    )


# ---------------------------------------------------------------------------------------------------
# The job's nodes


@dataclasses.dataclass
class _Agent:
    name: str
    node_id: str
    ip: str
    actor: Any
    #: whether the agent started with the job (its death before registering fails the job)
    initial: bool
    token_dir: str = ""
    exit_code: int | None = None
    #: killed through :meth:`RayCluster.kill_node`, which has told the master already
    killed: bool = False
    watcher: threading.Thread | None = None


class RayCluster:
    """The agents of one job on a Ray cluster: node ``name`` is an agent actor pinned to one Ray node."""

    def __init__(
        self,
        master: Master,
        address: str,
        token: str,
        config: JobConfig,
        log_dir: Path,
        cuda: bool,
        session: RaySession,
        training: threading.Event,
        phase: Callable[[str], None],
    ) -> None:
        import ray

        self._ray = ray
        self.master = master
        self.address = address
        self.config = config
        self.log_dir = log_dir
        self.cuda = cuda
        self.session = session
        self._token = token
        self._training = training
        self._phase = phase
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._all: list[_Agent] = []
        #: Ray node ids the launcher has looked at (new ones join the job)
        self._seen: set[str] = set()
        self._next_index = 0
        self._closing = threading.Event()
        self._follower: threading.Thread | None = None
        self._remote = ray.remote(max_restarts=0, max_concurrency=1)(_AgentActor)

    # -- public: the launcher's node operations -------------------------------------------------

    def known(self, nodes: list[dict[str, Any]]) -> None:
        """Nodes alive at the start: they never join by themselves (unused ones stay spare)."""
        with self._lock:
            self._seen.update(node["NodeID"] for node in nodes)

    def start(self, placed: list[tuple[str, dict[str, Any]]]) -> None:
        """Start the first agents (``(name, Ray node)`` pairs) and wait until Ray placed every one of them;
        OobleckError naming the nodes Ray could not place."""
        agents = [self._launch(name, node, initial=True) for name, node in placed]
        self._await_started(agents)

    def add_node(self, name: str, node: dict[str, Any] | None = None) -> None:
        """Start node ``name``'s agent on ``node`` (default: a spare Ray node); it registers with the master
        (joining a running job). OobleckError when no Ray node is spare."""
        if node is None:
            node = self._spare_node()
        agent = self._launch(name, node, initial=False)
        self._await_started([agent])

    def kill_node(self, name: str) -> None:
        """Kill node ``name`` like a machine dies: ``ray.kill`` of its agent actor (the agent and its workers
        die with the actor's process). Its Ray node becomes spare."""
        with self._lock:
            agent = self._agents.pop(name, None)
        if agent is None:
            return
        agent.killed = True
        self._ray.kill(agent.actor, no_restart=True)
        self.master.node_exited(name, -signal.SIGKILL)  # at once, so that the name can join again right away

    def follow_new_nodes(self) -> None:
        """Start an agent on every Ray node that appears from now on, once training has started."""
        self._follower = threading.Thread(target=self._follow, name="ray-new-nodes", daemon=True)
        self._follower.start()

    def close(self) -> None:
        """Wait for every agent to exit (they stop when the master does), force those that do not, and end
        every actor started here."""
        self._closing.set()
        if self._follower is not None:
            self._follower.join()
        with self._lock:
            agents = list(self._all)
        ray = self._ray
        pending = {}
        for agent in agents:
            if agent.exit_code is None:
                try:
                    pending[agent.name] = agent.actor.stop.remote(AGENT_EXIT_S, AGENT_GRACE_S)
                except Exception:
                    pass
        if pending:
            try:
                ray.wait(list(pending.values()), num_returns=len(pending), timeout=AGENT_EXIT_S + AGENT_GRACE_S + 5)
            except Exception:
                pass
        for agent in agents:
            try:
                ray.kill(agent.actor, no_restart=True)
            except Exception:
                pass
        for agent in agents:
            if agent.watcher is not None:
                agent.watcher.join(WAIT_POLL_S + 5)
            # a killed actor leaves its token directory behind; remove the ones on this machine
            if agent.token_dir and agent.ip == self.session.driver_ip:
                shutil.rmtree(agent.token_dir, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------------

    def _launch(self, name: str, node: dict[str, Any], initial: bool) -> _Agent:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id, ip = node["NodeID"], node["NodeManagerAddress"]
        devices = self.config.cluster.devices_per_node
        with self._lock:
            if self._closing.is_set():
                raise OobleckError(f"node {name}: the job is stopping")
            if name in self._agents:
                raise OobleckError(f"node {name}: already runs (on Ray node {self._agents[name].node_id[:8]})")
            busy = {a.node_id for a in self._agents.values()}
            if node_id in busy:
                raise OobleckError(f"node {name}: Ray node {node_id[:8]} already runs an agent of this job")
            on_host = 1 + sum(a.ip == ip for a in self._agents.values())
            self._next_index = max(self._next_index, _index_of(name) + 1)
        argv = [
            "-m", "oobleck.control.agent",
            "--master", self.address, "--node", name, "--devices", str(devices),
            "--log-dir", str(self.log_dir),
        ]  # fmt: skip
        extra: dict[str, str] = {}
        if "OMP_NUM_THREADS" in os.environ:  # the user's choice, made where the job was started
            extra["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        actor = self._remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **_actor_resources(node, self.cuda, devices),
        ).remote(
            argv=argv,
            token=self._token,
            cert=self.master.cert_pem,
            env=extra,
            workers_on_host=on_host * devices,
            node_ip=ip,
            cwd=os.getcwd(),
            pythonpath=str(Path(__file__).resolve().parents[1]),
            log_path=str(self.log_dir / f"agent-{name}.log"),
        )
        agent = _Agent(name, node_id, ip, actor, initial)
        with self._lock:
            self._agents[name] = agent
            self._all.append(agent)
            self._seen.add(node_id)
        self._write_nodes_file()
        return agent

    def _await_started(self, agents: list[_Agent]) -> None:
        ray = self._ray
        refs = {agent.name: agent.actor.started.remote() for agent in agents}
        deadline = time.monotonic() + PLACE_TIMEOUT_S
        ready: list[Any] = []
        while len(ready) < len(refs) and time.monotonic() < deadline and not self._closing.is_set():
            # in short waits: a job that ends meanwhile need not wait for a node that is still starting
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))
        failed: list[str] = []
        for agent in agents:
            ref = refs[agent.name]
            if ref not in ready:
                late = "the job is stopping" if self._closing.is_set() else f"was not placed within {PLACE_TIMEOUT_S:g} s"
                failed.append(f"{agent.name} on Ray node {agent.node_id[:8]} ({agent.ip}) {late}")
                continue
            try:
                info = ray.get(ref)
            except Exception as e:
                failed.append(f"{agent.name} on Ray node {agent.node_id[:8]} ({agent.ip}) failed to start: {_cause(e)}")
                continue
            agent.token_dir = info["token_dir"]
        if failed:
            for agent in agents:
                self._forget(agent)
                ray.kill(agent.actor, no_restart=True)
            raise OobleckError(f"ray launcher: agent {'; '.join(failed)}; check the Ray nodes' free resources ({_need_text(self.cuda, self.config.cluster.devices_per_node)})")
        for agent in agents:
            agent.watcher = threading.Thread(target=self._watch, args=(agent,), name=f"ray-agent-{agent.name}", daemon=True)
            agent.watcher.start()

    def _forget(self, agent: _Agent) -> None:
        with self._lock:
            if self._agents.get(agent.name) is agent:
                del self._agents[agent.name]

    def _watch(self, agent: _Agent) -> None:
        """An agent that exits (or whose actor dies with its Ray node) is a lost node to the master; an
        initial agent that dies before it registered fails the job, quoting the last line it wrote."""
        ray = self._ray
        died = False
        code: int | None = None
        while code is None:
            try:
                code = ray.get(agent.actor.wait.remote(WAIT_POLL_S))
            except ray.exceptions.ActorUnavailableError:
                if self._closing.wait(0.2):
                    died = True
                    break
            except Exception:  # ActorDiedError (the node or the actor was killed) or a lost connection
                died = True
                break
        agent.exit_code = -signal.SIGKILL if died else code
        self._forget(agent)
        if not died:
            try:
                ray.kill(agent.actor, no_restart=True)  # free the node's resources: it is spare now
            except Exception:
                pass
        if self._closing.is_set() or agent.killed:
            return  # the name may already belong to a new agent (a trace re-adds killed nodes)
        registered = self.master.node_exited(agent.name, agent.exit_code)
        what = "its Ray actor died (Ray node removed or actor killed)" if died else f"it {describe_exit(agent.exit_code)}"
        if not registered and agent.exit_code != 0:
            message = f"agent {agent.name} on Ray node {agent.node_id[:8]} ({agent.ip}): {what}: {last_line(self.log_dir / f'agent-{agent.name}.log')}"
            if agent.initial:
                self.master.abort(message)
            else:
                self._phase(f"joining node failed: {message}")
        elif self._training.is_set():
            log.warning("node %s (Ray node %s): %s", agent.name, agent.node_id[:8], what)

    def _spare_node(self) -> dict[str, Any]:
        ray = self._ray
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        with self._lock:
            busy = {a.node_id for a in self._agents.values()}
        devices = self.config.cluster.devices_per_node
        spare = [n for nid, n in alive.items() if nid not in busy and _fits(n, self.cuda, devices)]
        if not spare:
            raise OobleckError(
                f"no spare Ray node: all {len(alive)} alive Ray nodes run an agent of this job or cannot hold one "
                f"({_need_text(self.cuda, devices)}); add a Ray node (ray start --address ...) and it joins by itself"
            )
        spare.sort(key=lambda n: (_ip_key(n["NodeManagerAddress"]), n["NodeID"]))
        return spare[0]

    def _follow(self) -> None:
        ray = self._ray
        devices = self.config.cluster.devices_per_node
        while not self._closing.wait(POLL_S):
            if not self._training.is_set():
                continue  # the master takes joining nodes only once the job runs
            try:
                nodes = [n for n in ray.nodes() if n.get("Alive")]
            except Exception:
                continue
            for node in nodes:
                node_id = node["NodeID"]
                with self._lock:
                    if node_id in self._seen:
                        continue
                    self._seen.add(node_id)
                    name = node_name(self._next_index)
                if not _fits(node, self.cuda, devices):
                    self._phase(f"Ray node {node_id[:8]} ({node['NodeManagerAddress']}) joined the cluster but cannot hold an agent ({_need_text(self.cuda, devices)})")
                    continue
                self._phase(f"Ray node {node_id[:8]} ({node['NodeManagerAddress']}) joined the cluster: starting {name}")
                try:
                    self.add_node(name, node)
                except Exception as e:  # the node went away again, or Ray could not place the agent
                    self._phase(f"node {name} could not join: {_first_line(e)}")
                if self._closing.is_set():
                    return

    def _write_nodes_file(self) -> None:
        with self._lock:
            table = {a.name: {"ray_node_id": a.node_id, "ip": a.ip} for a in self._all}
        path = Path(self.config.run.dir) / NODES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)


def _index_of(name: str) -> int:
    """3 for ``node3``; -1 for names of another form."""
    return int(name[4:]) if name.startswith("node") and name[4:].isdigit() else -1


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    return _first_line(cause) if not isinstance(cause, OobleckError) else str(cause)


# ---------------------------------------------------------------------------------------------------
# The actor (runs in a Ray worker process on the node)


class _AgentActor:
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
