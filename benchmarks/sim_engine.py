"""The discrete-event core of the simulator: a node-availability timeline and the three policies' state
machines over it. Pure Python (never imports torch). The rules are described in
:mod:`benchmarks.simulator`'s docstring; this module implements them.

Time advances from event to event: between two membership changes a policy either trains (steps of a
known length, several committed at once), is busy (a recovery, restart, takeover, reconfiguration or a
foreground checkpoint, which may be cut short or restarted by the next change), or waits for nodes. Every
second of the simulated duration lands in exactly one bucket of the breakdown:

* ``useful``: steps that were committed and never rolled back (for Bamboo without its redundant part),
* ``redundant``: Bamboo's redundant forward passes inside those steps,
* ``recovery``: Oobleck's recoveries, Bamboo's takeovers and reconfigurations, every restart,
* ``checkpoint``: foreground checkpoint writes (Varuna, Bamboo),
* ``lost``: partial steps cut by a failure, steps rolled back to a checkpoint, the unfinished last step,
* ``waiting``: too few nodes for the policy to train at all.
"""

from __future__ import annotations

import heapq
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from benchmarks.sim_model import (
    POLICIES,
    BambooConfig,
    BambooConfigs,
    Costs,
    HomogeneousConfig,
    OobleckConfig,
    OobleckConfigs,
    Setup,
    SimulatorError,
    VarunaConfigs,
    describe_config,
)
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent

CATEGORIES = ("useful", "redundant", "recovery", "checkpoint", "lost", "waiting")


# ---------------------------------------------------------------------------------------------------------
# Timelines


def parse_interval(text: str | float | int) -> float:
    """Seconds in ``"6h"``, ``"30m"``, ``"90s"`` or a number of seconds; :class:`SimulatorError` unless
    positive and finite."""
    if isinstance(text, bool):
        raise SimulatorError(f"failure interval: got {text!r}; give seconds or a duration like 6h, 30m, 90s")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([hms]?)\s*", str(text))
        if not m:
            raise SimulatorError(f"failure interval: got {text!r}; give seconds or a duration like 6h, 30m, 90s")
        seconds = float(m.group(1)) * {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}[m.group(2)]
    if not (math.isfinite(seconds) and seconds > 0):
        raise SimulatorError(f"failure interval: got {text!r}; must be a positive time (e.g. 6h, 30m, 90s)")
    return seconds


def fixed_interval_trace(
    nodes: int, interval_s: float, duration_s: float, replacement_delay_s: float, seed: int = 0
) -> list[TraceEvent]:
    """``nodes`` nodes at time 0; every ``interval_s`` one alive node (chosen by a seeded RNG) is lost and a
    new node is added ``replacement_delay_s`` later (a replacement VM); events up to ``duration_s``."""
    interval_s = parse_interval(interval_s)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise SimulatorError(f"nodes: got {nodes!r}; must be an integer >= 1")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise SimulatorError(f"duration: got {duration_s!r}; must be a positive number of seconds")
    if not (math.isfinite(replacement_delay_s) and replacement_delay_s >= 0):
        raise SimulatorError(f"replacement delay: got {replacement_delay_s!r}; must be >= 0 seconds")
    rng = random.Random(seed)
    events = [TraceEvent(0.0, "add", node_name(i)) for i in range(1, nodes + 1)]
    alive = [node_name(i) for i in range(1, nodes + 1)]
    arrivals: list[tuple[float, int, str]] = []
    next_id = nodes + 1
    k = 1
    while k * interval_s < duration_s:
        now = k * interval_s
        while arrivals and arrivals[0][0] <= now:
            at, _, name = heapq.heappop(arrivals)
            events.append(TraceEvent(at, "add", name))
            alive.append(name)
        if alive:
            victim = alive.pop(rng.randrange(len(alive)))
            events.append(TraceEvent(now, "remove", victim))
            if now + replacement_delay_s < duration_s:
                heapq.heappush(arrivals, (now + replacement_delay_s, next_id, node_name(next_id)))
                next_id += 1
        k += 1
    events.extend(TraceEvent(at, "add", name) for at, _, name in sorted(arrivals))
    events.sort(key=lambda e: e.at_s)  # stable: at equal times the order above is kept
    return events


