"""Node-availability traces: the shipped traces parse, broken files give one-line errors naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from oobleck.errors import ConfigError
from oobleck.trace import TraceEvent, load_trace, nodes_alive, replay_schedule, summary

TRACES = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
needs_traces = pytest.mark.skipif(not (TRACES / "p3-trace.csv").exists(), reason="shared traces not present")


@needs_traces
@pytest.mark.parametrize(
    "name, events, adds, peak, minimum, final, hours",
    [
        ("p3-trace.csv", 344, 177, 32, 10, 10, 40920 / 3600),
        ("fixed-10m.csv", 45, 30, 30, 15, 15, 2.505),
        ("fixed-1h.csv", 45, 30, 30, 15, 15, 15.0),
    ],
)
def test_shipped_traces(name: str, events: int, adds: int, peak: int, minimum: int, final: int, hours: float) -> None:
    trace = load_trace(TRACES / name)
    s = summary(trace)
    assert (s.events, s.adds, s.removes) == (events, adds, events - adds)
    assert (s.peak_nodes, s.min_nodes, s.final_nodes) == (peak, minimum, final)
    assert s.duration_s == pytest.approx(hours * 3600)
    assert f"peak {peak}" in s.describe()


@needs_traces
def test_fixed_trace_loses_one_node_every_ten_minutes() -> None:
    steps = nodes_alive(load_trace(TRACES / "fixed-10m.csv"))
    assert [n for _, n in steps] == list(range(30, 14, -1))
    gaps = [b[0] - a[0] for a, b in zip(steps[1:], steps[2:])]
    assert all(g == pytest.approx(600, abs=5) for g in gaps)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_step_function_merges_simultaneous_events_and_skips_no_change(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "0,add,a\n0,add,b\n\n1500,remove,a\n1500,add,c\n2000,remove,b\n"))
    assert trace[2] == TraceEvent(1.5, "remove", "a")
    # at 1.5 s one node leaves and one joins: the count does not change, so no step is recorded there
    assert nodes_alive(trace) == [(0.0, 2), (2.0, 1)]
    s = summary(trace)
    assert (s.peak_nodes, s.min_nodes, s.final_nodes, s.duration_s) == (2, 1, 1, 2.0)


def test_replay_divides_times_by_compression(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "0,add,node1\n3600000,remove,node1\n"))
    fast = replay_schedule(trace, compression=60.0)
    assert [(e.at_s, e.kind, e.node) for e in fast] == [(0.0, "add", "node1"), (60.0, "remove", "node1")]
    for bad in (0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"^compression: got"):
            replay_schedule(trace, bad)


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("0,add,node1\n5,add\n", 2, "got 2 fields in '5,add'"),
        ("0,add,node1,extra\n", 1, "got 4 fields"),
        ("0.5,add,node1\n", 1, "time '0.5' is not an integer"),
        ("zero,add,node1\n", 1, "time 'zero' is not an integer"),
        ("-1,add,node1\n", 1, "time -1 is negative"),
        ("10,add,node1\n5,add,node2\n", 2, "time 5 is earlier than the previous event's 10"),
        ("0,join,node1\n", 1, "action 'join' is unknown; use add or remove"),
        ("0,add,\n", 1, "the node name is empty"),
        ("0,add,node1\n1,add,node1\n", 2, "adds node1, which is already present"),
        ("0,add,node1\n\n1,remove,node2\n", 3, "removes node2, which is not present"),
        ("0,add,node1\n1,remove,node1\n2,remove,node1\n", 3, "removes node1, which is not present"),
    ],
)
def test_broken_lines_name_file_line_and_problem(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_trace(path)
    message = str(err.value)
    assert message.startswith(f"trace {path}, line {line}: {problem}"), message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_trace(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="has no events"):
        load_trace(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^trace .*nope\.csv: cannot read it"):
        load_trace(tmp_path / "nope.csv")
