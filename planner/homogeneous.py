"""Homogeneous plans, as the Varuna-style and Bamboo-style baselines run: one pipeline depth for all
pipelines, the batch split as evenly as it goes.

For ``nodes`` nodes, :func:`best_homogeneous` tries every depth ``d`` that has a template and
``r = min(nodes // d, microbatches)`` replicas, and keeps the one with the shortest step (ties: the
shallower depth, tried first). Nodes beyond ``d * r`` stay idle. Bamboo's cut is searched on
:func:`redundant_profile`, which accounts for its shadow copies and redundant forward passes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

from planner.profile import ModelProfile
from planner.templates import PipelineTemplate


@dataclass(frozen=True)
class HomogeneousPlan:
    """``replicas`` pipelines cut as ``template``; pipeline p runs ``microbatches[p]`` per step."""

    template: PipelineTemplate
    replicas: int
    microbatches: tuple[int, ...]
    step_time_s: float

    @property
    def depth(self) -> int:
        return self.template.num_nodes

    @property
    def nodes_used(self) -> int:
        return self.depth * self.replicas


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` in ``parts`` integers that differ by at most one, the larger first."""
    q, r = divmod(total, parts)
    return tuple(q + 1 if i < r else q for i in range(parts))


def best_homogeneous(
    templates: Mapping[int, PipelineTemplate],
    nodes: int,
    num_microbatches: int,
    step_time: Callable[[PipelineTemplate, int], float] | None = None,
) -> HomogeneousPlan | None:
    """The fastest homogeneous plan on ``nodes`` nodes (None when no template fits). ``step_time(template,
    m)`` costs one pipeline running m microbatches (default: the template's 1F1B iteration time); the step
    time of a plan is its most loaded pipeline's."""
    cost = step_time or (lambda template, m: template.iteration_time(m))
    best: HomogeneousPlan | None = None
    for depth, template in sorted(templates.items()):
        replicas = min(nodes // depth, num_microbatches)
        if replicas < 1:
            continue
        counts = even_split(num_microbatches, replicas)
        step = cost(template, counts[0])
        if best is None or step < best.step_time_s * (1 - 1e-12):
            best = HomogeneousPlan(template, replicas, counts, step)
    return best


def redundant_profile(profile: ModelProfile) -> ModelProfile:
    """The profile Bamboo's cut is searched on: every layer's forward runs twice (its own stage and, as
    redundant computation, its predecessor) and its parameters and optimizer state are held twice (the
    shadow copy on the predecessor)."""
    layers = tuple(
        dataclasses.replace(
            layer,
            forward_s=2 * layer.forward_s,
            param_bytes=2 * layer.param_bytes,
            optimizer_bytes=2 * layer.optimizer_bytes,
        )
        for layer in profile.layers
    )
    return ModelProfile(layers, {**profile.fingerprint, "bamboo_redundancy": True}, profile.device_fixed_bytes)
