"""Activation recomputation and measured memory: recomputing changes no number (fp64, bitwise, global-RNG
dropout included), it lowers the measured peak of the stages it is on, the planner recomputes exactly the
stages that need it, and the engine follows the plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.jobs import cli_command
from engine_harness import run_engine
from models.base import Layer, MicroBatch
from oobleck import checkpoint
from oobleck.config import config_from_dict
from oobleck.engine.stage import StageExecutor, build_stage_layers
from oobleck.metrics import read_metrics
from oobleck.model_building import build_batches, build_model
from oobleck.precision import forward_layers
from oobleck.train_local import train_local
from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.profile import LayerProfile, ModelProfile
from planner.templates import build_templates, template_for
from tests.run_helpers import ROOT, ReferenceRun, assert_matches_reference, run_job, tiny_gpt, write_config

torch.set_num_threads(1)

GPT = {"n_layer": 4, "d_model": 32, "n_head": 2, "seq_len": 16}


def gpt_config(recompute: str, steps: int = 3) -> dict:
    return {
        "model": {"family": "gpt", "dtype": "float64", "overrides": GPT},
        "training": {"steps": steps, "global_batch": 12, "microbatch": 2, "lr": 3e-3, "recompute": recompute},
        "cluster": {"device": "cpu"},
    }


class _Dropping(Layer):
    """A layer whose dropout masks come from the process's global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, carry, mb: MicroBatch):
        x = mb.data["x"] if carry is None else carry
        return torch.nn.functional.dropout(torch.tanh(self.linear(x)), p=0.5, training=True)


def test_recomputed_dropout_draws_the_same_masks() -> None:
    torch.manual_seed(0)
    layers = [_Dropping() for _ in range(3)]
    mb = MicroBatch({"x": torch.randn(4, 8, dtype=torch.float64)})
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(1)
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        out = forward_layers(layers, None, mb, "fp32", torch.device("cpu"), ends_model=True, recompute=recompute)
        torch.randn(100)  # the global generator moves on before backward, as the rest of a step moves it
        out.sum().backward()
        grads[recompute] = (out.detach(), [p.grad.clone() for layer in layers for p in layer.parameters()])
    assert torch.equal(grads[False][0], grads[True][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[False][1], grads[True][1]))
    assert any(g.abs().sum() > 0 for g in grads[True][1])


def test_train_local_with_recompute_is_bitwise_the_same() -> None:
    plain = train_local(config_from_dict(gpt_config("none")))
    recomputed = train_local(config_from_dict(gpt_config("full")))
    assert plain.losses == recomputed.losses
    assert plain.losses[-1] < plain.losses[0]
    for a, b in zip(plain.layers, recomputed.layers):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    for a, b in zip(plain.optimizers, recomputed.optimizers):
        for p, q in zip(a.state.values(), b.state.values()):
            assert torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])


def _one_stage(recompute: bool, microbatches: int) -> tuple[StageExecutor, list]:
    """The whole small GPT as one stage after one step's forward and backward passes, and its gradients."""
    config = config_from_dict(gpt_config("none"))
    spec = build_model(config.model, config.training.seed)
    batches = build_batches(config, spec)
    layers = build_stage_layers(spec, 0, spec.num_layers, config.training, torch.device("cpu"))
    # the schedule of stage 0 of 3, so that every microbatch is in flight at once, without neighbours
    executor = StageExecutor(spec, layers, 0, 3, microbatches, None, None, torch.device("cpu"), recompute=recompute)
    executor.run([batches.microbatch(0, k) for k in range(microbatches)])
    return executor, [p.grad.clone() for h in layers for p in h.module.parameters() if p.grad is not None]


def test_recompute_lowers_the_measured_peak_and_keeps_the_gradients() -> None:
    plain, plain_grads = _one_stage(False, 3)
    recomputed, grads = _one_stage(True, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, grads))
    static = plain.memory.static_bytes()
    assert static == recomputed.memory.static_bytes() > 0
    saved_plain = plain.memory.peak_bytes() - static
    saved_recomputed = recomputed.memory.peak_bytes() - static
    # recomputed: each layer keeps its input carry, [2, 16, 32] doubles per microbatch (the embedding's
    # input is the token ids, which the checkpoint does not save), 5 layers after the embedding, 3 in flight
    assert saved_recomputed == 3 * 5 * 2 * 16 * 32 * 8
    assert saved_plain > 4 * saved_recomputed


def _profile(layers: int = 8) -> ModelProfile:
    """Layers of 10 bytes of state and 100 bytes of activations that send 10 bytes downstream."""
    layer = dict(forward_s=1.0, backward_s=2.0, param_bytes=10, grad_bytes=0, optimizer_bytes=0, activation_bytes=100, output_bytes=10)
    return ModelProfile(tuple(LayerProfile(name=f"l{i}", **layer) for i in range(layers)), {"model": "synthetic"})


