"""Pipeline templates: for each node count n, the best cut of the layer list into n*G one-device stages.

Cost model (1F1B, m microbatches, stages 1..k)::

    iteration_time(m) = sum_i (f_i + b_i + comm_i) + (m - 1) * max_i (f_i + b_i)

where ``comm_i`` is stage i's boundary transfer per microbatch (activation forward plus gradient backward,
each ``output_bytes`` of the stage's last layer, over intra-node bandwidth between devices of one node and
inter-node bandwidth where the boundary crosses nodes). The sum of ``f_i + b_i`` is the same for every cut,
so the template minimises the bottleneck ``max_i (f_i + b_i)`` first and the total boundary time second,
subject to each stage fitting in device memory.

Memory under 1F1B: stage i of k holds the activations of ``min(k - i, m)`` microbatches. A template must
work for any microbatch count a pipeline may be given, so templates are built for the worst case
``k - i``; :meth:`PipelineTemplate.stage_memory` gives the figure for a known m.

Activation recomputation (``recompute``: ``none``, ``full`` or ``auto``), decided per stage. A recomputing
stage keeps, per microbatch in flight, only each layer's input (the previous layer's ``output_bytes``; 0
for layer 0, whose input is the microbatch itself), and its backward time grows by its forward time. The
activations of the one layer being recomputed are transient and not counted, as the analytic profiles do
not count them (:mod:`planner.analytic`); on CUDA the measured peak includes them. ``full`` recomputes
every stage; ``auto`` recomputes a stage exactly when its activations would not fit otherwise, and
recomputes nowhere when a cut without recomputation reaches the same bottleneck. A stage's cost and
memory still grow with its layers, so the searches below are unchanged: a stage admits a layer range if
it fits within the bound (recomputing where the mode says), and ``auto`` can so choose a longer,
recomputing stage where that lowers the bottleneck.

The Bamboo-style baseline (``holds_sent_carry``) queues each microbatch's redundant forward of the next
stage's layers to run in a pipeline bubble (:mod:`oobleck.engine.shadow`), keeping, per microbatch in
flight, the carry the stage sends (its last layer's ``output_bytes``; the last stage, whose redundant
forward starts from the microbatch itself, keeps nothing). That carry counts with the stage's activations.

Algorithm, per stage count k (all k share the sorted candidate bottlenecks):

1. Bottleneck: binary search over the sorted set of possible stage costs ``T[e] - T[j]`` (prefix sums)
   for the least B such that a cut exists with every stage cost <= B and every stage in memory. The test
   is a greedy from the *last* stage backwards, each stage taking as many layers as it can. Going backwards
   matters: memory limits loosen towards the end of the pipeline (fewer microbatches in flight), so a stage
   that a greedy from the front would overfill can always be shortened and its layers moved to a later,
   looser stage, while a backward greedy never leaves an earlier (tighter) stage more than an optimal cut
   gives it.
2. Tie-break: with the bottleneck fixed at B*, a suffix DP over (stages left, first layer) minimises the
   total boundary time; stage i's limits depend only on how many stages follow it, so the DP runs in
   O(k * L) with a sliding-window minimum over the admissible end layers.

Why two passes rather than one DP on the pair (bottleneck, sum): that pair has no optimal substructure.
A first stage costing 10 makes any suffix bottleneck below 10 irrelevant, so a suffix with bottleneck 9
and a smaller sum beats the suffix that is lexicographically best (bottleneck 5, larger sum).
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.profile import ModelProfile


@dataclass(frozen=True)
class Stage:
    """Layers ``[layer_start, layer_end)`` on one device.

    ``send_s``: per-microbatch boundary time to the next stage (activation out plus gradient back; 0 for
    the last stage). ``static_bytes``: parameters, gradients and optimizer state, and the profile's
    ``device_fixed_bytes``. ``activation_bytes``:
    activations kept per microbatch in flight (for a recomputing stage, its layers' inputs; with
    ``holds_sent_carry``, plus the carry it sends, see the module notes). ``recompute``:
    the stage recomputes its activations in backward (``backward_s`` includes the recomputation).
    ``memory_bytes``: static plus the activations of the worst-case number of microbatches in flight
    (``k - i`` for stage i of k). ``grad_bytes``: the gradients of its trainable parameters (what its
    optimizer steps and the gradient all-reduce sums). ``update_s``: its layers' ``update_s`` (the profile's
    once-a-step work on gradients and parameters; 0 when not measured).
    """

    layer_start: int
    layer_end: int
    forward_s: float
    backward_s: float
    send_s: float
    memory_bytes: float
    static_bytes: float
    activation_bytes: float
    recompute: bool = False
    grad_bytes: float = 0.0
    update_s: float = 0.0

    def memory(self, in_flight: int) -> float:
        """Bytes the stage needs with ``in_flight`` microbatches in flight."""
        return self.static_bytes + in_flight * self.activation_bytes

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s


@dataclass(frozen=True)
class PipelineTemplate:
    """A cut of the model into ``num_nodes * devices_per_node`` stages; node j hosts stages
    ``[j*G, (j+1)*G)``."""

    num_nodes: int
    devices_per_node: int
    stages: tuple[Stage, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @functools.cached_property
    def bottleneck_s(self) -> float:
        """The slowest stage's forward+backward time for one microbatch."""
        return max(s.compute_s for s in self.stages)

    @functools.cached_property
    def fill_s(self) -> float:
        """One microbatch's trip through the pipeline and back: sum of compute and boundary times."""
        return sum(s.compute_s + s.send_s for s in self.stages)

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.layer_start, s.layer_end) for s in self.stages)

    @property
    def recompute(self) -> tuple[bool, ...]:
        """Per stage: whether it recomputes its activations in backward."""
        return tuple(s.recompute for s in self.stages)

    def iteration_time(self, num_microbatches: int) -> float:
        """Predicted 1F1B step time with ``num_microbatches`` microbatches (see the module docstring)."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        return self.fill_s + (num_microbatches - 1) * self.bottleneck_s

    def stage_memory(self, num_microbatches: int) -> list[float]:
        """Bytes each stage needs under 1F1B with ``num_microbatches`` microbatches."""
        k = self.num_stages
        return [s.memory(min(k - i, num_microbatches)) for i, s in enumerate(self.stages)]

    def fits(self, device_memory_bytes: float, num_microbatches: int) -> bool:
        """Whether every stage fits in one device's memory."""
        return all(mem <= device_memory_bytes for mem in self.stage_memory(num_microbatches))


