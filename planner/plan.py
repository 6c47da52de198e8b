"""The plan of a job: templates, the pipelines instantiated from them and the batch each one runs.

:func:`make_plan` is the planner's entry point; :meth:`Plan.replan` is what recovery calls with the
surviving node count (the templates are kept, nothing is re-profiled).

Placement convention used by :meth:`Plan.layout`: the pipelines take the available nodes in order
(pipeline 0 the first ``n_0`` nodes, and so on), node j of a pipeline hosts its stages
``[j*G, (j+1)*G)``, and the global rank of device d of node position q is ``q*G + d``. Pipeline p runs the
step's global microbatches ``[microbatch_start, microbatch_start + num_microbatches)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.instantiate import Instantiation, instantiate
from planner.profile import ModelProfile, fingerprint_hash
from planner.local_step import StepCosts, local_step_time
from planner.templates import PipelineTemplate, build_templates


@dataclass(frozen=True)
class Plan:
    """A complete plan. ``degraded``: fewer than f+1 pipelines (too few nodes survived to keep the
    fault-tolerance guarantee; recovery's fallback)."""

    cluster: ClusterSpec
    f: int
    global_batch: int
    microbatch: int
    n0: int
    templates: dict[int, PipelineTemplate]
    instantiation: Instantiation
    profile_fingerprint: dict[str, Any]
    degraded: bool = False

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // self.microbatch

    @property
    def step_time_s(self) -> float:
        return self.instantiation.step_time_s

    @property
    def samples_per_s(self) -> float:
        return self.instantiation.samples_per_s(self.microbatch)

    def local_step_time_s(self, costs: StepCosts) -> float:
        """Predicted step time of a local run of this plan whose steps cost ``costs``
        (:func:`planner.local_step.local_step_time`)."""
        return local_step_time(self.instantiation.pipelines, costs)

    def replan(self, nodes: int) -> "Plan":
        """A plan for ``nodes`` surviving nodes from the same templates. With fewer than (f+1)*n0 nodes
        but at least n0 the plan is degraded (as many pipelines as fit, at least one)."""
        degraded = nodes < (self.f + 1) * self.n0
        if nodes < self.n0:
            raise PlanningError(
                f"{nodes} nodes left, fewer than n0={self.n0} that one pipeline needs; restore from a checkpoint "
                "and wait for nodes"
            )
        inst = instantiate(self.templates, nodes, self.f, self.num_microbatches, min_pipelines=1 if degraded else None)
        return Plan(
            self.cluster.with_nodes(nodes),
            self.f,
            self.global_batch,
            self.microbatch,
            self.n0,
            self.templates,
            inst,
            self.profile_fingerprint,
            degraded,
        )

    def layout(self) -> list[dict[str, Any]]:
        """Per pipeline: ``nodes`` (node positions), ``ranks``, ``layer_ranges`` (one per rank),
        ``microbatch_start`` and ``num_microbatches`` (see the module docstring)."""
        g = self.cluster.devices_per_node
        out = []
        node = 0
        start = 0
        for template, count in self.instantiation.pipelines:
            nodes = list(range(node, node + template.num_nodes))
            out.append(
                {
                    "nodes": nodes,
                    "ranks": [q * g + d for q in nodes for d in range(g)],
                    "layer_ranges": [list(r) for r in template.layer_ranges],
                    "microbatch_start": start,
                    "num_microbatches": count,
                }
            )
            node += template.num_nodes
            start += count
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything about the plan as JSON-able data (times in seconds, memory in bytes)."""
        c = self.cluster
        inst = self.instantiation
        pipelines = []
        for (template, count), placed in zip(inst.pipelines, self.layout()):
            pipelines.append(
                {
                    **placed,
                    "num_nodes": template.num_nodes,
                    "iteration_time_s": template.iteration_time(count),
                    "stage_memory_bytes": template.stage_memory(count),
                    "stage_recompute": list(template.recompute),
                }
            )
        return {
            "cluster": {
                "nodes": c.nodes,
                "devices_per_node": c.devices_per_node,
                "device_memory_bytes": c.device_memory_bytes,
                "intra_node_bandwidth": c.intra_node_bandwidth,
                "inter_node_bandwidth": c.inter_node_bandwidth,
            },
            "f": self.f,
            "global_batch": self.global_batch,
            "microbatch": self.microbatch,
            "num_microbatches": self.num_microbatches,
            "n0": self.n0,
            "profile": {"fingerprint": self.profile_fingerprint, "fingerprint_hash": fingerprint_hash(self.profile_fingerprint)},
            "templates": [_template_dict(t) for _, t in sorted(self.templates.items())],
            "pipelines": pipelines,
            "idle_nodes": inst.idle_nodes,
            "degraded": self.degraded,
            "step_time_s": inst.step_time_s,
            "samples_per_s": self.samples_per_s,
        }


def _template_dict(t: PipelineTemplate) -> dict[str, Any]:
    return {
        "num_nodes": t.num_nodes,
        "num_stages": t.num_stages,
        "bottleneck_s": t.bottleneck_s,
        "fill_s": t.fill_s,
        "stages": [
            {
                "layers": [s.layer_start, s.layer_end],
                "forward_s": s.forward_s,
                "backward_s": s.backward_s,
                "send_s": s.send_s,
                "memory_bytes": s.memory_bytes,
                "recompute": s.recompute,
            }
            for s in t.stages
        ],
    }


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanningError(f"{name}: got {value!r}; must be an integer >= 1")


def make_plan(
    profile: ModelProfile, cluster: ClusterSpec, f: int, global_batch: int, microbatch: int, recompute: str = "none"
) -> Plan:
    """Templates for every node count in [n0, N - f*n0] and the best instantiation on all N nodes.
    ``recompute`` (``none``, ``full``, ``auto``): which stages recompute their activations
    (:mod:`planner.templates`).

    Raises :class:`PlanningError` (one line, with the numbers) when the batch does not divide, there are
    fewer microbatches than f+1 pipelines, the model does not fit, or the cluster is too small for f.
    """
    _positive_int("global_batch", global_batch)
    _positive_int("microbatch", microbatch)
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise PlanningError(f"f: got {f!r}; must be an integer >= 0")
    if global_batch % microbatch:
        lower = global_batch - global_batch % microbatch
        suggestion = f"{lower} or {lower + microbatch}" if lower else f"{microbatch}"
        raise PlanningError(
            f"global_batch {global_batch} is not a multiple of microbatch {microbatch}; use {suggestion}"
        )
    num_microbatches = global_batch // microbatch
    if num_microbatches < f + 1:
        raise PlanningError(
            f"global_batch {global_batch} / microbatch {microbatch} gives {num_microbatches} microbatches per step, "
            f"fewer than the f+1={f + 1} pipelines; raise global_batch to at least {(f + 1) * microbatch}"
        )
    templates = build_templates(profile, cluster, f, recompute)
    n0 = min(templates)
    inst = instantiate(templates, cluster.nodes, f, num_microbatches)
    return Plan(cluster, f, global_batch, microbatch, n0, templates, inst, dict(profile.fingerprint))
