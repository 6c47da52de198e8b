"""From a plan's pipelines to ranks, nodes and devices.

Rule: pipelines take consecutive nodes in plan order; stage ``j`` of a pipeline runs on the pipeline's
node ``j // G``, device ``j % G``; a stage's rank is its global stage index (stages of pipeline 0 first).
Pipeline ``p`` runs global microbatches ``[sum of earlier pipelines' counts, + its own count)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from oobleck.engine.api import PipelinePlan


@dataclass(frozen=True)
class PipelineShape:
    """What placement needs of one planned pipeline."""

    #: stage ``i`` runs layers ``[layer_ranges[i][0], layer_ranges[i][1])``; one stage per device
    layer_ranges: tuple[tuple[int, int], ...]
    num_microbatches: int
    #: per stage: whether it recomputes its activations (empty: none does)
    recompute: tuple[bool, ...] = ()
    #: per stage: the plan's predicted peak memory in bytes (empty: no prediction)
    predicted_bytes: tuple[int, ...] = ()
    #: the plan's predicted step time of the job in a local run, the same on each of its pipelines (0: none)
    predicted_step_s: float = 0.0


@dataclass(frozen=True)
class Placement:
    pipelines: tuple[PipelinePlan, ...]
    #: (node name, device index) -> rank
    ranks: dict[tuple[str, int], int]
    #: the plan's predicted step time of a local run (0: no prediction)
    predicted_step_s: float = 0.0

    @property
    def world_size(self) -> int:
        return len(self.ranks)


def place(shapes: list[PipelineShape], nodes: list[str], devices_per_node: int) -> Placement:
    """Place ``shapes`` on ``nodes`` (in this order) with ``devices_per_node`` devices each.

    Every pipeline's stage count must be a multiple of ``devices_per_node`` and the pipelines must use
    every node exactly once; ValueError otherwise (a planner bug, not a user error).
    """
    pipelines: list[PipelinePlan] = []
    ranks: dict[tuple[str, int], int] = {}
    rank = 0
    node_cursor = 0
    microbatch_start = 0
    for p, shape in enumerate(shapes):
        stages = len(shape.layer_ranges)
        if stages == 0 or stages % devices_per_node:
            raise ValueError(f"pipeline {p} has {stages} stages; expected a positive multiple of {devices_per_node}")
        pipeline_nodes = nodes[node_cursor : node_cursor + stages // devices_per_node]
        if len(pipeline_nodes) != stages // devices_per_node:
            raise ValueError(f"the plan needs more than the {len(nodes)} nodes available")
        for j in range(stages):
            ranks[(pipeline_nodes[j // devices_per_node], j % devices_per_node)] = rank + j
        pipelines.append(
            PipelinePlan(
                ranks=tuple(range(rank, rank + stages)),
                layer_ranges=tuple((int(a), int(b)) for a, b in shape.layer_ranges),
                microbatch_start=microbatch_start,
                num_microbatches=shape.num_microbatches,
                recompute=tuple(shape.recompute),
                predicted_bytes=tuple(shape.predicted_bytes),
            )
        )
        rank += stages
        node_cursor += len(pipeline_nodes)
        microbatch_start += shape.num_microbatches
    if node_cursor != len(nodes):
        raise ValueError(f"the plan uses {node_cursor} of {len(nodes)} nodes; every node must be used")
    predicted = max((shape.predicted_step_s for shape in shapes), default=0.0)
    return Placement(pipelines=tuple(pipelines), ranks=ranks, predicted_step_s=predicted)
