"""The Varuna-style and Bamboo-style baselines (``fault_tolerance.policy``), end to end and in their pure
parts. Like the recovery tests, every run is real (local agents and worker processes, SIGKILL from the
fault hooks) and is compared in float64 with ``train_local``: a baseline differs from Oobleck in how it
survives failures, never in what it computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import torch

from oobleck import checkpoint
from oobleck.config import config_from_dict
from oobleck.control.placement import PipelineShape, place
from oobleck.control.policy import shadow_holdings, takeover
from planner.homogeneous import best_homogeneous, even_split
from planner.templates import PipelineTemplate
from tests.engine_harness import run_engine
from tests.run_helpers import ReferenceRun, assert_matches_reference, gpt_job, recoveries, run_job

pytestmark = pytest.mark.timeout(400)


PLANNED = {(0, 2), (2, 4), (4, 6)}
#: the engine tests' tiny models: 6 layers each (an embedding, 4 blocks, a head)
TINY = {
    "gpt": {"n_layer": 4, "d_model": 32, "n_head": 2, "seq_len": 16},
    "dit": {"n_layer": 4, "d_model": 32, "n_head": 2},
}


def three_deep(pipelines: int) -> object:
    shapes = [PipelineShape(((0, 2), (2, 4), (4, 6)), 4) for _ in range(pipelines)]
    return place(shapes, [f"n{i}" for i in range(3 * pipelines)], 1)


def test_takeover_merges_a_lost_stage_into_its_neighbour() -> None:
    placement = three_deep(2)
    assert shadow_holdings(placement)[("n0", 0)] == frozenset({2, 3})
    assert shadow_holdings(placement)[("n2", 0)] == frozenset({0, 1})  # the last stage shadows the first
    shapes, order = takeover(placement, {"n1"}, PLANNED)
    assert order == ["n0", "n2", "n3", "n4", "n5"]
    assert shapes[0].layer_ranges == ((0, 4), (4, 6)) and shapes[1].layer_ranges == ((0, 2), (2, 4), (4, 6))
    # the first stage goes to the second (contiguous layers); its layers come from the last stage's shadow
    shapes, order = takeover(placement, {"n3"}, PLANNED)
    assert order == ["n0", "n1", "n2", "n4", "n5"] and shapes[1].layer_ranges == ((0, 4), (4, 6))
    assert all(s.num_microbatches == 4 for s in shapes)


def test_takeover_of_adjacent_stages_is_fatal() -> None:
    placement = three_deep(2)
    assert takeover(placement, {"n1", "n2"}, PLANNED) is None
    assert takeover(placement, {"n0", "n2"}, PLANNED) is None  # adjacent in the ring
    assert takeover(placement, {"n0", "n1", "n2"}, PLANNED) is None
    assert takeover(placement, {"n1", "n4"}, PLANNED) is not None  # one per pipeline
    # after n1 was taken over by n0, losing n0 or n2 (next to the first loss) is fatal too: the merged stage
    # would take over, or be taken over, beyond the one shadow its device has room for
    merged = place(takeover(placement, {"n1"}, PLANNED)[0], ["n0", "n2", "n3", "n4", "n5"], 1)
    assert takeover(merged, {"n2"}, PLANNED) is None and takeover(merged, {"n0"}, PLANNED) is None
    assert takeover(merged, {"n4"}, PLANNED) is not None

def test_best_homogeneous_picks_the_fastest_depth_and_leaves_the_rest_idle() -> None:
    from planner.templates import Stage

    def template(depth: int, per_stage: float) -> PipelineTemplate:
        stages = tuple(Stage(i, i + 1, per_stage / 3, 2 * per_stage / 3, 0.0, 0, 0, 0) for i in range(depth))
        return PipelineTemplate(depth, 1, stages)

    templates = {1: template(1, 4.0), 2: template(2, 2.0), 3: template(3, 1.4)}
    best = best_homogeneous(templates, 7, 12)
    assert best is not None
    # every candidate's step: fill + (m - 1) * bottleneck with m = ceil(12 / replicas)
    steps = {d: t.iteration_time(even_split(12, min(7 // d, 12))[0]) for d, t in templates.items()}
    assert best.step_time_s == min(steps.values()) and best.depth == min(steps, key=steps.get)
    assert best.nodes_used <= 7 and sum(best.microbatches) == 12
    assert best_homogeneous({3: template(3, 1.0)}, 2, 12) is None
    assert even_split(12, 5) == (3, 3, 2, 2, 2)


@pytest.mark.slow  # a real job
def test_varuna_restarts_every_worker_from_its_checkpoint(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    """A node lost at step 7 with checkpoints every 5 steps: every worker process restarts, the checkpoint of
    step 5 is loaded, steps 5 and 6 are lost and re-run."""
    faults = [{"step": 7, "phase": "backward", "kind": "kill", "target": "node", "nodes": [3]}]
    raw = gpt_job(profile_dir, nodes=6, steps=12, f=1, faults=faults, policy="varuna", checkpoint_every=5)
    run_dir, output = run_job(tmp_path, raw)
    assert_matches_reference(run_dir, raw, reference_run(raw))
    found = recoveries(run_dir)
    assert found[0]["mode"] == "restart" and found[0]["start_step"] == 5 and found[0]["steps_lost"] == 2, output[-2000:]
    restarted = [p for p in (run_dir / "logs").glob("node*-0.log") if "restarting the worker process" in p.read_text()]
    assert len(restarted) == found[0]["nodes_alive"], "every worker placed in the new plan restarts its process"


@pytest.mark.slow  # a real job
def test_bamboo_takes_over_a_lost_stage_and_restarts_when_adjacent_stages_die(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    """Two pipelines of three nodes. Losing node1 (a middle stage): node0 takes its layers over from its
    shadow, no step is lost and both pipelines go on (copies only re-establish the shadows). Then node4 and node5
    (adjacent stages) die together: fatal for Bamboo, which restarts from its checkpoint of step 6."""
    faults = [
        {"step": 3, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]},
        {"step": 8, "phase": "backward", "kind": "kill", "target": "node", "nodes": [4, 5]},
    ]
    raw = gpt_job(profile_dir, nodes=6, steps=10, f=1, faults=faults, policy="bamboo", checkpoint_every=6)
    run_dir, output = run_job(tmp_path, raw)
    assert_matches_reference(run_dir, raw, reference_run(raw))
    first, second = recoveries(run_dir)
    assert first["mode"] == "memory" and first["pipelines"] == 2, output[-2000:]
    assert first["steps_lost"] == 0 and first["nodes_alive"] == 5
    assert second["mode"] == "restart" and second["start_step"] == 6 and second["steps_lost"] == 2
    rows = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    assert rows and all('"redundant_s"' in r for r in rows)


@pytest.mark.parametrize("family,dataset", [("gpt", "pydoc"), ("dit", "digits")])
def test_bamboo_redundant_forwards_in_the_bubbles_change_no_number(tmp_path: Path, family: str, dataset: str) -> None:
    """One pipeline of three stages, four microbatches a step, float64: with every stage holding its
    successor's shadow and running its redundant forwards in the pipeline's bubbles (queued, see
    :class:`oobleck.engine.stage.StageExecutor`), every loss and every final parameter and optimizer moment
    equal, bit for bit, those of the same run without redundancy; the redundant work is measured every step.
    DiT's carries are tuples, with a condition each stage passes through from its received carry."""

    def train(name: str, redundant: bool) -> tuple[list[float], list[float], Path]:
        config = config_from_dict(
            {
                "model": {"family": family, "dtype": "float64", "overrides": TINY[family]},
                "data": {"dataset": dataset},
                "training": {"steps": 3, "global_batch": 8, "microbatch": 2, "lr": 3e-3, "grad_clip": None},
                "run": {"dir": str(tmp_path / name / "run")},
            }
        )
        (tmp_path / name).mkdir()
        run = run_engine(config, [[0, 2, 4, 6]], [4], tmp_path / name, redundant=redundant)
        assert run.checkpoint is not None
        return run.losses, [r.redundant_s for r in run.reports], run.checkpoint

    plain_losses, plain_redundant, plain = train("plain", False)
    losses, redundant_s, shadowed = train("bamboo", True)
    assert losses == plain_losses
    assert all(s == 0.0 for s in plain_redundant) and all(s > 0.0 for s in redundant_s)
    for index in range(6):
        want, got = checkpoint.load_layer_state(plain, index), checkpoint.load_layer_state(shadowed, index)
        assert _identical(got["params"], want["params"]), f"layer {index}: parameters"
        assert _identical(got["optimizer"], want["optimizer"]), f"layer {index}: optimizer state"


