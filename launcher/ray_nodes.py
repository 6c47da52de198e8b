"""The Ray launcher's choices about Ray nodes (pure functions of ``ray.nodes()`` entries): which nodes can
hold an agent, in what order the launcher takes them, what an agent actor reserves, and the address the
master binds."""

from __future__ import annotations

import ipaddress
from typing import Any

from oobleck.config import ClusterConfig


def fits(node: dict[str, Any], cuda: bool, devices: int) -> bool:
    resources = node.get("Resources", {})
    if cuda:
        return resources.get("GPU", 0) >= devices
    return resources.get("CPU", 0) >= 1


def actor_resources(node: dict[str, Any], cuda: bool, devices: int) -> dict[str, float]:
    if cuda:
        return {"num_gpus": devices, "num_cpus": 0}
    return {"num_cpus": min(devices, node.get("Resources", {}).get("CPU", 0))}


def need_text(cuda: bool, devices: int) -> str:
    return f"{devices} GPUs each" if cuda else "at least 1 CPU each"


def ip_key(ip: str) -> tuple[int, Any]:
    try:
        return (0, ipaddress.ip_address(ip))
    except ValueError:
        return (1, ip)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def master_host(configured: str, nodes: list[dict[str, Any]], driver_ip: str) -> str:
    """The address the master binds: the configured one, unless it is the loopback default and some node is
    elsewhere; then the driver's node IP address (which every Ray node reaches)."""
    if configured != ClusterConfig().master_host:
        return configured
    if all(_is_loopback(n["NodeManagerAddress"]) for n in nodes):
        return configured
    return driver_ip


def placement_order(nodes: list[dict[str, Any]], driver_node: str) -> list[dict[str, Any]]:
    """``nodes`` in the order the launcher takes them: the driver's own Ray node first, then by IP address
    and Ray node id."""
    return sorted(nodes, key=lambda n: (n["NodeID"] != driver_node, ip_key(n["NodeManagerAddress"]), n["NodeID"]))