def write_trace(events: Sequence[TraceEvent], path: Any) -> None:
    """Write ``events`` in the trace file format (``milliseconds,add|remove,node``) that
    :func:`oobleck.trace.load_trace` reads, so that the measured harness can replay the same schedule."""
    with open(path, "w", encoding="utf-8") as out:
        for e in events:
            out.write(f"{round(e.at_s * 1000)},{e.kind},{e.node}\n")


@dataclass(frozen=True)
class Change:
    """At ``at_s`` the node becomes usable by the job (``ready``) or is lost (``lost``)."""

    at_s: float
    kind: str
    node: str


def usable_timeline(events: Sequence[TraceEvent], capacity: int, node_ready_s: float) -> list[Change]:
    """The changes a job sees from a trace: nodes added at the trace's first timestamp are ready at once,
    later ones ``node_ready_s`` after their ``add`` (a node lost before it is ready is never seen); at most
    ``capacity`` nodes are in the job, further ready nodes queue (first come, first in) and take the place
    of lost ones at the moment of the loss. At one timestamp, losses come before arrivals."""
    if not events:
        raise SimulatorError("trace has no events; expected lines like 0,add,node1 (a node-availability trace)")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise SimulatorError(f"capacity: got {capacity!r}; must be an integer >= 1 (nodes)")
    if not (math.isfinite(node_ready_s) and node_ready_s >= 0):
        raise SimulatorError(f"node ready time: got {node_ready_s!r}; must be >= 0 seconds")
    first = events[0].at_s
    scheduled: list[tuple[float, int, str, int]] = []  # (ready time, sequence, node, token of its add)
    token: dict[str, int] = {}  # node -> token of its current add (-1: lost before it was ready)
    in_job: dict[str, None] = {}
    queue: list[str] = []
    out: list[Change] = []

    def flush(until: float) -> None:
        while scheduled and scheduled[0][0] < until:
            at, _, node, tok = heapq.heappop(scheduled)
            if token.get(node) != tok:
                continue  # lost before it was ready
            if len(in_job) < capacity:
                in_job[node] = None
                out.append(Change(at, "ready", node))
            else:
                queue.append(node)

    for seq, e in enumerate(events):
        flush(e.at_s)
        if e.kind == "add":
            token[e.node] = seq
            at = e.at_s if e.at_s <= first else e.at_s + node_ready_s
            heapq.heappush(scheduled, (at, seq, e.node, seq))
        elif e.kind == "remove":
            token[e.node] = -1
            if e.node in in_job:
                del in_job[e.node]
                out.append(Change(e.at_s, "lost", e.node))
                if queue:
                    promoted = queue.pop(0)
                    in_job[promoted] = None
                    out.append(Change(e.at_s, "ready", promoted))
            elif e.node in queue:
                queue.remove(e.node)
        else:
            raise SimulatorError(f"trace event {e!r}: kind must be add or remove")
    flush(math.inf)
    return out


# ---------------------------------------------------------------------------------------------------------
# Results


@dataclass
class SimResult:
    """One policy on one timeline. ``breakdown`` in seconds (sums to ``duration_s``); ``samples`` committed
    and kept; ``fault_free_samples_per_s``: the policy's throughput on all ``capacity`` nodes without
    failures or checkpoints."""

    policy: str
    duration_s: float
    samples: float
    steps: int
    breakdown: dict[str, float]
    counts: dict[str, int]
    fault_free_samples_per_s: float
    fault_free_config: str

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.duration_s if self.duration_s > 0 else 0.0

    def shares(self) -> dict[str, float]:
        total = sum(self.breakdown.values())
        return {k: (v / total if total > 0 else 0.0) for k, v in self.breakdown.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "samples_per_s": self.samples_per_s,
            "duration_s": self.duration_s,
            "samples": self.samples,
            "steps": self.steps,
            "breakdown_s": dict(self.breakdown),
            "breakdown_share": self.shares(),
            "counts": dict(self.counts),
            "fault_free_samples_per_s": self.fault_free_samples_per_s,
            "fault_free_config": self.fault_free_config,
        }


