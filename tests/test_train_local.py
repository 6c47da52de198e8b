"""The single-process reference trainer and its command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oobleck import checkpoint
from oobleck.config import config_from_dict
from oobleck.train_local import train_local

REPO = Path(__file__).resolve().parent.parent
SMALL_GPT = {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16}


def _config(model: dict, **training: object) -> dict:
    base = {"steps": 3, "global_batch": 4, "microbatch": 2, "lr": 3e-3, "seed": 0}
    return {
        "model": model,
        "data": {"dataset": "pydoc" if model["family"] == "gpt" else "digits"},
        "training": {**base, **training},
        "cluster": {"device": "cpu"},
    }


def test_gpt_loss_falls_and_run_dir_is_written(tmp_path: Path) -> None:
    cfg = config_from_dict(_config({"family": "gpt", "overrides": SMALL_GPT}, steps=6, global_batch=8))
    result = train_local(cfg, run_dir=tmp_path)
    assert len(result.losses) == 6
    assert result.losses[-1] < result.losses[0] - 0.2, result.losses

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(6))
    assert [m["loss"] for m in lines] == result.losses
    assert all(m["grad_norm"] > 0 and m["samples_per_s"] > 0 and m["lr"] == pytest.approx(3e-3) for m in lines)

    assert checkpoint.latest_checkpoint(tmp_path) == result.checkpoint == checkpoint.checkpoint_dir(tmp_path, 6)
    head = checkpoint.load_layer_state(result.checkpoint, len(result.layers) - 1)
    assert torch.equal(head["params"]["lm_head.weight"], result.layers[0].wte.weight.detach())


def test_tied_weight_is_one_parameter_stepped_once() -> None:
    cfg = config_from_dict(_config({"family": "gpt", "overrides": SMALL_GPT}, steps=1))
    result = train_local(cfg)
    embedding, head = result.layers[0], result.layers[-1]
    assert head.lm_head.weight is embedding.wte.weight
    owned = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in result.optimizers]
    assert id(embedding.wte.weight) in owned[0] and id(embedding.wte.weight) not in owned[-1]


def test_microbatch_size_does_not_change_the_numbers() -> None:
    """Gradients are summed losses over the global unit count, so cutting the same global batch into
    more microbatches gives the same step (float64: equal to rounding)."""
    model = {"family": "gpt", "overrides": SMALL_GPT, "dtype": "float64"}
    one = train_local(config_from_dict(_config(model, steps=3, global_batch=4, microbatch=4, weight_decay=0.1)))
    four = train_local(config_from_dict(_config(model, steps=3, global_batch=4, microbatch=1, weight_decay=0.1)))
    assert one.losses == pytest.approx(four.losses, rel=1e-12, abs=0)
    for a, b in zip(one.layers, four.layers):
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=name)


def test_clipping_limits_the_applied_gradient() -> None:
    model = {"family": "gpt", "overrides": SMALL_GPT, "dtype": "float64"}
    clipped = train_local(config_from_dict(_config(model, steps=2, grad_clip=1e-3, lr=1e-2)))
    free = train_local(config_from_dict(_config(model, steps=2, grad_clip=None, lr=1e-2)))
    assert clipped.stats[0].grad_norm == pytest.approx(free.stats[0].grad_norm, rel=1e-12)
    assert clipped.stats[0].grad_norm > 1e-3  # so step 0 was clipped and the runs part ways
    assert clipped.losses[1] != pytest.approx(free.losses[1], rel=1e-9)


def test_init_checkpoint_loads_parameters(tmp_path: Path) -> None:
    trained = train_local(config_from_dict(_config({"family": "gpt", "overrides": SMALL_GPT}, steps=2)), run_dir=tmp_path)
    raw = _config({"family": "gpt", "overrides": SMALL_GPT, "init_checkpoint": str(tmp_path)}, steps=1, lr=1e-9)
    resumed = train_local(config_from_dict(raw))
    # with a vanishing learning rate one step barely moves the loaded weights
    torch.testing.assert_close(resumed.layers[1].attn.c_attn.weight, trained.layers[1].attn.c_attn.weight, atol=1e-7, rtol=0)

    raw["model"]["overrides"] = {**SMALL_GPT, "n_layer": 3}
    with pytest.raises(checkpoint.CheckpointError, match="holds 4 layers but the model has 5"):
        train_local(config_from_dict(raw))

    # a checkpoint folder named directly is verified like any other before use
    step_dir = checkpoint.latest_checkpoint(tmp_path)
    assert step_dir is not None
    raw["model"]["overrides"] = SMALL_GPT
    raw["model"]["init_checkpoint"] = str(step_dir)
    train_local(config_from_dict(raw))
    layer = checkpoint.layer_file(step_dir, 1)
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"^model.init_checkpoint: .*layer_0001.pt does not match its SHA-256"):
        train_local(config_from_dict(raw))


@pytest.mark.parametrize("family", ["dit", "moe"])
def test_image_families_train(family: str) -> None:
    pytest.importorskip(f"models.{family}")
    result = train_local(config_from_dict(_config({"family": family, "preset": "tiny"}, steps=2)))
    assert len(result.losses) == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    if family == "moe":
        assert all(s.aux_loss > 0 for s in result.stats)


def test_difffit_fine_tunes_only_its_parameters_from_a_pretrained_run(tmp_path: Path) -> None:
    pytest.importorskip("models.dit")
    pretrained = train_local(config_from_dict(_config({"family": "dit", "preset": "tiny"}, steps=1)), run_dir=tmp_path)
    raw = _config({"family": "dit", "preset": "tiny", "difffit": True, "init_checkpoint": str(tmp_path)}, steps=2, lr=1e-2)
    raw["data"]["classes"] = [5, 6]
    tuned = train_local(config_from_dict(raw))
    frozen = changed = 0
    for index, layer in enumerate(tuned.layers):
        saved = checkpoint.load_layer_state(pretrained.checkpoint, index)["params"]
        for name, param in layer.named_parameters():
            if not param.requires_grad:
                assert torch.equal(param, saved[name]), name
                frozen += 1
            elif name in saved and not torch.equal(param, saved[name]):
                changed += 1
    assert frozen > 0 and changed > 0


def test_sample_grid_is_written(tmp_path: Path) -> None:
    pytest.importorskip("models.sampling")
    from PIL import Image

    from oobleck.config import SamplingConfig
    from oobleck.train_local import write_samples

    result = train_local(config_from_dict(_config({"family": "dit", "preset": "tiny"}, steps=1)))
    path = write_samples(result, tmp_path / "grid.png", SamplingConfig(steps=2), classes=[1, 2, 3], per_class=2)
    with Image.open(path) as image:  # a label column and 3 rows of 2 tiles of 8x8 pixels scaled 4x, 2-pixel padding
        assert image.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)


def test_samples_come_from_the_average_with_the_configured_guidance(tmp_path: Path) -> None:
    """write_samples draws from result.ema with sampling.steps and sampling.cfg_scale: its grid equals one made
    directly from the average with those options, and differs from the trained weights' and unguided grids."""
    from PIL import Image

    from models.sampling import sample_images, save_grid
    from oobleck.config import SamplingConfig
    from oobleck.train_local import write_samples

    # plain adaLN: the label reaches the output from the first step, so guidance changes the images
    model = {"family": "dit", "preset": "tiny", "overrides": {"class_dropout": 0.1, "adaln_zero": False}}
    result = train_local(config_from_dict(_config(model, steps=3)), ema_decay=0.9)
    assert result.ema is not None and result.ema.updates == 3

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image)

    def grid(name: str, layers: list, sampling: SamplingConfig) -> np.ndarray:
        labels = torch.tensor([3, 3, 7, 7])
        images = sample_images(layers, result.spec, labels, sampling.steps, torch.Generator().manual_seed(0), cfg_scale=sampling.cfg_scale)
        save_grid(images, tmp_path / name, nrow=2, scale=4, row_labels=["3", "7"])
        return pixels(tmp_path / name)

    guided = SamplingConfig(ema=0.9, cfg_scale=3.0, steps=4)
    written = pixels(write_samples(result, tmp_path / "written.png", guided, classes=[3, 7], per_class=2))
    assert np.array_equal(written, grid("ema.png", result.ema.layers, guided))
    assert not np.array_equal(written, grid("trained.png", result.layers, guided))
    assert not np.array_equal(written, grid("unguided.png", result.ema.layers, SamplingConfig(ema=0.9, cfg_scale=1.0, steps=4)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_trains_and_reports(tmp_path: Path) -> None:
    config = tmp_path / "gpt.yaml"
    config.write_text(yaml.safe_dump(_config({"family": "gpt", "overrides": SMALL_GPT}, steps=5)))
    done = _cli(str(config), "--steps", "2", "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "final loss" in done.stdout and "after 2 steps" in done.stdout
    assert checkpoint.latest_checkpoint(tmp_path / "run") == checkpoint.checkpoint_dir(tmp_path / "run", 2)


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("training: {lr: -1}\n", [], "training.lr: got -1"),
        ("model: {family: gpt}\n", ["--steps", "0"], "--steps: got 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: str, extra: list[str], message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    done = _cli(str(config), *extra, "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model: {family: dit}\nsampling: {cfg_scale: 2}\n", "sampling.cfg_scale: got 2; guidance needs a model trained with label dropout"),
        (
            "model: {family: dit, overrides: {num_timesteps: 10}}\nsampling: {steps: 20}\n",
            "sampling.steps: got 20; must be at most the model's num_timesteps (10)",
        ),
    ],
)
def test_cli_refuses_sampling_options_the_model_cannot_honour_before_training(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data: {dataset: digits}\n" + content)
    done = _cli(str(config), "--run-dir", str(tmp_path / "run"), "--samples", str(tmp_path / "grid.png"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()  # refused before the first step


def test_cli_writes_a_labelled_grid_with_the_sampling_section(tmp_path: Path) -> None:
    from PIL import Image

    raw = _config({"family": "dit", "preset": "tiny", "overrides": {"class_dropout": 0.1}}, steps=2)
    raw["data"]["classes"] = [5, 6]
    raw["sampling"] = {"ema": 0.5, "cfg_scale": 2.0, "steps": 3}
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = _cli(str(config), "--run-dir", str(tmp_path / "run"), "--samples", str(tmp_path / "grid.png"))
    assert done.returncode == 0, done.stderr
    assert f"samples: {tmp_path / 'grid.png'}" in done.stdout
    with Image.open(tmp_path / "grid.png") as image:  # label column + 8 per class, 2 rows (classes 5 and 6)
        assert image.size == (9 * 32 + 10 * 2, 2 * 32 + 3 * 2)
