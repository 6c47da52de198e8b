"""The local step-time prediction: the planner's formula (planner/local_step.py), how the plan
and the master's placement carry it, and what oobleck.engine.step_costs measures it from."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest

from oobleck.config import config_from_dict
from oobleck.control.heartbeat_load import heartbeat_cores
from oobleck.control.placement import PipelineShape, place
from oobleck.control.planning import shapes
from oobleck.profiler import expected_fingerprint
from oobleck.engine.step_costs import measure_step_costs
from oobleck.shared_cores import local_workers
from planner.cluster import ClusterSpec
from planner.plan import make_plan
from planner.profile import LayerProfile, ModelProfile
from planner.local_step import NO_COSTS, StepCosts, _dedicated_makespan, _shared_makespan, _worker_ops, local_step_time
from planner.templates import PipelineTemplate, Stage

# f + b per stage: 3, 6, 2; boundaries 0.5 and 0.25; gradients 100, 200, 50 bytes
STAGES = (
    Stage(0, 1, 1.0, 2.0, 0.5, 0, 0, 0, grad_bytes=100),
    Stage(1, 3, 2.0, 4.0, 0.25, 0, 0, 0, grad_bytes=200),
    Stage(3, 4, 1.0, 1.0, 0.0, 0, 0, 0, grad_bytes=50),
)
TEMPLATE = PipelineTemplate(3, 1, STAGES)


def test_without_costs_each_pipeline_plays_out_1f1b_on_devices_of_its_own() -> None:
    # m = 1: one forward chain and one backward chain, each boundary's send_s split between them
    assert local_step_time([(TEMPLATE, 1)], NO_COSTS) == TEMPLATE.iteration_time(1) == 11.75
    # m = 2, worked by hand: stage 1's second forward holds up stage 2, whose backward then holds up stage 1's
    assert local_step_time([(TEMPLATE, 2)], NO_COSTS) == 15.75
    assert local_step_time([(TEMPLATE, 2), (TEMPLATE, 7)], NO_COSTS) == local_step_time([(TEMPLATE, 7)], NO_COSTS)
    equal = PipelineTemplate(4, 1, tuple(Stage(i, i + 1, 1.0, 2.0, 0.0, 0, 0, 0) for i in range(4)))
    for m in (1, 3, 8):  # equal stages: the templates' formula is exact
        assert local_step_time([(equal, m)], NO_COSTS) == equal.iteration_time(m)


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


def test_the_cores_the_control_plane_keeps_busy_are_not_the_workers() -> None:
    one = PipelineTemplate(1, 1, (Stage(0, 4, 1.0, 2.0, 0.0, 0, 0, 0),))
    four = [(one, 5)] * 4
    assert local_step_time(four, StepCosts(cores=3, busy_cores=1)) == local_step_time(four, StepCosts(cores=2))
    assert local_step_time(four, StepCosts(cores=2, busy_cores=0.4)) == pytest.approx(4 * 15 / 1.6)
    with pytest.raises(ValueError, match="busy_cores"):
        local_step_time(four, StepCosts(cores=2, busy_cores=2))


def test_a_waiting_worker_leaves_its_core_to_the_others() -> None:
    # one pipeline of two stages and one microbatch on one core: only one worker can run at any time, so
    # sharing the core costs nothing, where "two workers on one core, each half as fast" would double it
    two_stages = PipelineTemplate(2, 1, (Stage(0, 1, 1.0, 1.0, 0.0, 0, 0, 0), Stage(1, 2, 1.0, 1.0, 0.0, 0, 0, 0)))
    assert local_step_time([(two_stages, 1)], StepCosts(cores=1)) == 4.0
    # two such pipelines: both first stages, then both second stages, ... share the core
    assert local_step_time([(two_stages, 1)] * 2, StepCosts(cores=1)) == 8.0
    # one pipeline of four equal stages (f + b = 3) and four microbatches on two cores: the job's 48
    # core-seconds over 2 cores bound it below by 24, the path by 21; in the fill and drain fewer than two
    # workers can run, so the played-out step is longer than either bound
    four_stages = PipelineTemplate(4, 1, tuple(Stage(i, i + 1, 1.0, 2.0, 0.0, 0, 0, 0) for i in range(4)))
    assert local_step_time([(four_stages, 4)], StepCosts(cores=2)) == 27.0
    # the job's work over the cores bounds the step from below, the naive slowdown from above
    two = [(TEMPLATE, 3), (TEMPLATE, 3)]
    alone = local_step_time([(TEMPLATE, 3)], NO_COSTS)
    assert local_step_time(two, StepCosts(cores=6)) == alone
    shared = local_step_time(two, StepCosts(cores=2))
    assert 66 / 2 <= shared < 3 * alone  # 66 core-seconds of work; 6 workers on 2 cores


def test_with_a_slot_per_worker_sharing_is_the_dedicated_schedule() -> None:
    # the linear-time schedule used when no worker shares is what the processor-sharing one gives then
    rng = random.Random(0)
    for _ in range(200):
        k, m = rng.randint(1, 5), rng.randint(1, 6)
        stages = tuple(Stage(i, i + 1, rng.random(), rng.random(), rng.random(), 0, 0, 0) for i in range(k))
        template = PipelineTemplate(k, 1, stages)
        ops = _worker_ops(template, m, 0, StepCosts(message_s=rng.random() / 10))
        assert _shared_makespan(ops, len(ops)) == pytest.approx(_dedicated_makespan(ops), rel=1e-9)


def test_messages_count_per_op_and_boundary() -> None:
    x = 0.125
    # an end stage sends or receives one message per forward and one per backward, the middle stage two
    assert local_step_time([(TEMPLATE, 1)], StepCosts(message_s=x)) == pytest.approx(11.75 + 8 * x)
    single = PipelineTemplate(1, 1, (Stage(0, 4, 4.0, 7.0, 0.0, 0, 0, 0),))
    assert local_step_time([(single, 3)], StepCosts(message_s=x)) == single.iteration_time(3)  # no boundary


def test_the_tail_adds_all_reduces_optimizer_and_commit_once_per_step() -> None:
    costs = StepCosts(allreduce_s=0.5, allreduce_byte_s=0.01, optimizer_byte_s=0.001, commit_s=0.25)
    alone = local_step_time([(TEMPLATE, 3)], costs)
    makespan = local_step_time([(TEMPLATE, 3)], NO_COSTS)
    # the norm's all-reduce, then the slowest AdamW step (200 bytes), then the commit
    assert alone == pytest.approx(makespan + 0.5 + 0.001 * 200 + 0.25)
    one_stage = PipelineTemplate(1, 1, (Stage(0, 4, 1.0, 2.0, 0.0, 0, 0, 0, grad_bytes=100),))
    assert local_step_time([(one_stage, 2)], costs) == pytest.approx(6 + 0.1 + 0.25)  # one rank: no all-reduce
    replicated = local_step_time([(TEMPLATE, 3), (TEMPLATE, 3)], costs)
    assert replicated == pytest.approx(alone + 0.5 + 0.01 * 200)  # and the gradients'
    # four copies of each layer: a ring all-reduce moves 2(4-1)/4 = 1.5 times the two-rank bytes per rank
    four = local_step_time([(TEMPLATE, 3)] * 4, costs)
    assert four == pytest.approx(alone + 0.5 + 0.01 * 200 * 1.5)
    # on one core the three AdamW steps share it: their sum, not the slowest
    one_core = local_step_time([(TEMPLATE, 3)], StepCosts(cores=1, optimizer_byte_s=0.001))
    assert one_core == pytest.approx(local_step_time([(TEMPLATE, 3)], StepCosts(cores=1)) + 0.001 * 350)


def test_a_stages_measured_update_replaces_the_adamw_estimate_and_shares_the_cores() -> None:
    measured = PipelineTemplate(1, 1, (Stage(0, 4, 1.0, 2.0, 0.0, 0, 0, 0, grad_bytes=100, update_s=0.75),))
    costs = StepCosts(optimizer_byte_s=0.001)
    assert local_step_time([(measured, 2)], costs) == pytest.approx(6 + 0.75)  # not + 0.1
    # two one-stage pipelines on one core: both updates share it, each with its gradient all-reduce
    shared = StepCosts(cores=1, allreduce_s=0.5, optimizer_byte_s=0.001)
    assert local_step_time([(measured, 2), (measured, 2)], shared) == pytest.approx(12 + 2 * (0.75 + 0.5) + 0.5)


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


def test_messages_are_timed_beside_what_the_caller_runs_and_the_rest_alone() -> None:
    import contextlib

    import torch

    entered: list[int] = []

    @contextlib.contextmanager
    def beside() -> Iterator[None]:
        entered.append(1)
        yield

    costs = measure_step_costs(4, torch.device("cpu"), 4096, 1 << 16, beside)
    assert len(entered) == 1 and costs.message_s > 0


def test_the_control_planes_heartbeats_are_measured_on_loopback() -> None:
    load = heartbeat_cores(streams=2, pipes=2, interval_s=0.05, seconds=0.3)
    assert load.beats >= 2 * 0.3 / 0.05 / 2  # both streams beat (half the beats at least: a loaded machine)
    assert 0 < load.cores < 1
    with pytest.raises(ValueError, match="interval_s"):
        heartbeat_cores(1, 0, 0.0)


def test_a_message_costs_more_cpu_the_more_bytes_it_carries() -> None:
    import torch

    # message_s is CPU time of the sender's and the receiver's threads per message (the copies through
    # loopback are part of it): 4 MB costs several times what 4 KB does (about 1.3 ms against 0.25 ms here)
    small = measure_step_costs(2, torch.device("cpu"), carry_bytes=4096, grad_bytes=1 << 16).message_s
    large = measure_step_costs(2, torch.device("cpu"), carry_bytes=4 << 20, grad_bytes=1 << 16).message_s
    assert large > 2 * small > 0


def test_the_profile_is_measured_with_each_local_workers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    raw = {"model": {"family": "gpt", "preset": "tiny"}, "data": {"dataset": "pydoc"}}
    # and with more workers than cores, other processes compute beside the profiler: as many as make the
    # run's workers, at most twice the cores
    for nodes, threads, neighbours in ((2, 4, 0), (4, 2, 0), (8, 1, 0), (9, 1, 8), (16, 1, 15), (40, 1, 15)):
        config = config_from_dict({**raw, "cluster": {"nodes": nodes, "device": "cpu"}})
        assert local_workers(config) == nodes
        fingerprint = expected_fingerprint(config)
        assert (fingerprint["threads"], fingerprint["neighbours"]) == (threads, neighbours)
