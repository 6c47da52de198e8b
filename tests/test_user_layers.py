"""Your own layers (``model.family: package.module:object``, models/user_layers.py): the (seed, i) rule and
tied groups, the dry-run sizes, the fingerprint and the profile file name, every kind of object the import
path may name, the one-line errors, and the example of examples/ trained through ``oobleck run`` with a node
killed."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from benchmarks.jobs import QUICK_PROFILE
from models.base import MicroBatch, ModelSpec, run_layers
from models.errors import ModelConfigError
from models.gpt import GPTSpec
from models.user_layers import LayerList, UserLayersSpec
from oobleck.config import ModelConfig, config_from_dict
from oobleck.errors import ConfigError
from oobleck.model_building import build_batches, build_model
from oobleck.profiler import profile_fingerprint, profile_path
from tests.run_helpers import ROOT, ReferenceRun, assert_matches_reference, recoveries, run_job

CHAR_LM = {"seq_len": 16, "vocab_size": 256, "width": 16, "depth": 2}
MLP = {"image_size": 8, "channels": 1, "num_classes": 10, "hidden": 16, "depth": 1}


def spec_of(family: str, config: dict[str, Any], seed: int = 5, dtype: str = "float64") -> ModelSpec:
    return build_model(ModelConfig(family=family, config=config, dtype=dtype), seed)


def test_layers_built_alone_equal_build_all_and_tied_copies_start_equal() -> None:
    spec = spec_of("examples.my_layers:char_lm", CHAR_LM)
    assert isinstance(spec, UserLayersSpec) and spec.num_layers == 4
    whole = spec.build_all()
    head = spec.num_layers - 1
    assert whole[0].get_parameter("module.weight") is whole[head].get_parameter("module.weight")
    assert spec.tied == [((0, "module.weight"), (head, "module.weight"))]
    for i in range(spec.num_layers):
        alone = spec.build_layer(i).state_dict()
        assert alone.keys() == whole[i].state_dict().keys()
        for name, tensor in whole[i].state_dict().items():
            assert tensor.dtype == torch.float64 and torch.equal(alone[name], tensor), (i, name)
    assert not torch.equal(whole[1].module.weights, whole[2].module.weights), "layers must draw from their own seed"
    other = spec_of("examples.my_layers:char_lm", CHAR_LM, seed=6).build_layer(1)
    assert not torch.equal(other.module.weights, whole[1].module.weights)
    state = torch.random.get_rng_state()
    spec.build_layer(2)
    assert torch.equal(state, torch.random.get_rng_state()), "building a layer must leave the global RNG alone"


def test_calling_convention_and_summed_loss_on_real_batches() -> None:
    """Text: the first layer reads tokens, the loss is the summed cross-entropy over every target token;
    images: the first layer reads the (fp64) image, the loss sums over the labels."""
    text = config_from_dict({"model": {"family": "examples.my_layers:char_lm", "dtype": "float64", "config": CHAR_LM},
                             "training": {"global_batch": 4, "microbatch": 2}})  # fmt: skip
    spec = build_model(text.model, 0)
    mb = build_batches(text, spec).microbatch(0, 0)
    layers = spec.build_all()
    logits = run_layers(layers[:-1], mb)
    logits = layers[-1].module(logits)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), mb.data["targets"].reshape(-1), reduction="sum")
    assert torch.equal(run_layers(layers, mb), expected)
    assert spec.loss_units(mb) == 2 * 16

    images = config_from_dict({"model": {"family": "examples.my_layers:mlp", "dtype": "float64", "config": MLP},
                               "data": {"dataset": "digits"}, "training": {"global_batch": 4, "microbatch": 4}})  # fmt: skip
    spec = build_model(images.model, 0)
    mb = build_batches(images, spec).microbatch(0, 0)
    loss = run_layers(spec.build_all(), mb)
    assert loss.dtype == torch.float64 and spec.loss_units(mb) == 4
    assert 4 * math.log(10) * 0.5 < loss.item() < 4 * math.log(10) * 2  # four samples' summed loss near chance


def test_layer_meta_fingerprint_and_profile_file_name(tmp_path: Path) -> None:
    spec = spec_of("examples.my_layers:mlp", MLP)
    metas = [spec.layer_meta(i) for i in range(spec.num_layers)]
    pixels, hidden = 64, 16
    assert [m.params for m in metas] == [pixels * hidden + hidden, hidden * hidden + hidden, hidden * 10 + 10]
    assert [m.output_numel_per_sample for m in metas] == [hidden, hidden, 0]
    # FlopCounterMode: 2 per multiply-add of each Linear (elementwise work counts nothing)
    assert [m.flops_per_sample for m in metas] == [2.0 * pixels * hidden, 2.0 * hidden * hidden, 2.0 * hidden * 10]
    fp = spec.fingerprint()
    assert fp["family"] == "examples.my_layers:mlp" and fp["config"] == MLP and fp["seed"] == 5
    assert fp["shapes"][0] == [["1.weight", [16, 64]], ["1.bias", [16]]]
    assert spec_of("examples.my_layers:mlp", {**MLP, "hidden": 8}).fingerprint()["shapes"] != fp["shapes"]
    job = config_from_dict({"model": {"family": "examples.my_layers:mlp", "config": MLP},
                            "cluster": {"device": "cpu"}, "profile": {"cache_dir": str(tmp_path)}})  # fmt: skip
    path = profile_path(job)
    assert path.parent == tmp_path and path.name.startswith("examples_my_layers_mlp-") and path.suffix == ".json"


USER_MODULE = '''
import torch
from torch import nn
from models.base import ModelSpec
from models.gpt import GPTConfig, GPTSpec
from models.user_layers import LayerList

NOT_CALLABLE = 3
SPEC = GPTSpec(GPTConfig(n_layer=1, n_head=2, d_model=8, seq_len=8))

def gpt(n_layer, seed, dtype):
    return GPTSpec(GPTConfig(n_layer=n_layer, n_head=2, d_model=8, seq_len=8), seed=seed, dtype=dtype)

class Tiny(GPTSpec):
    def __init__(self, width, seed, dtype):
        super().__init__(GPTConfig(n_layer=1, n_head=2, d_model=width, seq_len=8), seed=seed, dtype=dtype)

def instances():
    return [nn.Linear(4, 4)]

def raises(size):
    raise RuntimeError("no " + str(size))

def tuple_layers(image_size, channels, num_classes):
    # a tuple carry: the second layer receives both tensors as arguments
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 8)
        def forward(self, x):
            x = x.flatten(1)
            return self.a(x), x.sum(1, keepdim=True)
    class Join(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(9, num_classes)
        def forward(self, h, s):
            return self.b(torch.cat([h, s], 1))
    return LayerList([Split, Join])

def not_layers():
    return {"layers": []}

class NoPrint(ModelSpec):
    num_layers = 1
    build_layer = layer_meta = loss_units = None

def bad_tie():
    return LayerList([nn.ReLU, nn.ReLU], tied=[((0, "weight"), (2, "weight"))])
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_things.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_things"


def test_every_kind_of_object(user_module: str) -> None:
    assert spec_of(f"{user_module}:SPEC", {}).num_layers == 3  # an instance, used as it is
    made = spec_of(f"{user_module}:gpt", {"n_layer": 2}, seed=7)
    assert isinstance(made, GPTSpec) and made.num_layers == 4 and made.seed == 7 and made.dtype == torch.float64
    tiny = spec_of(f"{user_module}:Tiny", {"width": 4})
    assert isinstance(tiny, GPTSpec) and tiny.config.d_model == 4
    split = spec_of(f"{user_module}:tuple_layers", {"image_size": 8, "channels": 1, "num_classes": 3})
    assert [split.layer_meta(i).output_numel_per_sample for i in range(2)] == [9, 0]  # both tensors of the carry
    mb = MicroBatch({"image": torch.rand(2, 1, 8, 8), "label": torch.tensor([0, 2])})
    assert run_layers(split.build_all(), mb).shape == ()


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("no_such_pkg.layers:make", {}, "model.family: got 'no_such_pkg.layers:make'; no module 'no_such_pkg' on the Python path"),
        ("{m}:missing", {}, "has no attribute 'missing'"),
        ("{m}:NOT_CALLABLE", {}, "a int, not a ModelSpec or a factory"),
        ("{m}:raises", {"size": 3}, "calling it with model.config raised RuntimeError: no 3"),
        ("{m}:gpt", {"n_layer": 1, "bogus": 2}, "calling it with model.config raised TypeError"),
        ("{m}:instances", {}, "layer 0 is a Linear, not a constructor"),
        ("{m}:not_layers", {}, "it returned a dict; return a ModelSpec"),
        ("{m}:SPEC", {"x": 1}, "model.config: the object is a ModelSpec instance"),
        ("{m}:gpt", {"n_layer": 1, "seed": 1}, "model.config.seed: reserved"),
        ("{m}:NoPrint", {}, "NoPrint does not implement fingerprint()"),
        ("{m}:bad_tie", {}, "tied group [(0, 'weight'), (2, 'weight')] must list two or more"),
    ],
)
def test_errors_name_the_field(user_module: str, family: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec_of(family.format(m=user_module), config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_are_refused() -> None:
    with pytest.raises(ConfigError, match="model.overrides: your own layers take their arguments from model.config"):
        build_model(ModelConfig(family="examples.my_layers:mlp", config=MLP, overrides={"hidden": 3}), 0)


def test_data_shape_missing_and_dry_run_failure_are_one_line(tmp_path: Path) -> None:
    bare = UserLayersSpec("pkg.mod:obj", LayerList([lambda: torch.nn.Linear(4, 2)]), {}, 0, torch.float64)
    with pytest.raises(ModelConfigError, match="model.config: your own layers need the shape of their data"):
        bare.layer_meta(0)
    # channels 3 while the first layer takes 64 = 1 * 8 * 8 inputs: found by the dry run behind the profile
    job = config_from_dict({"model": {"family": "examples.my_layers:mlp", "config": {**MLP, "channels": 3}},
                            "cluster": {"device": "cpu"}, "profile": {"cache_dir": str(tmp_path)}})  # fmt: skip
    spec = build_model(job.model, 0)
    spec.layers.layers[0] = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    with pytest.raises(ConfigError, match="model.family: got 'examples.my_layers:mlp'; layer 0 failed on a one-sample batch"):
        profile_fingerprint(spec, 2, torch.device("cpu"))


def test_cli_import_error_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": {"family": "examples.no_such_module:mlp"}, "data": {"dataset": "digits"}}))
    done = subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(config), "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "model.family: got 'examples.no_such_module:mlp'" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_example_trains_through_run_with_a_node_killed(tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun) -> None:
    """examples/my-layers.yaml in fp64 on 4 nodes, node 1 killed in step 3: one recovery, the losses of
    ``train-local`` (1e-9), and the loss falls."""
    raw = yaml.safe_load((ROOT / "examples" / "my-layers.yaml").read_text())
    raw["model"]["dtype"] = "float64"
    raw["training"].update(steps=10, global_batch=16, microbatch=2, lr=1e-2)
    raw["cluster"].update(device="cpu", device_memory_gib=0.0003)  # small devices: two-stage pipelines (n0 = 2)
    raw["fault_tolerance"].update(heartbeat_interval_s=0.1, heartbeat_timeout_s=2.0)
    raw["profile"] = {"cache_dir": str(profile_dir), **QUICK_PROFILE}
    raw["faults"] = [{"step": 3, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]}]
    del raw["run"]
    run_dir, output = run_job(tmp_path, raw)
    reference = reference_run(raw)
    assert_matches_reference(run_dir, raw, reference)
    assert [r["lost"] for r in recoveries(run_dir)] == [["node1"]], output[-2000:]
    first, last = reference.losses[:3], reference.losses[-3:]  # single steps are noisy at batch 16
    assert sum(last) < 0.85 * sum(first), reference.losses