@dataclass
class _Snapshot:
    step: int = 0
    samples: float = 0.0
    useful: float = 0.0
    redundant: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# The common engine


class _Sim:
    """Accounting and the event loop; subclasses supply the policy's rules."""

    policy = ""

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float) -> None:
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise SimulatorError(f"duration: got {duration_s!r}; must be a positive number of seconds")
        if not (math.isfinite(step_scale) and step_scale > 0):
            raise SimulatorError(f"step_scale: got {step_scale!r}; must be a positive factor")
        self.setup = setup
        self.costs = setup.costs
        self.changes = list(changes)
        self.duration = float(duration_s)
        self.scale = float(step_scale)
        self.batch = setup.global_batch
        self.t = 0.0
        self.mode = "wait"  # run | busy | wait
        self.busy_kind = ""
        self.busy_cat = ""
        self.busy_until = 0.0
        self.started = False
        self.acc = dict.fromkeys(CATEGORIES, 0.0)
        self.samples = 0.0
        self.step = 0
        self.ckpt = _Snapshot()
        self.alive: dict[str, None] = {}
        self.counts: Counter[str] = Counter()
        self.step_s = math.inf
        self.redundant_s = 0.0

    # -- hooks -------------------------------------------------------------------------------------------
    def min_nodes(self) -> int:
        raise NotImplementedError

    def begin(self, now: float) -> None:
        """Start training on the alive nodes (job start or after a restart); mode becomes run or wait."""
        raise NotImplementedError

    def on_changes(self, now: float, lost: list[str], ready: list[str]) -> None:
        raise NotImplementedError

    def on_busy_done(self, now: float, kind: str) -> None:
        raise NotImplementedError

    def at_boundary(self, now: float) -> None:
        """After committed steps: start a checkpoint or a reconfiguration if one is due."""

    def steps_until_boundary(self) -> float:
        return math.inf

    def fault_free(self) -> tuple[float, str]:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------
    def set_step(self, step_s: float, redundant_s: float = 0.0) -> None:
        self.step_s = step_s * self.scale
        self.redundant_s = redundant_s * self.scale

    def steps_to_multiple(self, every: float) -> float:
        """Steps until the step count is next a multiple of ``every`` (a checkpoint interval)."""
        return every - self.step % every if self.step % every else every

    def interrupt(self, now: float) -> None:
        """A failure cuts the step in progress: its time so far is lost."""
        if self.mode == "run":
            self.acc["lost"] += max(0.0, now - self.t)
            self.t = now

    def start_busy(self, now: float, kind: str, category: str, seconds: float) -> None:
        self.t = now
        self.mode = "busy"
        self.busy_kind = kind
        self.busy_cat = category
        self.busy_until = now + seconds

    def wait(self, now: float) -> None:
        self.t = now
        self.mode = "wait"

    def snapshot(self) -> _Snapshot:
        return _Snapshot(self.step, self.samples, self.acc["useful"], self.acc["redundant"])

    def rollback(self) -> None:
        """Back to the latest complete checkpoint: the steps since are lost."""
        c = self.ckpt
        self.acc["lost"] += (self.acc["useful"] - c.useful) + (self.acc["redundant"] - c.redundant)
        self.acc["useful"], self.acc["redundant"] = c.useful, c.redundant
        self.counts["steps_lost"] += self.step - c.step
        self.step, self.samples = c.step, c.samples

    def commit(self, k: int) -> None:
        self.acc["useful"] += k * (self.step_s - self.redundant_s)
        self.acc["redundant"] += k * self.redundant_s
        self.samples += k * self.batch
        self.step += k

    # -- loop --------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        changes = self.changes
        i = 0
        n = len(changes)
        while True:
            next_t = changes[i].at_s if i < n else math.inf
            horizon = min(next_t, self.duration)
            if self.mode == "run":
                k = math.floor((horizon - self.t) / self.step_s * (1 + 1e-12)) if self.step_s > 0 else 0
                k = int(min(k, self.steps_until_boundary()))
                if k >= 1:
                    self.commit(k)
                    self.t = min(self.t + k * self.step_s, horizon)
                    self.at_boundary(self.t)
                    continue
            elif self.mode == "busy" and self.busy_until <= horizon:
                self.acc[self.busy_cat] += self.busy_until - self.t
                self.t = self.busy_until
                self.mode = "run"  # the hook sets the real mode
                self.on_busy_done(self.t, self.busy_kind)
                continue
            if next_t > self.duration or i >= n:
                # nothing more happens before the end
                end = self.duration
                bucket = {"run": "lost", "busy": self.busy_cat, "wait": "waiting"}[self.mode]
                self.acc[bucket] += max(0.0, end - self.t)
                self.t = end
                break
            # changes at next_t (all of them together)
            lost, ready = [], []
            while i < n and changes[i].at_s == next_t:
                (lost if changes[i].kind == "lost" else ready).append(changes[i].node)
                i += 1
            if self.mode == "busy":
                self.acc[self.busy_cat] += next_t - self.t
                self.t = next_t
            elif self.mode == "wait":
                self.acc["waiting"] += next_t - self.t
                self.t = next_t
            for node in lost:
                self.alive.pop(node, None)
            for node in ready:
                self.alive[node] = None
            if not self.started:
                if len(self.alive) >= self.min_nodes():
                    self.started = True
                    self.t = next_t
                    self.begin(next_t)
                continue
            self.on_changes(next_t, lost, ready)
        counts = {k: int(v) for k, v in sorted(self.counts.items())}
        ff, desc = self.fault_free()
        return SimResult(self.policy, self.duration, self.samples, self.step, dict(self.acc), counts, ff, desc)


