"""The cluster-scale simulator (benchmarks/sim/, run as benchmarks.simulator): hand-computed scenarios for each policy, sanity
properties over failure frequency, timelines, bad inputs, the CLI and its outputs. Pure Python: no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sim.experiment import build_setup
from benchmarks.sim.measured import MeasuredRun, predict_throughput
from benchmarks.sim.model import Costs, Setup, SimulatorError, redundant_profile
from benchmarks.sim.simulate import PolicyConfigs, simulate
from benchmarks.sim.timeline import Change, fixed_interval_trace, parse_interval, usable_timeline
from benchmarks.simulator import main
from oobleck.trace import TraceEvent, load_trace
from planner.cluster import ClusterSpec
from planner.profile import LayerProfile, ModelProfile

REPO = Path(__file__).resolve().parent.parent
P3 = REPO.parent / "shared" / "traces" / "p3-trace.csv"
GB = 10**9
BATCH = 16

# A toy model: 4 equal layers of 1 GB parameters + 1 GB gradients + 2 GB optimizer state (3 GB to copy),
# 10 GB devices, one device per node: a node holds at most 2 layers, so one pipeline needs n0 = 2 nodes.
TOY = ModelProfile(
    tuple(LayerProfile(f"l{i}", 0.01, 0.02, GB, GB, 2 * GB, GB // 10, 10**6) for i in range(4)),
    {"model": "toy", "microbatch": 1, "dtype": "16-bit", "device": "toy"},
)
COSTS = Costs(
    recovery_fixed_s=2.0,
    copy_bandwidth=1e9,
    restart_s=10.0,
    checkpoint_write_s=1.0,
    bamboo_takeover_s=0.5,
    bamboo_reconfigure_s=5.0,
    checkpoint_every=3,
    oobleck_checkpoint_every=3,
    bamboo_checkpoint_every=3,
)


def toy(nodes: int = 6, **costs: float) -> PolicyConfigs:
    cluster = ClusterSpec(nodes, 1, 10e9, 1e11, 1e9)
    return PolicyConfigs(Setup(TOY, cluster, 1, BATCH, 1, dataclasses.replace(COSTS, **costs)))


def start(nodes: int) -> list[TraceEvent]:
    return [TraceEvent(0.0, "add", f"node{i}") for i in range(1, nodes + 1)]


def lose(at: float, *names: str) -> list[TraceEvent]:
    return [TraceEvent(at, "remove", n) for n in names]


def test_no_torch_import() -> None:
    code = "import sys, benchmarks.simulator; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- no failures --------------------------------------------------------------------------------------------


def test_without_failures_each_policy_runs_at_its_fault_free_plan() -> None:
    pc = toy(checkpoint_write_s=0.0)
    plan_6 = pc.oobleck.plan
    assert plan_6.n0 == 2 and [t.num_nodes for t, _ in plan_6.instantiation.pipelines] == [2, 2, 2]
    for policy, step in [
        ("oobleck", plan_6.step_time_s),
        ("varuna", pc.varuna.config(6).step_time_s),
        ("bamboo", pc.bamboo.config(6).step_time_s),
    ]:
        duration = 300 * step  # a whole number of steps: nothing unfinished at the end
        r = simulate(policy, pc, start(6), duration)
        assert r.samples_per_s == pytest.approx(BATCH / step, rel=1e-9), policy
        assert r.samples_per_s == pytest.approx(r.fault_free_samples_per_s, rel=1e-9), policy
        assert r.breakdown["lost"] == pytest.approx(0, abs=1e-9) and r.breakdown["recovery"] == 0
    # Oobleck's is the planner's own figure
    assert simulate("oobleck", pc, start(6), 300 * plan_6.step_time_s).samples_per_s == pytest.approx(plan_6.samples_per_s)


def test_bamboo_pays_for_redundancy_in_time_and_memory() -> None:
    pc = toy()
    cfg = pc.bamboo.config(6)
    # the shadow copies double the state: 2 layers (8 GB of state) no longer fit a 10 GB device, so Bamboo
    # needs 4-node pipelines where the others run 2-node ones
    assert pc.bamboo.n0 == 4 and pc.varuna.n0 == 2
    assert cfg.depth == 4 and cfg.replicas == 1
    # each stage also runs the next stage's forward: 1/3 more compute per stage (f=0.01, b=0.02)
    assert cfg.step_time_s > cfg.no_redundancy_step_s
    assert cfg.pipeline.step_time(16) == pytest.approx(cfg.pipeline.step_time(16, redundancy=False) + 0.01 * (4 + 15))
    r = simulate("bamboo", pc, start(6), 300 * cfg.step_time_s)
    assert r.breakdown["redundant"] / (r.breakdown["useful"] + r.breakdown["redundant"]) == pytest.approx(
        1 - cfg.no_redundancy_step_s / cfg.step_time_s
    )
    assert r.samples_per_s < BATCH / cfg.no_redundancy_step_s
    assert redundant_profile(TOY).layers[0].forward_s == 2 * TOY.layers[0].forward_s


def test_varuna_checkpoints_cost_their_write_time_without_failures() -> None:
    pc = toy(checkpoint_write_s=1.0)
    step = pc.varuna.config(6).step_time_s
    duration = 100 * (3 * step + 1.0)  # 100 rounds of 3 steps and a 1 s checkpoint
    r = simulate("varuna", pc, start(6), duration)
    assert r.steps == 300 and r.counts["checkpoints"] == 100
    assert r.breakdown["checkpoint"] == pytest.approx(100.0)
    assert r.samples_per_s == pytest.approx(BATCH * 3 / (3 * step + 1.0))


# -- hand-computed failure scenarios -----------------------------------------------------------------------


def test_oobleck_one_failure_costs_exactly_its_recovery() -> None:
    pc = toy()
    t6 = pc.oobleck.plan.step_time_s
    t5 = pc.oobleck.plan.replan(5).step_time_s
    # 3 pipelines of 2 nodes; node6 (last position) holds layers 2 and 3 of the third pipeline
    assert pc.oobleck.config(6).holdings[5] == (2, 2, 4)
    recovery = 2.0 + (2 * 3 * GB) / 1e9  # fixed + 2 layers of parameters and optimizer state at 1 GB/s
    fail_at = 10 * t6
    duration = fail_at + recovery + 20 * t5
    r = simulate("oobleck", pc, start(6) + lose(fail_at, "node6"), duration)
    assert r.steps == 30 and r.counts.get("steps_lost", 0) == 0
    assert r.breakdown["recovery"] == pytest.approx(recovery)
    assert r.breakdown["lost"] == pytest.approx(0, abs=1e-9)
    assert r.samples_per_s == pytest.approx(30 * BATCH / duration)
    # after the failure: the planner's throughput for the 5 survivors, less the recovery time
    after = (r.samples - 10 * BATCH) / (duration - fail_at)
    assert after == pytest.approx(pc.oobleck.plan.replan(5).samples_per_s * (duration - fail_at - recovery) / (duration - fail_at))


def test_oobleck_survives_simultaneous_failures_while_a_copy_of_every_layer_is_left() -> None:
    pc = toy()
    t6 = pc.oobleck.plan.step_time_s
    t4 = pc.oobleck.plan.replan(4).step_time_s
    # node2 and node4 hold layers 2-3 in pipelines 0 and 1; pipeline 2 still has them: no step lost
    recovery = 2.0 + (4 * 3 * GB) / 1e9
    fail_at = 5.5 * t6  # mid-step: half a step is lost, nothing else
    duration = fail_at + recovery + 10 * t4
    r = simulate("oobleck", pc, start(6) + lose(fail_at, "node2", "node4"), duration)
    assert r.steps == 15 and r.counts.get("fatal", 0) == 0 and r.counts.get("steps_lost", 0) == 0
    assert r.breakdown["lost"] == pytest.approx(0.5 * t6)
    assert r.breakdown["recovery"] == pytest.approx(recovery)


def test_oobleck_restarts_from_its_checkpoint_when_every_copy_of_a_layer_is_lost() -> None:
    pc = toy(checkpoint_write_s=0.0)
    t6 = pc.oobleck.plan.step_time_s
    t3 = pc.oobleck.config(3).step_time_s
    fail_at = 5.5 * t6  # background checkpoint at step 3 (written instantly here); steps 4, 5 are lost
    duration = fail_at + 10.0 + 10 * t3
    r = simulate("oobleck", pc, start(6) + lose(fail_at, "node2", "node4", "node6"), duration)
    assert r.counts["fatal"] == 1 and r.counts["steps_lost"] == 2
    assert r.breakdown["lost"] == pytest.approx(2.5 * t6)
    assert r.breakdown["recovery"] == pytest.approx(10.0)  # the restart
    assert r.steps == 3 + 10


def test_varuna_loses_exactly_the_steps_since_its_last_checkpoint() -> None:
    pc = toy()
    t6 = pc.varuna.config(6).step_time_s
    t5 = pc.varuna.config(5).step_time_s
    # steps 1-3, checkpoint (1 s), steps 4-5, and half of step 6 when node6 is lost
    fail_at = 3 * t6 + 1.0 + 2.5 * t6
    duration = fail_at + 10.0 + 2 * t5  # restart (10 s) on 5 nodes, then steps 4 and 5 again
    r = simulate("varuna", pc, start(6) + lose(fail_at, "node6"), duration)
    assert r.counts["steps_lost"] == 2 and r.counts["fatal"] == 1 and r.counts["restarts"] == 1
    assert r.breakdown["lost"] == pytest.approx(2.5 * t6)
    assert r.breakdown["checkpoint"] == pytest.approx(1.0)
    assert r.breakdown["recovery"] == pytest.approx(10.0)
    assert r.breakdown["useful"] == pytest.approx(3 * t6 + 2 * t5)
    assert r.steps == 5 and r.samples == 5 * BATCH
    assert sum(r.breakdown.values()) == pytest.approx(duration)


def test_varuna_loses_a_checkpoint_cut_short_and_ignores_a_spare() -> None:
    pc = toy(nodes=5)
    t5 = pc.varuna.config(5).step_time_s
    assert pc.varuna.config(5).nodes_used == 4  # node5 is a spare
    spare_loss = lose(2 * t5, "node5")  # costs nothing
    fail_at = 3 * t5 + 0.5  # during the first checkpoint: back to step 0
    t3 = pc.varuna.config(3).step_time_s  # node2..node4 are left: one 2-node pipeline
    duration = fail_at + 10.0 + 3 * t3 + 1.0 + t3  # restart, steps 1-3, checkpoint, step 4
    r = simulate("varuna", pc, start(5) + spare_loss + lose(fail_at, "node1"), duration)
    assert r.counts["spare_losses"] == 1 and r.counts["steps_lost"] == 3 and r.counts["checkpoints"] == 1
    assert r.steps == 4 and r.breakdown["checkpoint"] == pytest.approx(0.5 + 1.0)  # the cut write counts too


@pytest.mark.parametrize("only_if_faster, restarts", [(True, 0), (False, 1)])
def test_varuna_grows_for_a_join_that_does_not_speed_it_up_only_as_the_engine_does(only_if_faster: bool, restarts: int) -> None:
    """Four nodes make two 2-node pipelines; a fifth makes no faster plan. Varuna's morphing leaves it a
    spare; the engine's Varuna-style master restarts at the next checkpoint to take it in anyway."""
    pc = toy(5, varuna_grows_only_if_faster=only_if_faster)
    t4 = pc.varuna.config(4).step_time_s
    join = [TraceEvent(0.5 * t4, "add", "node5")]
    duration = 12 * t4 + 4 * 1.0 + 10.0  # checkpoints every 3 steps, and a restart if one comes
    r = simulate("varuna", pc, start(4) + join, duration)
    assert r.counts.get("reconfigurations", 0) == restarts and r.counts.get("steps_lost", 0) == 0
    assert r.breakdown["recovery"] == pytest.approx(10.0 * restarts)


