"""What ``oobleck run`` prints, from real step and recovery records: the step line's samples/s without the
start-up (shown apart on the job's first step), the summary's nodes at the start and end with those lost and
joined, and node lists cut short. tests/test_run.py and tests/test_recovery.py check the same lines in real
jobs' output."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from oobleck.control.driver import _startup_s
from oobleck.control.records import RecoveryRecord, StepRecord
from oobleck.nodes import node_list
from oobleck.progress import Progress, summary


def _step(step: int, generation: int = 0, nodes: int = 4, startup_s: float = 0.0, step_time_s: float = 1.0) -> StepRecord:
    return StepRecord(
        step=step, loss=2.5, units=8, grad_norm=1.0, step_time_s=step_time_s,
        samples_per_s=8 / (step_time_s - startup_s), generation=generation, nodes_alive=nodes, pipelines=2,
        startup_s=startup_s,
    )  # fmt: skip


def _recovery(lost: tuple[str, ...] = (), joined: tuple[str, ...] = (), nodes: int = 3, start_step: int = 1) -> RecoveryRecord:
    return RecoveryRecord(
        generation=2, reason="test", lost=lost, joined=joined, mode="memory", start_step=start_step, steps_lost=0,
        layers_moved=2, nodes_alive=nodes, pipelines=2, detect_s=0.01, plan_s=0.001, rebuild_s=0.05,
        transfer_s=0.03, resume_s=0.2, total_s=0.21, end_s=0.001, leave_s=0.04, assign_s=0.02, setup_s=0.059,
    )  # fmt: skip


def _printed(records: list[StepRecord | RecoveryRecord]) -> list[str]:
    out = io.StringIO()
    with Progress(10, every=1, console=Console(file=out, force_terminal=False, width=200)) as progress:
        for record in records:
            (progress.recovery if isinstance(record, RecoveryRecord) else progress.step)(record)
    return out.getvalue().splitlines()


def test_first_step_shows_start_up_apart_from_its_rate() -> None:
    first, second, recovery, recovered = _printed(
        [_step(0, 1, startup_s=3.0, step_time_s=3.5), _step(1, 1), _recovery(("node2",)), _step(2, 2, startup_s=0.4, step_time_s=0.9)]
    )
    assert recovery.startswith(
        "recovered (lost node2) in 0.21 s: detect 10 ms, end 1 ms, leave 40 ms, assign 20 ms (plan 1 ms), "
        "rebuild 50 ms, transfer 30 ms, setup 59 ms (2 layers, from memory); 0 steps lost"
    )
    assert first == "step 1/10  loss 2.5000  16.0 samples/s  nodes 4  pipelines 2  start-up 3.0 s"
    assert second.endswith("8.0 samples/s  nodes 4  pipelines 2")
    # a recovered generation's wait is on its "recovered (...)" line, not repeated here; the rate leaves it out
    assert recovered == "step 3/10  loss 2.5000  16.0 samples/s  nodes 4  pipelines 2"


def test_summary_without_membership_changes() -> None:
    line = summary([_step(0), _step(1)], [], 4.0, 8, "runs/x")
    assert line == "trained 2 steps on 4 nodes in 4.0 s; final loss 2.5000; 4.0 samples/s overall; 2 pipelines; run directory runs/x"


def test_summary_after_losses_and_a_join() -> None:
    recoveries = [_recovery(lost=("node2",)), _recovery(lost=("node0", "node3")), _recovery(joined=("node9",))]
    line = summary([_step(0, nodes=5), _step(1, nodes=3)], recoveries, 2.0, 8, "r")
    assert line.startswith(
        "trained 2 steps starting on 5 nodes and ending on 3 (3 lost: node2, node0, node3; 1 joined: node9) in 2.0 s;"
    ), line


def test_summary_after_a_loss_during_the_final_checkpoint() -> None:
    """A recovery after the last step (into a generation with no step left) counts for the end."""
    line = summary([_step(0, nodes=5), _step(1, nodes=5)], [_recovery(lost=("node1",), nodes=4, start_step=2)], 2.0, 8, "r")
    assert line.startswith("trained 2 steps starting on 5 nodes and ending on 4 (1 lost: node1) in 2.0 s;"), line


def test_node_lists_are_cut_short() -> None:
    assert node_list(["node0", "node1", "node2"]) == "node0, node1, node2"
    names = [f"node{i}" for i in range(64)]
    assert node_list(names) == "node0, node1, node2, node3, node4, node5, node6, ..., node63"
    assert node_list(names[:8]) == ", ".join(names[:8])


@pytest.mark.parametrize(
    "ready_ago, step_s, expected",
    [
        (0.5, 3.0, 2.5),  # the last rank was ready 0.5 s ago: the 2.5 s before were start-up
        (5.0, 3.0, 0.0),  # a rank's clock ahead of the master's: never negative
        (-1.0, 3.0, 3.0),  # or behind it: never more than the step
    ],
)
def test_start_up_is_the_part_of_the_step_before_every_rank_was_ready(ready_ago: float, step_s: float, expected: float) -> None:
    now = time.time()
    timings = [{"resumed_at": now - ready_ago - 1.0}, {"resumed_at": now - ready_ago}]
    assert _startup_s(timings, step_s) == pytest.approx(expected, abs=0.05)
    assert _startup_s([], step_s) == 0.0