#: the values of ``training.recompute`` (see the module notes)
RECOMPUTE_MODES = ("none", "full", "auto")


class _Prefix:
    """Prefix sums of a profile so that any contiguous run of layers costs O(1), and the recomputation
    rule of the module notes (``recompute``) applied to a stage; ``holds_sent_carry``: see the module notes."""

    def __init__(self, profile: ModelProfile, recompute: str = "none", holds_sent_carry: bool = False) -> None:
        if recompute not in RECOMPUTE_MODES:
            raise PlanningError(f"recompute: got {recompute!r}; allowed: {', '.join(RECOMPUTE_MODES)}")
        self.mode = recompute
        self.num_layers = profile.num_layers
        self.forward = _prefix([layer.forward_s for layer in profile.layers])
        self.backward = _prefix([layer.backward_s for layer in profile.layers])
        self.compute = _prefix([layer.forward_s + layer.backward_s for layer in profile.layers])
        self.static = _prefix([layer.static_bytes for layer in profile.layers])
        #: what every stage's device holds besides its layers (the profile's ``device_fixed_bytes``)
        self.fixed = profile.device_fixed_bytes
        self.grads = _prefix([layer.grad_bytes for layer in profile.layers])
        self.update = _prefix([layer.update_s for layer in profile.layers])
        self.activation = _prefix([layer.activation_bytes for layer in profile.layers])
        # a recomputed layer keeps its input: the carry the layer before it sends
        self.kept = _prefix([0] + [layer.output_bytes for layer in profile.layers[:-1]])
        self.output = [layer.output_bytes for layer in profile.layers]
        #: by a stage's end layer: the carry it keeps per microbatch in flight besides its activations
        self.sent = [0.0] * (self.num_layers + 1)
        if holds_sent_carry:
            self.sent[1 : self.num_layers] = [float(b) for b in self.output[:-1]]
        self._candidates: list[float] | None = None

    def cost(self, start: int, end: int, recompute: bool = False) -> float:
        extra = self.forward[end] - self.forward[start] if recompute else 0.0
        return self.compute[end] - self.compute[start] + extra

    def static_bytes(self, start: int, end: int) -> float:
        """A stage's bytes whatever the microbatches in flight: its layers' and the device's fixed bytes."""
        return self.static[end] - self.static[start] + self.fixed

    def memory(self, start: int, end: int, held: int, recompute: bool = False) -> float:
        static = self.static_bytes(start, end)
        if recompute:
            return static + held * (self.kept[end] - self.kept[start] + self.sent[end])
        return static + held * (self.activation[end] - self.activation[start] + self.sent[end])

    def recomputes(self, start: int, end: int, held: int, memory: float) -> bool:
        """Whether the stage of layers ``[start, end)`` with ``held`` microbatches in flight recomputes."""
        if self.mode == "auto":
            return self.memory(start, end, held) > memory
        return self.mode == "full"

    def fits(self, start: int, end: int, held: int, bound: float, memory: float) -> bool:
        """Whether that stage costs at most ``bound`` and fits in ``memory``, recomputing as the mode says.
        Monotone: if a range fits, so does every shorter range with the same end."""
        recompute = self.recomputes(start, end, held, memory)
        return self.cost(start, end, recompute) <= bound and self.memory(start, end, held, recompute) <= memory

    def plain(self) -> "_Prefix":
        """The same profile with recomputation off."""
        plain = copy.copy(self)
        plain.mode, plain._candidates = "none", None
        return plain

    def most_memory(self, held: int) -> float:
        """Memory with which any stage fits, however the model is cut (a bound for bisection): the whole model's,
        plus the largest carry a stage may hold besides its activations."""
        return max(self.memory(0, self.num_layers, held, r) for r in (False, True)) + held * max(self.sent)

    @property
    def candidates(self) -> list[float]:
        """Every possible stage cost, sorted: the optimal bottleneck is one of them."""
        if self._candidates is None:
            c, f = self.compute, self.forward
            n = self.num_layers
            costs: set[float] = set()
            if self.mode != "full":
                costs.update(c[e] - c[j] for j in range(n) for e in range(j + 1, n + 1))
            if self.mode != "none":  # recomputing: the stage's forward runs twice
                costs.update((c[e] - c[j]) + (f[e] - f[j]) for j in range(n) for e in range(j + 1, n + 1))
            self._candidates = sorted(costs)
        return self._candidates


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _leftmost_start(p: _Prefix, end: int, lowest: int, bound: float, memory: float, held: int) -> int:
    """The smallest j in [lowest, end - 1] whose stage ``[j, end)`` fits (:meth:`_Prefix.fits`), or ``end``
    if even the single layer ``end - 1`` does not fit. Fitting is monotone in j."""
    lo, hi = lowest, end  # answer in [lo, hi]; hi == end means none fits
    while lo < hi:
        mid = (lo + hi) // 2
        if p.fits(mid, end, held, bound, memory):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _feasible(p: _Prefix, k: int, bound: float, memory: float) -> bool:
    """Whether layers can be cut into exactly k stages with cost <= bound and each stage in memory.

    Greedy from the last stage (1 microbatch in flight) to the first (k in flight), each stage starting
    as early as it can while leaving at least one layer for every earlier stage.
    """
    end = p.num_layers
    for suffix in range(1, k):  # stage index k - suffix holds `suffix` microbatches
        start = _leftmost_start(p, end, k - suffix, bound, memory, suffix)
        if start == end:
            return False
        end = start
    return p.fits(0, end, k, bound, memory)