def test_varuna_takes_a_node_ready_during_a_restart_in_at_its_next_checkpoint() -> None:
    """As the engine's master does: a restart plans for the nodes alive when it began; a node ready during
    it waits for the next periodic checkpoint, after which the job restarts (losing no step) to take it in."""
    pc = toy()
    t6, t5 = pc.varuna.config(6).step_time_s, pc.varuna.config(5).step_time_s
    fail_at = 0.5 * t6
    join = [TraceEvent(fail_at + 5.0, "add", "node7")]  # during the 10 s restart
    # restart on node1..node5: steps 1-3, checkpoint (1 s), restart (10 s) on 6 nodes, steps 4-5
    duration = fail_at + 10.0 + 3 * t5 + 1.0 + 10.0 + 2 * t6
    r = simulate("varuna", pc, start(6) + lose(fail_at, "node6") + join, duration)
    assert r.counts["restarts"] == 1 and r.counts["reconfigurations"] == 1 and r.counts["steps_lost"] == 0
    assert r.steps == 5
    assert r.breakdown["useful"] == pytest.approx(3 * t5 + 2 * t6)
    assert r.breakdown["recovery"] == pytest.approx(20.0)
    assert r.breakdown["checkpoint"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "first, second, second_loss_after, downtime, joined",
    [
        # the restart plans two 2-node pipelines on node1..node4 (no spare); a loss 4 s in joins it (it ends
        # when it would have: 10 s down, not 4 + 10), one 7 s in starts it over (7 + 10 s down)
        (("node6", "node5"), "node4", 4.0, 10.0, 1),
        (("node6", "node5"), "node4", 7.0, 17.0, 0),
        # the restart plans node1..node4 and leaves node5 a spare (its old process idle): losing node4 4 s in
        # brings node5 in, whose process restarts only then (4 + 10 s down); losing the spare costs nothing
        (("node6",), "node4", 4.0, 14.0, 1),
        (("node6",), "node5", 4.0, 10.0, 0),
    ],
)
def test_a_loss_during_a_restart_joins_it_while_its_processes_are_starting(
    first: tuple[str, ...], second: str, second_loss_after: float, downtime: float, joined: int
) -> None:
    """restart_s 10 s, of which the first 6 s are the processes starting (they take the newer plan when
    they ask for their place), as the engine's Varuna-style restarts go."""
    pc = toy(restart_join_s=6.0)
    t6 = pc.varuna.config(6).step_time_s
    fail_at = 0.5 * t6
    t_after = pc.varuna.config(6 - len(first) - 1).step_time_s
    duration = fail_at + downtime + 2 * t_after
    events = start(6) + lose(fail_at, *first) + lose(fail_at + second_loss_after, second)
    r = simulate("varuna", pc, events, duration)
    assert r.counts["restarts"] == 1 and r.counts.get("restart_joins", 0) == joined
    assert r.counts.get("spare_losses", 0) == int(second == "node5")
    assert r.breakdown["recovery"] == pytest.approx(downtime)
    assert downtime < 2 * COSTS.restart_s
    assert r.steps == 2 and r.breakdown["useful"] == pytest.approx(2 * t_after)


