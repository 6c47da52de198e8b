"""Which surviving replica sends each layer a worker needs after a re-plan (docs/design.md, "Copying layers").

Pure Python and deterministic: every process computes the same plan from the same inputs, whatever order its
dicts and sets iterate in, so no process has to broadcast it.

Choosing sources is makespan scheduling with restricted assignment (a transfer may go only to a source that
holds its layer). :func:`plan_transfers` solves it the Lenstra-Shmoys-Tardos way, which bounds the busiest
source by the best possible load plus one layer:

1. binary search for T, the smallest integer load cap under which the transfers can be split *fractionally*
   among their eligible sources (a max-flow feasibility test); T <= the optimal integral makespan;
2. a max-flow at that cap assigns bytes of each transfer to sources; cancelling cycles among the split
   transfers leaves their support a forest;
3. each split transfer goes whole to one of its sources, at most one split transfer per source (a leaf of the
   forest is always a source), so no source exceeds T + the largest layer;
4. a local pass then moves transfers off the busiest source while that strictly lowers it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Collection, Mapping


class LayerLost(Exception):
    """Some needed layers have no surviving copy: the job must restore from its latest checkpoint."""

    def __init__(self, layers: Collection[int]) -> None:
        self.layers: tuple[int, ...] = tuple(sorted(layers))
        super().__init__(f"no surviving replica holds layers {list(self.layers)}; restore from the latest checkpoint")


@dataclass(frozen=True)
class Transfer:
    """``source`` sends ``layer`` (``nbytes``: its parameters and optimizer state) to ``receiver``."""

    layer: int
    source: int
    receiver: int
    nbytes: int


@dataclass(frozen=True)
class TransferPlan:
    """``transfers`` sorted by (layer, receiver); ``source_bytes[s]``: the bytes source s sends, for every
    survivor that holds at least one layer somebody needs (0 for those that send nothing)."""

    transfers: tuple[Transfer, ...]
    source_bytes: Mapping[int, int]

    @property
    def max_source_bytes(self) -> int:
        """The busiest source's total (0 when nothing moves)."""
        return max(self.source_bytes.values(), default=0)


def plan_transfers(
    holders: Mapping[int, Collection[int]],
    needs: Mapping[int, Collection[int]],
    layer_bytes: Mapping[int, int],
) -> TransferPlan:
    """Plan one transfer for each (receiver, layer) with ``layer in needs[receiver]`` and the receiver not
    among ``holders[layer]``; its source is one of ``holders[layer]``.

    ``holders``: layer -> surviving ids that hold it (the old generation's ownership restricted to survivors);
    ``needs``: id -> layers it must hold under the new plan; ``layer_bytes``: layer -> bytes one copy moves.
    Holder and receiver ids share one id space. The busiest source sends at most
    ceil(T*) + max(nbytes) bytes, T* being the optimal fractional load (a lower bound on any plan's).

    Raises LayerLost naming every needed layer without a surviving holder, and ValueError for a needed layer
    missing from ``layer_bytes`` or with a negative size.
    """
    jobs: list[tuple[int, int]] = []  # (layer, receiver)
    lost: set[int] = set()
    for receiver in sorted(needs):
        for layer in sorted(needs[receiver]):
            have = holders.get(layer, ())
            if receiver in have:
                continue
            if not have:
                lost.add(layer)
            jobs.append((layer, receiver))
    if lost:
        raise LayerLost(lost)
    for layer in sorted({layer for layer, _ in jobs}):
        if layer not in layer_bytes or layer_bytes[layer] < 0:
            size = layer_bytes.get(layer)
            raise ValueError(f"layer_bytes[{layer}]: got {size!r}; need a size of 0 bytes or more")
    jobs.sort()
    sizes = [layer_bytes[layer] for layer, _ in jobs]
    eligible = [tuple(sorted(holders[layer])) for layer, _ in jobs]
    sources = sorted({s for group in eligible for s in group})

    cap = _smallest_fractional_cap(sizes, eligible, sources)
    split = _fractional_assignment(sizes, eligible, sources, cap)
    _cancel_cycles(split, sizes)
    owner = _round(split)
    load = {s: 0 for s in sources}
    for j, s in enumerate(owner):
        load[s] += sizes[j]
    _rebalance(owner, sizes, eligible, load)

    transfers = tuple(Transfer(layer, owner[j], receiver, sizes[j]) for j, (layer, receiver) in enumerate(jobs))
    return TransferPlan(transfers, load)


