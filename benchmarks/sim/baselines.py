"""The baselines' rules in the simulator: Varuna-style restarts from foreground checkpoints and
Bamboo-style redundant pipelines with takeovers, both on homogeneous pipelines (see :mod:`benchmarks.sim`)."""

from __future__ import annotations

from typing import Sequence

from benchmarks.sim.core import PolicySim
from benchmarks.sim.model import BambooConfig, BambooConfigs, HomogeneousConfig, Setup, VarunaConfigs
from benchmarks.sim.timeline import Change


class HomogeneousSim(PolicySim):
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


class VarunaSim(HomogeneousSim):
    """Varuna-style: any loss of a node in use stops everything, rolls back to the latest checkpoint and
    restarts on the nodes alive when the restart begins (a loss during it joins it or starts it over:
    :meth:`~benchmarks.sim.core.PolicySim.restart_after_loss`). A node that
    becomes ready later waits for the next periodic checkpoint, after which the job restarts to take it in
    (growing costs a restart but loses no step): only if that makes it faster, or always, as the engine's
    master does (``Costs.varuna_grows_only_if_faster``)."""

    policy = "varuna"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: VarunaConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: HomogeneousConfig | None = None
        self.placed: list[str] = []
        self.restart_nodes: list[str] | None = None  # the nodes the restart under way plans for
        self.restart_after_checkpoint = False
        #: nodes whose process has trained in some configuration (a restart that brings one in restarts it)
        self.trained_on: set[str] = set()

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
        self.trained_on.update(nodes[: cfg.nodes_used])
        self.set_step(cfg.step_time_s)
        self.mode = "run"
        self.t = now

    def _used(self, planned: list[str]) -> set[str]:
        """The nodes the plan for ``planned`` (in order) trains on; the rest are spares."""
        cfg = self.configs.config(len(planned))
        return set(planned[: cfg.nodes_used]) if cfg is not None else set()

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
                planned = self.restart_nodes
                assert planned is not None  # every restart sets the nodes it plans for
                before = self._used(planned)
                hit = [n for n in lost if n in before]
                self.counts["node_losses"] += len(hit)
                self.counts["spare_losses"] += len(lost) - len(hit)
                if not hit:
                    return  # a spare's loss: the engine does not re-plan
                if len(self.alive) < self.configs.n0:
                    self.wait(now)
                    return
                # the newer plan: the restart's nodes still alive, then any that became ready meanwhile
                self.restart_nodes = [n for n in planned if n in self.alive] + [n for n in self.alive if n not in planned]
                # a spare of the restart brought in now restarts its process only now if that process has
                # trained before; a node never placed runs a fresh process already, as in the engine
                spares_in = (self._used(self.restart_nodes) - before) & self.trained_on
                self.restart_after_loss(now, self.costs.restart_s, newcomers=bool(spares_in))
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
            self.restart_after_checkpoint = self.pending_join and (
                not self.costs.varuna_grows_only_if_faster or self._grows_faster()
            )
            self.start_busy(now, "checkpoint", "checkpoint", self.costs.checkpoint_write_s)


class BambooSim(HomogeneousSim):
    policy = "bamboo"

    def __init__(self, setup: Setup, changes: Sequence[Change], duration_s: float, step_scale: float, configs: BambooConfigs) -> None:
        super().__init__(setup, changes, duration_s, step_scale)
        self.configs = configs
        self.cfg: BambooConfig | None = None
        self.placed: list[str] = []  # positions [0, depth*replicas) are pipelines; lost ones keep their slot
        self.dead: list[set[int]] = []
        self.check = False
        #: a node became ready since the last (re-)partition
        self.joined = False

    def _update_step(self) -> None:
        assert self.cfg is not None and self.cfg.pipeline is not None
        dead = [frozenset(d) for d in self.dead]
        step = self.configs.step_time(self.cfg, dead)
        plain = max(self.cfg.pipeline.step_time(m, d, redundancy=False) for m, d in zip(self.cfg.microbatches, dead))
        self.set_step(step, max(0.0, step - plain))

    def begin(self, now: float) -> None:
        self.check = False
        self.joined = False
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
            if lost:
                self.counts["node_losses"] += len(lost)
                if self.busy_kind == "restart" and len(self.alive) >= self.configs.n0:
                    self.restart_after_loss(now, self.costs.bamboo_fatal_restart_s)
                else:  # a re-partition's rendezvous starts over
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
            self.joined = True
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
            if self.joined and self.costs.bamboo_replans_on_join:
                self._restart(now, "reconfigure")
                return
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
