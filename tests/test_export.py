"""``oobleck export``: the whole model out of a checkpoint (oobleck/export.py). The exported tensors, loaded
back, give the same loss on a fixed batch as the checkpoint's own layers; a spec's ``export_pretrained`` is
used when it says so; bad input is one line, exit 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.base import run_layers
from oobleck import checkpoint
from oobleck.cli import main
from oobleck.config import config_from_dict
from oobleck.export import export, load_exported
from oobleck.model_building import build_batches
from oobleck.train_local import train_local

GPT = {"family": "gpt", "dtype": "float64", "overrides": {"n_layer": 2, "d_model": 16, "n_head": 2, "seq_len": 16}}
CHAR_LM = {"family": "examples.my_layers:char_lm", "dtype": "float64", "config": {"seq_len": 16, "vocab_size": 256, "width": 16}}


def trained(run_dir: Path, model: dict[str, Any], steps: int = 3) -> Any:
    """``model`` trained ``steps`` steps on pydoc with checkpoints after step 2 and at the end."""
    config = config_from_dict({
        "model": model, "data": {"dataset": "pydoc"},
        "training": {"steps": steps, "global_batch": 4, "microbatch": 2, "lr": 1e-2, "seed": 1},
        "cluster": {"device": "cpu"}, "fault_tolerance": {"checkpoint_every": 2},
    })  # fmt: skip
    train_local(config, run_dir=run_dir)
    return config


def checkpoint_loss(config: Any, ckpt: Path) -> torch.Tensor:
    """The loss of the checkpoint's own layers (restored as a resumed run restores them) on a fixed batch."""
    from oobleck.model_building import build_model

    spec = build_model(config.model, config.training.seed)
    layers = spec.build_all()
    for i, layer in enumerate(layers):
        checkpoint.restore_layer(checkpoint.load_layer_state(ckpt, i), layer)
    return run_layers(layers, build_batches(config, spec).microbatch(7, 1))


@pytest.mark.parametrize("model", [GPT, CHAR_LM], ids=["gpt", "your-own-layers"])
def test_exported_tensors_give_the_checkpoints_loss(tmp_path: Path, model: dict[str, Any]) -> None:
    config = trained(tmp_path / "run", model)
    done = export(tmp_path / "run", tmp_path / "out")
    assert done.step == 3 and not done.pretrained and sorted(p.name for p in done.out_dir.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((done.out_dir / "config.json").read_text())
    assert saved["model"] == config.to_dict()["model"] and saved["num_layers"] == 4 and saved["step"] == 3
    tensors = load_file(str(done.out_dir / "model.safetensors"))
    (first, first_name), (last, last_name) = saved["tied"][0]
    assert f"{first}.{first_name}" in tensors and f"{last}.{last_name}" not in tensors  # a tied weight is stored once

    spec, layers = load_exported(done.out_dir)
    batch = build_batches(config, spec).microbatch(7, 1)
    want = checkpoint_loss(config, checkpoint.checkpoint_dir(tmp_path / "run", 3))
    assert torch.equal(run_layers(layers, batch), want)
    assert layers[first].get_parameter(first_name) is layers[last].get_parameter(last_name)

    earlier = export(tmp_path / "run", tmp_path / "out2", step=2)
    _, layers2 = load_exported(earlier.out_dir)
    step2 = run_layers(layers2, batch)
    assert torch.equal(step2, checkpoint_loss(config, checkpoint.checkpoint_dir(tmp_path / "run", 2)))
    assert not torch.equal(step2, want)


PRETRAINED = '''
from pathlib import Path
from models.gpt import GPTConfig, GPTSpec

class Marked(GPTSpec):
    def __init__(self, seed, dtype):
        super().__init__(GPTConfig(n_layer=1, n_head=2, d_model=8, seq_len=16), seed=seed, dtype=dtype)

    def export_pretrained(self, states, out_dir):
        Path(out_dir, "pretrained.txt").write_text(f"{len(states)} {sorted(states[0])}")
        return True
'''


def test_a_spec_with_a_library_format_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "marked_spec.py").write_text(textwrap.dedent(PRETRAINED))
    monkeypatch.syspath_prepend(str(tmp_path))
    trained(tmp_path / "run", {"family": "marked_spec:Marked"}, steps=1)
    done = export(tmp_path / "run", tmp_path / "out")
    assert done.pretrained and [p.name for p in done.out_dir.iterdir()] == ["pretrained.txt"]
    assert (done.out_dir / "pretrained.txt").read_text() == "3 ['wpe.weight', 'wte.weight']"


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trained(tmp_path / "run", GPT, steps=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("taken")
    (tmp_path / "empty-run").mkdir()
    cases = {
        "RUN: got '{t}/nope'; no such run directory": ["{t}/nope", "--out", "{t}/o1"],
        "RUN: {t}/empty-run holds no complete checkpoint": ["{t}/empty-run", "--out", "{t}/o2"],
        "--step: got 5; {t}/run has no checkpoint of that step": ["{t}/run", "--step", "5", "--out", "{t}/o3"],
        "--out: '{t}/full' exists and is not an empty folder": ["{t}/run", "--out", "{t}/full"],
    }
    for message, args in cases.items():
        assert main(["export", *(a.format(t=tmp_path) for a in args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message.format(t=tmp_path) in err, err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ok")]) == 0
    assert "exported step 1 from" in capsys.readouterr().out
