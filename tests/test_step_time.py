"""The local step-time prediction: the planner's formula (planner/templates.py, "Local runs"), how the plan
and the master's placement carry it, and what oobleck.step_costs measures it from."""

from __future__ import annotations

import pytest

from oobleck.config import config_from_dict
from oobleck.control.placement import PipelineShape, place
from oobleck.control.planning import shapes
from oobleck.profiler import expected_fingerprint
from oobleck.step_costs import local_workers, measure_step_costs, threads_per_worker
from planner.cluster import ClusterSpec
from planner.plan import make_plan
from planner.profile import LayerProfile, ModelProfile
from planner.templates import NO_COSTS, PipelineTemplate, Stage, StepCosts, compute_scale

# f + b per stage: 3, 6, 2; boundaries 0.5 and 0.25; gradients 100, 200, 50 bytes
STAGES = (
    Stage(0, 1, 1.0, 2.0, 0.5, 0, 0, 0, grad_bytes=100),
    Stage(1, 3, 2.0, 4.0, 0.25, 0, 0, 0, grad_bytes=200),
    Stage(3, 4, 1.0, 1.0, 0.0, 0, 0, 0, grad_bytes=50),
)
TEMPLATE = PipelineTemplate(3, 1, STAGES)


def test_compute_scale_is_the_oversubscription_of_the_cores() -> None:
    assert compute_scale(cores=8, workers=4, threads=2) == 1.0  # every thread has a core
    assert compute_scale(cores=16, workers=4, threads=2) == 1.0  # spare cores do not speed a worker up
    assert compute_scale(cores=2, workers=4, threads=1) == 2.0  # half a core each
    assert compute_scale(cores=1, workers=4, threads=1) == 4.0  # half the cores per worker: twice the time
    with pytest.raises(ValueError, match="must be >= 1"):
        compute_scale(cores=0, workers=4, threads=1)


@pytest.mark.parametrize("m", [1, 2, 7])
def test_without_costs_the_local_step_is_the_iteration_time(m: int) -> None:
    assert TEMPLATE.local_step_time(m, NO_COSTS, replicated=True, ranks=6) == TEMPLATE.iteration_time(m)


def test_halving_the_cores_per_worker_doubles_the_compute_time() -> None:
    no_sends = PipelineTemplate(3, 1, tuple(Stage(s.layer_start, s.layer_end, s.forward_s, s.backward_s, 0.0, 0, 0, 0) for s in STAGES))
    half = StepCosts(compute_scale=compute_scale(cores=2, workers=4, threads=1))
    quarter = StepCosts(compute_scale=compute_scale(cores=1, workers=4, threads=1))
    for m in (1, 4):
        base = no_sends.iteration_time(m)
        assert no_sends.local_step_time(m, half, False, 3) == 2 * base
        assert no_sends.local_step_time(m, quarter, False, 3) == 4 * base


def test_messages_count_per_microbatch_and_boundary() -> None:
    x = 0.125
    costs = StepCosts(message_s=x)
    # an end stage sends or receives 2 messages per microbatch, the middle stage 4
    busy = [3 + 2 * x, 6 + 4 * x, 2 + 2 * x]
    for m in (1, 5):
        expected = sum(busy) + 0.75 + (m - 1) * max(busy)
        assert TEMPLATE.local_step_time(m, costs, False, 1) == pytest.approx(expected)
    single = PipelineTemplate(1, 1, (Stage(0, 4, 4.0, 7.0, 0.0, 0, 0, 0),))
    assert single.local_step_time(3, costs, False, 1) == single.iteration_time(3)  # no boundary, no message


def test_the_tail_adds_optimizer_all_reduces_and_commit_once_per_step() -> None:
    costs = StepCosts(compute_scale=2.0, allreduce_s=0.5, allreduce_byte_s=0.01, optimizer_byte_s=0.001, commit_s=0.25)
    pipeline = 2 * TEMPLATE.iteration_time(3) - sum(s.send_s for s in STAGES)  # sends are not scaled
    # the stage of 200 gradient bytes is the slowest: its optimizer (scaled), then its all-reduces
    optimizer = 2.0 * 0.001 * 200
    alone = TEMPLATE.local_step_time(3, costs, replicated=False, ranks=1)
    assert alone == pytest.approx(pipeline + optimizer + 0.25)  # one rank: no all-reduce at all
    unreplicated = TEMPLATE.local_step_time(3, costs, replicated=False, ranks=3)
    assert unreplicated == pytest.approx(alone + 0.5)  # the norm's all-reduce
    replicated = TEMPLATE.local_step_time(3, costs, replicated=True, ranks=6)
    assert replicated == pytest.approx(unreplicated + 0.5 + 0.01 * 200)  # and the gradients'


def _profile(layers: int) -> ModelProfile:
    return ModelProfile(
        tuple(LayerProfile(f"l{i}", 0.01, 0.02, 4000, 4000, 8000, 1000, 512) for i in range(layers)),
        {"model": {"toy": layers}, "microbatch": 1, "dtype": "float32", "device": "cpu"},
    )


def test_the_plan_placement_and_shapes_carry_the_slowest_pipelines_prediction() -> None:
    cluster = ClusterSpec(5, 1, 1e6, 1e9, 1e8)  # 16 KB per layer: 16 layers need 2 or more nodes a pipeline
    plan = make_plan(_profile(16), cluster, f=1, global_batch=24, microbatch=1)
    costs = StepCosts(compute_scale=2.5, message_s=1e-3, allreduce_s=1e-3, allreduce_byte_s=1e-9, commit_s=1e-3, optimizer_byte_s=1e-9)
    times = plan.local_step_times(costs)
    assert len(times) == len(plan.instantiation.pipelines) >= 2
    assert plan.local_step_time_s(costs) == max(times) > plan.step_time_s * 2.5
    planned = shapes(plan, costs)
    assert [s.predicted_step_s for s in planned] == times
    placement = place(planned, [f"node{i}" for i in range(5)], 1)
    assert placement.predicted_step_s == max(times)
    assert place([PipelineShape(((0, 16),), 24)], ["node0"], 1).predicted_step_s == 0.0  # none predicted


def test_measured_costs_follow_the_cores_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    costs = measure_step_costs(8, torch.device("cpu"), carry_bytes=4096, grad_bytes=1 << 16)
    assert threads_per_worker(8) == 1 and costs.cores_per_worker == 0.25 and costs.compute_scale == 4.0
    assert min(costs.message_s, costs.allreduce_s, costs.commit_s, costs.optimizer_byte_s) > 0
    assert costs.allreduce_byte_s >= 0
    assert measure_step_costs(2, torch.device("cpu"), 4096, 1 << 16).compute_scale == 1.0  # a core each


def test_the_profile_is_measured_with_each_local_workers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    raw = {"model": {"family": "gpt", "preset": "tiny"}, "data": {"dataset": "pydoc"}}
    for nodes, threads in ((2, 4), (4, 2), (16, 1)):
        config = config_from_dict({**raw, "cluster": {"nodes": nodes, "device": "cpu"}})
        assert local_workers(config) == nodes
        assert expected_fingerprint(config)["threads"] == threads
