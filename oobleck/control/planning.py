"""The master's planner: the job's profile (measured once, cached on disk) and the planner's pipelines
for the registered nodes, as :class:`~oobleck.control.placement.PipelineShape` lists."""

from __future__ import annotations

from typing import Callable

from oobleck.config import JobConfig
from oobleck.control.master import Planner
from oobleck.control.placement import PipelineShape
from planner.cluster import ClusterSpec
from planner.plan import Plan, make_plan

GIB = 1024**3
#: the config gives bandwidths in GB/s; the planner wants bytes per second
GB = 1e9


def cluster_spec(config: JobConfig) -> ClusterSpec:
    """The planner's view of the configured cluster."""
    c = config.cluster
    return ClusterSpec(
        nodes=c.nodes,
        devices_per_node=c.devices_per_node,
        device_memory_bytes=c.device_memory_gib * GIB,
        intra_node_bandwidth=c.intra_node_bandwidth_gbps * GB,
        inter_node_bandwidth=c.inter_node_bandwidth_gbps * GB,
    )


def shapes(plan: Plan) -> list[PipelineShape]:
    """The plan's pipelines in plan order."""
    return [
        PipelineShape(layer_ranges=template.layer_ranges, num_microbatches=count)
        for template, count in plan.instantiation.pipelines
    ]


def job_planner(config: JobConfig, log: Callable[[str], None] | None = None) -> Planner:
    """Profile ``config``'s model (reusing a matching cached profile) and plan the full cluster now, so
    that an impossible job fails before any process starts (PlanningError); the returned planner gives
    that plan for ``cluster.nodes`` nodes and replans from the same templates for any other count."""
    from oobleck.profiler import ensure_profile

    t = config.training
    full = make_plan(ensure_profile(config, log=log), cluster_spec(config), config.fault_tolerance.f, t.global_batch, t.microbatch)
    if log is not None:
        sizes = "+".join(str(template.num_nodes) for template, _ in full.instantiation.pipelines)
        log(f"plan: {len(full.instantiation.pipelines)} pipelines of {sizes} nodes, n0={full.n0}")

    def plan(nodes: list[str]) -> list[PipelineShape]:
        return shapes(full if len(nodes) == full.cluster.nodes else full.replan(len(nodes)))

    return plan