# ---------------------------------------------------------------------------------------------------------
# Oobleck


class _Oobleck(_Sim):
    policy = "oobleck"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: OobleckConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: OobleckConfig | None = None
        self.placed: list[str] = []  # node names by position; positions >= len(cfg.holdings) are spares
        self.lost_set: set[str] = set()
        self.pending_join = False
        self.joining: list[str] = []
        self.bg: tuple[float, _Snapshot] | None = None  # a background checkpoint in flight
        self.last_bg_step = 0

    def min_nodes(self) -> int:
        return self.configs.n0

    def fault_free(self) -> tuple[float, str]:
        cfg = self.configs.config(self.setup.cluster.nodes)
        assert cfg is not None
        return self.batch / cfg.step_time_s, describe_config("oobleck", cfg)

    def _adopt(self, nodes: list[str]) -> bool:
        cfg = self.configs.config(len(nodes))
        if cfg is None:
            return False
        self.cfg = cfg
        self.placed = list(nodes)
        self.set_step(cfg.step_time_s)
        return True

    def begin(self, now: float) -> None:
        self.pending_join = False
        if self._adopt(list(self.alive)):
            self.mode = "run"
            self.t = now
        else:
            self.wait(now)

    def _in_use(self) -> set[str]:
        assert self.cfg is not None
        return set(self.placed[: len(self.cfg.holdings)])

    def _fatal(self) -> bool:
        """Some layer has no copy left outside the lost nodes (or too few nodes remain)."""
        assert self.cfg is not None
        survivors = [n for n in self.placed if n not in self.lost_set]
        if len(survivors) < self.configs.n0:
            return True
        covered = [0] * self.setup.profile.num_layers
        for q, (_, a, b) in enumerate(self.cfg.holdings):
            if self.placed[q] not in self.lost_set:
                for layer in range(a, b):
                    covered[layer] += 1
        return min(covered) == 0

    def _promote(self, now: float) -> None:
        if self.bg is not None and self.bg[0] <= now:
            self.ckpt = self.bg[1]
            self.counts["checkpoints"] += 1
            self.bg = None

    def _recover(self, now: float) -> None:
        """Start (or restart, when more nodes were lost during it) the recovery from ``lost_set``."""
        assert self.cfg is not None
        if self._fatal():
            self.counts["fatal"] += 1
            self._promote(now)
            self.bg = None
            self.rollback()
            self.lost_set.clear()
            self.pending_join = False
            if len(self.alive) >= self.configs.n0:
                self.counts["restarts"] += 1
                self.start_busy(now, "restart", "recovery", self.costs.restart_s)
            else:
                self.wait(now)
            return
        nbytes = sum(self.configs.layer_bytes(a, b) for q, (_, a, b) in enumerate(self.cfg.holdings) if self.placed[q] in self.lost_set)
        self.start_busy(now, "recovery", "recovery", self.costs.recovery_fixed_s + nbytes / self.costs.copy_bandwidth)

    def on_changes(self, now: float, lost: list[str], ready: list[str]) -> None:
        if ready:
            self.counts["joins"] += len(ready)
        if self.mode == "wait":
            if len(self.alive) >= self.configs.n0:
                self.counts["restarts"] += 1
                self.start_busy(now, "restart", "recovery", self.costs.restart_s)
            return
        if self.mode == "busy" and self.busy_kind == "restart":
            if lost:  # the rendezvous starts over
                self.counts["node_losses"] += len(lost)
                if len(self.alive) >= self.configs.n0:
                    self.start_busy(now, "restart", "recovery", self.costs.restart_s)
                else:
                    self.wait(now)
            return  # nodes that joined are in the restart's rendezvous
        in_use = self._in_use()
        hit = [n for n in lost if n in in_use]
        spare_lost = [n for n in lost if n not in in_use]
        self.counts["node_losses"] += len(hit)
        self.counts["spare_losses"] += len(spare_lost)
        for n in spare_lost:
            if n in self.placed:
                self.placed.remove(n)
        self.joining = [n for n in self.joining if n in self.alive]
        if ready:
            self.pending_join = True
        if hit and self.mode == "busy" and self.busy_kind == "join":
            # a failure cuts the join short: recover the survivors; the joining nodes come in afterwards
            self.joining = []
            self.pending_join = True
        if hit:
            self.interrupt(now)
            if not (self.mode == "busy" and self.busy_kind == "recovery"):
                self.counts["recoveries"] += 1
            self.lost_set.update(hit)
            self._recover(now)

    def on_busy_done(self, now: float, kind: str) -> None:
        self._promote(now)
        if kind == "restart":
            self.lost_set.clear()
            self.pending_join = False
            if self._adopt(list(self.alive)):
                self.mode = "run"
                self.last_bg_step = self.step
            else:
                self.wait(now)
            return
        if kind == "recovery":
            survivors = [n for n in self.placed if n not in self.lost_set]
            self.lost_set.clear()
            ok = self._adopt(survivors)
            assert ok, "a non-fatal recovery always leaves at least n0 nodes"
        elif kind == "join":
            ok = self._adopt(self.placed + [n for n in self.joining if n in self.alive])
            assert ok
            self.joining = []
        self.mode = "run"
        self.at_boundary(now)

    def steps_until_boundary(self) -> float:
        if self.pending_join:
            return 1
        return self.steps_to_multiple(self.costs.oobleck_checkpoint_every)

    def at_boundary(self, now: float) -> None:
        self._promote(now)
        k = self.costs.oobleck_checkpoint_every
        if self.step % k == 0 and self.step > self.last_bg_step and self.bg is None:
            self.bg = (now + self.costs.checkpoint_write_s, self.snapshot())
            self.last_bg_step = self.step
        if self.pending_join:
            self.pending_join = False
            assert self.cfg is not None
            new = [n for n in self.alive if n not in self.placed]
            if not new:
                return
            candidate = self.configs.config(len(self.placed) + len(new))
            if candidate is not None and candidate.step_time_s < self.cfg.step_time_s * (1 - 1e-9):
                start = len(self.placed)
                nbytes = sum(
                    self.configs.layer_bytes(a, b) for q, (_, a, b) in enumerate(candidate.holdings) if q >= start
                )
                self.joining = new
                self.counts["recoveries"] += 1
                self.start_busy(now, "join", "recovery", self.costs.recovery_fixed_s + nbytes / self.costs.copy_bandwidth)
            else:
                self.placed.extend(new)  # spares: a later recovery re-plans with them


