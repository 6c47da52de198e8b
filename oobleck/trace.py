"""Node-availability traces: which node joins or is lost, and when.

A trace file has one event per line, ``milliseconds_since_start,add|remove,nodeN`` (blank lines are
ignored). :func:`load_trace` checks that the file describes a possible history (times never go backwards, a
node is added only while absent and removed only while present) and raises a one-line
:class:`~oobleck.errors.ConfigError` naming the file, the line and the problem otherwise. A launcher replays a
trace faster than real time with :func:`replay_schedule`. Pure Python: the simulator reads traces without the
control plane.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Sequence

from oobleck.errors import ConfigError

Kind = Literal["add", "remove"]
KINDS: tuple[Kind, ...] = ("add", "remove")


@dataclass(frozen=True)
class TraceEvent:
    """At ``at_s`` seconds after the start, ``node`` joins (``add``) or is lost (``remove``)."""

    at_s: float
    kind: Kind
    node: str


@dataclass(frozen=True)
class TraceSummary:
    """What a trace does overall.

    ``duration_s`` is the time of the last event; ``peak_nodes`` and ``min_nodes`` are the largest and smallest
    alive counts from the first event's time on (the count before any event, zero, is not counted);
    ``final_nodes`` is the count after the last event.
    """

    events: int
    adds: int
    removes: int
    duration_s: float
    peak_nodes: int
    min_nodes: int
    final_nodes: int

    def describe(self) -> str:
        """One line for a CLI or a report."""
        return (
            f"{self.events} events ({self.adds} adds, {self.removes} removes) over {self.duration_s / 3600:.2f} h; "
            f"nodes alive: peak {self.peak_nodes}, min {self.min_nodes}, final {self.final_nodes}"
        )


def load_trace(path: str | os.PathLike[str]) -> list[TraceEvent]:
    """Read and validate the trace at ``path``; events come back in file order.

    Raises ConfigError (one line: ``trace PATH, line N: problem; fix``) for an unreadable or empty file, a
    line without exactly three comma-separated fields, a time that is not a non-negative integer number of
    milliseconds, a time earlier than the previous line's, an action other than add/remove, an empty node
    name, adding a node that is already present, or removing one that is not.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problem = f"cannot read it ({e}); give the path of a readable text file"
        raise ConfigError(f"trace {os.fspath(path)}: {problem}") from None
    events: list[TraceEvent] = []
    alive: set[str] = set()
    last_ms = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        def bad(problem: str) -> ConfigError:
            return ConfigError(f"trace {os.fspath(path)}, line {number}: {problem}")

        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            raise bad(f"got {len(fields)} fields in {line!r}; expected milliseconds_since_start,add|remove,nodeN")
        ms_text, kind, node = fields
        try:
            ms = int(ms_text)
        except ValueError:
            raise bad(f"time {ms_text!r} is not an integer; give whole milliseconds since the start") from None
        if ms < 0:
            raise bad(f"time {ms} is negative; times are milliseconds since the start, 0 or more")
        if ms < last_ms:
            raise bad(f"time {ms} is earlier than the previous event's {last_ms}; sort the events by time")
        if kind not in KINDS:
            raise bad(f"action {kind!r} is unknown; use add or remove")
        if not node:
            raise bad("the node name is empty; name the node, e.g. node3")
        if kind == "add" and node in alive:
            raise bad(f"adds {node}, which is already present; remove it first or fix the name")
        if kind == "remove" and node not in alive:
            raise bad(f"removes {node}, which is not present; add it earlier or fix the name")
        if kind == "add":
            alive.add(node)
        else:
            alive.remove(node)
        last_ms = ms
        events.append(TraceEvent(ms / 1000.0, kind, node))
    if not events:
        raise ConfigError(f"trace {os.fspath(path)}: has no events; expected lines like 0,add,node1")
    return events


def replay_schedule(events: Sequence[TraceEvent], compression: float) -> list[TraceEvent]:
    """The same events with every time divided by ``compression`` (trace seconds per wall-clock second), so
    ``compression=60`` replays a trace-hour in one minute."""
    if not (isinstance(compression, (int, float)) and math.isfinite(compression) and compression > 0):
        raise ConfigError(
            f"compression: got {compression!r}; must be a positive number of trace seconds per wall second"
        )
    return [TraceEvent(e.at_s / compression, e.kind, e.node) for e in events]


def nodes_alive(events: Sequence[TraceEvent]) -> list[tuple[float, int]]:
    """The alive-count step function: ``(t, n)`` means n nodes are alive from t until the next entry's time
    (before the first entry, none are). Events at the same time are applied together, and an entry appears
    only where the count changes. ``events`` must be in time order, as :func:`load_trace` returns them."""
    steps: list[tuple[float, int]] = []
    count = 0
    for i, event in enumerate(events):
        count += 1 if event.kind == "add" else -1
        last_at_this_time = i + 1 == len(events) or events[i + 1].at_s != event.at_s
        if last_at_this_time and (not steps or steps[-1][1] != count):
            steps.append((event.at_s, count))
    return steps


def peak_nodes(events: Sequence[TraceEvent]) -> int:
    """The most nodes alive at once under the time-ordered ``events`` (0 for none), events at the same time
    applied together as in :func:`nodes_alive`."""
    return max((n for _, n in nodes_alive(events)), default=0)


def summary(events: Sequence[TraceEvent]) -> TraceSummary:
    """Counts, duration and alive-node extremes of a non-empty, time-ordered trace."""
    if not events:
        raise ValueError("summary of an empty trace")
    counts = [n for _, n in nodes_alive(events)] or [0]
    adds = sum(1 for e in events if e.kind == "add")
    return TraceSummary(
        events=len(events),
        adds=adds,
        removes=len(events) - adds,
        duration_s=events[-1].at_s,
        peak_nodes=peak_nodes(events),
        min_nodes=min(counts),
        final_nodes=counts[-1],
    )
