"""``oobleck sample``: a PNG grid from a diffusion model's checkpoint, read from the checkpoint alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from oobleck.checkpoint_samples import write_sample_grid
from oobleck.config import config_from_dict
from oobleck.errors import ConfigError
from oobleck.train_local import check_samples, train_local
from tests.test_diffusers_models import UNET

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, model: dict, classes: list[int] | None = None) -> Path:
    raw = {
        "model": model,
        "data": {"dataset": "pydoc"} if model["family"] == "gpt" else {"dataset": "digits", "classes": classes},
        "training": {"steps": 2, "global_batch": 4, "microbatch": 4, "seed": 0},
    }
    run_dir = tmp_path / "run"
    train_local(config_from_dict(raw), run_dir=run_dir)
    return run_dir


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "sample", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_sample_writes_a_grid_of_the_expected_size_for_a_diffusers_unet(tmp_path: Path) -> None:
    """A class-conditional UNet trained on classes 3 and 7: two rows of 5 tiles and a label column, each
    8x8 enlarged to 32x32, with 2 px padding: 6 * 32 + 7 * 2 = 206 wide, 2 * 32 + 3 * 2 = 70 high. No YAML
    file exists: the checkpoint's meta.json is all the command reads."""
    run_dir = _train(tmp_path, {"family": "diffusers", "architecture": "unet2d", "config": UNET}, classes=[3, 7])
    out = tmp_path / "grid.png"
    proc = _cli(str(run_dir), "--step", "2", "--out", str(out), "--per-class", "5", "--sample-steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"samples: {out} (206x70 px)" in proc.stdout
    with Image.open(out) as image:
        assert image.size == (206, 70) and image.mode == "L"


def test_sample_of_a_builtin_dit_and_an_unconditional_unet(tmp_path: Path) -> None:
    dit = _train(tmp_path / "dit", {"family": "dit", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2}})
    path, width, height = write_sample_grid(dit, tmp_path / "dit.png", rows=3, per_class=2, steps=2)
    assert (width, height) == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2) and Image.open(path).size == (width, height)
    unconditional = {k: v for k, v in UNET.items() if k != "num_class_embeds"}
    unet = _train(tmp_path / "unet", {"family": "diffusers", "architecture": "unet2d", "config": unconditional})
    path, width, height = write_sample_grid(unet, None, per_class=3, steps=2)
    assert path.parent.name == "step_00000002" and (width, height) == (3 * 32 + 4 * 2, 4 * 32 + 5 * 2)
    # train-local --samples draws a row per class: it refuses the unconditional model in one line instead
    model = {"family": "diffusers", "architecture": "unet2d", "config": unconditional}
    with pytest.raises(ConfigError, match=r"^--samples: the model is not a class-conditional"):
        check_samples(config_from_dict({"model": model, "data": {"dataset": "digits"}}))


def test_bad_run_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "RUN: got " in proc.stderr and "no such run directory" in proc.stderr
    gpt = _train(tmp_path, {"family": "gpt", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2, "seq_len": 16}})
    proc = _cli(str(gpt), "--step", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a diffusion model" in proc.stderr, proc.stderr
    proc = _cli(str(gpt), "--step", "5")
    assert proc.returncode == 2 and "--step: got 5" in proc.stderr, proc.stderr