# ---------------------------------------------------------------------------------------------------------
# Varuna


class _Homogeneous(_Sim):
    """A baseline of homogeneous pipelines: its ``configs`` give n0 and the plan for a node count."""

    configs: VarunaConfigs | BambooConfigs

    def min_nodes(self) -> int:
        return self.configs.n0

    def fault_free(self) -> tuple[float, str]:
        cfg = self.configs.config(self.setup.cluster.nodes)
        assert cfg is not None
        return self.batch / cfg.step_time_s, f"{cfg.replicas}x{cfg.depth} nodes"


    def _restart(self, now: float) -> None:
        raise NotImplementedError

    def _counted_or_waiting(self, now: float, ready: list[str]) -> bool:
        """Count the joins; while waiting for nodes, restart once n0 are alive. True when waiting (the
        changes are handled)."""
        if ready:
            self.counts["joins"] += len(ready)
        if self.mode != "wait":
            return False
        if len(self.alive) >= self.configs.n0:
            self._restart(now)
        return True


class _Varuna(_Homogeneous):
    """Varuna-style: any loss of a node in use stops everything, rolls back to the latest checkpoint and
    restarts on the nodes alive when the restart begins (a loss during it starts it over). A node that
    becomes ready later waits for the next periodic checkpoint, after which the job restarts to take it in
    if that makes it faster (growing costs a restart but loses no step; the engine's master grows at the same
    checkpoint boundary, ``_grows_after``, but restarts even when the plan does not improve)."""

    policy = "varuna"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: VarunaConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: HomogeneousConfig | None = None
        self.placed: list[str] = []
        self.restart_nodes: list[str] | None = None  # the nodes the restart under way plans for
        self.restart_after_checkpoint = False

    @property
    def pending_join(self) -> bool:
        return any(n not in self.placed for n in self.alive)

    def begin(self, now: float) -> None:
        planned = self.restart_nodes if self.restart_nodes is not None else list(self.alive)
        self.restart_nodes = None
        self.restart_after_checkpoint = False
        nodes = [n for n in planned if n in self.alive]
        cfg = self.configs.config(len(nodes))
        if cfg is None:
            self.wait(now)
            return
        self.cfg = cfg
        self.placed = nodes
        self.set_step(cfg.step_time_s)
        self.mode = "run"
        self.t = now

    def _restart(self, now: float, count: bool = True) -> None:
        self.restart_after_checkpoint = False
        if len(self.alive) >= self.configs.n0:
            self.counts["restarts"] += int(count)
            self.restart_nodes = list(self.alive)
            self.start_busy(now, "restart", "recovery", self.costs.restart_s)
        else:
            self.wait(now)

    def _fail(self, now: float) -> None:
        """A node in the job is lost: stop, roll back to the latest checkpoint, restart."""
        self.interrupt(now)
        self.counts["fatal"] += 1
        self.rollback()
        self._restart(now)

    def on_changes(self, now: float, lost: list[str], ready: list[str]) -> None:
        if self._counted_or_waiting(now, ready):
            return
        if self.mode == "busy" and self.busy_kind == "restart":
            if lost:
                self.counts["node_losses"] += len(lost)
                self._restart(now, count=False)  # the rendezvous starts over
            return  # a node ready now waits for the next checkpoint
        assert self.cfg is not None
        in_use = set(self.placed[: self.cfg.nodes_used])
        hit = [n for n in lost if n in in_use]
        self.counts["node_losses"] += len(hit)
        self.counts["spare_losses"] += len(lost) - len(hit)
        self.placed = [n for n in self.placed if n in self.alive]
        if hit:
            self._fail(now)  # a checkpoint being written is lost with it

    def on_busy_done(self, now: float, kind: str) -> None:
        if kind == "restart":
            self.begin(now)
            return
        if kind == "checkpoint":
            self.ckpt = self.snapshot()
            self.counts["checkpoints"] += 1
            self.mode = "run"
            if self.restart_after_checkpoint:
                self.counts["reconfigurations"] += 1
                self._restart(now, count=False)
            return
        raise AssertionError(kind)

    def steps_until_boundary(self) -> float:
        return self.steps_to_multiple(self.costs.checkpoint_every)

    def _grows_faster(self) -> bool:
        """Whether the best configuration for every alive node is faster than the current one."""
        assert self.cfg is not None
        candidate = self.configs.config(len(self.alive))
        return candidate is not None and candidate.step_time_s < self.cfg.step_time_s * (1 - 1e-9)

    def at_boundary(self, now: float) -> None:
        if self.step % self.costs.checkpoint_every == 0 and self.step != self.ckpt.step:
            self.restart_after_checkpoint = self.pending_join and self._grows_faster()
            self.start_busy(now, "checkpoint", "checkpoint", self.costs.checkpoint_write_s)