def _smallest_fractional_cap(sizes: list[int], eligible: list[tuple[int, ...]], sources: list[int]) -> int:
    """The least integer T such that the jobs can be split over their eligible sources with none above T.
    Jobs with the same eligible set are merged for the search: feasibility depends only on the sums."""
    by_group: dict[tuple[int, ...], int] = defaultdict(int)
    for size, group in zip(sizes, eligible):
        by_group[group] += size
    groups = sorted(by_group.items())
    total = sum(sizes)

    def feasible(cap: int) -> bool:
        net = _FlowNetwork(2 + len(groups) + len(sources))
        sink = 1 + len(groups) + len(sources)
        index = {s: 1 + len(groups) + k for k, s in enumerate(sources)}
        for g, (group, size) in enumerate(groups):
            net.add_edge(0, 1 + g, size)
            for s in group:
                net.add_edge(1 + g, index[s], size)
        for s in sources:
            net.add_edge(index[s], sink, cap)
        return net.max_flow(0, sink) == total

    lo, hi = (total + len(sources) - 1) // len(sources) if sources else 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _fractional_assignment(
    sizes: list[int], eligible: list[tuple[int, ...]], sources: list[int], cap: int
) -> list[dict[int, int]]:
    """Per job, bytes placed on each source (only positive entries) by a max-flow under load cap ``cap``."""
    net = _FlowNetwork(2 + len(sizes) + len(sources))
    sink = 1 + len(sizes) + len(sources)
    index = {s: 1 + len(sizes) + k for k, s in enumerate(sources)}
    edges: list[list[tuple[int, int]]] = []
    for j, (size, group) in enumerate(zip(sizes, eligible)):
        net.add_edge(0, 1 + j, size)
        edges.append([(s, net.add_edge(1 + j, index[s], size)) for s in group])
    for s in sources:
        net.add_edge(index[s], sink, cap)
    if net.max_flow(0, sink) != sum(sizes):
        raise AssertionError(f"load cap {cap} was found feasible but the flow does not place every byte")
    split = [{s: net.flow(e) for s, e in job_edges if net.flow(e) > 0} for job_edges in edges]
    for j, group in enumerate(eligible):
        if not split[j]:  # a zero-byte layer carries no flow: its smallest holder sends it
            split[j] = {group[0]: 0}
    return split


def _cancel_cycles(split: list[dict[int, int]], sizes: list[int]) -> None:
    """Shift bytes around cycles of the split jobs' support graph (job - source - job - ... - job) until it
    is a forest; every job's total and every source's load stay the same."""
    while (cycle := _find_cycle(split)) is not None:
        # cycle = [j0, s0, j1, s1, ..., jk, sk]: add to (j_t, s_t), take from (j_{t+1}, s_t)
        jobs, srcs = cycle[0::2], cycle[1::2]
        takes = [(jobs[(t + 1) % len(jobs)], srcs[t]) for t in range(len(srcs))]
        delta = min(split[j][s] for j, s in takes)
        for t, s in enumerate(srcs):
            split[jobs[t]][s] += delta
        for j, s in takes:
            split[j][s] -= delta
            if split[j][s] == 0:
                del split[j][s]
    for j, parts in enumerate(split):
        assert sum(parts.values()) == sizes[j], "cycle cancelling changed a job's size"


def _find_cycle(split: list[dict[int, int]]) -> list[int] | None:
    """A simple cycle through jobs split over two or more sources, as [job, source, job, source, ...], or None.
    Nodes are ("j", job) and ("s", source); the search order is fixed so the result is deterministic."""
    adjacency: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for j, parts in enumerate(split):
        if len(parts) > 1:
            for s in sorted(parts):
                adjacency[("j", j)].append(("s", s))
                adjacency[("s", s)].append(("j", j))
    parent: dict[tuple[str, int], tuple[str, int] | None] = {}
    for root in sorted(adjacency):
        if root in parent:
            continue
        parent[root] = None
        stack = [root]
        while stack:
            node = stack.pop()
            for nxt in adjacency[node]:
                if nxt == parent[node]:
                    continue
                if nxt in parent:
                    return _cycle_through(node, nxt, parent)
                parent[nxt] = node
                stack.append(nxt)
    return None


def _cycle_through(
    a: tuple[str, int], b: tuple[str, int], parent: dict[tuple[str, int], tuple[str, int] | None]
) -> list[int]:
    """The cycle closed by the non-tree edge a-b: the tree paths from a and b up to their common ancestor."""
    path_a = [a]
    while parent[path_a[-1]] is not None:
        path_a.append(parent[path_a[-1]])  # type: ignore[arg-type]
    ancestors = set(path_a)
    path_b = [b]
    while path_b[-1] not in ancestors:
        path_b.append(parent[path_b[-1]])  # type: ignore[arg-type]
    top = path_b[-1]
    nodes = path_a[: path_a.index(top) + 1] + path_b[-2::-1]  # a ... top ... b, then b-a closes it
    start = next(i for i, (kind, _) in enumerate(nodes) if kind == "j")
    nodes = nodes[start:] + nodes[:start]
    return [ident for _, ident in nodes]