def _identical(a: object, b: object) -> bool:
    """Whether two nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    return a == b


def test_heterogeneous_benchmark_refuses_bad_flags_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.heterogeneous import main

    assert main(["--nodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "benchmarks.heterogeneous: error: --nodes: got [2]; each must be in [4, 8] on this machine"
    assert main(["--steps", "6", "--warmup", "5"]) == 2
    assert "--warmup: got 5; must leave at least 5 measured steps" in capsys.readouterr().err


def test_cpu_shares_cap_each_nodes_processes_and_clean_up() -> None:
    """benchmarks.cpu_shares puts a process naming ``--node X`` into X's cgroup with X's CFS quota, leaves
    other processes alone, and removes its groups afterwards."""
    import psutil

    from benchmarks.cpu_shares import PERIOD_US, CpuShares, unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(f"per-node CPU caps unavailable here: {why}")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [subprocess.Popen([*sleeper, "--node", "nodeA"]), subprocess.Popen([*sleeper, "--node", "elsewhere"])]
    try:
        with CpuShares(["nodeA", "nodeB"], cpus_each=0.25) as shares:
            group = shares._groups["nodeA"]
            assert (group / "cpu.cfs_quota_us").read_text().strip() == str(PERIOD_US // 4)
            assert shares.place(psutil.Process(procs[0].pid)) is not None
            assert shares.place(psutil.Process(procs[1].pid)) is None
            assert (group / "cgroup.procs").read_text().split() == [str(procs[0].pid)]
        assert not group.exists() and not group.parent.exists()
        assert procs[0].poll() is None  # moved back, not harmed
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
