"""The pipeline engine reproduces the single-process reference trainer.

Each test trains a tiny model twice: with ``train_local`` in this process, and with the engine as real
worker processes (``tests/engine_harness.py``), then compares per-step losses and the final parameters
read back from the engine's checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_harness import EngineRun, max_loss_error, max_optimizer_error, max_param_error, run_engine
from oobleck import checkpoint
from oobleck.config import JobConfig, config_from_dict
from oobleck.train_local import LocalResult, train_local

#: every test trains with real worker processes, for up to 20 steps
pytestmark = pytest.mark.slow

# the machine's cores are shared by many processes: threads would only contend
torch.set_num_threads(1)

#: 5 single-device nodes as two heterogeneous pipelines: 2 stages and 3 stages over the 6 layers
FIVE_NODES = [[0, 3, 6], [0, 2, 4, 6]]


def job(tmp_path: Path, family: str, dtype: str, steps: int, **training: Any) -> JobConfig:
    return config_from_dict(
        {
            "model": {"family": family, "dtype": dtype, "overrides": _SMALL[family]},
            "data": {"dataset": "pydoc" if family == "gpt" else "digits"},
            "training": {
                "steps": steps, "global_batch": 12, "microbatch": 2, "lr": 3e-3, "grad_clip": None, **training,
            },
            "run": {"dir": str(tmp_path / "run")},
        }
    )


_SMALL: dict[str, dict[str, int]] = {
    "gpt": {"n_layer": 4, "d_model": 32, "n_head": 2, "seq_len": 16},
    "dit": {"n_layer": 4, "d_model": 32, "n_head": 2},
    "moe": {"n_layer": 4, "d_model": 32, "n_head": 2},
}


def check(
    config: JobConfig,
    cuts: list[list[int]],
    microbatches: list[int],
    tmp_path: Path,
    tolerance: float,
    reference_dir: Path | None = None,
) -> tuple[EngineRun, LocalResult]:
    """Train with both trainers; assert losses and final parameters agree within ``tolerance``."""
    reference = train_local(config, run_dir=reference_dir)
    run = run_engine(config, cuts, microbatches, tmp_path)
    assert max_loss_error(run.losses, reference.losses) < tolerance
    assert run.checkpoint is not None and max_param_error(run.checkpoint, reference.layers) < tolerance
    return run, reference


def test_gpt_float64_heterogeneous_pipelines(tmp_path: Path) -> None:
    # unequal microbatch counts: the loss must be divided by the global unit count, not per pipeline
    run, reference = check(job(tmp_path, "gpt", "float64", 20), FIVE_NODES, [2, 4], tmp_path, 1e-9)
    assert reference.losses[-1] < reference.losses[0]  # it trains: the comparison is not of constants
    assert [r.step for r in run.reports] == list(range(20))


def test_gpt_float32_with_default_clipping(tmp_path: Path) -> None:
    check(job(tmp_path, "gpt", "float32", 8, grad_clip=1.0), FIVE_NODES, [4, 2], tmp_path, 1e-4)


def test_dit_float64(tmp_path: Path) -> None:
    check(job(tmp_path, "dit", "float64", 6), FIVE_NODES, [3, 3], tmp_path, 1e-9)


def test_difffit_float64_leaves_frozen_weights_alone(tmp_path: Path) -> None:
    config = job(tmp_path, "dit", "float64", 4)
    config.model.difffit = True
    _, reference = check(config, [[0, 4, 6], [0, 1, 3, 6]], [2, 4], tmp_path, 1e-9)
    frozen = [p for layer in reference.layers for p in layer.parameters() if not p.requires_grad]
    assert frozen  # the comparison covers frozen weights, which the engine must not sync or step


def test_moe_float64_with_aux_losses(tmp_path: Path) -> None:
    check(job(tmp_path, "moe", "float64", 6), FIVE_NODES, [2, 4], tmp_path, 1e-9)


def test_two_nodes_two_devices_with_active_clipping(tmp_path: Path) -> None:
    # G=2: two nodes of two devices give two pipelines of two stages (4 ranks). AdamW is nearly blind to a
    # gradient's scale, so the limit is small enough to bring gradients down to the order of its eps
    # (1e-8): a wrong clip coefficient then shows in the parameters, not only in the reported norm.
    max_norm = 1e-6
    config = job(tmp_path, "gpt", "float64", 6, grad_clip=max_norm)
    config.fault_tolerance.checkpoint_every = 3
    run, reference = check(config, [[0, 3, 6], [0, 4, 6]], [3, 3], tmp_path, 1e-9, reference_dir=tmp_path / "ref")
    # the periodic checkpoint holds the same weights, optimizer moments and step counts as the reference's
    mid, reference_mid = (checkpoint.checkpoint_dir(d, 3) for d in (config.run.dir, tmp_path / "ref"))
    assert checkpoint.read_meta(mid)["step"] == 3
    assert max_optimizer_error(mid, reference_mid, 6) < 1e-9
    assert max_optimizer_error(run.checkpoint, reference.checkpoint, 6) < 1e-9
    norms = [r.grad_norm for r in run.reports]
    assert all(n > 1e3 * max_norm for n in norms)  # clipping scaled every step
    assert max(abs(a - s.grad_norm) / s.grad_norm for a, s in zip(norms, reference.stats)) < 1e-9


def test_abort_stops_every_worker_and_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    config = job(tmp_path, "gpt", "float64", 4)
    config.fault_tolerance.checkpoint_every = 2
    run = run_engine(config, [[0, 2, 6], [0, 4, 6]], [2, 4], tmp_path, abort_at=2)
    assert [r.step for r in run.reports] == [0, 1]
    assert all("StepAborted: step 2 was aborted by the master" in log for log in run.logs)
    # the checkpoint after the committed steps is complete and right; nothing of step 2 or later was written
    reference = train_local(dataclasses.replace(config, training=dataclasses.replace(config.training, steps=2)))
    assert max_param_error(checkpoint.checkpoint_dir(config.run.dir, 2), reference.layers) < 1e-9
    assert checkpoint.latest_checkpoint(config.run.dir) == checkpoint.checkpoint_dir(config.run.dir, 2)
