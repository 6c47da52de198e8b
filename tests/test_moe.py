"""The RAPHAEL-style MoE diffusion transformer: split equivalence, routing, load balancing, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.base import MicroBatch, run_layers
from models.data import BatchSource
from models.errors import ModelConfigError
from models.images import ImageDataset
from models.moe import PRESETS, MoEBlockLayer, MoEConfig, MoESpec, load_balancing_loss, trace_routing
from models.sampling import sample_images
from tests.model_checks import assert_split_equivalent, held_out_loss_before_after

# small enough for float64 checks in milliseconds, with several experts of each kind
SMALL = MoEConfig(
    image_size=8, channels=1, patch=4, d_model=16, n_layer=3, n_head=2, num_classes=3,
    n_prompt=2, num_time_experts=3, num_space_experts=4, top_k=2, mlp_ratio=1.0, aux_coef=0.1,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; `digits` comes from there too


def random_images(n: int, config: MoEConfig, seed: int = 1) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand((n, config.channels, config.image_size, config.image_size), generator=gen) * 2 - 1
    return ImageDataset(images, torch.randint(0, config.num_classes, (n,), generator=gen))


def microbatch(spec: MoESpec, n: int = 6, step: int = 0) -> MicroBatch:
    """Microbatch 0 of ``step``, with the spec's diffusion randomness, cast to the spec's dtype."""
    source = BatchSource(random_images(32, spec.config), n, n, seed=3, randomness=spec.sample_randomness)
    mb = source.microbatch(step, 0)
    return MicroBatch({k: v.to(spec.dtype) if v.is_floating_point() else v for k, v in mb.data.items()})


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("boundaries", [[1], [2, 4], [1, 2, 3, 4]])
def test_split_equals_whole_in_float64(boundaries: list[int], top_k: int) -> None:
    # plain adaLN: every gradient is non-zero at initialisation, so the comparison is not vacuous
    spec = MoESpec(dataclasses.replace(SMALL, adaln_zero=False, top_k=top_k), seed=5, dtype=torch.float64)
    mb = microbatch(spec)
    assert len(set(spec.build_layer(1).block.time_moe.route(mb.data["t"]).tolist())) > 1  # several time experts used
    assert_split_equivalent(spec, mb, boundaries)


def test_blocks_add_scaled_aux_losses() -> None:
    spec = MoESpec(SMALL, seed=5, dtype=torch.float64)
    mb = microbatch(spec)
    routings = trace_routing(spec.build_all(), mb)
    assert len(mb.aux_losses) == SMALL.n_layer == len(routings)
    for aux, routing in zip(mb.aux_losses, routings):
        raw = load_balancing_loss(routing.space_probs, routing.space_expert)
        assert float(aux.detach()) == pytest.approx(SMALL.aux_coef * mb.size * float(raw), rel=1e-12)
        assert 0.0 < float(raw) <= SMALL.num_space_experts / SMALL.top_k  # E / k: all tokens on k experts


def test_routing_is_deterministic_and_stage_independent() -> None:
    spec = MoESpec(dataclasses.replace(SMALL, adaln_zero=False), seed=7, dtype=torch.float32)
    mb = microbatch(spec, n=8)
    first = trace_routing(spec.build_all(), mb.fresh())
    second = trace_routing(spec.build_all(), mb.fresh())
    for a, b in zip(first, second):
        assert torch.equal(a.time_expert, b.time_expert)
        assert torch.equal(a.space_expert, b.space_expert)
        assert torch.equal(a.space_probs, b.space_probs)
    # a stage that starts at block 1 (built alone, fed the carry) routes exactly as the whole model
    carry = run_layers([spec.build_layer(0), spec.build_layer(1)], mb.fresh())
    _, routing = spec.build_layer(2).forward_routed(carry, mb.fresh())
    assert torch.equal(routing.space_expert, first[1].space_expert)
    # time experts are equal buckets of the schedule
    want = mb.data["t"] * SMALL.num_time_experts // SMALL.num_timesteps
    assert torch.equal(first[0].time_expert, want)
    assert first[0].space_expert.shape == (8, spec.config.tokens, SMALL.top_k)


def test_load_balancing_loss_trains_the_gate_towards_balance() -> None:
    spec = MoESpec(SMALL, seed=11, dtype=torch.float32)
    mb = microbatch(spec, n=16)
    carry = tuple(t.detach() for t in spec.build_layer(0)(None, mb))
    layer = spec.build_layer(1)
    assert isinstance(layer, MoEBlockLayer)
    gate = layer.block.space_moe.gate
    # skew the router: expert 0's row points along the mean (normalised) token, so most tokens pick it
    tokens = torch.nn.functional.layer_norm(carry[0], (SMALL.d_model,), eps=1e-6)
    with torch.no_grad():
        gate.weight[0] += 2.0 * tokens.mean(dim=(0, 1)) / tokens.mean(dim=(0, 1)).norm()

    def step_loads() -> tuple[torch.Tensor, float]:
        mb_step = mb.fresh()
        _, routing = layer.forward_routed(carry, mb_step)
        return mb_step.aux_losses[0], float(routing.space_load().max())

    aux, max_load_before = step_loads()
    aux.backward()
    assert gate.weight.grad is not None and float(gate.weight.grad.abs().max()) > 0  # differentiable to the gate
    optimizer = torch.optim.Adam([gate.weight], lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        aux, _ = step_loads()
        aux.backward()
        optimizer.step()
    _, max_load_after = step_loads()
    print(f"max space-expert load: {max_load_before:.3f} -> {max_load_after:.3f}")
    assert max_load_before > 0.4  # two of four experts per token: 0.25 is perfectly balanced, 0.5 the worst
    assert max_load_after < max_load_before - 0.1, (max_load_before, max_load_after)


def test_training_on_digits_lowers_the_loss(digits) -> None:
    spec = MoESpec(PRESETS["tiny"], seed=0, dtype=torch.float32)
    layers = spec.build_all()
    optimizer = torch.optim.AdamW([p for layer in layers for p in layer.parameters()], lr=2e-3)
    source = BatchSource(digits, global_batch=32, microbatch=32, seed=0, randomness=spec.sample_randomness)
    held_out = source.microbatch(10_000, 0)  # a fixed batch (images, t, noise) never trained on
    before, after = held_out_loss_before_after(layers, source, held_out, 60, optimizer)
    print(f"digits eps-MSE on a held-out batch: {before:.4f} -> {after:.4f}")
    assert after < 0.6 * before, (before, after)


def test_sampling_uses_the_inference_path() -> None:
    spec = MoESpec(dataclasses.replace(SMALL, class_dropout=0.1), seed=2, dtype=torch.float32)
    layers = spec.build_all()
    labels = torch.tensor([0, 1, 2])
    images = sample_images(layers, spec, labels, steps=3, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert images.shape == (3, 1, 8, 8) and float(images.abs().max()) <= 1.0
    again = sample_images(layers, spec, labels, steps=3, generator=torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert torch.equal(images, again)


def test_layer_meta_matches_built_layers() -> None:
    spec = MoESpec(SMALL, seed=0)
    names = [spec.layer_meta(i).name for i in range(spec.num_layers)]
    assert names == ["stem", "block0", "block1", "block2", "head"]
    for i in range(spec.num_layers):
        layer = spec.build_layer(i)
        assert spec.layer_meta(i).params == sum(p.numel() for p in layer.parameters())
    mb = microbatch(spec, n=4)
    carry = None
    for i in range(spec.num_layers):
        # the math backend lowers attention to counted matmuls; the counter skips the fused CPU kernel
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            carry = spec.build_layer(i)(carry, mb.fresh())
        assert spec.layer_meta(i).flops_per_sample == counter.get_total_flops() / mb.size, i
        if i == 0:
            assert spec.layer_meta(0).output_numel_per_sample == sum(t[0].numel() for t in carry)


def test_layers_are_a_function_of_seed_and_index() -> None:
    a, b = MoESpec(SMALL, seed=4), MoESpec(SMALL, seed=4)
    for x, y in zip(a.build_layer(2).state_dict().values(), b.build_layer(2).state_dict().values()):
        assert torch.equal(x, y)
    other = MoESpec(SMALL, seed=5).build_layer(2).state_dict()
    assert not torch.equal(a.build_layer(2).state_dict()["block.space_moe.gate.weight"], other["block.space_moe.gate.weight"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != MoESpec(dataclasses.replace(SMALL, top_k=1), seed=4).fingerprint()


@pytest.mark.parametrize(
    "change,field",
    [({"top_k": 3}, "top_k"), ({"top_k": 2, "num_space_experts": 1}, "top_k"), ({"patch": 3}, "patch"), ({"n_head": 3}, "n_head"), ({"aux_coef": -1.0}, "aux_coef")],
)
def test_bad_config_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(ModelConfigError, match=rf"model\.overrides\.{field}: got"):
        MoESpec(dataclasses.replace(SMALL, **change))


def test_registry_builds_moe_for_digits() -> None:
    from oobleck.config import DataConfig, ModelConfig
    from oobleck.model_building import build_dataset, build_model

    spec = build_model(ModelConfig(family="moe", preset="tiny", overrides={"n_layer": 2}), seed=0)
    assert isinstance(spec, MoESpec) and spec.num_layers == 4
    data = build_dataset(DataConfig(dataset="digits", classes=[0, 1]), spec)
    assert set(data.labels.tolist()) == {0, 1}
