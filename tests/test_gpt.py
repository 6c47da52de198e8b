"""GPT: split equivalence, per-layer determinism, parameter and FLOP arithmetic, generation, training."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.base import MicroBatch, run_layers
from models.data import BatchSource
from models.errors import ModelConfigError
from models.gpt import PRESETS, GPTConfig, GPTHead, GPTSpec, generate
from models.text import TokenWindows, encode, pydoc_corpus
from tests.model_checks import assert_split_equivalent

TINY = PRESETS["tiny"]


def random_batch(c: GPTConfig, batch: int, seed: int) -> MicroBatch:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, c.vocab_size, (batch, c.seq_len + 1), generator=gen)
    return MicroBatch({"tokens": tokens[:, :-1], "targets": tokens[:, 1:]})


def boundary_sets(num_layers: int, count: int, seed: int) -> list[list[int]]:
    """One stage, one layer per stage, and ``count`` random cuts in between."""
    rng = random.Random(seed)
    inner = range(1, num_layers)
    sets = [[], list(inner)]
    for _ in range(count):
        sets.append(sorted(rng.sample(inner, rng.randint(1, num_layers - 2))))
    return sets


def test_split_execution_equals_whole_model_float64() -> None:
    spec = GPTSpec(TINY, seed=3, dtype=torch.float64)
    mb = random_batch(TINY, batch=2, seed=0)
    for boundaries in boundary_sets(spec.num_layers, count=4, seed=1):
        assert_split_equivalent(spec, mb, boundaries, rtol=1e-12)


def test_split_equivalence_without_bias_and_short_sequences() -> None:
    config = GPTConfig(n_layer=3, n_head=2, d_model=16, seq_len=8, bias=False)
    spec = GPTSpec(config, seed=5, dtype=torch.float64)
    mb = MicroBatch({k: v[:, :5] for k, v in random_batch(config, batch=3, seed=2).data.items()})
    for boundaries in boundary_sets(spec.num_layers, count=3, seed=4):
        assert_split_equivalent(spec, mb, boundaries, rtol=1e-12)


def test_layer_built_alone_equals_layer_of_build_all() -> None:
    spec = GPTSpec(TINY, seed=7)
    whole = spec.build_all()
    for i in range(spec.num_layers):
        alone = spec.build_layer(i).state_dict()
        together = whole[i].state_dict()
        assert alone.keys() == together.keys()
        for name in alone:
            assert torch.equal(alone[name], together[name]), (i, name)
    head = spec.build_layer(spec.num_layers - 1)
    assert torch.equal(head.lm_head.weight, spec.build_layer(0).wte.weight)
    assert whole[-1].lm_head.weight is whole[0].wte.weight  # build_all shares the tied parameter
    assert spec.tied == [((0, "wte.weight"), (spec.num_layers - 1, "lm_head.weight"))]


def test_init_depends_on_seed_and_layer() -> None:
    a, b = GPTSpec(TINY, seed=0), GPTSpec(TINY, seed=1)
    assert not torch.equal(a.build_layer(0).wte.weight, b.build_layer(0).wte.weight)
    w1, w2 = (a.build_layer(i).attn.c_attn.weight for i in (1, 2))
    assert not torch.equal(w1, w2)
    assert w1.std().item() == pytest.approx(0.02, rel=0.05)
    residual = a.build_layer(1).mlp.c_proj.weight.std().item()
    assert residual == pytest.approx(0.02 / math.sqrt(2 * TINY.n_layer), rel=0.05)


def test_layer_meta_params_match_built_layers() -> None:
    for config in (TINY, GPTConfig(n_layer=2, n_head=2, d_model=24, seq_len=10, vocab_size=50, bias=False)):
        spec = GPTSpec(config)
        for i in range(spec.num_layers):
            meta = spec.layer_meta(i)
            built = sum(p.numel() for p in spec.build_layer(i).parameters())
            assert meta.params == meta.trainable_params == built, (i, meta)
        whole = {id(p): p.numel() for layer in spec.build_all() for p in layer.parameters()}
        assert config.num_params() == sum(whole.values())


def test_described_parameter_counts() -> None:
    assert 0.5e6 < TINY.num_params() < 1.5e6
    assert PRESETS["gpt2"].num_params() == 124_439_808  # GPT-2 small as published (tied, with positions)
    assert 170e9 < PRESETS["gpt3-175b"].num_params() < 180e9
    for name, config in PRESETS.items():
        spec = GPTSpec(config)  # describing a spec builds nothing, so even 175B is instant
        total = sum(spec.layer_meta(i).params for i in range(spec.num_layers))
        assert total - config.vocab_size * config.d_model == config.num_params(), name


def test_layer_meta_flops_match_counted_flops() -> None:
    """The FLOP formula against torch's counter; CPU attention kernels are not counted, so the attention
    term is added from the matmuls an explicit attention does."""
    spec = GPTSpec(TINY)
    layers = spec.build_all()
    mb = random_batch(TINY, batch=1, seed=0)
    with FlopCounterMode(display=False) as counter:
        run_layers(layers, mb)
    c = TINY
    attention = c.n_layer * 2 * (2 * c.seq_len * c.seq_len * c.d_model)
    counted = counter.get_total_flops() + attention
    described = sum(spec.layer_meta(i).flops_per_sample for i in range(spec.num_layers))
    assert described == pytest.approx(counted, rel=0.02)
    assert spec.layer_meta(1).output_numel_per_sample == c.seq_len * c.d_model
    assert spec.layer_meta(spec.num_layers - 1).output_numel_per_sample == 0


def test_loss_units_and_initial_loss() -> None:
    spec = GPTSpec(TINY)
    mb = random_batch(TINY, batch=3, seed=1)
    assert spec.loss_units(mb) == 3 * TINY.seq_len
    with torch.no_grad():
        loss = run_layers(spec.build_all(), mb)
    assert loss.dim() == 0
    assert float(loss) / spec.loss_units(mb) == pytest.approx(math.log(256), rel=0.02)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dropout", 0.1), ("d_model", 130), ("n_layer", 0), ("seq_len", -4)],
)
def test_bad_config_is_a_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ModelConfigError, match=f"model.overrides.{field}: got {value}"):
        GPTSpec(dataclasses.replace(TINY, **{field: value}))


def test_building_from_a_config_turns_the_models_error_into_a_config_error() -> None:
    from oobleck.config import ModelConfig
    from oobleck.errors import ConfigError
    from oobleck.model_building import build_model

    with pytest.raises(ModelConfigError) as direct:
        GPTSpec(dataclasses.replace(TINY, d_model=130))
    with pytest.raises(ConfigError) as built:
        build_model(ModelConfig(family="gpt", preset="tiny", overrides={"d_model": 130}), seed=0)
    assert str(built.value) == str(direct.value) and isinstance(built.value.__cause__, ModelConfigError)


def test_fingerprint_is_json_and_tracks_what_changes_numbers() -> None:
    base = GPTSpec(TINY, seed=0).fingerprint()
    assert json.loads(json.dumps(base)) == base
    assert base["family"] == "gpt" and base["dtype"] == "float32" and base["d_model"] == 128
    assert GPTSpec(TINY, seed=1).fingerprint() != base
    assert GPTSpec(TINY, dtype=torch.float64).fingerprint() != base
    assert GPTSpec(dataclasses.replace(TINY, n_head=2)).fingerprint() != base


def test_generate_greedy_matches_argmax_and_sampling_is_reproducible() -> None:
    spec = GPTSpec(TINY, seed=2)
    layers = spec.build_all()
    prompt = encode("def f(x):" * 10)  # longer than the context: generate must crop it
    greedy = generate(layers, prompt, 5, temperature=0)
    assert greedy.shape == (prompt.numel() + 5,) and torch.equal(greedy[: prompt.numel()], prompt)
    head = layers[-1]
    assert isinstance(head, GPTHead)
    with torch.no_grad():
        window = prompt[-TINY.seq_len :].unsqueeze(0)
        first = head.logits(run_layers(layers[:-1], MicroBatch({"tokens": window})))[0, -1].argmax()
    assert greedy[prompt.numel()] == first
    sampled = [generate(layers, prompt, 8, 1.0, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    assert int(sampled[0].min()) >= 0 and int(sampled[0].max()) < 256
    with pytest.raises(TypeError):
        generate(layers[:-1], prompt, 1)


def test_tiny_learns_pydoc_text() -> None:
    spec = GPTSpec(TINY, seed=0)
    layers = spec.build_all()
    params = list({id(p): p for layer in layers for p in layer.parameters()}.values())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    batches = BatchSource(TokenWindows(pydoc_corpus(), TINY.seq_len), global_batch=16, microbatch=8, seed=0)
    losses = []
    for step in range(40):
        optimizer.zero_grad()
        total, units = 0.0, 0
        for k in range(batches.num_microbatches):
            mb = batches.microbatch(step, k)
            loss = run_layers(layers, mb)
            loss.backward()
            total, units = total + loss.item(), units + spec.loss_units(mb)
        for p in params:  # summed losses: divide the gradients by the global token count once
            p.grad /= units
        optimizer.step()
        losses.append(total / units)
    print("tiny pydoc losses:", " ".join(f"{x:.3f}" for x in losses))
    assert losses[0] == pytest.approx(math.log(256), rel=0.03)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
