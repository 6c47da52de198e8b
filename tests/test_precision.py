"""Mixed precision (``training.precision``, :mod:`oobleck.precision`): the config's errors, the casts at
every layer boundary (so a pipeline's cuts do not change a number), the 16-bit carries on the wire, fp16's
loss scale against torch's GradScaler, and real ``oobleck run`` jobs against ``oobleck train-local``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oobleck import checkpoint
from oobleck.config import config_from_dict
from oobleck.engine.stage import StageExecutor, build_stage_layers
from oobleck.metrics import read_metrics
from oobleck.model_building import build_batches, build_model
from oobleck.precision import GROWTH_INTERVAL, INITIAL_FP16_LOG2, LossScale, compute_dtype, forward_layers
from oobleck.train_local import train_local
from run_helpers import gpt_job, recoveries, run_job

#: the tiny GPT of the engine tests in float32: 6 layers (embedding, 4 blocks, head), tied embedding and head
SMALL_GPT = {"family": "gpt", "dtype": "float32", "overrides": {"n_layer": 4, "d_model": 32, "n_head": 2, "seq_len": 16}}


def small_config(precision: str, **training: Any):
    return config_from_dict(
        {"model": SMALL_GPT, "training": {"global_batch": 8, "microbatch": 2, "precision": precision, **training}}
    )


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("command", "text", "line"),
    [
        ("run", "training:\n  precision: fp8\n", "training.precision: got 'fp8'; allowed: fp32, bf16, fp16"),
        ("train-local", "training:\n  precision: half\n", "training.precision: got 'half'; allowed: fp32, bf16, fp16"),
        (
            "train-local",
            "model:\n  dtype: float64\ntraining:\n  precision: bf16\n",
            "training.precision: got 'bf16'; mixed precision keeps float32 parameters: set model.dtype: float32",
        ),
        (
            "run",
            "faults:\n- {step: 1, kind: overflow}\n",
            "faults[0].kind: got 'overflow'; overflow needs training.precision: fp16",
        ),
    ],
)
def test_bad_precision_is_one_line_exit_2(tmp_path: Path, command: str, text: str, line: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "oobleck.cli", command, str(path)], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and line in lines[0], proc.stderr[-500:]


# ---------------------------------------------------------------------------------------------------
# Casts at every layer boundary


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_any_cut_computes_the_whole_models_numbers(precision: str) -> None:
    """Two halves joined the way p2p joins stages (the receiver's fresh leaf, the gradient sent back) give
    bitwise the loss and the gradients of the whole model in one piece, at every cut, and what crosses the
    cut (the carry and its gradient) is in the compute dtype."""
    config = small_config(precision)
    spec = build_model(config.model, 0)
    layers = spec.build_all()
    mb = build_batches(config, spec).microbatch(0, 0)
    cpu = torch.device("cpu")
    params = [p for layer in layers for p in layer.parameters()]

    def grads() -> list[torch.Tensor]:
        found = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return found

    whole = forward_layers(layers, None, mb.fresh(), precision, cpu, ends_model=True)
    (whole * 1024).backward()  # a loss scale, as fp16 uses
    want = grads()
    for cut in range(1, len(layers)):
        sent = forward_layers(layers[:cut], None, mb.fresh(), precision, cpu, ends_model=False)
        received = sent.detach().requires_grad_()
        loss = forward_layers(layers[cut:], received, mb.fresh(), precision, cpu, ends_model=True)
        (loss * 1024).backward()
        sent.backward(received.grad)
        assert sent.dtype == received.grad.dtype == compute_dtype(precision)
        assert torch.equal(loss, whole), cut
        assert all(torch.equal(g, w) for g, w in zip(grads(), want)), cut
    assert whole.dtype == torch.float32  # the loss itself is computed in float32 by autocast


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_recompute_under_autocast_changes_no_number(precision: str) -> None:
    """training.recompute with mixed precision: the checkpoint re-enters the forward's autocast state, so
    the gradients are bitwise those of the run that kept its activations."""
    config = small_config(precision)
    spec = build_model(config.model, 0)
    layers = spec.build_all()
    mb = build_batches(config, spec).microbatch(0, 0)
    params = [p for layer in layers for p in layer.parameters()]
    found = []
    for recompute in (False, True):
        loss = forward_layers(layers, None, mb.fresh(), precision, torch.device("cpu"), ends_model=True, recompute=recompute)
        loss.backward()
        found.append((loss.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (plain, plain_grads), (again, again_grads) = found
    assert torch.equal(plain, again) and all(torch.equal(a, b) for a, b in zip(plain_grads, again_grads))


def test_fp32_runs_the_layers_untouched() -> None:
    config = small_config("fp32")
    spec = build_model(config.model, 0)
    layers = spec.build_all()
    mb = build_batches(config, spec).microbatch(0, 0)
    carry = forward_layers(layers[:2], None, mb, "fp32", torch.device("cpu"), ends_model=False)
    assert carry.dtype == torch.float32 and torch.equal(carry, layers[1](layers[0](None, mb), mb))


# ---------------------------------------------------------------------------------------------------
# The loss scale


def test_loss_scale_follows_torch_grad_scalers_update() -> None:
    """The scale after each step equals what torch.amp.GradScaler.update computes (its kernel,
    _amp_update_scale_, with GradScaler's defaults) for the same overflow history, growth included."""
    history = [True, True] + [False] * GROWTH_INTERVAL + [True] + [False] * 3 + [True, True]
    scale = torch.full((), 2.0**INITIAL_FP16_LOG2)
    tracker = torch.zeros((), dtype=torch.int32)
    ours = LossScale(INITIAL_FP16_LOG2)
    for overflow in history:
        found_inf = torch.full((), float(overflow))
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, GROWTH_INTERVAL)
        ours = ours.after(overflow)
        assert (ours.value, ours.good_steps) == (scale.item(), tracker.item())
    assert ours.log2 == INITIAL_FP16_LOG2 - 2 + 1 - 1 - 2  # it grew once in between


def test_the_scale_is_saved_and_loaded_with_every_layer(tmp_path: Path) -> None:
    config = small_config("fp16")
    spec = build_model(config.model, 0)
    cpu = torch.device("cpu")
    saved = build_stage_layers(spec, 0, 3, config.training, cpu, step=7)
    for held in saved:
        held.scale = LossScale(9, 5)
        checkpoint.write_layer(tmp_path, held.index, held.state())
    loaded = build_stage_layers(spec, 0, 3, config.training, cpu)
    assert {h.scale for h in loaded} == {LossScale(INITIAL_FP16_LOG2)}
    for held in loaded:
        held.load(checkpoint.load_layer_state(tmp_path, held.index))
    assert [(h.step, h.scale) for h in loaded] == [(7, LossScale(9, 5))] * 3


# ---------------------------------------------------------------------------------------------------
# Bytes on the wire


def _two_stages(rank: int, init_file: str, out: dict[str, int]) -> None:
    """Rank ``rank`` of a two-stage pipeline over the 6 layers (cut at 3) runs one step of 4 microbatches in
    each precision; rank 0 records the activation bytes it sent, rank 1 the gradient bytes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for precision in ("fp32", "bf16", "fp16"):
            config = small_config(precision)
            spec = build_model(config.model, 0)
            mbs = [build_batches(config, spec).microbatch(0, k) for k in range(4)]
            first, last = ((0, 3), (3, 6))[rank]
            layers = build_stage_layers(spec, first, last, config.training, torch.device("cpu"))
            executor = StageExecutor(
                spec, layers, rank, 2, 4, prev=0 if rank else None, next_=None if rank else 1,
                device=torch.device("cpu"), precision=precision,
            )  # fmt: skip
            executor.run(mbs, loss_scale=8.0)
            link = executor.prev if rank else executor.next
            out[f"{precision}/{rank}"] = link.sent_bytes
    finally:
        dist.destroy_process_group()


def test_carries_and_their_gradients_travel_in_half_the_bytes(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_stages, args=(str(tmp_path / "init"), out), nprocs=2)
        sent = dict(out)
    # 4 microbatches of 2 x 16 positions x 32 features: 4096 values each way per step
    assert sent["fp32/0"] == sent["fp32/1"] == 4 * 4096
    for precision in ("bf16", "fp16"):
        assert sent[f"{precision}/0"] == sent[f"{precision}/1"] == 2 * 4096, sent
    print(f"bytes a step sends between the two stages (activations / gradients): {sent}")


# ---------------------------------------------------------------------------------------------------
# Real jobs against train-local


def precision_job(profile_dir: Path, precision: str, steps: int, faults: list[dict[str, Any]], **ft: Any) -> dict[str, Any]:
    """The tiny GPT job of the run tests in float32 at ``precision`` on 4 nodes with 2 MiB devices (n0 = 1),
    f = 2 and a global batch of 3 microbatches: at least 3 pipelines, each with at least one microbatch, on 4
    nodes is exactly a 2-node and two 1-node pipelines, whatever the measured profile. After a node is
    killed the 3 survivors are three 1-node pipelines, every layer still held somewhere."""
    raw = gpt_job(profile_dir, nodes=4, steps=steps, f=2, faults=faults, **ft)
    raw["model"]["dtype"] = "float32"
    raw["training"]["global_batch"] = 3 * raw["training"]["microbatch"]
    raw["training"]["precision"] = precision
    return raw


def reference_of(raw: dict[str, Any]):
    """train-local of ``raw`` (overflow faults included, as train-local honours them)."""
    return train_local(config_from_dict({k: v for k, v in raw.items() if k not in ("cluster",)}))


#: the tolerance of a 16-bit run against train-local (see docs/design.md, "Mixed precision"): both compute
#: the same values at every layer boundary, but float32 gradient sums run in another order (pipelines, then
#: the all-reduce), so parameters differ by float32 rounding, which a 16-bit rounding of an activation can
#: turn into a 2**-8 (bf16) or 2**-11 (fp16) relative step in that element; averaged over a loss this
#: stays well under 1e-3 (measured: at most 2e-5 over these tests' steps, 1.5e-4 over the 50 steps of
#: benchmarks/precision_losses.py)
LOSS_RTOL = 1e-3


def assert_losses_match(run_dir: Path, reference) -> list[dict[str, Any]]:
    rows = list({r["step"]: r for r in read_metrics(run_dir)}.values())
    assert [r["step"] for r in rows] == list(range(len(reference.losses)))
    errors = [abs(r["loss"] - want) / want for r, want in zip(rows, reference.losses)]
    print("relative loss errors against train-local:", [f"{e:.1e}" for e in errors])
    assert max(errors) < LOSS_RTOL, errors
    return rows


@pytest.mark.slow
def test_bf16_job_on_heterogeneous_pipelines_matches_train_local(tmp_path: Path, profile_dir: Path) -> None:
    raw = precision_job(profile_dir, "bf16", 6, [])
    run_dir, _ = run_job(tmp_path, raw)
    reference = reference_of(raw)
    assert reference.losses[-1] < reference.losses[0] - 0.1  # it trains: the comparison is not of constants
    rows = assert_losses_match(run_dir, reference)
    # 3 pipelines on 4 nodes, none idle: a 2-node and two 1-node ones
    assert all((r["nodes_alive"], r["pipelines"]) == (4, 3) for r in rows)
    assert max(r["grad_norm"] for r in rows) > 1.0  # the default grad_clip (1.0) clipped: covered too


@pytest.mark.slow
def test_fp16_overflow_on_one_pipeline_is_skipped_by_all_and_the_scale_survives_a_kill(
    tmp_path: Path, profile_dir: Path
) -> None:
    """fp16 from the initial scale 2**16: the first steps overflow and are skipped until the scale fits.
    Then an inf is forced into node 0's gradients (the 2-node pipeline) at step 6: every rank skips it, and
    the scale halves. Node 1 is killed at step 8: the survivors re-plan as 1 + 1 + 1 and layers move with
    the scale. Losses match train-local with the same forced overflow, every skipped step left the parameters
    as they were, and the final scale is train-local's."""
    faults = [
        {"step": 6, "kind": "overflow", "nodes": [0]},
        {"step": 8, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]},
    ]
    raw = precision_job(profile_dir, "fp16", 10, faults, checkpoint_every=1, checkpoint_keep=0)
    run_dir, _ = run_job(tmp_path, raw)
    reference = reference_of(raw)
    rows = assert_losses_match(run_dir, reference)
    # steps 0-7 ran in the first generation (a 2-node and two 1-node pipelines), 8-9 on the 3 survivors; not
    # nodes_alive for step 7: node 1 dies in step 8's forward, which may come before step 7's commit record
    assert [(r["generation"], r["pipelines"]) for r in rows] == [(1, 3)] * 8 + [(2, 3)] * 2
    assert [r["nodes_alive"] for r in rows[8:]] == [3, 3]
    (recovery,) = recoveries(run_dir)
    assert recovery["mode"] == "memory" and recovery["layers_moved"] > 0  # moved layers carried the scale
    skipped = [r["step"] for r in rows if not math.isfinite(r["grad_norm"])]
    assert skipped == [s.step for s in reference.stats if not math.isfinite(s.grad_norm)]
    assert 6 in skipped and 7 not in skipped and 5 not in skipped
    for step in skipped[1:]:  # the state after a skipped step is the state before it (step 0 has no checkpoint)
        before, after = (checkpoint.checkpoint_dir(run_dir, s) for s in (step, step + 1))
        for index in range(len(reference.layers)):
            old, new = (checkpoint.load_layer_state(c, index) for c in (before, after))
            assert all(torch.equal(old["params"][k], new["params"][k]) for k in old["params"]), (step, index)
    final = checkpoint.latest_checkpoint(run_dir)
    scales = {tuple(checkpoint.load_layer_state(final, i)["loss_scale"]) for i in range(len(reference.layers))}
    assert scales == {tuple(reference.scale.encode())}
    assert reference.scale.log2 == INITIAL_FP16_LOG2 - len(skipped)
