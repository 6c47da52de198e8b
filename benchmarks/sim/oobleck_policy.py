"""Oobleck's rules in the simulator: heterogeneous pipelines re-instantiated from the templates on every
membership change, background checkpoints, a restart only when a layer lost every copy (see
:mod:`benchmarks.sim`)."""

from __future__ import annotations

from typing import Sequence

from benchmarks.sim.core import PolicySim, Snapshot
from benchmarks.sim.model import OobleckConfig, OobleckConfigs, Setup, describe_config
from benchmarks.sim.timeline import Change


class OobleckSim(PolicySim):
    policy = "oobleck"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: OobleckConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: OobleckConfig | None = None
        self.placed: list[str] = []  # node names by position; positions >= len(cfg.holdings) are spares
        self.lost_set: set[str] = set()
        self.pending_join = False
        self.joining: list[str] = []
        self.bg: tuple[float, Snapshot] | None = None  # a background checkpoint in flight
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
            if lost:
                self.counts["node_losses"] += len(lost)
                if len(self.alive) >= self.configs.n0:
                    self.restart_after_loss(now, self.costs.restart_s)
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
