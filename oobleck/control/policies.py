"""What the Bamboo-style baseline does differently from a re-plan: shadows and takeovers (pure functions
of a :class:`~oobleck.control.placement.Placement`; one device per node, which the config enforces).

Under ``fault_tolerance.policy: bamboo`` every stage holds a shadow copy of its successor in the ring of its
pipeline's stages (:meth:`~oobleck.engine.api.PipelinePlan.shadow_stage`), kept at the committed step. When
nodes are lost, :func:`takeover` keeps every pipeline and hands each lost stage's layers to a neighbour that
holds them: stage ``i`` to stage ``i - 1`` (its shadow holder), the first stage to the second (the layers
come from the last stage's shadow, since a stage must hold contiguous layers). Two lost stages adjacent in
the ring leave some layers with no copy in their pipeline: Bamboo treats that as fatal (restart from the
checkpoint), even where another pipeline holds them. So is a takeover by, or of, a stage that already took
one over: Bamboo's plan reserves device memory for one stage and one shadow per device, and the merged
stage exceeds it (the engine does not enforce simulated device memory on CPU, so the rule is explicit).
Taken together, any lost node next to one lost before it (since the last re-plan) is fatal.
"""

from __future__ import annotations

from typing import Collection

from oobleck.control.placement import PipelineShape, Placement


def stage_nodes(placement: Placement) -> dict[int, str]:
    """rank -> the node that runs it."""
    return {rank: name for (name, _), rank in placement.ranks.items()}


def shadow_holdings(placement: Placement) -> dict[tuple[str, int], frozenset[int]]:
    """(node, device) -> the layers of the stage it shadows (only stages of pipelines of two or more)."""
    out: dict[tuple[str, int], frozenset[int]] = {}
    key_of = {rank: key for key, rank in placement.ranks.items()}
    for pipeline in placement.pipelines:
        for stage, rank in enumerate(pipeline.ranks):
            shadowed = pipeline.shadow_stage(stage)
            if shadowed is not None:
                a, b = pipeline.layer_ranges[shadowed]
                out[key_of[rank]] = frozenset(range(a, b))
    return out


def takeover(
    placement: Placement, lost: Collection[str], planned: Collection[tuple[int, int]]
) -> tuple[list[PipelineShape], list[str]] | None:
    """The pipelines after the stages on ``lost`` nodes are taken over (see the module notes), and the
    surviving nodes in placement order; None when a pipeline lost two stages adjacent in its ring, or a
    takeover would involve a stage whose layer range is not one of the last plan's (``planned``)."""
    node_of = stage_nodes(placement)
    shapes: list[PipelineShape] = []
    order: list[str] = []
    for pipeline in placement.pipelines:
        nodes = [node_of[r] for r in pipeline.ranks]
        n = len(nodes)
        dead = {i for i, name in enumerate(nodes) if name in lost}
        if len(dead) == n or any((i - 1) % n in dead for i in dead):
            return None
        takers = [i - 1 if i > 0 else 1 for i in dead]
        involved = set(dead) | set(takers)
        if len(set(takers)) < len(takers) or any(pipeline.layer_ranges[i] not in planned for i in involved):
            return None
        ranges = []
        for i in range(n):
            if i in dead:
                continue
            a, b = pipeline.layer_ranges[i]
            if i == 1 and 0 in dead:
                a = pipeline.layer_ranges[0][0]
            if i + 1 < n and i + 1 in dead:
                b = pipeline.layer_ranges[i + 1][1]
            ranges.append((a, b))
            order.append(nodes[i])
        shapes.append(PipelineShape(tuple(ranges), pipeline.num_microbatches))
    return shapes, order
