"""Instantiation: which templates to run side by side on N' nodes, and how many microbatches each gets.

Batch distribution. A pipeline from template t given m microbatches takes ``t.iteration_time(m) =
fill_t + (m - 1) * bottleneck_t``. Think of pipeline p as the increasing sequence of times
``fill_p, fill_p + M_p, fill_p + 2 M_p, ...``; giving it m microbatches means taking the first m. The
least possible makespan for B microbatches, each pipeline at least 1, is therefore the B-th smallest
element of the merged sequences (and at least every fill_p). :func:`_makespan` finds it exactly:
relaxing each pipeline's count to a straight line gives a time just below the answer, from which a heap
walks the elements in increasing order. The counts are then ``cap_p(T*)``, the surplus taken off the
latest-finishing pipelines.

Template choice. A multiset of templates is a vector of counts c_n (pipelines of n nodes) with
``sum n * c_n == N'`` and ``sum c_n >= min_pipelines``. The search is a depth-first branch and bound over
the counts, template kinds taken in order of their per-node throughput, largest count first (so the
first complete multiset found is already good). A branch is cut when

* the nodes left cannot be written as a sum of the remaining kinds' sizes (precomputed bitsets),
* the pipeline count cannot end inside [min_pipelines, B], or
* it cannot beat the best multiset found so far (makespan T_best): the pipelines already chosen finish
  exactly ``cap_p`` microbatches strictly before T_best, and each node not yet assigned can add at most
  the best such count per node among the remaining kinds; if even that sum is below B, the branch goes.

The search is exact: it returns a multiset with the least makespan after distribution.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

from planner.errors import PlanningError
from planner.templates import PipelineTemplate

Templates = Union[Mapping[int, PipelineTemplate], Iterable[PipelineTemplate]]


@dataclass(frozen=True)
class Instantiation:
    """Pipelines to run (template, microbatches per step), in decreasing order of node count.

    ``step_time_s``: predicted time of one training step (the slowest pipeline). ``idle_nodes``: nodes
    left unused because no multiset of templates covers the available count exactly (0 whenever the
    template range is contiguous and wide enough, see "Coverage" in docs/design.md).
    """

    pipelines: tuple[tuple[PipelineTemplate, int], ...]
    step_time_s: float
    idle_nodes: int = 0

    @property
    def num_nodes(self) -> int:
        """Nodes the pipelines use."""
        return sum(t.num_nodes for t, _ in self.pipelines)

    @property
    def num_microbatches(self) -> int:
        return sum(m for _, m in self.pipelines)

    def samples_per_s(self, microbatch: int) -> float:
        """Training throughput: samples of one step over the predicted step time."""
        return self.num_microbatches * microbatch / self.step_time_s


def _capacity(fill: float, bottleneck: float, t: float) -> int:
    """How many microbatches a pipeline finishes within t: the largest m with fill + (m-1)*M <= t
    (bottleneck M > 0, which every template of a profile with nonzero compute has).

    ``fill + (m-1)*M`` is non-decreasing in m, so the answer is found by a search over integers around
    the estimate: it ends after O(log) steps even where floats cannot tell m from m+1 (beyond 2^53)."""
    if t < fill:
        return 0

    def within(m: int) -> bool:  # the same expression iteration_time uses
        return fill + (m - 1) * bottleneck <= t

    estimate = (t - fill) / bottleneck
    if not math.isfinite(estimate):
        raise PlanningError(f"a step time of {t} s over a bottleneck of {bottleneck} s is out of range")
    lo = max(1, int(estimate))  # within(lo) unless the estimate rounded up: walk down by doubling
    step = 1
    while lo > 1 and not within(lo):
        lo = max(1, lo - step)
        step *= 2
    hi, step = lo + 1, 1  # first m known not within: up by doubling
    while within(hi):
        lo, hi = hi, hi + step
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _makespan(kinds: Sequence[tuple[float, float, int]], total: int) -> float:
    """Least makespan for ``total`` microbatches over pipelines given as (fill, bottleneck, count) kinds,
    each pipeline taking at least one. Requires total >= the number of pipelines."""
    floor = max(fill for fill, _, _ in kinds)

    def count(t: float) -> int:
        return sum(c * _capacity(fill, m, t) for fill, m, c in kinds)

    if count(floor) >= total:
        return floor
    # Relaxing each capacity to the line (t - fill + M) / M >= cap(t) gives t_line, below which fewer
    # than `total` microbatches finish; one bottleneck further down, fewer than `total` minus one per
    # pipeline do. From there the walk below passes at most about two elements per pipeline.
    t_line = (total + sum(c * (fill - m) / m for fill, m, c in kinds)) / sum(c / m for _, m, c in kinds)
    lo = max(floor, t_line - max(m for _, m, _ in kinds))
    have = count(lo)
    # walk the elements above lo in increasing order until `total` are taken
    # (time, index j, ...): the element fill + j*M is computed as iteration_time computes it, not summed up
    heap = [(fill + j * m, j, fill, m, c) for fill, m, c in kinds for j in [_capacity(fill, m, lo)]]
    heapq.heapify(heap)
    while True:
        t, j, fill, m, c = heapq.heappop(heap)
        have += c
        if have >= total:
            return t
        heapq.heappush(heap, (fill + (j + 1) * m, j + 1, fill, m, c))


def distribute_batch(templates: Sequence[PipelineTemplate], num_microbatches: int) -> list[int]:
    """Microbatches per pipeline (same order as ``templates``): each >= 1, summing to exactly
    ``num_microbatches``, minimising the slowest pipeline's ``iteration_time``. Where pipelines could
    drop microbatches without changing the makespan, the latest-finishing drop them first, so equal
    pipelines get counts that differ by at most one (the ones listed first get more)."""
    if not templates:
        raise PlanningError("no pipelines to distribute microbatches over")
    if num_microbatches < len(templates):
        raise PlanningError(
            f"{num_microbatches} microbatches cannot give each of {len(templates)} pipelines one; "
            "raise the global batch or lower the microbatch size"
        )
    # pipelines with equal timings form one kind: the work then scales with kinds, not pipelines
    members: dict[tuple[float, float], list[int]] = {}
    for i, t in enumerate(templates):
        members.setdefault((t.fill_s, t.bottleneck_s), []).append(i)
    kinds = list(members.items())
    makespan = _makespan([(fill, neck, len(idx)) for (fill, neck), idx in kinds], num_microbatches)
    # every pipeline may take all its microbatches that end by the makespan (at least one, as the
    # makespan is at least every fill time); the surplus comes off the latest-finishing ones first,
    # which never raises the makespan. Per kind: `level` microbatches each, except the last `cut`
    # members, which already gave one up.
    level = [_capacity(fill, neck, makespan) for (fill, neck), _ in kinds]
    cut = [0] * len(kinds)
    surplus = sum(q * len(idx) for q, (_, idx) in zip(level, kinds)) - num_microbatches
    latest = [(-(fill + (q - 1) * neck), -g) for g, (q, ((fill, neck), _)) in enumerate(zip(level, kinds)) if q > 1]
    heapq.heapify(latest)
    while surplus:
        _, g = heapq.heappop(latest)
        g = -g
        (fill, neck), idx = kinds[g]
        take = min(len(idx) - cut[g], surplus)
        cut[g] += take
        surplus -= take
        if cut[g] == len(idx):
            level[g] -= 1
            cut[g] = 0
            if level[g] > 1:
                heapq.heappush(latest, (-(fill + (level[g] - 1) * neck), -g))
    counts = [0] * len(templates)
    for q, c, (_, idx) in zip(level, cut, kinds):
        for position, i in enumerate(idx):
            counts[i] = q - 1 if position >= len(idx) - c else q
    return counts


def _as_list(templates: Templates) -> list[PipelineTemplate]:
    values = templates.values() if isinstance(templates, Mapping) else templates
    return sorted(values, key=lambda t: t.num_nodes)


#: branch-and-bound nodes one instantiation may visit (about a second of pure Python): large clusters
#: of many template sizes (thousands of nodes, one device each) would otherwise search for minutes. Past
#: it the best multiset found so far is used; the search stays exact on every smaller problem.
SEARCH_BUDGET = 100_000


class _OutOfBudget(Exception):
    pass


class _Search:
    """Branch and bound over template counts for one node count (see the module docstring)."""

    def __init__(self, kinds: list[PipelineTemplate], total: int, min_pipelines: int, budget: int = SEARCH_BUDGET) -> None:
        self.budget = budget
        self.exhausted = False
        # best per-node throughput first: the first complete multiset is then a good incumbent
        self.kinds = sorted(kinds, key=lambda t: (t.num_nodes * t.bottleneck_s, t.num_nodes))
        self.total = total
        self.min_pipelines = min_pipelines
        k = len(self.kinds)
        self.size = [t.num_nodes for t in self.kinds]
        self.fill = [t.fill_s for t in self.kinds]
        self.neck = [t.bottleneck_s for t in self.kinds]
        self.smallest = [math.inf] * (k + 1)
        self.largest = [0] * (k + 1)
        for i in reversed(range(k)):
            self.smallest[i] = min(self.smallest[i + 1], self.size[i])
            self.largest[i] = max(self.largest[i + 1], self.size[i])
        self.reach: list[int] = []  # reach[i] bit r: r nodes are a sum of sizes of kinds i..k-1
        self.best: tuple[float, list[int]] | None = None
        # against the incumbent: microbatches each kind finishes strictly before its makespan, and the
        # best such count per node among kinds i.. (an upper bound for nodes not yet assigned)
        self.caps = [0] * k
        self.density = [0.0] * (k + 1)

    def run(self, nodes: int) -> tuple[float, list[int]] | None:
        """(makespan, counts per kind) of the best multiset on exactly ``nodes`` nodes, or None."""
        k = len(self.kinds)
        mask = (1 << (nodes + 1)) - 1
        self.reach = [0] * (k + 1)
        self.reach[k] = 1
        for i in reversed(range(k)):
            # unbounded copies of size[i]: after shifting by size * 2^t, up to 2^(t+1) - 1 copies are in
            r = self.reach[i + 1]
            shift = self.size[i]
            while shift <= nodes:
                r |= (r << shift) & mask
                shift *= 2
            self.reach[i] = r
        self.best = None
        if self.exhausted:
            return None
        try:
            self._dfs(0, nodes, [0] * k, 0)
        except _OutOfBudget:
            self.exhausted = True
        return self.best

    def _improve(self, span: float, counts: list[int]) -> None:
        self.best = (span, list(counts))
        for j in range(len(self.kinds)):
            below = _capacity(self.fill[j], self.neck[j], span)
            if below and self.fill[j] + (below - 1) * self.neck[j] == span:
                below -= 1  # the element equal to the makespan does not beat it
            self.caps[j] = below
        for j in reversed(range(len(self.kinds))):
            self.density[j] = max(self.density[j + 1], self.caps[j] / self.size[j])

    def _dfs(self, i: int, left: int, counts: list[int], pipelines: int) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _OutOfBudget
        if not (self.reach[i] >> left) & 1:
            return
        # pipeline count must be able to end in [min_pipelines, total]
        most = pipelines + (left // self.smallest[i] if left else 0)
        least = pipelines + (-(-left // self.largest[i]) if left else 0)
        if most < self.min_pipelines or least > self.total:
            return
        if self.best is not None:
            # can this branch finish `total` microbatches strictly before the incumbent's makespan?
            decided = 0
            for j in range(i):
                if counts[j]:
                    if not self.caps[j]:
                        return
                    decided += counts[j] * self.caps[j]
            if decided + left * self.density[i] < self.total:
                return
        if left == 0:
            span = _makespan([(self.fill[j], self.neck[j], c) for j, c in enumerate(counts) if c], self.total)
            if self.best is None or span < self.best[0]:
                self._improve(span, counts)
            return
        n = self.size[i]
        for c in range(left // n, -1, -1):
            counts[i] = c
            self._dfs(i + 1, left - c * n, counts, pipelines + c)
        counts[i] = 0


def instantiate(
    templates: Templates,
    nodes: int,
    f: int,
    num_microbatches: int,
    min_pipelines: int | None = None,
) -> Instantiation:
    """The best set of pipelines on ``nodes`` nodes with at least ``min_pipelines`` (default f+1).

    Uses every node when some multiset of template sizes sums to ``nodes`` with enough pipelines;
    otherwise the largest node count below that can be covered, reporting the rest as idle. Pass
    ``min_pipelines=1`` for the degraded mode recovery uses when fewer than (f+1)*n0 nodes remain.
    Raises :class:`PlanningError` when too few nodes or microbatches remain for ``min_pipelines``.
    """
    kinds = _as_list(templates)
    if not kinds:
        raise PlanningError("no pipeline templates to instantiate from")
    need = f + 1 if min_pipelines is None else min_pipelines
    n0 = kinds[0].num_nodes
    if nodes < need * n0:
        if min_pipelines is None:
            raise PlanningError(
                f"f={f} needs at least {need * n0} nodes with n0={n0}; cluster has {nodes}; "
                "recovery can still run fewer pipelines with min_pipelines=1"
            )
        raise PlanningError(f"{need} pipelines need at least {need * n0} nodes with n0={n0}; {nodes} remain")
    if num_microbatches < need:
        raise PlanningError(
            f"{num_microbatches} microbatches per step is fewer than the {need} pipelines f={f} needs; "
            "raise the global batch or lower the microbatch size"
        )
    search = _Search(kinds, num_microbatches, need)
    for used in range(nodes, need * n0 - 1, -1):
        found = search.run(used)
        if found is not None or search.exhausted:
            break
    if found is None:
        if search.exhausted:
            raise PlanningError(
                f"instantiation on {nodes} nodes gave up after {SEARCH_BUDGET} search steps without a plan; "
                "use fewer nodes or more devices per node"
            )
        raise PlanningError(
            f"no set of at least {need} pipelines fits {nodes} nodes with {num_microbatches} microbatches; "
            "raise the global batch or lower the microbatch size"
        )
    _, counts = found
    chosen = [t for t, c in zip(search.kinds, counts) for _ in range(c)]
    chosen.sort(key=lambda t: -t.num_nodes)
    per_pipeline = distribute_batch(chosen, num_microbatches)
    step = max(t.iteration_time(m) for t, m in zip(chosen, per_pipeline))
    return Instantiation(tuple(zip(chosen, per_pipeline)), step, idle_nodes=nodes - used)