# ---------------------------------------------------------------------------------------------------------
# Bamboo


class _Bamboo(_Homogeneous):
    policy = "bamboo"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: BambooConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: BambooConfig | None = None
        self.placed: list[str] = []  # positions [0, depth*replicas) are pipelines; lost ones keep their slot
        self.dead: list[set[int]] = []
        self.check = False

    def _update_step(self) -> None:
        assert self.cfg is not None and self.cfg.pipeline is not None
        dead = [frozenset(d) for d in self.dead]
        step = self.configs.step_time(self.cfg, dead)
        plain = max(self.cfg.pipeline.step_time(m, d, redundancy=False) for m, d in zip(self.cfg.microbatches, dead))
        self.set_step(step, max(0.0, step - plain))

    def begin(self, now: float) -> None:
        self.check = False
        cfg = self.configs.config(len(self.alive))
        if cfg is None:
            self.wait(now)
            return
        self.cfg = cfg
        self.placed = list(self.alive)
        self.dead = [set() for _ in range(cfg.replicas)]
        self._update_step()
        self.mode = "run"
        self.t = now

    def _restart(self, now: float, kind: str = "restart", count: bool = True) -> None:
        if len(self.alive) >= self.configs.n0:
            self.counts["restarts" if kind == "restart" else "reconfigurations"] += int(count)
            seconds = self.costs.bamboo_fatal_restart_s if kind == "restart" else self.costs.bamboo_reconfigure_s
            self.start_busy(now, kind, "recovery", seconds)
        else:
            self.wait(now)

    def on_changes(self, now: float, lost: list[str], ready: list[str]) -> None:
        if self._counted_or_waiting(now, ready):
            return
        if self.mode == "busy" and self.busy_kind in ("restart", "reconfigure"):
            if lost:  # the rendezvous starts over
                self.counts["node_losses"] += len(lost)
                self._restart(now, self.busy_kind, count=False)
            return
        assert self.cfg is not None
        depth, used = self.cfg.depth, self.cfg.nodes_used
        position = {n: q for q, n in enumerate(self.placed[:used])}
        hit = [n for n in lost if n in position]
        self.counts["node_losses"] += len(hit)
        self.counts["spare_losses"] += len(lost) - len(hit)
        self.placed = self.placed[:used] + [n for n in self.placed[used:] if n in self.alive]
        if ready:
            self.placed.extend(n for n in ready if n not in self.placed)
            self.check = True
        if not hit:
            return
        self.interrupt(now)
        fatal = False
        for n in hit:
            p, pos = divmod(position[n], depth)
            if any((pos - d) % depth in (1, depth - 1) for d in self.dead[p]) or depth < 2:
                fatal = True
            self.dead[p].add(pos)
        if fatal:
            self.counts["fatal"] += 1
            self.rollback()
            self._restart(now)
            return
        self.counts["takeovers"] += len(hit)
        self._update_step()
        self.start_busy(now, "takeover", "recovery", self.costs.bamboo_takeover_s)

    def on_busy_done(self, now: float, kind: str) -> None:
        if kind in ("restart", "reconfigure"):
            self.begin(now)
            return
        self.mode = "run"
        if kind == "checkpoint":
            self.ckpt = self.snapshot()
            self.counts["checkpoints"] += 1
        elif kind == "takeover":
            self.check = True
        self.at_boundary(now)

    def steps_until_boundary(self) -> float:
        if self.check:
            return 1
        return self.steps_to_multiple(self.costs.bamboo_checkpoint_every)

    def at_boundary(self, now: float) -> None:
        assert self.cfg is not None
        if self.check:
            self.check = False
            overloaded = sum(len(d) for d in self.dead)
            active = self.cfg.nodes_used - overloaded
            spares = len(self.placed) - self.cfg.nodes_used
            if self.configs.config(len(self.alive)) is None:
                return  # no pipeline fits the alive nodes: keep running as taken over
            # the Oobleck artifact's Bamboo rules: spares can replace the overloaded nodes; the chance that a
            # failure is fatal (2 x overloaded / active) is above the threshold; another pipeline fits
            if overloaded and (spares >= overloaded or 2 * overloaded / max(active, 1) > self.costs.bamboo_reconfigure_threshold):
                self._restart(now, "reconfigure")
                return
            if (active + spares) // self.cfg.depth > self.cfg.replicas:
                self._restart(now, "reconfigure")
                return
        if self.step % self.costs.bamboo_checkpoint_every == 0 and self.step != self.ckpt.step:
            self.start_busy(now, "checkpoint", "checkpoint", self.costs.checkpoint_write_s)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class PolicyConfigs:
    """The three policies' configuration tables for one :class:`Setup` (built once, reused across
    timelines)."""

    setup: Setup
    oobleck: OobleckConfigs = field(init=False)
    varuna: VarunaConfigs = field(init=False)
    bamboo: BambooConfigs = field(init=False)

    def __post_init__(self) -> None:
        self.oobleck = OobleckConfigs(self.setup)
        self.varuna = VarunaConfigs(self.setup)
        self.bamboo = BambooConfigs(self.setup)