def test_bamboo_takes_over_one_loss_and_restarts_on_two_consecutive() -> None:
    pc = toy(nodes=4, checkpoint_write_s=0.0)
    cfg = pc.bamboo.config(4)
    t = cfg.step_time_s
    # one pipeline of 4 nodes, no spare: node2 lost -> node1 runs both stages (no 3-node pipeline fits,
    # so no re-partition): a takeover, half a step lost, then the slower step
    slow = cfg.pipeline.step_time(16, frozenset({1}))
    assert slow > t
    r = simulate("bamboo", pc, start(4) + lose(4.5 * t, "node2"), 4.5 * t + 0.5 + 10 * slow)
    assert r.counts["takeovers"] == 1 and r.counts.get("fatal", 0) == 0 and r.counts.get("steps_lost", 0) == 0
    assert r.breakdown["lost"] == pytest.approx(0.5 * t) and r.breakdown["recovery"] == pytest.approx(0.5)
    assert r.steps == 4 + 10
    # with spares, the takeover is followed by a re-partition (spares can replace the overloaded node)
    pc6 = toy(nodes=6, checkpoint_write_s=0.0)
    assert pc6.bamboo.config(6) == cfg  # one 4-node pipeline, two spares
    r = simulate("bamboo", pc6, start(6) + lose(4.5 * t, "node2"), 4.5 * t + 0.5 + 5.0 + 10 * t)
    assert r.counts["takeovers"] == 1 and r.counts["reconfigurations"] == 1 and r.steps == 4 + 10
    assert r.breakdown["recovery"] == pytest.approx(0.5 + 5.0)
    # node1 and node3 are not neighbours in a 4-node ring: both taken over
    r = simulate("bamboo", toy(nodes=4, bamboo_reconfigure_threshold=1.0), start(4) + lose(4.5 * t, "node1", "node3"), 100 * t)
    assert r.counts["takeovers"] == 2 and r.counts.get("fatal", 0) == 0
    degraded = cfg.pipeline.step_time(16, frozenset({0, 2}))
    assert degraded > t  # the survivors each run two stages
    # node2 and node3 are neighbours: fatal, back to the checkpoint of step 3, restart on the 4 left
    r = simulate("bamboo", pc6, start(6) + lose(4.5 * t, "node2", "node3"), 4.5 * t + 5.0 + 2 * t)
    assert r.counts["fatal"] == 1 and r.counts["steps_lost"] == 1 and r.counts["restarts"] == 1
    assert r.breakdown["lost"] == pytest.approx(1.5 * t)
    assert r.breakdown["recovery"] == pytest.approx(5.0) and r.steps == 3 + 2
    # with too few nodes left for a pipeline, it waits
    r = simulate("bamboo", pc, start(4) + lose(4.5 * t, "node2", "node3"), 100.0)
    assert r.breakdown["waiting"] == pytest.approx(100.0 - 4.5 * t)


