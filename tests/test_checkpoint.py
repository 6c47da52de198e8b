"""Per-layer checkpoints: atomic files, completeness, and survival of a writer killed half way."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from oobleck.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    layer_file,
    load_layer_state,
    read_meta,
    restore_layer,
    save_layer,
    write_meta,
)
from oobleck.config import TrainingConfig
from oobleck.training import make_optimizer

REPO = Path(__file__).resolve().parent.parent


def _trained_layer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = make_optimizer(list(layer.named_parameters()), TrainingConfig(weight_decay=0.1))
    layer(torch.randn(2, 3)).sum().backward()
    opt.step()
    return layer, opt


def _save_checkpoint(run: Path, step: int, layers: list[tuple[nn.Module, torch.optim.Optimizer]]) -> Path:
    ckpt = checkpoint_dir(run, step)
    for i, (layer, opt) in enumerate(layers):
        save_layer(ckpt, step, i, layer, opt)
    write_meta(ckpt, step, len(layers), {"training": {"steps": step}})
    return ckpt


def test_round_trip_restores_parameters_and_optimizer_state(tmp_path: Path) -> None:
    layer, opt = _trained_layer(0)
    ckpt = _save_checkpoint(tmp_path, 3, [(layer, opt)])
    assert ckpt == tmp_path / "checkpoints" / "step_00000003"
    assert read_meta(ckpt) == {"format": 1, "step": 3, "num_layers": 1, "config": {"training": {"steps": 3}}}

    fresh, fresh_opt = _trained_layer(1)
    state = load_layer_state(ckpt, 0)
    assert state["step"] == 3
    restore_layer(state, fresh, fresh_opt)
    for a, b in zip(layer.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])


def test_optimizer_state_for_other_parameters_is_refused(tmp_path: Path) -> None:
    layer, opt = _trained_layer(0)
    ckpt = _save_checkpoint(tmp_path, 1, [(layer, opt)])
    other, _ = _trained_layer(1)
    other[1].weight.requires_grad_(False)
    other_opt = make_optimizer(list(other.named_parameters()), TrainingConfig())
    with pytest.raises(CheckpointError, match="optimizer state covers"):
        restore_layer(load_layer_state(ckpt, 0), other, other_opt)
    restore_layer(load_layer_state(ckpt, 0), other)  # parameters alone still load
    assert torch.equal(other[0].weight, layer[0].weight)


def test_latest_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    layers = [_trained_layer(0), _trained_layer(1)]
    _save_checkpoint(tmp_path, 2, layers)
    newest = _save_checkpoint(tmp_path, 10, layers)
    assert latest_checkpoint(tmp_path) == newest

    layer_file(newest, 1).unlink()  # meta present, a layer file gone
    no_meta = checkpoint_dir(tmp_path, 12)
    save_layer(no_meta, 12, 0, *layers[0])
    save_layer(no_meta, 12, 1, *layers[1])
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)


def test_meta_before_all_layers_is_refused(tmp_path: Path) -> None:
    ckpt = checkpoint_dir(tmp_path, 1)
    save_layer(ckpt, 1, 0, *_trained_layer(0))
    with pytest.raises(CheckpointError, match=r"layer files \[1\] not written yet"):
        write_meta(ckpt, 1, 2, {})


def test_missing_layer_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="layer 5 missing"):
        load_layer_state(tmp_path, 5)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from oobleck.checkpoint import checkpoint_dir, save_layer, write_meta
    run = sys.argv[1]
    small = nn.Linear(2, 2)
    with torch.no_grad():
        small.weight.fill_(1.0)
    ckpt = checkpoint_dir(run, 1)
    for i in range(3):
        save_layer(ckpt, 1, i, small, None)
    write_meta(ckpt, 1, 3, {})
    big = nn.Linear(1024, 1024)  # 4 MiB per file: the kill lands while one is being written
    ckpt = checkpoint_dir(run, 2)
    save_layer(ckpt, 2, 0, big, None)
    print("writing", flush=True)
    i = 1
    while True:  # never reaches meta.json
        save_layer(ckpt, 2, i, big, None)
        i += 1
    """
)


def test_writer_killed_mid_checkpoint_leaves_previous_one(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_dir(tmp_path, 2).is_dir()
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_dir(tmp_path, 1)
    for i in range(3):
        state = load_layer_state(latest, i)
        assert state["step"] == 1 and torch.equal(state["params"]["weight"], torch.ones(2, 2))
