"""The optimizer, learning-rate schedule and clipping every trainer shares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oobleck.config import TrainingConfig
from oobleck.errors import ConfigError
from oobleck.training import (
    clip_coefficient,
    grad_square_sum,
    lr_at,
    make_optimizer,
    scale_grads,
    set_lr,
    torch_dtype,
)


def test_warmup_rises_linearly_to_lr() -> None:
    cfg = TrainingConfig(lr=1e-2, warmup_steps=4, steps=10, lr_schedule="constant")
    assert [lr_at(s, cfg) for s in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


def test_cosine_decays_from_lr_to_min_lr() -> None:
    cfg = TrainingConfig(lr=1.0, min_lr=0.1, warmup_steps=2, steps=12, lr_schedule="cosine")
    assert lr_at(2, cfg) == pytest.approx(1.0)  # first step after warm-up: t = 0
    assert lr_at(7, cfg) == pytest.approx(0.55)  # halfway: t = 0.5
    assert lr_at(12, cfg) == pytest.approx(0.1)
    assert lr_at(50, cfg) == pytest.approx(0.1)  # past the end stays at min_lr
    values = [lr_at(s, cfg) for s in range(2, 13)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_linear_decay() -> None:
    cfg = TrainingConfig(lr=2.0, min_lr=0.0, warmup_steps=0, steps=4, lr_schedule="linear")
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError):
        lr_at(-1, TrainingConfig())


def test_clip_coefficient() -> None:
    assert clip_coefficient(5.0, None) == 1.0
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert math.isnan(clip_coefficient(float("nan"), 1.0))


def _two_layer_model(dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).to(dtype), nn.Linear(4, 2).to(dtype)]


def _backward(layers: list[nn.Module], x: torch.Tensor) -> None:
    for layer in layers:
        x = layer(x)
    (x**2).sum().backward()


def test_norm_and_scaling_match_torch_clip_grad_norm() -> None:
    ours, theirs = _two_layer_model(), _two_layer_model()
    x = torch.randn(5, 3, dtype=torch.float64)
    _backward(ours, x)
    _backward(theirs, x)
    params = [p for layer in ours for p in layer.parameters()]
    norm = math.sqrt(sum(grad_square_sum(layer.parameters()) for layer in ours))
    scale_grads(params, clip_coefficient(norm, 0.1))
    torch_norm = torch.nn.utils.clip_grad_norm_([p for layer in theirs for p in layer.parameters()], 0.1)
    assert norm == pytest.approx(float(torch_norm), rel=1e-12)
    for a, b in zip(params, (p for layer in theirs for p in layer.parameters())):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_shared_parameter_counts_once() -> None:
    shared = nn.Parameter(torch.ones(2, 2))
    shared.grad = torch.full((2, 2), 3.0)
    assert grad_square_sum([shared, shared]) == pytest.approx(36.0)
    scale_grads([shared, shared], 0.5)
    assert torch.equal(shared.grad, torch.full((2, 2), 1.5))


def test_param_groups_decay_matrices_only_and_skip_frozen() -> None:
    layer = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(5, 4))
    layer[2].weight.requires_grad_(False)
    opt = make_optimizer(list(layer.named_parameters()), TrainingConfig(weight_decay=0.1, lr=3e-3))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(4,), (4,), (4,)]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == pytest.approx(3e-3) and not decay["foreach"]


def test_layer_without_trainable_parameters_gets_a_working_optimizer() -> None:
    opt = make_optimizer([], TrainingConfig())
    opt.step()
    assert [len(g["params"]) for g in opt.param_groups] == [0, 0]


def test_one_optimizer_per_layer_equals_one_over_everything() -> None:
    cfg = TrainingConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, steps=5, lr_schedule="cosine")
    per_layer, whole = _two_layer_model(), _two_layer_model()
    per_layer_opts = [make_optimizer(list(layer.named_parameters()), cfg) for layer in per_layer]
    whole_opt = make_optimizer([(f"{i}.{n}", p) for i, layer in enumerate(whole) for n, p in layer.named_parameters()], cfg)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(6, 3, dtype=torch.float64, generator=gen)
        for layers, opts in ((per_layer, per_layer_opts), (whole, [whole_opt])):
            for opt in opts:
                opt.zero_grad()
                set_lr(opt, lr_at(step, cfg))
            _backward(layers, x)
            for opt in opts:
                opt.step()
    for a, b in zip(per_layer, whole):
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), name
    moved = _two_layer_model()
    assert not torch.equal(moved[1].weight, whole[1].weight)  # the steps did change something


def test_torch_dtype() -> None:
    assert torch_dtype("float64") is torch.float64
    with pytest.raises(ConfigError, match="model.dtype: got 'float8'"):
        torch_dtype("float8")
