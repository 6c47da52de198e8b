"""Node-availability timelines for the simulator: interval parsing, the seeded fixed-interval generator,
trace writing, and the timeline of usable-node changes a policy sees (pure Python)."""

from __future__ import annotations

import heapq
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from benchmarks.sim.model import SimulatorError
from oobleck.nodes import node_name
from oobleck.trace import TraceEvent


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
