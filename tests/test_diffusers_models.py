"""diffusers models (UNet2DModel, DiTTransformer2DModel) as layer lists: equal to the library model split at
any boundaries, independently built layers, pretrained slices, carry sizes, DiffFit, export, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from models.base import MicroBatch, run_layers
from models.data import BatchSource
from models.difffit import ScaleFactor, trainable_fraction
from models.diffusers_zoo import build_spec
from models.diffusers_zoo.spec import DiffusersSpec
from models.errors import ModelConfigError
from tests.model_checks import assert_split_equivalent

pytestmark = pytest.mark.usefixtures("one_thread")

#: a class-conditional UNet on 8x8x1 images: 2 down blocks (one with attention), a mid block, 2 up blocks
UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "attention_head_dim": 8, "num_class_embeds": 10,
}  # fmt: skip
#: a DiT on 8x8x1 images: 2x2 patches, width 16, 3 blocks, 10 classes (+ the null class)
DIT = {
    "sample_size": 8, "in_channels": 1, "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8,
    "patch_size": 2, "num_embeds_ada_norm": 10, "norm_num_groups": 1,
}  # fmt: skip
ARCHS = {"unet2d": UNET, "dit": DIT}


def spec_of(arch: str, dtype: torch.dtype = torch.float64, **kw: Any) -> DiffusersSpec:
    return build_spec(arch, ARCHS[arch], None, seed=5, dtype=dtype, **kw)


def microbatch(spec: DiffusersSpec, digits, n: int = 4, step: int = 0) -> MicroBatch:
    return BatchSource(digits, n, n, seed=3, randomness=spec.sample_randomness).microbatch(step, 0)


def library_model(spec: DiffusersSpec) -> torch.nn.Module:
    """The real diffusers model holding exactly the weights of ``spec.build_all()``."""
    cls = UNet2DModel if spec.architecture == "unet2d" else DiTTransformer2DModel
    model = cls(**spec.kwargs).to(spec.dtype)
    model.load_state_dict(spec.library_state([layer.state_dict() for layer in spec.build_all()]))
    return model.eval()  # eval: the library's own random label dropout off (the layers drop by the data seed)


def library_loss(model: torch.nn.Module, mb: MicroBatch, channels: int) -> torch.Tensor:
    """The summed noise-prediction loss of the library model on ``mb``, noised by a DDPMScheduler."""
    d = mb.data
    x_t = DDPMScheduler().add_noise(d["image"].to(torch.float64), d["noise"].to(torch.float64), d["t"])
    eps = model(x_t, d["t"], class_labels=d["label"]).sample[:, :channels]
    return ((eps - d["noise"]) ** 2).mean(dim=(1, 2, 3)).sum()


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_equal_the_library_model(arch: str, digits) -> None:
    """Loss and every gradient of the layer list equal the diffusers model's on the same noisy input,
    timesteps and labels (fp64, 1e-12 relative); tied copies' gradients add up to the shared weight's."""
    spec = spec_of(arch)
    mb = microbatch(spec, digits)
    model = library_model(spec)
    want = library_loss(model, mb, spec.config.channels)
    want.backward()
    layers = spec.build_all()
    got = run_layers(layers, mb.fresh())
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    grads: dict[str, torch.Tensor] = {}
    for layer in layers:  # build_all shares tied parameters: count each once
        for name, p in layer.named_parameters():
            grads.setdefault(name, p.grad)
    lib = dict(model.named_parameters())
    assert set(grads) == set(lib)
    largest = max(p.grad.abs().max().item() for p in lib.values())
    for name, g in grads.items():
        # a key bias's gradient is 0 up to rounding (softmax ignores a shift shared by all keys): compare it
        # against the model's largest gradient entry instead of its own rounding noise
        own = lib[name].grad.abs().max().item()
        scale = largest if name.endswith("to_k.bias") else max(own, 1e-300)
        assert (g - lib[name].grad).abs().max().item() <= 1e-12 * scale, name


@pytest.mark.parametrize("arch", ARCHS)
def test_split_at_any_boundaries_equals_the_whole(arch: str, digits) -> None:
    spec = spec_of(arch)
    mb = microbatch(spec, digits)
    cuts = range(1, spec.num_layers)
    every = [list(c) for r in range(1, len(cuts) + 1) for c in itertools.combinations(cuts, r)]
    # the DiT: all 15 splits; the UNet (63): every single cut, every 6th multi-cut and a stage per layer
    singles = len(cuts)
    chosen = every if spec.num_layers <= 5 else every[:singles] + every[singles::6] + [list(cuts)]
    for boundaries in chosen:
        assert_split_equivalent(spec, mb, boundaries)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_layer_alone_equals_build_all(arch: str) -> None:
    spec = spec_of(arch, dtype=torch.float32)
    whole = spec.build_all()
    for i in reversed(range(spec.num_layers)):
        alone = spec.build_layer(i).state_dict()
        assert alone.keys() == whole[i].state_dict().keys()
        assert all(torch.equal(v, whole[i].state_dict()[k]) for k, v in alone.items()), i
    other = build_spec(arch, ARCHS[arch], None, seed=6, dtype=torch.float32).build_layer(1).state_dict()
    assert not all(torch.equal(v, whole[1].state_dict()[k]) for k, v in other.items()), "the seed must matter"


def test_tied_copy_of_the_dit_embedding_is_equal_when_built_apart() -> None:
    spec = spec_of("dit")
    block0, head = spec.build_layer(1), spec.build_layer(spec.num_layers - 1)
    assert len(spec.tied) == len(list(head.get_submodule("transformer_blocks.0.norm1.emb").parameters())) > 0
    for (i, a), (j, b) in spec.tied:
        assert (i, j) == (1, spec.num_layers - 1) and torch.equal(block0.get_parameter(a), head.get_parameter(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrained_weights_land_exactly(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(11)
    cls = UNet2DModel if arch == "unet2d" else DiTTransformer2DModel
    cls(**ARCHS[arch]).save_pretrained(tmp_path)
    saved = cls.from_pretrained(tmp_path).state_dict()
    spec = build_spec(None, {}, str(tmp_path), seed=0, dtype=torch.float32)
    assert spec.architecture == arch and spec.weights is not None
    seen = set()
    for i in range(spec.num_layers):
        for name, value in spec.build_layer(i).state_dict().items():
            assert torch.equal(value, saved[name]), (i, name)
            seen.add(name)
    assert seen == set(saved)


def test_unet_carry_counts_the_pending_skips(digits) -> None:
    """layer_meta's carry elements per sample are every tensor the layer sends (feature map, embedding and
    the packed skips), and the skips make most of them: down blocks send more than h and emb."""
    spec = spec_of("unet2d")
    mb = microbatch(spec, digits, n=2)
    carry = None
    layers = spec.build_all()
    for i, layer in enumerate(layers[:-1]):
        carry = layer(carry, mb)
        sent = sum(t.numel() for t in carry) // mb.size
        meta = spec.layer_meta(i)
        assert meta.output_numel_per_sample == sent, (i, meta, sent)
        if i <= 2:  # stem and down blocks: skips pending
            assert len(carry) == 3 and sent > carry[0][0].numel() + carry[1][0].numel()
    assert len(carry) == 2, "after the last up block no skip is pending"
    assert spec.layer_meta(spec.num_layers - 1).output_numel_per_sample == 0
    assert all(spec.layer_meta(i).flops_per_sample > 0 for i in range(spec.num_layers))


def test_difffit_trains_biases_norms_class_embeddings_and_scales() -> None:
    spec = spec_of("dit", difffit=True)
    # 1 636 of 33 508 parameters (4.88%; the head's tied copy of block 0's embedding counted as layer_meta
    # counts it): every bias, the 11-row class tables of the 3 blocks (and the copy) and 2 x 16 scale
    # factors in the first block; the adaLN norms and the output norm have no weights
    assert [spec.layer_meta(i).trainable_params for i in range(spec.num_layers)] == [16, 480, 448, 448, 244]
    assert round(trainable_fraction(spec), 4) == 0.0488
    layer = spec.build_layer(1)
    scales = [m for m in layer.modules() if isinstance(m, ScaleFactor)]
    assert len(scales) == 2 and all(s.gamma.requires_grad for s in scales)
    assert not any(isinstance(m, ScaleFactor) for m in spec.build_layer(2).modules()), "only the first half"
    frozen = layer.get_parameter("transformer_blocks.0.attn1.to_q.weight")
    assert not frozen.requires_grad and layer.get_parameter("transformer_blocks.0.attn1.to_out.0.bias").requires_grad
    with pytest.raises(ModelConfigError, match=r"^model.difffit: .*unet2d"):
        spec_of("unet2d", difffit=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_with_from_pretrained_and_gives_the_same_loss(arch: str, digits, tmp_path: Path) -> None:
    """export_pretrained -> from_pretrained gives the layers' loss on a fixed batch; DiffFit's scale
    factors (moved off 1 here) are folded into the linears; a config_dir spec reads the export back."""
    spec = spec_of(arch, difffit=arch == "dit")
    layers = spec.build_all()
    with torch.no_grad():
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, ScaleFactor):
                    m.gamma.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    mb = microbatch(spec, digits, step=2)
    want = run_layers(layers, mb.fresh()).item()
    assert spec.export_pretrained([layer.state_dict() for layer in layers], str(tmp_path))
    cls = UNet2DModel if arch == "unet2d" else DiTTransformer2DModel
    model = cls.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert abs(library_loss(model, mb, 1).item() - want) <= 1e-12 * want
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["num_train_timesteps"] == 1000
    again = build_spec(None, {}, str(tmp_path), seed=0, dtype=torch.float64)
    assert abs(run_layers(again.build_all(), mb.fresh()).item() - want) <= 1e-12 * want


def test_scheduler_and_class_dropout_options(digits) -> None:
    config = {**DIT, "scheduler": {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2"}, "class_dropout": 0.5}
    spec = build_spec("dit", config, None, seed=0, dtype=torch.float64)
    assert spec.schedule.num_timesteps == 50
    assert torch.equal(spec.schedule.alphas_cumprod, DDPMScheduler(50, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double())
    mb = microbatch(spec, digits, n=8)
    assert int(mb.data["t"].max()) < 50 and 0 < int(mb.data["drop_label"].sum()) < 8
    _, _, y = spec.build_layer(0)(None, mb)
    assert torch.equal(y, torch.where(mb.data["drop_label"], 10, mb.data["label"]))


def _error(arch: str | None, config: dict, config_dir: str | None = None) -> str:
    with pytest.raises(ModelConfigError) as e:
        build_spec(arch, config, config_dir, seed=0, dtype=torch.float32)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_input_gives_one_line_naming_the_field(tmp_path: Path) -> None:
    assert _error("vae", {}).startswith("model.architecture: got 'vae'; allowed for diffusers: unet2d, dit")
    assert _error("dit", {**DIT, "depth": 3}).startswith("model.config.depth: not a DiTTransformer2DModel argument")
    assert _error("dit", {**DIT, "norm_type": "layer_norm"}).startswith("model.config: DiTTransformer2DModel rejects it")
    assert _error("unet2d", {**UNET, "down_block_types": ["SkipDownBlock2D", "DownBlock2D"]}).startswith(
        "model.config.down_block_types: SkipDownBlock2D is not supported"
    )
    assert _error("unet2d", {**UNET, "dropout": 0.1}).startswith("model.config.dropout: must be 0")
    assert _error("dit", {**DIT, "scheduler": {"prediction_type": "v_prediction"}}).startswith(
        "model.config.scheduler.prediction_type"
    )
    assert _error(None, {}, str(tmp_path / "nowhere")).startswith("model.config_dir: got ")
    DiTTransformer2DModel(**DIT).save_pretrained(tmp_path)
    assert _error("unet2d", {}, str(tmp_path)).startswith("model.architecture: got 'unet2d' but ")


def test_config_errors_reach_the_cli_as_one_line_exit_2(tmp_path: Path) -> None:
    """build_model turns the adapter's refusals into ConfigErrors; the CLI prints one line and exits 2."""
    import subprocess
    import sys

    import yaml

    from oobleck.config import config_from_dict
    from oobleck.errors import ConfigError
    from oobleck.model_building import build_model

    def model(**fields: Any) -> Any:
        return config_from_dict({"model": {"family": "diffusers", **fields}, "data": {"dataset": "digits"}}).model

    with pytest.raises(ConfigError, match=r"^model.overrides: family diffusers reads model.config"):
        build_model(model(architecture="dit", config=DIT, overrides={"n_layer": 2}), 0)
    with pytest.raises(ConfigError, match=r"^model.difffit: DiffFit applies to the diffusers dit"):
        build_model(model(architecture="unet2d", config=UNET, difffit=True), 0)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"family": "diffusers", "config_dir": str(tmp_path / "missing")}, "data": {"dataset": "digits"}}))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(job), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model.config_dir: got " in proc.stderr