# -- properties --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, nodes", [("gpt3-2.7b", 12), ("gpt3-1.3b", 16)])
def test_more_frequent_failures_never_raise_throughput(model: str, nodes: int) -> None:
    setup = build_setup(model, nodes=nodes)
    pc = PolicyConfigs(setup)
    duration = 12 * 3600.0
    timelines = [start(nodes)] + [
        fixed_interval_trace(nodes, parse_interval(i), duration, 300.0, seed=1) for i in ("6h", "1h", "30m", "10m")
    ]
    for policy in ("oobleck", "varuna", "bamboo"):
        rates = [simulate(policy, pc, events, duration, 45.0).samples_per_s for events in timelines]
        assert all(a >= b - 1e-9 for a, b in zip(rates, rates[1:])), (policy, rates)
        assert rates[0] > rates[-1]
        if policy == "oobleck":
            assert rates[0] == pytest.approx(pc.oobleck.plan.samples_per_s, rel=1e-3)


def test_breakdown_accounts_for_all_time_and_fixed_traces_replace_nodes() -> None:
    events = fixed_interval_trace(10, 600.0, 3 * 3600.0, 120.0, seed=3)
    removes = [e for e in events if e.kind == "remove"]
    adds = [e for e in events if e.kind == "add" and e.at_s > 0]
    assert len(removes) == 17 and len(adds) == 17
    assert all(a.at_s == pytest.approx(r.at_s + 120.0) for r, a in zip(removes, adds))
    pc = PolicyConfigs(build_setup("gpt3-1.3b", nodes=10))
    for policy in ("oobleck", "varuna", "bamboo"):
        r = simulate(policy, pc, events, 3 * 3600.0, 45.0)
        assert sum(r.breakdown.values()) == pytest.approx(3 * 3600.0), policy
        assert min(r.breakdown.values()) >= -1e-9


