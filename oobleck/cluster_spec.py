"""The planner's view of a configured cluster: :class:`planner.cluster.ClusterSpec` from ``cluster:``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.cluster import ClusterSpec

if TYPE_CHECKING:
    from oobleck.config import ClusterConfig

#: bytes per GiB (``cluster.device_memory_gib``)
GIB = 2**30
#: bytes per GB (the config gives bandwidths in GB/s; the planner wants bytes per second)
GB = 10**9


def cluster_spec(cluster: ClusterConfig, nodes: int | None = None, devices_per_node: int | None = None) -> ClusterSpec:
    """``cluster`` in the planner's units (bytes, bytes per second); ``nodes`` and ``devices_per_node``, when
    given, replace the config's counts (the memory and bandwidths stay the config's)."""
    return ClusterSpec(
        nodes=cluster.nodes if nodes is None else nodes,
        devices_per_node=cluster.devices_per_node if devices_per_node is None else devices_per_node,
        device_memory_bytes=cluster.device_memory_gib * GIB,
        intra_node_bandwidth=cluster.intra_node_bandwidth_gbps * GB,
        inter_node_bandwidth=cluster.inter_node_bandwidth_gbps * GB,
    )