def test_export_of_a_trained_checkpoint_gives_its_loss(digits, tmp_path: Path) -> None:
    """A DiffFit DiT trained 3 steps by train-local (its scale factors moved off 1): the checkpoint's layers,
    rebuilt from the checkpoint alone, and the exported library model give the same loss on a fixed batch."""
    from oobleck.generation import find_checkpoint, load_checkpoint_model
    from oobleck.config import config_from_dict
    from oobleck.train_local import train_local

    raw = {
        "model": {"family": "diffusers", "architecture": "dit", "dtype": "float64", "difffit": True, "config": DIT},
        "data": {"dataset": "digits"},
        "training": {"steps": 3, "global_batch": 4, "microbatch": 4, "lr": 1e-2, "seed": 0},
    }
    train_local(config_from_dict(raw), run_dir=tmp_path / "run")
    saved = load_checkpoint_model(find_checkpoint(tmp_path / "run", None))
    gamma = saved.layers[1].get_parameter("difffit_attn.gamma")
    assert not torch.equal(gamma, torch.ones_like(gamma)), "training must move the scale factors"
    mb = microbatch(saved.spec, digits, step=7)  # type: ignore[arg-type]
    want = run_layers(saved.layers, mb.fresh()).item()
    saved.spec.export_pretrained([layer.state_dict() for layer in saved.layers], str(tmp_path / "out"))
    model = DiTTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float64).eval()
    assert abs(library_loss(model, mb, 1).item() - want) <= 1e-12 * want
