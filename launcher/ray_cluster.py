"""The Ray launcher's nodes: :class:`RayCluster` pins one agent actor to each Ray node the job uses, watches
it, starts agents on nodes that join and on spare nodes (``oobleck inject --add``), and ends them all."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from launcher.job import AGENT_EXIT_S, AGENT_GRACE_S, NodeContext
from launcher.ray_actor import AgentActor
from launcher.ray_nodes import actor_resources, fits, ip_key, need_text
from launcher.ray_session import RaySession, first_line
from oobleck.control.master import describe_exit
from oobleck.control.procs import last_line
from oobleck.errors import OobleckError
from oobleck.nodes import node_name

#: seconds between looks at the Ray cluster's node list (new nodes join the job)
POLL_S = 0.5
#: seconds Ray gets to place an agent actor and start its agent process
PLACE_TIMEOUT_S = 60.0
#: how long one call to an agent actor blocks waiting for its agent to exit
WAIT_POLL_S = 1.0
#: RUN/ray_nodes.json: node name -> Ray node id and IP address
NODES_FILE = "ray_nodes.json"

log = logging.getLogger(__name__)


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
        job: NodeContext,
        token: str,
        cuda: bool,
        session: RaySession,
        training: threading.Event,
        phase: Callable[[str], None],
    ) -> None:
        import ray

        self._ray = ray
        self.job = job
        self.master = job.master
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
        self._remote = ray.remote(max_restarts=0, max_concurrency=1)(AgentActor)

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
        devices = self.job.config.cluster.devices_per_node
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
            "--master", self.job.address, "--node", name, "--devices", str(devices),
            "--log-dir", str(self.job.log_dir),
        ]  # fmt: skip
        extra: dict[str, str] = {}
        if "OMP_NUM_THREADS" in os.environ:  # the user's choice, made where the job was started
            extra["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        actor = self._remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **actor_resources(node, self.cuda, devices),
        ).remote(
            argv=argv,
            token=self._token,
            cert=self.master.cert_pem,
            env=extra,
            workers_on_host=on_host * devices,
            node_ip=ip,
            cwd=os.getcwd(),
            pythonpath=str(Path(__file__).resolve().parents[1]),
            log_path=str(self.job.log_dir / f"agent-{name}.log"),
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
            raise OobleckError(f"ray launcher: agent {'; '.join(failed)}; check the Ray nodes' free resources ({need_text(self.cuda, self.job.config.cluster.devices_per_node)})")
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
            message = f"agent {agent.name} on Ray node {agent.node_id[:8]} ({agent.ip}): {what}: {last_line(self.job.log_dir / f'agent-{agent.name}.log')}"
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
        devices = self.job.config.cluster.devices_per_node
        spare = [n for nid, n in alive.items() if nid not in busy and fits(n, self.cuda, devices)]
        if not spare:
            raise OobleckError(
                f"no spare Ray node: all {len(alive)} alive Ray nodes run an agent of this job or cannot hold one "
                f"({need_text(self.cuda, devices)}); add a Ray node (ray start --address ...) and it joins by itself"
            )
        spare.sort(key=lambda n: (ip_key(n["NodeManagerAddress"]), n["NodeID"]))
        return spare[0]

    def _follow(self) -> None:
        ray = self._ray
        devices = self.job.config.cluster.devices_per_node
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
                if not fits(node, self.cuda, devices):
                    self._phase(f"Ray node {node_id[:8]} ({node['NodeManagerAddress']}) joined the cluster but cannot hold an agent ({need_text(self.cuda, devices)})")
                    continue
                self._phase(f"Ray node {node_id[:8]} ({node['NodeManagerAddress']}) joined the cluster: starting {name}")
                try:
                    self.add_node(name, node)
                except Exception as e:  # the node went away again, or Ray could not place the agent
                    self._phase(f"node {name} could not join: {first_line(e)}")
                if self._closing.is_set():
                    return

    def _write_nodes_file(self) -> None:
        with self._lock:
            table = {a.name: {"ray_node_id": a.node_id, "ip": a.ip} for a in self._all}
        path = Path(self.job.config.run.dir) / NODES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)


def _index_of(name: str) -> int:
    """3 for ``node3``; -1 for names of another form."""
    return int(name[4:]) if name.startswith("node") and name[4:].isdigit() else -1


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    return first_line(cause) if not isinstance(cause, OobleckError) else str(cause)
