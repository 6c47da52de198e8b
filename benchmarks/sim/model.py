"""What the simulator knows about each policy's configuration: step times from the planner's cost model,
bytes from the profile, and the published or measured costs of recovery, restart and checkpoints.

Pure Python (never imports torch), like ``planner/``. Used by the simulator's other modules; see
:mod:`benchmarks.sim`'s docstring for the policies' rules and the sources of every figure.

* :class:`Costs` holds the overheads (seconds, bytes per second, steps) that are not in the planner's cost
  model; :func:`published_costs` fills them for GPU-scale runs from published figures.
* :class:`Setup` is what the three policies share: one profile, one cluster, f, global batch, microbatch.
* :class:`OobleckConfigs`, :class:`VarunaConfigs`, :class:`BambooConfigs` answer, for a number of usable
  nodes, which configuration the policy runs and how long one training step takes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from planner.analytic import GB, GiB, DeviceSpec
from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.homogeneous import best_homogeneous, redundant_profile
from planner.plan import Plan, make_plan
from planner.profile import ModelProfile
from planner.templates import PipelineTemplate, build_templates

POLICIES = ("oobleck", "varuna", "bamboo")


class SimulatorError(ValueError):
    """Bad input to the simulator; the message names the value and what is allowed."""


# GCP a2-highgpu-1g: one A100 40 GB per VM with 24 Gb/s of network (the GCP spot instances of the Oobleck
# paper's spot-trace experiment, SOSP'23 artifact tools/simulator/README.md). The planner's DEVICES has only
# the 80 GB A100; peak and efficiency are the planner's A100 figures.
A100_40G_1GPU = DeviceSpec("a100-40g", 312e12, 40 * GiB, 300 * GB, 24e9 / 8, 0.5)

#: Published overheads per model shape, in seconds. Source: the Oobleck SOSP'23 artifact's simulators
#: (github.com/SymbioticLab/Oobleck, branch sosp23-artifact, tools/simulator/{oobleck,varuna,bamboo}_simulator.py),
#: which the paper's Figures 9-15 come from:
#: ``oobleck_reconfigure_s`` = Oobleck's reconfiguration time (6 s for GPT-3 2.7B, 10 s for 6.7B);
#: ``varuna_restart_s`` = Varuna's restart (local rendezvous incl. checkpoint load: 515 s, 701 s);
#: ``varuna_checkpoint_s`` = one Varuna checkpoint (50 s, 120 s);
#: ``bamboo_reconfigure_s`` = Bamboo's reconfiguration (230 s, 450 s).
PUBLISHED: dict[str, dict[str, float]] = {
    "gpt3-2.7b": {"oobleck_reconfigure_s": 6.0, "varuna_restart_s": 515.0, "varuna_checkpoint_s": 50.0, "bamboo_reconfigure_s": 230.0},
    "gpt3-6.7b": {"oobleck_reconfigure_s": 10.0, "varuna_restart_s": 701.0, "varuna_checkpoint_s": 120.0, "bamboo_reconfigure_s": 450.0},
}
#: Varuna's checkpoint interval in steps: ``--save-interval 10`` in Varuna's own GPT-2 example
#: (github.com/microsoft/varuna, Megatron-LM/examples/pretrain_gpt2_varuna.sh), also the Oobleck artifact's
#: ``checkpoint_per_iter = 10``.
VARUNA_CHECKPOINT_EVERY = 10
#: Time from a node's ``add`` until it can train (VM boot, container, agent): the artifact's
#: ``spot_instance_creation_time`` of 45 s.
NODE_READY_S = 45.0
#: Bamboo reconfigures once 2 x (overloaded nodes) / (active nodes) exceeds this (the artifact's Bamboo rule).
BAMBOO_RECONFIGURE_THRESHOLD = 0.05


@dataclass(frozen=True)
class Costs:
    """Overheads outside the planner's cost model. Times in seconds, bandwidths in bytes/s.

    * ``recovery_fixed_s``: Oobleck, fixed part of one recovery (detect, re-plan, rebuild the groups);
      the layer copy (bytes / ``copy_bandwidth``) comes on top.
    * ``restart_s``: stop everything, start the processes, rendezvous, load the checkpoint (Varuna on every
      membership change; Oobleck and Bamboo when their in-memory redundancy is lost).
    * ``checkpoint_write_s`` every ``checkpoint_every`` steps: Varuna writes in the foreground; Oobleck in
      the background every ``oobleck_checkpoint_every`` steps (no stall; a write counts once it finished);
      Bamboo in the foreground every ``bamboo_checkpoint_every`` steps.
    * ``bamboo_takeover_s``: a predecessor takes over a lost stage from its shadow copy (groups rebuilt,
      no copy); ``bamboo_reconfigure_s``: Bamboo's re-partition onto the current nodes;
      ``bamboo_restart_s``: its restart from the checkpoint after a fatal failure (None: the same as
      ``bamboo_reconfigure_s``, as the published figures have one number for both; in this engine a
      restart is a process restart, measured separately); ``bamboo_reconfigure_threshold``: see :data:`BAMBOO_RECONFIGURE_THRESHOLD`.
    * ``restart_join_s``: the first part of every process restart, until the restarted processes ask for
      their place in the plan; a loss within it joins the restart, a later one starts it over
      (:meth:`benchmarks.sim.core.PolicySim.restart_after_loss`; 0, the default: every loss starts it over).
    * ``bamboo_replans_on_join``: a node ready to join makes Bamboo re-partition onto the best configuration
      for every alive node at the next step boundary (True: this engine's Bamboo-style master,
      :mod:`oobleck.control.policy`), or only by the artifact's rules (False, the default: spares replace
      overloaded nodes, or another pipeline of the current depth fits).
    * ``varuna_grows_only_if_faster``: at a checkpoint with a node waiting to join, Varuna restarts to take it
      in only when that makes the job faster (True, the default: Varuna's morphing), or always (False: this
      engine's Varuna-style master, ``Varuna.grows_after`` in :mod:`oobleck.control.policy`).
    """

    recovery_fixed_s: float
    copy_bandwidth: float
    restart_s: float
    checkpoint_write_s: float
    bamboo_takeover_s: float
    bamboo_reconfigure_s: float
    checkpoint_every: int = VARUNA_CHECKPOINT_EVERY
    oobleck_checkpoint_every: int = VARUNA_CHECKPOINT_EVERY
    bamboo_checkpoint_every: int = 100
    bamboo_reconfigure_threshold: float = BAMBOO_RECONFIGURE_THRESHOLD
    bamboo_restart_s: float | None = None
    restart_join_s: float = 0.0
    varuna_grows_only_if_faster: bool = True
    bamboo_replans_on_join: bool = False

    @property
    def bamboo_fatal_restart_s(self) -> float:
        """Bamboo's restart after a fatal failure (``bamboo_restart_s``, else its reconfiguration time)."""
        return self.bamboo_reconfigure_s if self.bamboo_restart_s is None else self.bamboo_restart_s

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "bamboo_restart_s":
                continue
            if f.name in ("varuna_grows_only_if_faster", "bamboo_replans_on_join"):
                if not isinstance(value, bool):
                    raise SimulatorError(f"costs.{f.name}: got {value!r}; must be true or false")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SimulatorError(f"costs.{f.name}: got {value!r}; must be a finite number >= 0")
        for name in ("checkpoint_every", "oobleck_checkpoint_every", "bamboo_checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SimulatorError(f"costs.{name}: got {value!r}; must be an integer >= 1 (steps)")
        if self.copy_bandwidth <= 0:
            raise SimulatorError(f"costs.copy_bandwidth: got {self.copy_bandwidth!r}; must be > 0 bytes/s")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def state_bytes(profile: ModelProfile) -> float:
    """Bytes a checkpoint or a full copy of the model holds: parameters plus optimizer state."""
    return float(sum(layer.param_bytes + layer.optimizer_bytes for layer in profile.layers))


def _published_fit(key: str, nbytes: float) -> float:
    """A published figure for a shape without one: linear in the model's state bytes through the two
    published shapes (GPT-3 2.7B and 6.7B, their analytic mixed-precision AdamW state: 14 B/parameter)."""
    from planner.analytic import SHAPES, analytic_profile

    xs = []
    for name in ("gpt3-2.7b", "gpt3-6.7b"):
        xs.append(state_bytes(analytic_profile(SHAPES[name], 1, A100_40G_1GPU)))
    y0, y1 = PUBLISHED["gpt3-2.7b"][key], PUBLISHED["gpt3-6.7b"][key]
    # every published pair grows with size and the line stays positive at 0 bytes (checkpoint: 2.4 s)
    return max(0.0, y0 + (y1 - y0) * (nbytes - xs[0]) / (xs[1] - xs[0]))


def published_costs(shape_name: str, profile: ModelProfile, cluster: ClusterSpec, **overrides: Any) -> Costs:
    """:class:`Costs` for a GPU-scale run of ``shape_name`` from the published figures in :data:`PUBLISHED`
    (fitted linearly in state bytes for other shapes). Oobleck's fixed recovery cost is the artifact's whole
    reconfiguration time, and the layer copy at the cluster's inter-node bandwidth comes on top, so Oobleck
    is charged at least what the paper's own simulator charged. Bamboo's takeover rebuilds its groups like
    Oobleck's recovery but copies nothing: the same fixed cost."""
    nbytes = state_bytes(profile)
    pub = PUBLISHED.get(shape_name) or {key: _published_fit(key, nbytes) for key in PUBLISHED["gpt3-2.7b"]}
    values: dict[str, Any] = dict(
        recovery_fixed_s=pub["oobleck_reconfigure_s"],
        copy_bandwidth=cluster.inter_node_bandwidth,
        restart_s=pub["varuna_restart_s"],
        checkpoint_write_s=pub["varuna_checkpoint_s"],
        bamboo_takeover_s=pub["oobleck_reconfigure_s"],
        bamboo_reconfigure_s=pub["bamboo_reconfigure_s"],
    )
    values.update(overrides)
    return Costs(**values)


@dataclass(frozen=True)
class Setup:
    """What all three policies share. ``cluster.nodes`` is the most nodes a job uses at once (the
    capacity; more alive nodes wait as spares outside the job)."""

    profile: ModelProfile
    cluster: ClusterSpec
    f: int
    global_batch: int
    microbatch: int
    costs: Costs

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // self.microbatch


# ---------------------------------------------------------------------------------------------------------
# Oobleck: the planner's instantiation for the alive node count


@dataclass(frozen=True)
class OobleckConfig:
    """Oobleck's plan for ``nodes`` usable nodes: ``holdings[q]`` = (pipeline, first layer, end layer) for
    node position q (positions beyond the pipelines are idle spares)."""

    nodes: int
    step_time_s: float
    pipelines: tuple[int, ...]  # node count of each pipeline
    holdings: tuple[tuple[int, int, int], ...]
    degraded: bool


class OobleckConfigs:
    """Templates built once (``make_plan`` on the full cluster); a plan per alive count by ``Plan.replan``."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.plan: Plan = make_plan(setup.profile, setup.cluster, setup.f, setup.global_batch, setup.microbatch)
        self.n0 = self.plan.n0
        self._cache: dict[int, OobleckConfig | None] = {}
        static = [0.0]
        for layer in setup.profile.layers:
            static.append(static[-1] + layer.param_bytes + layer.optimizer_bytes)
        self._state_prefix = static

    def layer_bytes(self, start: int, end: int) -> float:
        """Parameters plus optimizer state of layers [start, end): what a copy moves."""
        return self._state_prefix[end] - self._state_prefix[start]

    def config(self, nodes: int) -> OobleckConfig | None:
        """The plan for ``nodes`` nodes, degraded below (f+1)*n0; None below n0."""
        if nodes not in self._cache:
            self._cache[nodes] = self._make(nodes)
        return self._cache[nodes]

    def _make(self, nodes: int) -> OobleckConfig | None:
        if nodes < self.n0:
            return None
        plan = self.plan if nodes == self.plan.cluster.nodes else self.plan.replan(nodes)
        g = plan.cluster.devices_per_node
        holdings: list[tuple[int, int, int]] = []
        sizes = []
        for p, (template, _) in enumerate(plan.instantiation.pipelines):
            sizes.append(template.num_nodes)
            for j in range(template.num_nodes):
                first, last = template.stages[j * g], template.stages[(j + 1) * g - 1]
                holdings.append((p, first.layer_start, last.layer_end))
        return OobleckConfig(nodes, plan.step_time_s, tuple(sizes), tuple(holdings), plan.degraded)


# ---------------------------------------------------------------------------------------------------------
# Varuna: homogeneous pipelines, best depth and replica count


@dataclass(frozen=True)
class HomogeneousConfig:
    """``replicas`` pipelines of ``depth`` nodes each, ``microbatches`` per pipeline (the first ones get one
    more when the batch does not divide), step time of the slowest."""

    depth: int
    replicas: int
    microbatches: tuple[int, ...]
    step_time_s: float

    @property
    def nodes_used(self) -> int:
        return self.depth * self.replicas


class VarunaConfigs:
    """The planner's best cut for every depth (templates with f=0 over [n0, N]); for n nodes the depth
    and replica count (depth x replicas <= n) with the highest throughput (ties: fewer nodes)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.templates: dict[int, PipelineTemplate] = build_templates(setup.profile, setup.cluster, 0)
        self.n0 = min(self.templates)
        self._cache: dict[int, HomogeneousConfig | None] = {}

    def config(self, nodes: int) -> HomogeneousConfig | None:
        if nodes not in self._cache:
            self._cache[nodes] = self._best(nodes)
        return self._cache[nodes]

    def _best(self, nodes: int) -> HomogeneousConfig | None:
        plan = best_homogeneous(self.templates, nodes, self.setup.num_microbatches)
        if plan is None:
            return None
        return HomogeneousConfig(plan.depth, plan.replicas, plan.microbatches, plan.step_time_s)


# ---------------------------------------------------------------------------------------------------------
# Bamboo: homogeneous pipelines with redundant computation


@dataclass(frozen=True)
class BambooPipeline:
    """One Bamboo pipeline shape: ``depth`` nodes, stages cut as ``template`` (searched on
    :func:`redundant_profile`), with exact costs from the real profile.

    Stage i (device i) computes its own layers forward and backward (``own[i]``) and, eagerly, the forward
    of stage ``succ(i) = (i + G) mod k``: the same device slot on the next node, wrapping around (``fwd``).
    Eagerly is an upper bound: the engine runs that forward in the pipeline's bubbles where it can
    (:mod:`oobleck.engine.shadow`), which this model does not credit.
    After node q is lost, the node before it (q - 1, wrapping) runs q's stages fully, with no redundant
    forward for them (nothing shadows the node after q any more).
    """

    depth: int
    devices_per_node: int
    own: tuple[float, ...]
    fwd: tuple[float, ...]
    send: tuple[float, ...]
    memory: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.own)

    def succ(self, i: int) -> int:
        return (i + self.devices_per_node) % self.num_stages

    def step_time(self, microbatches: int, dead: frozenset[int] = frozenset(), redundancy: bool = True) -> float:
        """1F1B step time with ``microbatches`` microbatches when the nodes (positions) in ``dead`` were
        taken over; ``redundancy=False`` gives the same cut without the redundant forwards."""
        g = self.devices_per_node
        loads = [0.0] * self.num_stages
        fill = sum(self.own) + sum(self.send)
        for i in range(self.num_stages):
            if i // g in dead:
                continue
            j = self.succ(i)
            loads[i] += self.own[i]
            if j // g in dead:
                loads[i] += self.own[j]  # took over the lost stage: its full forward and backward
            elif redundancy and j // g != i // g:
                loads[i] += self.fwd[j]
                fill += self.fwd[j]
        return fill + (microbatches - 1) * max(loads)


@dataclass(frozen=True)
class BambooConfig(HomogeneousConfig):
    pipeline: BambooPipeline | None = None
    no_redundancy_step_s: float = 0.0


class BambooConfigs:
    """Cuts from the redundant profile for every depth >= 2 (a one-node pipeline has no neighbour to
    shadow it); a depth counts only where the exact per-stage memory (own static + successor's shadow
    static + own activations and queued redundant forwards' carries in flight, see
    :func:`planner.templates.build_templates`) fits. Best depth and replica count as for Varuna."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        try:
            templates = build_templates(redundant_profile(setup.profile), setup.cluster, 0, holds_sent_carry=True)
        except PlanningError as e:
            raise PlanningError(f"Bamboo (redundant copies double the static memory): {e}") from None
        self.pipelines: dict[int, BambooPipeline] = {}
        self.templates: dict[int, PipelineTemplate] = {}
        p = setup.profile
        for depth, template in sorted(templates.items()):
            if depth < 2:
                continue
            pipe = self._exact(template, p)
            if max(pipe.memory) <= setup.cluster.device_memory_bytes:
                self.pipelines[depth] = pipe
                self.templates[depth] = template
        if not self.pipelines:
            raise PlanningError(
                f"Bamboo: no pipeline of 2..{setup.cluster.nodes} nodes fits its stages plus their successors' "
                "shadow copies in device memory"
            )
        self.n0 = min(self.pipelines)
        self._cache: dict[int, BambooConfig | None] = {}

    @staticmethod
    def _exact(template: PipelineTemplate, profile: ModelProfile) -> BambooPipeline:
        layers = profile.layers
        k = template.num_stages
        g = template.devices_per_node
        own, fwd, send, static, act = [], [], [], [], []
        for s in template.stages:
            chunk = layers[s.layer_start : s.layer_end]
            own.append(sum(x.forward_s + x.backward_s for x in chunk))
            fwd.append(sum(x.forward_s for x in chunk))
            send.append(s.send_s)
            static.append(sum(x.static_bytes for x in chunk))
            act.append(sum(x.activation_bytes for x in chunk))
        memory = []
        for i in range(k):
            j = (i + g) % k
            start, end = template.stages[j].layer_start, template.stages[j].layer_end
            shadow = static[j] - sum(x.grad_bytes for x in layers[start:end])
            # each queued redundant forward keeps its input, stage j's (none when j starts the model)
            queued = layers[start - 1].output_bytes if start > 0 else 0
            redundant = shadow + (k - i) * queued if j // g != i // g else 0.0
            memory.append(static[i] + redundant + (k - i) * act[i])
        return BambooPipeline(template.num_nodes, g, tuple(own), tuple(fwd), tuple(send), tuple(memory))

    def config(self, nodes: int) -> BambooConfig | None:
        if nodes not in self._cache:
            self._cache[nodes] = self._best(nodes)
        return self._cache[nodes]

    def _best(self, nodes: int) -> BambooConfig | None:
        plan = best_homogeneous(
            self.templates, nodes, self.setup.num_microbatches, lambda t, m: self.pipelines[t.num_nodes].step_time(m)
        )
        if plan is None:
            return None
        pipe = self.pipelines[plan.depth]
        counts = plan.microbatches
        return BambooConfig(plan.depth, plan.replicas, counts, plan.step_time_s, pipe, pipe.step_time(counts[0], redundancy=False))

    def step_time(self, config: BambooConfig, dead: Sequence[frozenset[int]]) -> float:
        """Step time of ``config`` when pipeline p has taken over the nodes ``dead[p]`` (positions)."""
        assert config.pipeline is not None
        return max(config.pipeline.step_time(m, d) for m, d in zip(config.microbatches, dead))


def describe_config(policy: str, config: Any) -> str:
    """One line for a table: what the policy runs."""
    if config is None:
        return "cannot run"
    if policy == "oobleck":
        sizes = sorted(config.pipelines, reverse=True)
        groups: dict[int, int] = {}
        for s in sizes:
            groups[s] = groups.get(s, 0) + 1
        return " + ".join(f"{c}x{s}" for s, c in groups.items()) + " nodes"
    return f"{config.replicas}x{config.depth} nodes"


__all__ = [
    "A100_40G_1GPU",
    "NODE_READY_S",
    "POLICIES",
    "PUBLISHED",
    "BambooConfig",
    "BambooConfigs",
    "BambooPipeline",
    "Costs",
    "HomogeneousConfig",
    "OobleckConfig",
    "OobleckConfigs",
    "Setup",
    "SimulatorError",
    "VarunaConfigs",
    "describe_config",
    "published_costs",
    "redundant_profile",
    "state_bytes",
]
