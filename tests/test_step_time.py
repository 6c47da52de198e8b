"""The local step-time prediction: the planner's formula (planner/templates.py, "Local runs"), how the plan
and the master's placement carry it, and what oobleck.step_costs measures it from."""

from __future__ import annotations

import math

import pytest

from oobleck.config import config_from_dict
from oobleck.control.placement import PipelineShape, place
from oobleck.control.planning import shapes
from oobleck.profiler import expected_fingerprint
from oobleck.step_costs import local_workers, measure_step_costs
from planner.cluster import ClusterSpec
from planner.plan import make_plan
from planner.profile import LayerProfile, ModelProfile
from planner.templates import NO_COSTS, PipelineTemplate, Stage, StepCosts, local_step_time

# f + b per stage: 3, 6, 2; boundaries 0.5 and 0.25; gradients 100, 200, 50 bytes
STAGES = (
    Stage(0, 1, 1.0, 2.0, 0.5, 0, 0, 0, grad_bytes=100),
    Stage(1, 3, 2.0, 4.0, 0.25, 0, 0, 0, grad_bytes=200),
    Stage(3, 4, 1.0, 1.0, 0.0, 0, 0, 0, grad_bytes=50),
)
TEMPLATE = PipelineTemplate(3, 1, STAGES)


def test_without_costs_the_local_step_is_the_slowest_iteration_time() -> None:
    for m in (1, 2, 7):
        assert local_step_time([(TEMPLATE, m)], NO_COSTS) == TEMPLATE.iteration_time(m)
    assert local_step_time([(TEMPLATE, 2), (TEMPLATE, 7)], NO_COSTS) == TEMPLATE.iteration_time(7)


def test_halving_the_cores_per_worker_doubles_the_compute_time() -> None:
    # four one-stage pipelines (no fill or drain): every worker computes all the time
    one = PipelineTemplate(1, 1, (Stage(0, 4, 1.0, 2.0, 0.0, 0, 0, 0),))
    four = [(one, 5)] * 4
    alone = one.iteration_time(5)  # 15 s
    assert local_step_time(four, StepCosts(cores=4)) == alone  # a core each
    assert local_step_time(four, StepCosts(cores=8)) == alone  # spare cores do not speed a worker up
    assert local_step_time(four, StepCosts(cores=2)) == 2 * alone  # half a core each
    assert local_step_time(four, StepCosts(cores=1)) == 4 * alone  # a quarter: twice that
    assert local_step_time(four, StepCosts(cores=4, threads=2)) == 2 * alone  # 2 threads each on 4 cores


def test_workers_in_the_fill_and_drain_leave_their_cores_to_the_others() -> None:
    # work = 2 pipelines x 3 microbatches x (3 + 6 + 2) = 66 core-seconds; each pipeline alone: 11.75 + 2 * 6
    two = [(TEMPLATE, 3), (TEMPLATE, 3)]
    assert local_step_time(two, StepCosts(cores=6)) == TEMPLATE.iteration_time(3) == 23.75
    assert local_step_time(two, StepCosts(cores=2)) == 33.0  # 6 workers on 2 cores: not 3 x 23.75


def test_messages_count_per_microbatch_and_boundary() -> None:
    x = 0.125
    costs = StepCosts(message_s=x)
    # an end stage sends or receives 2 messages per microbatch, the middle stage 4
    busy = [3 + 2 * x, 6 + 4 * x, 2 + 2 * x]
    for m in (1, 5):
        expected = sum(busy) + 0.75 + (m - 1) * max(busy)
        assert local_step_time([(TEMPLATE, m)], costs) == pytest.approx(expected)
    single = PipelineTemplate(1, 1, (Stage(0, 4, 4.0, 7.0, 0.0, 0, 0, 0),))
    assert local_step_time([(single, 3)], costs) == single.iteration_time(3)  # no boundary, no message


def test_the_tail_adds_optimizer_all_reduces_and_commit_once_per_step() -> None:
    costs = StepCosts(allreduce_s=0.5, allreduce_byte_s=0.01, optimizer_byte_s=0.001, commit_s=0.25)
    # the stage of 200 gradient bytes is the slowest: its optimizer, then its all-reduces
    alone = local_step_time([(TEMPLATE, 3)], costs)
    assert alone == pytest.approx(TEMPLATE.iteration_time(3) + 0.001 * 200 + 0.5 + 0.25)  # the norm's all-reduce
    one_stage = PipelineTemplate(1, 1, (Stage(0, 4, 1.0, 2.0, 0.0, 0, 0, 0, grad_bytes=100),))
    assert local_step_time([(one_stage, 2)], costs) == pytest.approx(6 + 0.1 + 0.25)  # one rank: no all-reduce
    replicated = local_step_time([(TEMPLATE, 3), (TEMPLATE, 3)], costs)
    assert replicated == pytest.approx(alone + 0.5 + 0.01 * 200)  # and the gradients'


def _profile(layers: int) -> ModelProfile:
    return ModelProfile(
        tuple(LayerProfile(f"l{i}", 0.01, 0.02, 4000, 4000, 8000, 1000, 512) for i in range(layers)),
        {"model": {"toy": layers}, "microbatch": 1, "dtype": "float32", "device": "cpu"},
    )


def test_the_plan_placement_and_shapes_carry_the_jobs_prediction() -> None:
    cluster = ClusterSpec(5, 1, 1e6, 1e9, 1e8)  # 16 KB per layer: 16 layers need 2 or more nodes a pipeline
    plan = make_plan(_profile(16), cluster, f=1, global_batch=24, microbatch=1)
    costs = StepCosts(cores=1, message_s=1e-3, allreduce_s=1e-3, allreduce_byte_s=1e-9, commit_s=1e-3, optimizer_byte_s=1e-9)
    predicted = plan.local_step_time_s(costs)
    assert len(plan.instantiation.pipelines) >= 2 and predicted > plan.step_time_s
    assert predicted == local_step_time(plan.instantiation.pipelines, costs)
    planned = shapes(plan, costs)
    assert [s.predicted_step_s for s in planned] == [predicted] * len(planned)
    assert place(planned, [f"node{i}" for i in range(5)], 1).predicted_step_s == predicted
    assert place([PipelineShape(((0, 16),), 24)], ["node0"], 1).predicted_step_s == 0.0  # none predicted


def test_measured_costs_follow_the_cores_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    costs = measure_step_costs(8, torch.device("cpu"), carry_bytes=4096, grad_bytes=1 << 16)
    assert (costs.cores, costs.threads) == (2, 1)
    assert min(costs.message_s, costs.allreduce_s, costs.commit_s, costs.optimizer_byte_s) > 0
    assert costs.allreduce_byte_s >= 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert measure_step_costs(2, torch.device("cpu"), 4096, 1 << 16).threads == 4
    assert measure_step_costs(2, torch.device("cuda"), 4096, 1 << 16).cores == math.inf  # a device each


def test_the_profile_is_measured_with_each_local_workers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    raw = {"model": {"family": "gpt", "preset": "tiny"}, "data": {"dataset": "pydoc"}}
    for nodes, threads in ((2, 4), (4, 2), (16, 1)):
        config = config_from_dict({**raw, "cluster": {"nodes": nodes, "device": "cpu"}})
        assert local_workers(config) == nodes
        assert expected_fingerprint(config)["threads"] == threads