def test_auto_recomputes_only_the_stages_that_would_not_fit() -> None:
    # two stages of four layers: stage 0 holds 2 microbatches (40 + 800 bytes), stage 1 holds 1 (440 bytes)
    cluster = ClusterSpec(2, 1, 500, 1e9, 1e9)
    assert template_for(_profile(), cluster, 2, "none") is None
    auto = template_for(_profile(), cluster, 2, "auto")
    assert auto is not None and auto.recompute == (True, False)
    assert auto.layer_ranges == ((0, 4), (4, 8))
    # stage 0 keeps 3 layer inputs (layer 0's is the batch) per microbatch
    assert auto.stage_memory(8) == [40 + 2 * 30, 440]
    assert [s.backward_s for s in auto.stages] == [8 + 4, 8]
    full = template_for(_profile(), cluster, 2, "full")
    assert full is not None and full.recompute == (True, True)
    assert full.stages[1].memory_bytes == 40 + 40
    # too small for both stages without recomputation: the error says what would help
    with pytest.raises(PlanningError, match=r"activation recomputation \(training.recompute: auto\)$"):
        build_templates(_profile(), ClusterSpec(2, 1, 300, 1e9, 1e9), 0)
    # with it, the whole model fits one device: 80 bytes of state, 70 of layer inputs
    templates = build_templates(_profile(), ClusterSpec(2, 1, 300, 1e9, 1e9), 0, "auto")
    assert min(templates) == 1 and templates[1].recompute == (True,) and templates[1].stage_memory(4) == [150]


def test_bad_recompute_value_is_one_line_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "job.yaml", {**gpt_config("partial"), "run": {"dir": str(tmp_path / "run")}})
    proc = subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["oobleck train-local: error: training.recompute: got 'partial'; allowed: none, full, auto"], proc.stderr


@pytest.mark.slow
def test_engine_with_recompute_is_bitwise_the_same_and_lighter(tmp_path: Path) -> None:
    runs = {}
    for recompute in ("none", "full"):
        raw = {**gpt_config(recompute), "run": {"dir": str(tmp_path / recompute / "run")}}
        (tmp_path / recompute).mkdir()
        # two heterogeneous pipelines: stage 0 of the 3-stage one holds 3 microbatches in flight
        runs[recompute] = run_engine(config_from_dict(raw), [[0, 3, 6], [0, 2, 4, 6]], [2, 4], tmp_path / recompute)
    plain, recomputed = runs["none"], runs["full"]
    assert plain.checkpoint is not None and recomputed.checkpoint is not None
    assert plain.losses == recomputed.losses
    for index in range(6):
        a = checkpoint.load_layer_state(plain.checkpoint, index)
        b = checkpoint.load_layer_state(recomputed.checkpoint, index)
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        for k, state in a["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    for before, after in zip(plain.reports, recomputed.reports):
        assert len(before.peak_bytes) == 5 and all(p > 0 for p in after.peak_bytes)
        assert all(a < b for a, b in zip(after.peak_bytes, before.peak_bytes)), (after.peak_bytes, before.peak_bytes)
        assert before.predicted_bytes == (0,) * 5  # a plan made by hand predicts nothing


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_refuses_a_plan_that_does_not_fit_and_recomputes_where_the_plan_says(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    # 1.5 MiB devices: the tiny GPT (1.7 MiB of parameters, gradients and moments) needs 3-node pipelines
    # without recomputation (two of them for f = 1: 6 nodes), and 2-node ones with it
    raw = tiny_gpt(profile_dir, nodes=4, steps=3)
    raw["cluster"]["device_memory_gib"] = 0.0015
    proc = subprocess.run(
        cli_command("run", str(write_config(tmp_path / "none.yaml", raw)), "--run-dir", str(tmp_path / "none")),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    *progress, error = proc.stderr.strip().splitlines()  # "planning ...", then the one error line
    assert error.startswith("oobleck run: error: f=1 needs at least 6 nodes with n0=3"), proc.stderr
    assert not any("error" in line or line.startswith("starting") for line in progress), proc.stderr  # nothing launched

    raw["training"]["recompute"] = "auto"
    run_dir, output = run_job(tmp_path, raw)
    assert_matches_reference(run_dir, raw, reference_run({**raw, "training": {**raw["training"], "recompute": "none"}}))
    rows = read_metrics(run_dir)
    last = rows[-1]
    assert len(last["peak_bytes"]) == len(last["predicted_bytes"]) == 4
    # within 10%: a stage that kept every activation where the plan says it recomputes (or the reverse)
    # would be 25-30% off
    for predicted, measured in zip(last["predicted_bytes"], last["peak_bytes"]):
        assert 0.9 <= predicted / measured <= 1.1, (last["predicted_bytes"], last["peak_bytes"])
