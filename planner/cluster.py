"""The cluster as the planner sees it: node count, devices per node, device memory and link bandwidths."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.errors import PlanningError


@dataclass(frozen=True)
class ClusterSpec:
    """``nodes`` nodes of ``devices_per_node`` devices each.

    ``device_memory_bytes``: memory of one device. Bandwidths are in bytes per second, one direction:
    ``intra_node_bandwidth`` between two devices of one node, ``inter_node_bandwidth`` across nodes.
    Construction raises :class:`PlanningError` naming the bad field.
    """

    nodes: int
    devices_per_node: int
    device_memory_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanningError(f"cluster {name}: got {value!r}; must be an integer >= 1")
        for name in ("device_memory_bytes", "intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise PlanningError(f"cluster {name}: got {value!r}; must be a positive number")

    def with_nodes(self, nodes: int) -> "ClusterSpec":
        """The same kind of cluster with a different node count (survivors after failures)."""
        return ClusterSpec(nodes, self.devices_per_node, self.device_memory_bytes, self.intra_node_bandwidth, self.inter_node_bandwidth)