def _min_bottleneck(p: _Prefix, k: int, memory: float) -> float | None:
    """The least achievable bottleneck for k stages, or None if no cut fits in memory."""
    if k > p.num_layers or not _feasible(p, k, math.inf, memory):
        return None
    cands = p.candidates
    # no stage can cost less than the average, so start the search there
    lo = bisect.bisect_left(cands, p.cost(0, p.num_layers) / k * (1 - 1e-12))
    hi = len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(p, k, cands[mid], memory):
            hi = mid
        else:
            lo = mid + 1
    return cands[lo]


def _cut_min_comm(p: _Prefix, k: int, bound: float, memory: float, devices_per_node: int, send_time: tuple[float, float]) -> list[int]:
    """Stage boundaries [0, e_1, ..., L] of a k-stage cut with every stage cost <= bound and in memory,
    minimising the total boundary time. ``send_time`` = seconds per output byte (intra, inter node).

    Suffix DP: best[j] for `s` stages covering [j, L); the first of them is stage k - s, which holds s
    microbatches and sends across nodes iff (k - s + 1) is a multiple of G, i.e. (s - 1) % G == 0.
    """
    n = p.num_layers
    inf = math.inf
    # s = 1: the last stage, no boundary after it
    best = [inf] * (n + 1)
    for j in range(n):
        if p.fits(j, n, 1, bound, memory):
            best[j] = 0.0
    choices: list[list[int]] = [[n] * (n + 1)]
    for s in range(2, k + 1):
        per_byte = send_time[1] if (s - 1) % devices_per_node == 0 else send_time[0]
        # value of ending the first stage at e (1 <= e < n)
        value = [inf] + [p.output[e - 1] * per_byte + best[e] for e in range(1, n)] + [inf]
        new = [inf] * (n + 1)
        choice = [-1] * (n + 1)
        window: deque[int] = deque()  # candidate ends, newest (smallest e) at the right, values increasing
        hi = n - 1
        for j in range(n - s, -1, -1):
            e_new = j + 1
            while window and value[window[-1]] >= value[e_new]:
                window.pop()
            window.append(e_new)
            while hi > j and not p.fits(j, hi, s, bound, memory):
                hi -= 1
            while window and window[0] > hi:
                window.popleft()
            if window and value[window[0]] < inf:
                new[j] = value[window[0]]
                choice[j] = window[0]
        best = new
        choices.append(choice)
    if best[0] == inf:
        raise AssertionError(f"no {k}-stage cut under bottleneck {bound} although the search found one")
    bounds = [0]
    for s in range(k, 1, -1):
        bounds.append(choices[s - 1][bounds[-1]])
    bounds.append(n)
    return bounds