def check_policies(policies: Iterable[str]) -> list[str]:
    out = list(policies)
    for p in out:
        if p not in POLICIES:
            raise SimulatorError(f"policy: got {p!r}; known policies: {', '.join(POLICIES)}")
    if not out:
        raise SimulatorError(f"no policy given; known policies: {', '.join(POLICIES)}")
    return out


def simulate(
    policy: str,
    configs: PolicyConfigs,
    events: Sequence[TraceEvent],
    duration_s: float | None = None,
    node_ready_s: float = 0.0,
    step_scale: float = 1.0,
    costs: Costs | None = None,
) -> SimResult:
    """Run ``policy`` over the node-availability trace ``events`` for ``duration_s`` (default: until the
    trace's last event) with at most ``configs.setup.cluster.nodes`` nodes in the job. ``step_scale``
    multiplies every step time (calibration); ``costs`` replaces ``configs.setup.costs``."""
    check_policies([policy])
    if not events:
        raise SimulatorError("trace has no events; expected lines like 0,add,node1 (a node-availability trace)")
    if duration_s is None:
        duration_s = events[-1].at_s
        if duration_s <= 0:
            raise SimulatorError("trace lasts 0 s (every event at time 0); give a duration")
    changes = usable_timeline(events, configs.setup.cluster.nodes, node_ready_s)
    sim: _Sim
    if policy == "oobleck":
        sim = _Oobleck(configs.setup, changes, duration_s, step_scale, configs.oobleck)
    elif policy == "varuna":
        sim = _Varuna(configs.setup, changes, duration_s, step_scale, configs.varuna)
    else:
        sim = _Bamboo(configs.setup, changes, duration_s, step_scale, configs.bamboo)
    if costs is not None:
        sim.costs = costs
    return sim.run()


__all__ = [
    "CATEGORIES",
    "Change",
    "PolicyConfigs",
    "SimResult",
    "check_policies",
    "fixed_interval_trace",
    "parse_interval",
    "simulate",
    "usable_timeline",
    "write_trace",
]