def _round(split: list[dict[int, int]]) -> list[int]:
    """One source per job: a job placed whole keeps its source; split jobs (a forest with the sources) are
    matched to distinct sources by repeatedly pairing a leaf source with its only remaining job."""
    owner: list[int | None] = [next(iter(p)) if len(p) == 1 else None for p in split]
    jobs_at: dict[int, set[int]] = defaultdict(set)
    for j, parts in enumerate(split):
        if len(parts) > 1:
            for s in parts:
                jobs_at[s].add(j)
    leaves = [s for s in jobs_at if len(jobs_at[s]) == 1]
    heapq.heapify(leaves)
    while leaves:
        s = heapq.heappop(leaves)
        if len(jobs_at[s]) != 1:  # its job was already matched through another leaf
            continue
        (j,) = jobs_at[s]
        owner[j] = s
        for other in split[j]:
            jobs_at[other].discard(j)
            if len(jobs_at[other]) == 1:
                heapq.heappush(leaves, other)
    if any(o is None for o in owner):
        raise AssertionError("split jobs left unmatched: the support graph was not a forest")
    return owner  # type: ignore[return-value]


def _rebalance(owner: list[int], sizes: list[int], eligible: list[tuple[int, ...]], load: dict[int, int]) -> None:
    """Move jobs off the busiest source while one fits elsewhere below that source's load. Each move lowers
    the sum of squared loads, so this ends; it never raises the busiest load, so the bound above holds."""
    while load:
        busiest = max(sorted(load), key=lambda s: load[s])
        mine = sorted((j for j, s in enumerate(owner) if s == busiest), key=lambda j: (-sizes[j], j))
        for j in mine:
            if sizes[j] == 0:  # moving nothing changes no load and would never end
                continue
            target = min(eligible[j], key=lambda s: (load[s], s))
            if load[target] + sizes[j] < load[busiest]:
                owner[j] = target
                load[busiest] -= sizes[j]
                load[target] += sizes[j]
                break
        else:
            return


class _FlowNetwork:
    """Integer max-flow (Dinic) on a small directed graph; edges are numbered so their flow can be read."""

    def __init__(self, nodes: int) -> None:
        self._out: list[list[int]] = [[] for _ in range(nodes)]
        self._to: list[int] = []
        self._residual: list[int] = []
        self._capacity: list[int] = []

    def add_edge(self, u: int, v: int, capacity: int) -> int:
        """Add u -> v with ``capacity``; returns the edge's id (its reverse residual edge is id ^ 1)."""
        edge = len(self._to)
        for a, b, c in ((u, v, capacity), (v, u, 0)):
            self._out[a].append(len(self._to))
            self._to.append(b)
            self._residual.append(c)
            self._capacity.append(c)
        return edge

    def flow(self, edge: int) -> int:
        """Flow on ``edge`` after :meth:`max_flow`."""
        return self._capacity[edge] - self._residual[edge]

    def max_flow(self, source: int, sink: int) -> int:
        """Push as much flow as possible from ``source`` to ``sink``; returns its value."""
        total = 0
        while True:
            level = [-1] * len(self._out)
            level[source] = 0
            queue = deque([source])
            while queue:
                u = queue.popleft()
                for e in self._out[u]:
                    if self._residual[e] > 0 and level[self._to[e]] < 0:
                        level[self._to[e]] = level[u] + 1
                        queue.append(self._to[e])
            if level[sink] < 0:
                return total
            total += self._blocking_flow(source, sink, level)

    def _blocking_flow(self, source: int, sink: int, level: list[int]) -> int:
        """Saturate every source-sink path of the level graph (iteratively: paths can be long); returns the
        flow pushed."""
        pushed = 0
        next_edge = [0] * len(self._out)  # edges before this index lead nowhere useful any more
        path: list[int] = []
        u = source
        while True:
            if u == sink:
                amount = min(self._residual[e] for e in path)
                for e in path:
                    self._residual[e] -= amount
                    self._residual[e ^ 1] += amount
                pushed += amount
                path.clear()
                u = source
                continue
            out = self._out[u]
            while next_edge[u] < len(out):
                e = out[next_edge[u]]
                if self._residual[e] > 0 and level[self._to[e]] == level[u] + 1:
                    path.append(e)
                    u = self._to[e]
                    break
                next_edge[u] += 1
            else:  # a dead end: step back and never try the edge into it again
                if u == source:
                    return pushed
                u = self._to[path.pop() ^ 1]
                next_edge[u] += 1
