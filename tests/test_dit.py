"""DiT: the diffusion schedule, the layer list (split equivalence, determinism), training and sampling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from models.base import MicroBatch
from models.data import BatchSource
from models.diffusion import NoiseSchedule, draw_diffusion_randomness, sincos_pos_embed_2d, timestep_embedding
from models.dit import PRESETS, DiTConfig, DiTSpec
from models.errors import ModelConfigError
from models.sampling import sample_images, save_grid
from tests.model_checks import assert_split_equivalent, held_out_loss_before_after, whole_model_grads

# small enough for float64 autograd in milliseconds; plain adaLN so that every gradient is non-zero
SMALL = DiTConfig(image_size=8, channels=1, patch=2, d_model=16, n_layer=3, n_head=2, num_classes=10, adaln_zero=False)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `digits` comes from there too


def _microbatch(spec: DiTSpec, dataset, n: int = 6, step: int = 0) -> MicroBatch:
    return BatchSource(dataset, n, n, seed=3, randomness=spec.sample_randomness).microbatch(step, 0)


def test_schedule_matches_ddpm_linear_betas() -> None:
    s = NoiseSchedule()
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - s.betas[1].item()))
    x0, noise = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)
    x_t = s.q_sample(x0, torch.tensor([0, 999]), noise)
    a = s.alphas_cumprod[[0, 999]]
    expected = (a.sqrt() * 0.5 - (1 - a).sqrt()).float()
    assert torch.allclose(x_t[:, 0, 0, 0], expected)


def test_randomness_comes_only_from_the_generator() -> None:
    s, sample = NoiseSchedule(), {"image": torch.zeros(1, 8, 8)}
    a = draw_diffusion_randomness(sample, torch.Generator().manual_seed(7), s)
    torch.manual_seed(123)  # the global RNG must not matter
    b = draw_diffusion_randomness(sample, torch.Generator().manual_seed(7), s)
    c = draw_diffusion_randomness(sample, torch.Generator().manual_seed(7), s, label_dropout=0.5)
    assert set(a) == {"t", "noise"} and a["t"].dtype == torch.long and a["t"].dim() == 0
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["noise"], b["noise"])
    # drop_label is drawn last: t and noise do not move when label dropout is switched on
    assert torch.equal(a["t"], c["t"]) and torch.equal(a["noise"], c["noise"]) and c["drop_label"].dtype == torch.bool


def test_sinusoidal_tables() -> None:
    emb = timestep_embedding(torch.tensor([0, 10]), 6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64))
    assert emb[1, 0].item() == pytest.approx(math.cos(10.0)) and emb[1, 3].item() == pytest.approx(math.sin(10.0))
    table = sincos_pos_embed_2d(8, 2, 3)  # rows: patch (i, j) at index i * 3 + j; columns first
    assert table.shape == (6, 8)
    assert table[5, 0].item() == pytest.approx(math.sin(2.0)) and table[5, 4].item() == pytest.approx(math.sin(1.0))


@pytest.mark.parametrize("difffit", [False, True])
@pytest.mark.parametrize("variant", [{}, {"class_dropout": 0.5, "learn_pos": True}])
def test_split_equivalence_float64(digits, difffit: bool, variant: dict) -> None:
    spec = DiTSpec(dataclasses.replace(SMALL, **variant), seed=1, dtype=torch.float64, difffit=difffit)
    mb = _microbatch(spec, digits)
    if variant:
        assert "drop_label" in mb.data
    _, grads = whole_model_grads(spec, mb)
    # the check must be able to see a wrong carry: gradients reach the stem and the middle blocks
    assert any(i == 0 for i, _ in grads) and all(g.abs().max() > 0 for g in grads.values())
    for boundaries in ([1], [2, 4], [1, 2, 3, 4]):
        assert_split_equivalent(spec, mb, boundaries)


def test_build_layer_matches_build_all_and_depends_on_seed() -> None:
    spec = DiTSpec(PRESETS["tiny"], seed=5)
    whole = spec.build_all()
    for i in range(spec.num_layers):
        alone = spec.build_layer(i).state_dict()
        assert alone.keys() == whole[i].state_dict().keys()
        assert all(torch.equal(v, whole[i].state_dict()[k]) for k, v in alone.items())
    other = DiTSpec(PRESETS["tiny"], seed=6).build_layer(1).state_dict()
    assert not torch.equal(other["block.attn.qkv.weight"], whole[1].state_dict()["block.attn.qkv.weight"])
    # adaLN-Zero: modulation and output layers start at zero
    assert whole[1].block.adaLN_modulation[1].weight.abs().max() == 0
    assert whole[-1].final.linear.weight.abs().max() == 0


def test_layer_meta_counts_match_built_layers() -> None:
    spec = DiTSpec(PRESETS["tiny"])
    metas = [spec.layer_meta(i) for i in range(spec.num_layers)]
    built = [sum(p.numel() for p in layer.parameters()) for layer in spec.build_all()]
    assert [m.params for m in metas] == built
    assert 200_000 < sum(built) < 500_000
    assert metas[0].output_numel_per_sample == 16 * 64 + 64 and metas[-1].output_numel_per_sample == 0
    xl = DiTSpec(PRESETS["dit-xl/2"])  # meta-device counts: the published 675M without allocating it
    assert sum(xl.layer_meta(i).params for i in range(xl.num_layers)) == pytest.approx(675e6, rel=0.001)


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ModelConfigError, match="model.overrides.patch"):
        DiTSpec(dataclasses.replace(SMALL, patch=3))
    with pytest.raises(ModelConfigError, match="model.overrides.n_head"):
        DiTSpec(dataclasses.replace(SMALL, n_head=3))


def test_training_on_digits_reduces_loss(digits) -> None:
    torch.manual_seed(0)  # nothing below draws from it; set so a stray draw could not vary between runs
    spec = DiTSpec(PRESETS["tiny"], seed=0)
    layers = spec.build_all()
    source = BatchSource(digits, 32, 32, seed=0, randomness=spec.sample_randomness)
    opt = torch.optim.AdamW([p for layer in layers for p in layer.parameters()], lr=2e-3, weight_decay=0.0)
    # a fixed evaluation batch (its own timesteps and noise) makes the comparison independent of step noise
    held_out = BatchSource(digits, 128, 128, seed=99, randomness=spec.sample_randomness).microbatch(0, 0)
    before, after = held_out_loss_before_after(layers, source, held_out, 70, opt)
    print(f"tiny DiT on digits: held-out eps-MSE {before:.4f} -> {after:.4f} after 70 steps")
    assert before == pytest.approx(1.0, abs=0.1)  # zero-initialised output predicts eps_hat = 0
    assert after < 0.6 * before


def test_sampling_writes_a_grid(tmp_path) -> None:
    spec = DiTSpec(dataclasses.replace(PRESETS["tiny"], class_dropout=0.1), seed=0)
    layers = spec.build_all()
    labels = torch.arange(10)
    a = sample_images(layers, spec, labels, steps=8, generator=torch.Generator().manual_seed(1))
    b = sample_images(layers, spec, labels, steps=8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    c = sample_images(layers, spec, labels, steps=8, generator=gen, method="ddpm", cfg_scale=2.0)
    assert a.shape == (10, 1, 8, 8) and a.abs().max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    size = save_grid(a, tmp_path / "grid" / "samples.png", nrow=4, pad=2, scale=3)
    with Image.open(tmp_path / "grid" / "samples.png") as img:
        assert img.size == size == (4 * 24 + 5 * 2, 3 * 24 + 4 * 2)
        assert img.mode == "L"