def _template(p: _Prefix, num_nodes: int, cluster: ClusterSpec, bounds: list[int]) -> PipelineTemplate:
    g = cluster.devices_per_node
    k = len(bounds) - 1
    stages = []
    for i in range(k):
        a, b = bounds[i], bounds[i + 1]
        recompute = p.recomputes(a, b, k - i, cluster.device_memory_bytes)
        if i == k - 1:
            send = 0.0
        else:
            bandwidth = cluster.inter_node_bandwidth if (i + 1) % g == 0 else cluster.intra_node_bandwidth
            send = 2 * p.output[b - 1] / bandwidth
        static = p.static_bytes(a, b)
        activation = p.memory(a, b, 1, recompute) - static
        forward = p.forward[b] - p.forward[a]
        stages.append(
            Stage(
                layer_start=a,
                layer_end=b,
                forward_s=forward,
                backward_s=p.backward[b] - p.backward[a] + (forward if recompute else 0.0),
                send_s=send,
                memory_bytes=p.memory(a, b, k - i, recompute),
                static_bytes=static,
                activation_bytes=activation,
                recompute=recompute,
                grad_bytes=p.grads[b] - p.grads[a],
                update_s=p.update[b] - p.update[a],
            )
        )
    return PipelineTemplate(num_nodes, g, tuple(stages))


def _max_nodes_by_layers(profile: ModelProfile, cluster: ClusterSpec) -> int:
    """Most nodes one pipeline can span: every device needs at least one layer."""
    return profile.num_layers // cluster.devices_per_node


