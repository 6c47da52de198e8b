"""DiffFit: which parameters train, how many, and loading a pretrained DiT for fine-tuning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.base import run_layers
from models.data import BatchSource
from models.difffit import difffit_trainable_names, load_pretrained, regrid_positions, trainable_fraction
from models.diffusion import sincos_pos_embed_2d
from models.dit import PRESETS, DiTConfig, DiTSpec
from models.errors import ModelConfigError

TINY = PRESETS["tiny"]  # 4 blocks: DiffFit scales blocks 0 and 1

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _state(layers) -> dict[int, dict[str, torch.Tensor]]:
    return {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in enumerate(layers)}


def test_exact_trainable_names_of_tiny_model() -> None:
    spec = DiTSpec(TINY, difffit=True)
    layers = spec.build_all()
    block_biases = ["attn.qkv.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias", "adaLN_modulation.1.bias"]
    scaled = ["block.attn.qkv.bias", "block.attn.proj.bias", "block.mlp.fc1.bias", "block.mlp.fc2.bias",
              "block.adaLN_modulation.1.bias", "block.scale_attn.gamma", "block.scale_mlp.gamma"]
    expected = [
        ["x_embedder.proj.bias", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight"],
        scaled,
        scaled,
        [f"block.{n}" for n in block_biases],
        [f"block.{n}" for n in block_biases],
        ["final.linear.bias", "final.adaLN_modulation.1.bias"],
    ]
    assert [difffit_trainable_names(layer) for layer in layers] == expected
    for layer, names in zip(layers, expected):
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == names
    assert DiTSpec(TINY).build_layer(1).block.scale_attn is None  # no scale factors without DiffFit


def test_trainable_fraction_of_dit_xl() -> None:
    xl = PRESETS["dit-xl/2"]
    full = trainable_fraction(DiTSpec(xl, difffit=True))
    small_table = trainable_fraction(DiTSpec(dataclasses.replace(xl, num_classes=200), difffit=True))
    print(f"DiffFit trainable fraction of DiT-XL/2: {full:.4%} (1000 classes), {small_table:.4%} (200 classes)")
    assert 0.0023 < full < 0.0027
    assert 0.0010 < small_table < 0.0013
    assert trainable_fraction(DiTSpec(xl)) == 1.0


def test_scale_factors_start_as_identity_and_only_trainables_get_gradients(digits) -> None:
    plain, tuned = DiTSpec(TINY, seed=2), DiTSpec(TINY, seed=2, difffit=True)
    mb = BatchSource(digits, 8, 8, seed=0, randomness=plain.sample_randomness).microbatch(0, 0)
    plain_layers = plain.build_all()
    # make the blocks non-trivial (adaLN-Zero starts them as identities) in both models alike
    state = _state(plain_layers)
    gen = torch.Generator().manual_seed(0)
    for i in range(1, plain.num_layers):
        for name, value in state[i].items():
            state[i][name] = value + 0.05 * torch.randn(value.shape, generator=gen)
    tuned_layers = tuned.build_all()
    load_pretrained(plain_layers, state)
    report = load_pretrained(tuned_layers, state)
    assert {name for _, name in report.kept_init} == {"block.scale_attn.gamma", "block.scale_mlp.gamma"}
    loss = run_layers(tuned_layers, mb.fresh())
    assert torch.allclose(loss, run_layers(plain_layers, mb.fresh()), rtol=1e-6)
    loss.backward()
    for layer in tuned_layers:
        trainable = set(difffit_trainable_names(layer))
        for name, p in layer.named_parameters():
            assert (p.grad is not None) == (name in trainable), name
    assert tuned_layers[1].block.scale_attn.gamma.grad.abs().max() > 0


def test_load_pretrained_into_higher_resolution_with_new_classes() -> None:
    low = dataclasses.replace(TINY, image_size=14, num_classes=10)
    high = dataclasses.replace(low, image_size=28, num_classes=4)
    source = _state(DiTSpec(low, seed=1).build_all())
    target_spec = DiTSpec(high, seed=7, difffit=True)
    layers = target_spec.build_all()
    fresh_table = layers[0].y_embedder.embedding_table.weight.detach().clone()
    report = load_pretrained(layers, source, new_num_classes=4)
    assert report.reinitialised == [(0, "y_embedder.embedding_table.weight")]
    assert torch.equal(layers[0].y_embedder.embedding_table.weight, fresh_table)
    assert torch.equal(layers[2].block.attn.qkv.weight, source[2]["block.attn.qkv.weight"])
    assert torch.equal(layers[0].x_embedder.proj.weight, source[0]["x_embedder.proj.weight"])
    # the fixed sin-cos table is the 14x14 grid's, not the 7x7 one of the checkpoint
    assert torch.equal(layers[0].pos_embed, sincos_pos_embed_2d(64, 14, 14).float())
    with pytest.raises(ModelConfigError, match="new_num_classes"):
        load_pretrained(DiTSpec(high).build_all(), source)
    with pytest.raises(ModelConfigError, match="model.overrides.num_classes"):
        load_pretrained(DiTSpec(high).build_all(), source, new_num_classes=5)
    wide = DiTSpec(dataclasses.replace(low, d_model=32, n_head=2)).build_all()
    with pytest.raises(ModelConfigError, match="shape"):
        load_pretrained(wide, source)


def test_learned_positions_are_regridded_bicubically() -> None:
    low = DiTConfig(image_size=8, channels=1, patch=2, d_model=16, n_layer=2, n_head=2, num_classes=10, learn_pos=True)
    source = _state(DiTSpec(low, seed=1).build_all())
    layers = DiTSpec(dataclasses.replace(low, image_size=16), seed=1).build_all()
    report = load_pretrained(layers, source)
    assert report.regridded == [(0, "pos_embed")]
    old = source[0]["pos_embed"]
    assert layers[0].pos_embed.shape == (64, 16)
    assert torch.allclose(layers[0].pos_embed, regrid_positions(old, 64))
    assert torch.allclose(regrid_positions(old, 16), old, atol=1e-6)  # same grid: unchanged
    constant = torch.full((16, 3), 0.25)
    assert torch.allclose(regrid_positions(constant, 64), torch.full((64, 3), 0.25), atol=1e-6)