def test_usable_timeline_applies_ready_delay_and_capacity() -> None:
    events = [
        TraceEvent(0.0, "add", "a"),
        TraceEvent(0.0, "add", "b"),
        TraceEvent(0.0, "add", "c"),
        TraceEvent(10.0, "remove", "a"),
        TraceEvent(20.0, "add", "d"),
        TraceEvent(30.0, "remove", "d"),  # lost before it was ready: never seen
        TraceEvent(40.0, "add", "e"),
    ]
    assert usable_timeline(events, capacity=2, node_ready_s=45.0) == [
        Change(0.0, "ready", "a"),
        Change(0.0, "ready", "b"),
        Change(10.0, "lost", "a"),
        Change(10.0, "ready", "c"),  # queued beyond the capacity until a's place frees up
    ]
    assert usable_timeline(events, capacity=3, node_ready_s=45.0)[-1] == Change(85.0, "ready", "e")


@pytest.mark.skipif(not P3.exists(), reason="shared traces not present")
def test_p3_trace_oobleck_beats_both_baselines() -> None:
    events = load_trace(P3)
    pc = PolicyConfigs(build_setup("gpt3-2.7b", nodes=30))
    rates = {p: simulate(p, pc, events, None, 45.0).samples_per_s for p in ("oobleck", "varuna", "bamboo")}
    assert rates["oobleck"] > rates["bamboo"] > 0 and rates["oobleck"] > rates["varuna"] > 0


