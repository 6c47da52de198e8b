"""The master's pure decisions, one policy next to the other: a generation's layout, which layers each worker
holds, when joining nodes fold in, which spare nodes stay idle, where layers come from, the recovery record;
and the Ray launcher's choice of nodes. No process, store or thread runs here."""

from __future__ import annotations

import pytest

from launcher.ray_nodes import actor_resources, fits, master_host, placement_order
from oobleck.control.placement import Placement, PipelineShape, place
from oobleck.control.policy import Bamboo, Membership, Policy, Varuna, choose_nodes, policy_for, stage_layers
from oobleck.control.records import Change, recovery_record
from oobleck.control.sources import layer_moves
from oobleck.control.state import GATHER_S, TOGETHER_S, joins_due
from oobleck.engine.transfer import LayerLost

THREE = ((0, 2), (2, 4), (4, 6))
PLANNED = frozenset(THREE)


class Recorder:
    """A planner that plans one three-stage pipeline per three nodes and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, nodes: list[str]) -> list[PipelineShape]:
        self.calls.append(list(nodes))
        return [PipelineShape(THREE, 4) for _ in range(len(nodes) // 3)]


def three_deep(pipelines: int) -> Placement:
    return place([PipelineShape(THREE, 4)] * pipelines, [f"n{i}" for i in range(3 * pipelines)], 1)


def test_policy_for_names_each_policy_and_its_traits() -> None:
    assert [type(policy_for(n)) for n in ("oobleck", "varuna", "bamboo")] == [Policy, Varuna, Bamboo]
    assert [policy_for(n).name for n in ("oobleck", "varuna", "bamboo")] == ["oobleck", "varuna", "bamboo"]
    assert [policy_for(n).redundant for n in ("oobleck", "varuna", "bamboo")] == [False, False, True]
    assert [policy_for(n).grows_from_checkpoint for n in ("oobleck", "varuna", "bamboo")] == [False, True, False]


@pytest.mark.parametrize("first", [True, False])
def test_oobleck_replans_every_generation_and_never_restarts(first: bool) -> None:
    planner = Recorder()
    names = [f"n{i}" for i in range(6)]
    layout = policy_for("oobleck").layout(planner, Membership(names, first, three_deep(2), False, PLANNED))
    assert planner.calls == [names]
    assert layout.nodes == names and len(layout.shapes) == 2 and not layout.restart and layout.planned is None


@pytest.mark.parametrize("first", [True, False])
def test_varuna_replans_and_restarts_after_the_first_generation(first: bool) -> None:
    planner = Recorder()
    names = [f"n{i}" for i in range(3)]
    layout = policy_for("varuna").layout(planner, Membership(names, first, None, False, PLANNED))
    assert planner.calls == [names] and layout.nodes == names
    assert layout.restart is (not first) and layout.planned is None


def test_bamboo_first_generation_plans_and_records_the_planned_ranges() -> None:
    planner = Recorder()
    layout = policy_for("bamboo").layout(planner, Membership([f"n{i}" for i in range(3)], True))
    assert len(planner.calls) == 1 and not layout.restart and layout.planned == PLANNED


def test_bamboo_loss_is_taken_over_by_a_neighbour_without_a_plan() -> None:
    planner = Recorder()
    survivors = ["n0", "n2", "n3", "n4", "n5"]
    layout = policy_for("bamboo").layout(planner, Membership(survivors, False, three_deep(2), False, PLANNED))
    assert planner.calls == [] and not layout.restart and layout.planned is None
    assert layout.nodes == survivors
    assert [s.layer_ranges for s in layout.shapes] == [((0, 4), (4, 6)), THREE]


def test_bamboo_fatal_loss_replans_and_restarts() -> None:
    planner = Recorder()
    # n0 and n1 are adjacent in their ring: no neighbour holds both stages
    layout = policy_for("bamboo").layout(planner, Membership(["n2", "n3", "n4", "n5"], False, three_deep(2), False, PLANNED))
    assert planner.calls == [["n2", "n3", "n4", "n5"]] and layout.restart and layout.planned == PLANNED


def test_bamboo_without_a_committed_layout_restarts_again() -> None:
    planner = Recorder()
    layout = policy_for("bamboo").layout(planner, Membership(["n0", "n1", "n2"], False, None, False, PLANNED))
    assert len(planner.calls) == 1 and layout.restart


def test_bamboo_joins_replan_from_memory() -> None:
    planner = Recorder()
    names = [f"n{i}" for i in range(6)]
    layout = policy_for("bamboo").layout(planner, Membership(names, False, three_deep(1), True, PLANNED))
    assert planner.calls == [names] and not layout.restart and layout.planned == PLANNED


def test_held_layers_are_the_stage_and_under_bamboo_its_successors_shadow() -> None:
    placement = three_deep(1)
    stages = {("n0", 0): frozenset({0, 1}), ("n1", 0): frozenset({2, 3}), ("n2", 0): frozenset({4, 5})}
    assert stage_layers(placement) == stages
    assert policy_for("oobleck").held_layers(placement) == stages
    assert policy_for("varuna").held_layers(placement) == stages
    assert policy_for("bamboo").held_layers(placement) == {
        ("n0", 0): frozenset({0, 1, 2, 3}),
        ("n1", 0): frozenset({2, 3, 4, 5}),
        ("n2", 0): frozenset({4, 5, 0, 1}),  # the last stage shadows the first
    }


@pytest.mark.parametrize("checkpoint_after", [True, False])
def test_only_varuna_waits_for_a_checkpoint_to_grow(checkpoint_after: bool) -> None:
    assert policy_for("oobleck").grows_after(7, checkpoint_after)
    assert policy_for("bamboo").grows_after(7, checkpoint_after)
    assert policy_for("varuna").grows_after(7, checkpoint_after) is checkpoint_after


def test_ready_joins_fold_at_once_unless_a_node_started_with_them_is_still_starting() -> None:
    ready = [(10.0, 20.0)]  # registered at 10 s, workers ready at 20 s: a 10 s start-up
    assert joins_due(ready, [], now=20.01)  # nothing else starting: the next boundary
    assert joins_due(ready, [15.0], now=20.01)  # a node registered apart from it: not waited for
    assert joins_due([], [10.0], now=20.01)  # no instant known: at once
    # a node started together with it (registered within TOGETHER_S): wait for it, up to GATHER_S
    together, gather = [10.0 + TOGETHER_S], GATHER_S
    assert not joins_due(ready, together, now=20.0 + gather - 0.01)
    assert joins_due(ready, together, now=20.0 + gather)
    # the first ready join's wait counts, and any of them may have a starting partner
    assert not joins_due([(10.0, 20.0), (12.0, 20.5)], [12.2], now=20.0 + gather - 0.01)
    assert joins_due([(10.0, 20.0), (12.0, 20.5)], [12.2], now=20.0 + gather)


def test_a_join_record_times_each_joined_node_from_its_workers_being_ready() -> None:
    change = Change(noticed_at=100.0, reasons=["a joined", "b joined"], joined=["a", "b"], ready_at=[100.0, 100.5])
    timing = {"left_at": 100.75, "assigned_at": 100.8, "resumed_at": 101.25, "join_s": 0.25, "groups_s": 0.0, "transfer_s": 0.125}
    record = recovery_record(
        generation=3, change=change, mode="memory", start_step=7, steps_lost=0, layers_moved=2,
        placement=three_deep(1), plan_s=0.0, timings=[timing],
    )  # fmt: skip
    assert record.joined == ("a", "b") and record.joined_ready_s == (1.25, 0.75)
    assert record.joined_ready_s[0] == record.resume_s == record.total_s
    merged = Change(1.0, joined=["a"], ready_at=[1.0]).merged(Change(2.0, joined=["b"], ready_at=[2.5]))
    assert (merged.joined, merged.ready_at) == (["a", "b"], [1.0, 2.5])


def test_choose_nodes_keeps_the_most_distinct_layers_in_placement_order() -> None:
    held = {"a": {0, 1}, "b": {0, 1}, "c": {2, 3}, "d": set()}
    assert choose_nodes(["a", "b", "c", "d"], 2, held) == ["a", "c"]
    assert choose_nodes(["d", "c", "b", "a"], 2, held) == ["c", "b"]  # ties go to the earlier name
    assert choose_nodes(["x", "y", "z"], 2, {}) == ["x", "y"]


def test_layer_moves_copy_from_placed_holders_only() -> None:
    placement = place([PipelineShape(((0, 3), (3, 6)), 4)], ["a", "b"], 1)
    needed = stage_layers(placement)
    held = {("a", 0): frozenset({0, 1, 2, 3}), ("b", 0): frozenset({4, 5}), ("gone", 0): frozenset({3})}
    assert layer_moves(placement, needed, held, None) == ((3, 0, 1),)
    assert layer_moves(placement, needed, {**held, ("b", 0): frozenset({3, 4, 5})}, [1] * 6) == ()
    with pytest.raises(LayerLost):
        layer_moves(placement, needed, {("a", 0): frozenset({0, 1, 2}), ("gone", 0): frozenset({3, 4, 5})}, None)


def test_recovery_record_takes_the_last_ready_rank_and_the_earliest_kill() -> None:
    change = Change(noticed_at=100.0, reasons=["node n1 lost"], lost=["n1"], kill_times=[99.5, 99.0], ended_at=100.25)
    timings = [
        # slower to rebuild, but ready first: the record follows the rank ready last
        {"left_at": 100.5, "assigned_at": 101.0, "resumed_at": 103.0, "join_s": 1.5, "groups_s": 0.25, "transfer_s": 0.25},
        {"left_at": 101.0, "assigned_at": 101.5, "resumed_at": 104.0, "join_s": 0.5, "groups_s": 0.25, "transfer_s": 1.0},
    ]
    record = recovery_record(
        generation=2, change=change, mode="memory", start_step=5, steps_lost=0, layers_moved=3,
        placement=three_deep(2), plan_s=0.01, timings=timings,
    )  # fmt: skip
    assert (record.detect_s, record.resume_s, record.total_s) == (1.0, 4.0, 5.0)
    assert (record.end_s, record.leave_s, record.assign_s) == (0.25, 0.75, 0.5)
    assert (record.rebuild_s, record.transfer_s, record.setup_s) == (0.75, 1.0, 0.75)
    phases = (record.detect_s, record.end_s, record.leave_s, record.assign_s, record.rebuild_s, record.transfer_s, record.setup_s)  # fmt: skip
    assert sum(phases) == record.total_s
    assert record.lost == ("n1",) and record.joined == () and record.reason == "node n1 lost"
    assert (record.nodes_alive, record.pipelines) == (6, 2)
    # a worker new to the job (no generation left) after a change whose end was not written: its wait for
    # the assignment runs from the notice
    new = {"left_at": None, "assigned_at": 101.0, "resumed_at": 103.0, "join_s": 0.5, "groups_s": 0.5, "transfer_s": 0.5}
    unknown = recovery_record(
        generation=2, change=Change(noticed_at=100.0), mode="init", start_step=0, steps_lost=0, layers_moved=0,
        placement=three_deep(1), plan_s=0.0, timings=[new],
    )  # fmt: skip
    assert unknown.detect_s is None and unknown.total_s == unknown.resume_s == 3.0
    assert (unknown.end_s, unknown.leave_s, unknown.assign_s, unknown.setup_s) == (0.0, 0.0, 1.0, 0.5)


def test_changes_merge_in_order_from_the_first_notice_to_the_last_end() -> None:
    first = Change(1.0, ["a lost"], ["a"], [], [0.5], ended_at=1.5)
    merged = first.merged(Change(2.0, ["b joined"], [], ["b"], [], ended_at=3.0))
    assert merged == Change(1.0, ["a lost", "b joined"], ["a"], ["b"], [0.5], ended_at=3.0)
    assert first.merged(Change(2.0)).ended_at == 1.5  # the later change ended nothing yet
    assert first.merged(None) is first


def ray_node(node_id: str, ip: str, cpus: float = 1, gpus: float = 0) -> dict[str, object]:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_ray_nodes_fit_by_cpu_or_gpu_and_reserve_accordingly() -> None:
    assert fits(ray_node("a", "10.0.0.1", cpus=1), cuda=False, devices=4)
    assert not fits(ray_node("a", "10.0.0.1", cpus=0), cuda=False, devices=1)
    assert not fits(ray_node("a", "10.0.0.1", gpus=1), cuda=True, devices=2)
    assert actor_resources(ray_node("a", "10.0.0.1", cpus=2), cuda=False, devices=4) == {"num_cpus": 2}
    assert actor_resources(ray_node("a", "10.0.0.1", gpus=2), cuda=True, devices=2) == {"num_gpus": 2, "num_cpus": 0}


def test_ray_nodes_are_taken_driver_first_then_by_address() -> None:
    nodes = [ray_node("z", "10.0.0.10"), ray_node("y", "10.0.0.9"), ray_node("d", "10.0.0.99"), ray_node("x", "10.0.0.9")]
    assert [n["NodeID"] for n in placement_order(nodes, driver_node="d")] == ["d", "x", "y", "z"]


def test_master_binds_the_driver_address_only_when_nodes_are_elsewhere() -> None:
    loopback = [ray_node("a", "127.0.0.1")]
    remote = [ray_node("a", "127.0.0.1"), ray_node("b", "10.0.0.2")]
    assert master_host("127.0.0.1", loopback, "10.0.0.1") == "127.0.0.1"
    assert master_host("127.0.0.1", remote, "10.0.0.1") == "10.0.0.1"
    assert master_host("10.0.0.7", remote, "10.0.0.1") == "10.0.0.7"  # configured explicitly
