"""The Ray launcher's connection: :class:`RaySession` connects this process to a Ray cluster (or starts a
throwaway one on this machine) and lists its usable nodes."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable

from launcher.ray_nodes import fits, placement_order
from oobleck.config import JobConfig
from oobleck.errors import OobleckError

#: seconds to wait for a TCP connection to the Ray address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0
#: environment defaults for the Ray cluster this launcher starts itself (set only where unset, and the
#: first only when Ray is not imported yet: Ray reads it at import)
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


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
                f"{first_line(e)}); start it with `ray start --head` or fix the address"
            ) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.connected = True

    def usable_nodes(self, cuda: bool, devices: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the alive Ray nodes that can hold an agent in placement order, every alive Ray node)."""
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        usable = placement_order([n for n in alive if fits(n, cuda, devices)], self.driver_node)
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"
