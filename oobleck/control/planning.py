"""The master's planner: the job's profile (measured once, cached on disk) and the planner's pipelines
for the registered nodes, as :class:`~oobleck.control.placement.PipelineShape` lists."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from oobleck.cluster_spec import cluster_spec
from oobleck.config import JobConfig
from oobleck.control.policy import Planner
from oobleck.control.placement import PipelineShape
from planner.errors import PlanningError
from planner.homogeneous import HomogeneousPlan, best_homogeneous, redundant_profile
from planner.plan import Plan, make_plan
from planner.profile import ModelProfile
from planner.local_step import StepCosts, local_step_time
from planner.templates import PipelineTemplate, build_templates


def local_step_costs(config: JobConfig, profile: ModelProfile) -> StepCosts:
    """What a local run of ``config`` planned from ``profile`` pays per step beyond the profile
    (:func:`oobleck.engine.step_costs.job_step_costs`), with the cores its control plane's heartbeats keep
    busy when the workers share this machine's cores (:mod:`oobleck.control.heartbeat_load`)."""
    from oobleck.control.heartbeat_load import heartbeat_cores
    from oobleck.engine.step_costs import job_step_costs
    from oobleck.shared_cores import local_workers

    costs = job_step_costs(config, profile)
    if math.isinf(costs.cores):
        return costs
    load = heartbeat_cores(config.cluster.nodes, local_workers(config), config.fault_tolerance.heartbeat_interval_s)
    # bounded, so that a freak measurement cannot leave the workers without cores
    return replace(costs, busy_cores=min(load.cores, costs.cores / 2))


def shape(template: PipelineTemplate, count: int, step_s: float) -> PipelineShape:
    """A pipeline of ``template`` running ``count`` microbatches, with the stages' recomputation, their
    predicted peak memory and the job's predicted local step time ``step_s``."""
    return PipelineShape(
        layer_ranges=template.layer_ranges,
        num_microbatches=count,
        recompute=template.recompute,
        predicted_bytes=tuple(int(b) for b in template.stage_memory(count)),
        predicted_step_s=step_s,
    )


def shapes(plan: Plan, costs: StepCosts) -> list[PipelineShape]:
    """The plan's pipelines in plan order, with its local step time predicted for steps that cost ``costs``."""
    step_s = plan.local_step_time_s(costs)
    return [shape(template, count, step_s) for template, count in plan.instantiation.pipelines]


def job_planner(config: JobConfig, log: Callable[[str], None] | None = None) -> Planner:
    """Profile ``config``'s model (reusing a matching cached profile) and plan the full cluster now, so
    that an impossible job fails before any process starts (PlanningError); the returned planner gives
    that plan for ``cluster.nodes`` nodes and replans from the same templates for any other count.

    The baselines plan homogeneous pipelines (:mod:`planner.homogeneous`): Varuna-style on the plain
    profile's templates, Bamboo-style on its redundant profile's, two nodes deep at least (a stage's shadow
    lives on the next node)."""
    from oobleck.profiler import ensure_profile

    t = config.training
    profile = ensure_profile(config, log=log)
    costs = local_step_costs(config, profile)
    policy = config.fault_tolerance.policy
    if policy != "oobleck":
        return _homogeneous_planner(config, profile, costs, log)
    full = make_plan(
        profile, cluster_spec(config.cluster), config.fault_tolerance.f, t.global_batch, t.microbatch, t.recompute
    )
    if log is not None:
        sizes = "+".join(str(template.num_nodes) for template, _ in full.instantiation.pipelines)
        log(f"plan: {len(full.instantiation.pipelines)} pipelines of {sizes} nodes, n0={full.n0}")

    def plan(nodes: list[str]) -> list[PipelineShape]:
        return shapes(full if len(nodes) == full.cluster.nodes else full.replan(len(nodes)), costs)

    return plan


def _homogeneous_planner(
    config: JobConfig, profile: ModelProfile, costs: StepCosts, log: Callable[[str], None] | None
) -> Planner:
    policy = config.fault_tolerance.policy
    microbatches = config.training.global_batch // config.training.microbatch
    recompute = config.training.recompute
    if policy == "bamboo":
        # the shadow's memory: its copies (the redundant profile) and the carries its queued forwards keep
        cluster = cluster_spec(config.cluster)
        redundant = build_templates(redundant_profile(profile), cluster, 0, recompute, holds_sent_carry=True)
        templates = {d: t for d, t in redundant.items() if d >= 2}
    else:
        templates = build_templates(profile, cluster_spec(config.cluster), 0, recompute)

    def choose(count: int) -> HomogeneousPlan:
        best = best_homogeneous(templates, count, microbatches)
        if best is None:
            smallest = min(templates, default=config.cluster.nodes + 1)
            raise PlanningError(f"{policy}: {count} nodes are fewer than the {smallest} its shallowest pipeline needs")
        return best

    full = choose(config.cluster.nodes)
    if log is not None:
        log(f"plan ({policy}): {full.replicas} pipelines of {full.depth} nodes, {config.cluster.nodes - full.nodes_used} idle")

    def plan(nodes: list[str]) -> list[PipelineShape]:
        best = full if len(nodes) == config.cluster.nodes else choose(len(nodes))
        step_s = local_step_time([(best.template, m) for m in best.microbatches], costs)
        return [shape(best.template, m, step_s) for m in best.microbatches]

    return plan