def min_nodes(
    profile: ModelProfile, cluster: ClusterSpec, recompute: str = "none", holds_sent_carry: bool = False
) -> int:
    """n0: the fewest nodes on which one pipeline of the model fits in memory under 1F1B, recomputing as
    ``recompute`` says and holding the sent carries as ``holds_sent_carry`` says (see the module notes).

    Raises :class:`PlanningError` when no node count up to the cluster's size fits.
    """
    p = _Prefix(profile, recompute, holds_sent_carry)
    g = cluster.devices_per_node
    most = min(cluster.nodes, _max_nodes_by_layers(profile, cluster))
    if most < 1:
        raise PlanningError(
            f"the model has {profile.num_layers} layers but a node has {g} devices and each device runs at least "
            f"one layer; use fewer devices per node or a model with at least {g} layers"
        )
    for n in range(1, most + 1):
        if _feasible(p, n * g, math.inf, cluster.device_memory_bytes):
            return n
    where = (
        f"even on all {most} nodes"
        if most == cluster.nodes
        else f"on any pipeline of up to {most} nodes (each of its devices needs one of the {p.num_layers} layers)"
    )
    raise PlanningError(
        f"the model does not fit {where}: cut into {most * g} stages, one per device, its fullest device needs "
        f"{_size(_least_device_memory(p, most * g))} (its layers' parameters, gradients and optimizer state, and "
        f"the activations of the microbatches in flight under 1F1B), a device has {_size(cluster.device_memory_bytes)}; "
        + ("use more or larger devices or a smaller microbatch" if recompute != "none" else
           "use more or larger devices, a smaller microbatch or activation recomputation (training.recompute: auto)")
    )


def _least_device_memory(p: _Prefix, k: int) -> float:
    """The least device memory (bytes, within 0.1%) with which the layers can be cut into ``k`` stages
    that each fit under 1F1B (``k <= num_layers``). Bisection: whether a cut fits grows with the memory, and
    the whole model holding ``k`` microbatches' activations is always enough."""
    lo, hi = 0.0, p.most_memory(k)
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if _feasible(p, k, math.inf, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _size(n: float) -> str:
    """Bytes with a binary unit, 3 significant digits (``1.29 GiB``, ``20 B``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def template_for(profile: ModelProfile, cluster: ClusterSpec, num_nodes: int, recompute: str = "none") -> PipelineTemplate | None:
    """The best template on ``num_nodes`` nodes, or None if no cut into num_nodes*G stages fits."""
    return _templates_for(_Prefix(profile, recompute), cluster, [num_nodes]).get(num_nodes)


def _templates_for(p: _Prefix, cluster: ClusterSpec, node_counts: Sequence[int]) -> dict[int, PipelineTemplate]:
    g = cluster.devices_per_node
    per_byte = (1 / cluster.intra_node_bandwidth, 1 / cluster.inter_node_bandwidth)
    out = {}
    for n in node_counts:
        k = n * g
        bound = _min_bottleneck(p, k, cluster.device_memory_bytes)
        if bound is None:
            continue
        # auto: a cut that reaches the same bottleneck without recomputing anything is preferred, since
        # recomputation costs time the bottleneck does not show (the other stages' backward passes)
        cut_with = p.plain() if p.mode == "auto" and _feasible(p.plain(), k, bound, cluster.device_memory_bytes) else p
        bounds = _cut_min_comm(cut_with, k, bound, cluster.device_memory_bytes, g, per_byte)
        out[n] = _template(cut_with, n, cluster, bounds)
    return out


def build_templates(
    profile: ModelProfile, cluster: ClusterSpec, f: int, recompute: str = "none", holds_sent_carry: bool = False
) -> dict[int, PipelineTemplate]:
    """Templates for every node count n in [n0, N - f*n0] that fits, keyed by n, recomputing as
    ``recompute`` says and holding the sent carries as ``holds_sent_carry`` says (the Bamboo-style
    baseline; see the module notes).

    The range is capped at ``L // G`` nodes (each device needs a layer). Raises :class:`PlanningError`
    when the cluster cannot host f+1 pipelines of n0 nodes.
    """
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise PlanningError(f"f: got {f!r}; must be an integer >= 0")
    n0 = min_nodes(profile, cluster, recompute, holds_sent_carry)
    need = (f + 1) * n0
    if cluster.nodes < need:
        raise PlanningError(
            f"f={f} needs at least {need} nodes with n0={n0}; cluster has {cluster.nodes}; "
            f"lower f to {cluster.nodes // n0 - 1} or add nodes"
        )
    top = min(cluster.nodes - f * n0, _max_nodes_by_layers(profile, cluster))
    return _templates_for(_Prefix(profile, recompute, holds_sent_carry), cluster, range(n0, top + 1))
