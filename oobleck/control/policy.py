"""The three fault-tolerance policies side by side: how each lays out a new generation, which layers each
worker holds, and when each grows the job. Every decision here is a pure function of its arguments
(the master reads its state under its lock, then asks); :func:`policy_for` gives the configured one.

* ``oobleck`` re-plans from the templates on every change and never restarts a worker; layers come from
  surviving holders (the master's layer sources). Joining nodes fold in at the next step boundary.
* ``varuna`` re-plans homogeneous pipelines and restarts every worker from the latest checkpoint on every
  change after the first generation; it grows only at a checkpoint, once that checkpoint is complete, so
  that the restart loses no step.
* ``bamboo`` keeps its pipelines when nodes are lost and lets neighbours take the lost stages over
  (:func:`takeover`); a fatal loss re-plans and restarts from the checkpoint, joins re-plan from memory.
  Its workers also hold a shadow of their successor's stage (:func:`shadow_holdings`).

Bamboo's takeovers. Under ``fault_tolerance.policy: bamboo`` every stage holds a shadow copy of its
successor in the ring of its pipeline's stages (:meth:`~oobleck.engine.api.PipelinePlan.shadow_stage`),
kept at the committed step (one device per node, which the config enforces). When nodes are lost,
:func:`takeover` keeps every pipeline and hands each lost stage's layers to a neighbour that holds them:
stage ``i`` to stage ``i - 1`` (its shadow holder), the first stage to the second (the layers come from
the last stage's shadow, since a stage must hold contiguous layers). Two lost stages adjacent in the ring
leave some layers with no copy in their pipeline: Bamboo treats that as fatal (restart from the
checkpoint), even where another pipeline holds them. So is a takeover by, or of, a stage that already took
one over: Bamboo's plan reserves device memory for one stage and one shadow per device, and the merged
stage exceeds it (the engine does not enforce simulated device memory on CPU, so the rule is explicit).
Taken together, any lost node next to one lost before it (since the last re-plan) is fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from oobleck.control.placement import PipelineShape, Placement

log = logging.getLogger(__name__)

#: the node names (in placement order) -> the planned pipelines
Planner = Callable[[list[str]], list[PipelineShape]]
#: (node, device) -> a set of layers
Holdings = dict[tuple[str, int], frozenset[int]]


@dataclass(frozen=True)
class Layout:
    """A new generation's pipelines, its nodes in placement order and whether its workers restart."""

    shapes: list[PipelineShape]
    nodes: list[str]
    restart: bool
    #: the stages' layer ranges when this layout is a fresh plan under ``bamboo`` (its takeovers are checked
    #: against them later); None when the pipelines were kept or the policy does not track them
    planned: frozenset[tuple[int, int]] | None = None


@dataclass(frozen=True)
class Membership:
    """What a layout decision looks at: the usable nodes' ``names`` (placement order); ``first``: the job's
    first generation; ``committed``: the placement of the last generation that committed a step (None
    since a restart lost it); ``joins``: the change includes joining nodes; ``planned``: the stages' layer
    ranges of the last fresh plan."""

    names: list[str]
    first: bool
    committed: Placement | None = None
    joins: bool = False
    planned: frozenset[tuple[int, int]] = frozenset()


class Policy:
    """One fault-tolerance policy's decisions; the base class is ``oobleck``'s."""

    name = "oobleck"
    #: the workers keep a shadow of their successor's stage (``Assignment.redundant``)
    redundant = False
    #: joining nodes fold in only once the checkpoint of the step boundary is complete
    grows_from_checkpoint = False

    def layout(self, planner: Planner, now: Membership) -> Layout:
        """The next generation's layout for ``now``; PlanningError from ``planner`` passes through."""
        return Layout(planner(now.names), now.names, False)

    def held_layers(self, placement: Placement) -> Holdings:
        """(node, device) -> the layers its worker holds under ``placement``."""
        return stage_layers(placement)

    def grows_after(self, step: int, checkpoint_after: bool) -> bool:
        """Whether joining nodes fold in after committed ``step``; ``checkpoint_after``: a periodic
        checkpoint of the state after ``step`` is due."""
        return True


class Varuna(Policy):
    """Varuna-style: re-plan and restart every worker from the checkpoint on every change after the first
    generation; grow only at a checkpoint (the one of ``step + 1``, written in the foreground), so that the
    restart loses no step."""

    name = "varuna"
    grows_from_checkpoint = True

    def layout(self, planner: Planner, now: Membership) -> Layout:
        return Layout(planner(now.names), now.names, not now.first)

    def grows_after(self, step: int, checkpoint_after: bool) -> bool:
        return checkpoint_after


class Bamboo(Policy):
    """Bamboo-style: takeovers while they are allowed, else a re-plan (see the module notes)."""

    name = "bamboo"
    redundant = True

    def layout(self, planner: Planner, now: Membership) -> Layout:
        def replan(restart: bool) -> Layout:
            shapes = planner(now.names)
            return Layout(shapes, now.names, restart, frozenset(r for shape in shapes for r in shape.layer_ranges))

        if now.first:
            return replan(False)
        # takeovers start from the layout the holdings describe: the last one that committed a step
        # (two losses seen one after the other must count as adjacent if they are)
        committed = now.committed
        if committed is None:  # nothing held since the last restart: restart again
            return replan(True)
        if not now.joins:
            placed = stage_nodes(committed).values()
            taken = takeover(committed, set(placed) - set(now.names), now.planned)
            if taken is not None:
                return Layout(taken[0], taken[1], False)
            log.warning("bamboo: a lost stage has no neighbour left that may take it over; restarting from the checkpoint")
            return replan(True)
        return replan(False)

    def held_layers(self, placement: Placement) -> Holdings:
        """Its stage's layers and the shadow of its successor's."""
        held = stage_layers(placement)
        for key, layers in shadow_holdings(placement).items():
            held[key] = held[key] | layers
        return held


_POLICIES: dict[str, Policy] = {p.name: p for p in (Policy(), Varuna(), Bamboo())}


def policy_for(name: str) -> Policy:
    """The policy ``fault_tolerance.policy`` names (the config admits only these three)."""
    return _POLICIES[name]


def choose_nodes(names: list[str], count: int, held: Mapping[str, Collection[int]]) -> list[str]:
    """``count`` of ``names`` for a plan that cannot use them all, chosen greedily to keep as many distinct
    layers in memory as possible (``held``: node -> the layers it holds; then fewer need copying, and none
    may be lost for want of a placed holder); ties go to the earlier name. Returned in ``names`` order."""
    chosen: list[str] = []
    covered: set[int] = set()
    for _ in range(count):
        best = max(
            (n for n in names if n not in chosen),
            key=lambda n: (len(set(held.get(n, ())) - covered), -names.index(n)),
        )
        chosen.append(best)
        covered |= set(held.get(best, ()))
    return [n for n in names if n in chosen]


def stage_layers(placement: Placement) -> Holdings:
    """(node, device) -> the layers of the stage it runs under ``placement``."""
    by_rank = {
        rank: frozenset(range(a, b))
        for pipeline in placement.pipelines
        for rank, (a, b) in zip(pipeline.ranks, pipeline.layer_ranges)
    }
    return {key: by_rank[rank] for key, rank in placement.ranks.items()}


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
