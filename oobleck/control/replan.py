"""Re-planning: whenever the membership changed, :class:`Replanner` forms the next generation (the policy's
layout, placement, where its layers come from, its first step) and hands it to a commit driver."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from oobleck.control.checkpoints import restore_latest
from oobleck.control.placement import Placement, place
from oobleck.control.policy import Membership, Planner, Policy, choose_nodes
from oobleck.control.sources import FRESH, Sources, layer_moves
from oobleck.control.state import Generation, JobState
from oobleck.engine.api import Restore
from oobleck.engine.store_keys import generation_prefix
from planner.errors import PlanningError

log = logging.getLogger(__name__)
#: how often the re-planner re-checks whether a re-plan is due or its wait for nodes ran out
_POLL_S = 0.2


@dataclass
class Replanner:
    """Forms a new generation whenever the membership changed (see the master's module notes); :meth:`run`
    on a thread of its own. ``start(gen, plan_s)`` starts the commit of a generation it formed;
    ``layer_bytes``: each layer's size, for the copies (None: all alike)."""

    state: JobState
    policy: Policy
    planner: Planner
    layer_bytes: Sequence[int] | None
    start: Callable[[Generation, float], None]

    @property
    def _devices(self) -> int:
        return self.state.config.cluster.devices_per_node

    def run(self) -> None:
        state = self.state
        wait_limit = state.config.fault_tolerance.wait_for_nodes_s
        while True:
            with state.lock:
                while not (state.replan or state.over()):
                    if state.waiting_since is not None and time.monotonic() - state.waiting_since > wait_limit:
                        state.fail_locked(f"{state.waiting_reason}; no node joined within {wait_limit:g} s")
                        return
                    state.lock.wait(_POLL_S)
                if state.over():
                    return
                state.replan = False
                state.joins_ready = False
                membership = state.membership
                first = state.generation is None
                # a node that registered mid-run is placed once its workers are up (they wait for work)
                usable = [
                    n for n, v in state.nodes.items()
                    if v.alive and (first or v.in_job or len(v.waiting) == self._devices)
                ]  # fmt: skip
                names = sorted(usable, key=natural_key)
            try:
                self.new_generation(names, membership)
            except Exception as e:  # a planner or store failure: end the job with its one-line reason
                state.fail(f"planning failed: {e}")
                return

    def new_generation(self, names: list[str], membership: int) -> None:
        """Plan and start a generation on ``names`` unless the membership moved past ``membership``
        meanwhile; too few nodes start (or continue) the wait for nodes to join."""
        state = self.state
        started = time.perf_counter()
        first = state.generation is None and not state.recoveries and state.change is None
        try:
            with state.lock:
                now = Membership(
                    names,
                    first,
                    state.committed_placement,
                    state.change is not None and bool(state.change.joined),
                    frozenset(state.planned_ranges),
                )
            layout = self.policy.layout(self.planner, now)
            if layout.planned is not None:
                state.planned_ranges = set(layout.planned)
            shapes, names = layout.shapes, layout.nodes
            used = sum(len(shape.layer_ranges) for shape in shapes) // self._devices
            if used < len(names):
                # too few nodes for the guarantee, and the templates cannot use them all: the spares wait
                # (their workers stay up) and are placed again at the next re-plan
                names = self._choose_nodes(names, used)
            placement = place(shapes, names, self._devices)
        except PlanningError as e:
            if first:
                raise
            with state.lock:
                if state.waiting_since is None:
                    state.waiting_since = time.monotonic()
                    log.warning("cannot train on %d nodes (%s); waiting for nodes to join", len(names), e)
                state.waiting_reason = f"{len(names)} nodes left: {e}"
            return
        with state.lock:
            if membership != state.membership or state.failure is not None:
                return  # the membership changed again meanwhile; that change re-plans
            restore, moves, start = self._sources(placement, first, layout.restart)
            if first:
                state.committed = start  # a resumed run starts at its checkpoint
            steps_lost = state.committed - start
            if steps_lost:
                log.warning("restoring step %d: %d committed steps are lost and will be re-run", start, steps_lost)
                state.records = [r for r in state.records if r.step < start]
                state.committed = start
                state.holdings = {}
                state.committed_placement = None
            old = state.generation
            if old is not None:
                state.end(old)
            for name in names:
                state.nodes[name].in_job = True
            number = (old.number if old else 0) + 1
            change, state.change = state.change, None
            if old is not None and not old.committed_any and old.change is not None:
                # the last recovery was interrupted by this change: report both as one, timed from the first
                change = old.change.merged(change)
                steps_lost += old.steps_lost
            gen = Generation(
                number,
                placement,
                generation_prefix(number),
                start,
                time.monotonic(),
                restore,
                moves,
                change=change,
                steps_lost=steps_lost,
                restart=layout.restart,
            )
            state.generation = gen
            state.waiting_since = None
            state.lock.notify_all()
        log.info(
            "generation %d: %d pipelines on %d ranks from step %d (%s)",
            number, len(placement.pipelines), placement.world_size, start, restore,
        )  # fmt: skip
        self.start(gen, time.perf_counter() - started)

    def _choose_nodes(self, names: list[str], count: int) -> list[str]:
        """:func:`~oobleck.control.policy.choose_nodes` by the layers each node holds at the committed step."""
        with self.state.lock:
            held: dict[str, set[int]] = {}
            for (name, _), layers in self.state.holdings.items():
                held.setdefault(name, set()).update(layers)
        chosen = choose_nodes(names, count, held)
        idle = [n for n in names if n not in chosen]
        log.warning("the plan uses %d of %d nodes; idle as spares: %s", count, len(names), ", ".join(idle))
        return chosen

    def _sources(self, placement: Placement, first: bool, restart: bool) -> Sources:
        """Where the new generation's layers come from. Lock held."""
        from oobleck.engine.transfer import LayerLost

        state = self.state
        if first:
            if state.config.run.resume:
                return restore_latest(state, "resuming the run")
            return FRESH
        if restart:
            return restore_latest(state, f"{self.policy.name}: restarting every worker")
        try:
            moves = layer_moves(placement, self.policy.held_layers(placement), state.holdings, self.layer_bytes)
        except LayerLost as e:
            return restore_latest(state, str(e))
        return Sources(Restore.MEMORY, moves, state.committed)


def natural_key(name: str) -> list[Any]:
    """node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
