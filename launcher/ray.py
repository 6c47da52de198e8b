"""The Ray launcher: the master in this process (the Ray driver), one agent per node of a Ray cluster.

:func:`run` is what ``oobleck run`` calls with ``cluster.launcher: ray``; it keeps the contract of
:func:`launcher.local.run`. With ``cluster.ray_address`` set (``HOST:PORT`` of the head's GCS, or ``auto``)
it connects to that cluster; without one it starts a throwaway Ray cluster of ``cluster.nodes`` nodes on this
machine (``ray.cluster_utils.Cluster``, on loopback when this process is the first to import Ray) and shuts
it down at the end. A process already connected to Ray (``ray.init`` called before) keeps its connection.

Modules: this one is the driver (:func:`run`); :mod:`launcher.ray_session` the connection,
:mod:`launcher.ray_nodes` the choice of nodes, :mod:`launcher.ray_cluster` the job's agents and
:mod:`launcher.ray_actor` the actor on each node.

Placement: every node is a Ray node. The launcher pins one :class:`~launcher.ray_actor.AgentActor` to each node it uses
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
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.job import Callbacks, JobStart, NodeContext, job_start, job_token, supervise
from launcher.ray_cluster import RayCluster
from launcher.ray_nodes import master_host, need_text
from launcher.ray_session import RaySession
from oobleck.config import JobConfig
from oobleck.control.master import Master
from oobleck.control.policy import Planner
from oobleck.control.records import StepRecord
from oobleck.control.run_files import write_control_file
from oobleck.control.tls import write_cert
from oobleck.devices import wants_cuda
from oobleck.errors import OobleckError
from oobleck.nodes import node_list
from oobleck.trace import peak_nodes

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 only
    from typing_extensions import Unpack


def run(config: JobConfig, planner: Planner, **callbacks: Unpack[Callbacks]) -> list[StepRecord]:
    """Run ``config`` on ``cluster.nodes`` nodes of a Ray cluster and return the committed steps' records
    (see the module notes and :func:`launcher.local.run`)."""
    job = job_start(_absolute_paths(config), callbacks.get("on_phase"))
    config, names = job.config, job.names
    cuda = wants_cuda(config.cluster.device, visible_here=False)
    session = RaySession.open(config, cuda, local_nodes=peak_nodes(job.schedule) if job.schedule else len(names), phase=job.phase)
    try:
        usable, alive = session.usable_nodes(cuda, config.cluster.devices_per_node)
        if len(usable) < len(names):
            raise OobleckError(
                f"cluster.nodes: the job needs {len(names)} nodes but the Ray cluster at {session.address} has "
                f"{len(usable)} alive nodes that can hold an agent ({need_text(cuda, config.cluster.devices_per_node)}) "
                f"of {len(alive)} alive; add Ray nodes or lower cluster.nodes"
            )
        chosen = usable[: len(names)]
        host = master_host(config.cluster.master_host, chosen, session.driver_ip)
        config = dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, master_host=host))
        return _run_job(dataclasses.replace(job, config=config), planner, chosen, alive, session, cuda, callbacks)
    finally:
        session.close()


def _run_job(
    job: JobStart,
    planner: Planner,
    chosen: list[dict[str, Any]],
    alive: list[dict[str, Any]],
    session: RaySession,
    cuda: bool,
    callbacks: Callbacks,
) -> list[StepRecord]:
    config = job.config
    training = threading.Event()
    on_step = callbacks.get("on_step")

    def step(record: StepRecord) -> None:
        training.set()
        if on_step is not None:
            on_step(record)

    with job_token() as (token, token_file):
        master = Master(config, token, planner, on_step=step, on_recovery=callbacks.get("on_recovery"))

        def start(address: str) -> RayCluster:
            cluster = RayCluster(NodeContext(master, address, config, job.log_dir), token, cuda, session, training, job.phase)
            cert_file = write_cert(token_file.parent, master.cert_pem) if master.cert_pem else None
            cluster.known(alive)
            write_control_file(Path(config.run.dir), address, token_file, cert_file)
            job.phase(
                f"master at {address}{' (TLS)' if cert_file else ''}; starting {len(job.names)} agents on the Ray cluster "
                f"at {session.address}: {node_list(job.names)}"
            )
            cluster.start(list(zip(job.names, chosen)))
            if not job.schedule:
                cluster.follow_new_nodes()
            return cluster

        return supervise(master, start, job)


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