# -- validation hook ---------------------------------------------------------------------------------------


def test_predict_throughput_calibrates_to_measured_fault_free_rates() -> None:
    cluster = ClusterSpec(6, 1, 10e9, 1e11, 1e9)
    run = MeasuredRun(TOY, cluster, 1, BATCH, 1, COSTS, start(6), 100.0, fault_free_samples_per_s={"oobleck": 10.0, "varuna": 5.0})
    predicted = predict_throughput(run)
    assert predicted["oobleck"] == pytest.approx(10.0, rel=0.01)  # 100 s, no failures: the measured rate
    assert predicted["varuna"] < 5.0  # plus its checkpoints
    assert set(predicted) == {"oobleck", "varuna", "bamboo"}


# -- bad inputs ----------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    pc = toy()
    with pytest.raises(SimulatorError, match="failure interval: got '-5m'; must be a positive time"):
        parse_interval("-5m")
    with pytest.raises(SimulatorError, match="failure interval"):
        parse_interval("soon")
    with pytest.raises(SimulatorError, match="failure interval: got -60"):
        fixed_interval_trace(10, -60, 3600.0, 0.0)
    with pytest.raises(SimulatorError, match="policy: got 'checkpointing'; known policies: oobleck, varuna, bamboo"):
        simulate("checkpointing", pc, start(6), 10.0)
    with pytest.raises(SimulatorError, match="trace has no events"):
        simulate("oobleck", pc, [], 10.0)
    with pytest.raises(SimulatorError, match="duration: got -1"):
        simulate("oobleck", pc, start(6), -1.0)
    with pytest.raises(SimulatorError, match="costs.restart_s: got -1"):
        dataclasses.replace(COSTS, restart_s=-1)
    with pytest.raises(SimulatorError, match="costs.varuna_grows_only_if_faster: got 1; must be true or false"):
        dataclasses.replace(COSTS, varuna_grows_only_if_faster=1)
    with pytest.raises(SimulatorError, match="costs.bamboo_replans_on_join: got 'yes'; must be true or false"):
        dataclasses.replace(COSTS, bamboo_replans_on_join="yes")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["--trace", str(empty), "--intervals", "--models", "gpt3-1.3b", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["--intervals=-5m", "--trace", "none", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["--models", "gpt3-999b", "--trace", "none", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_writes_tables_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    args = ["--models", "gpt3-1.3b", "--nodes", "8", "--intervals", "1h", "10m", "--trace", "none", "--duration-h", "2"]
    assert main(args + ["--out", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "throughput, samples/s" in text and "time breakdown" in text and "oob/varuna" in text
    doc = json.loads(out.read_text())
    model = doc["models"]["gpt3-1.3b"]
    assert set(model["scenarios"]) == {"1h", "10m"}
    entry = model["scenarios"]["10m"]
    assert set(entry["policies"]) == {"oobleck", "varuna", "bamboo", "varuna_tuned"}
    assert entry["ratios"]["oobleck/varuna"] == pytest.approx(
        entry["policies"]["oobleck"]["samples_per_s"] / entry["policies"]["varuna"]["samples_per_s"]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("replans_on_join, reconfigurations", [(False, 0), (True, 1)])
def test_bamboo_repartitions_for_a_join_only_as_the_engine_does(replans_on_join: bool, reconfigurations: int) -> None:
    """One 4-node pipeline; a fifth node fits no second pipeline. The artifact's Bamboo leaves it a spare;
    the engine's Bamboo-style master re-plans for every joining node at the next step boundary."""
    pc = toy(nodes=5, checkpoint_write_s=0.0, bamboo_replans_on_join=replans_on_join)
    t = pc.bamboo.config(4).step_time_s
    duration = 10 * t + COSTS.bamboo_reconfigure_s * reconfigurations
    r = simulate("bamboo", pc, start(4) + [TraceEvent(2.5 * t, "add", "node5")], duration)
    assert r.counts.get("reconfigurations", 0) == reconfigurations and r.steps == 10
    assert r.breakdown["recovery"] == pytest.approx(COSTS.bamboo_reconfigure_s * reconfigurations)
