"""The failure schedule every policy's run is measured under: its starting nodes and the losses and adds
replayed after the first commit, timed in wall seconds or in committed steps (see the package notes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.sim.timeline import fixed_interval_trace
from oobleck.errors import OobleckError
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent, load_trace, peak_nodes, replay_schedule

#: at most this many nodes alive at once on this machine (each is an agent and a worker importing torch)
MAX_NODES = 8
#: the generated schedules by name (``--schedule``) and the unit their events are timed in
UNITS = {"interval": "s", "steps": "steps"}


@dataclass(frozen=True)
class Schedule:
    """The nodes that start every job (``initial``), the events replayed after the first commit (``events``,
    in time order) and a one-line description. ``unit``: what an event's ``at_s`` counts: ``s``, wall
    seconds after the first commit; ``steps``, steps committed (the event is replayed once the job has
    committed that many steps: its highest committed step is ``at_s - 1``)."""

    initial: tuple[str, ...]
    events: tuple[TraceEvent, ...]
    description: str
    unit: str = "s"

    @property
    def nodes(self) -> list[str]:
        """Every node name the schedule starts or adds."""
        return list(dict.fromkeys([*self.initial, *(e.node for e in self.events if e.kind == "add")]))

    @property
    def capacity(self) -> int:
        """The most nodes alive at once."""
        timeline = [TraceEvent(0.0, "add", n) for n in self.initial] + list(self.events)
        return peak_nodes(timeline)


def fixed_schedule(
    nodes: int, every: float, failures: int, replace_after: float, seed: int, unit: str = "s"
) -> Schedule:
    """``nodes`` nodes; ``failures`` losses ``every`` ``unit`` apart (seconds, or committed steps), each
    replaced ``replace_after`` later: the first losses of the simulator's
    :func:`~benchmarks.sim.timeline.fixed_interval_trace` with ``seed`` (each victim drawn by the seeded RNG
    among the nodes the schedule has alive), and their replacements (new names)."""
    last = failures * every + 1e-9
    timeline = fixed_interval_trace(nodes, every, (failures + 1) * every + replace_after, replace_after, seed)
    events = tuple(
        e for e in timeline if 0 < e.at_s <= (last if e.kind == "remove" else last + replace_after)
    )
    initial = tuple(node_name(i) for i in range(1, nodes + 1))
    text = f"{nodes} nodes; a node lost every {every:g} {unit} ({failures} in all), each replaced {replace_after:g} {unit} later; seed {seed}"
    return Schedule(initial, events, text, unit)


def trace_schedule(path: Path, compression: float) -> Schedule:
    """The trace at ``path`` replayed ``compression`` times faster: its time-0 adds start the job."""
    events = replay_schedule(load_trace(path), compression)
    initial = tuple(e.node for e in events if e.at_s == 0 and e.kind == "add")
    later = tuple(e for e in events if e.at_s > 0)
    if len(initial) < 4:
        raise OobleckError(f"--trace: {path} adds {len(initial)} nodes at time 0; the job needs at least 4")
    schedule = Schedule(initial, later, f"trace {path}, compression {compression:g}: {len(initial)} nodes at the start, {len(later)} events over {later[-1].at_s if later else 0:.0f} s")
    if schedule.capacity > MAX_NODES:
        raise OobleckError(f"--trace: {path} has {schedule.capacity} nodes alive at once; at most {MAX_NODES} fit this machine")
    return schedule


def write_initial_trace(path: Path, schedule: Schedule) -> Path:
    """The job's ``trace:`` file: only the schedule's time-0 adds (the launcher starts them by name)."""
    path.write_text("".join(f"0,add,{name}\n" for name in schedule.initial))
    return path
