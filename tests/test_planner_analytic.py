"""Analytic profiles: parameter counts match the papers, formulas hold, bad inputs are refused."""

from __future__ import annotations

import pytest

from planner.analytic import DEVICES, SHAPES, analytic_profile, device_named, shape_named
from planner.errors import PlanningError

A100 = DEVICES["a100-80g"]


def _params(name: str, tied_head: bool) -> float:
    """Parameters of the model (the head's tied copy of the GPT embedding counted once)."""
    profile = analytic_profile(SHAPES[name], 1, A100)
    layers = profile.layers[:-1] if tied_head else profile.layers
    return sum(layer.param_bytes for layer in layers) / 2 + (2 * SHAPES[name].d_model if tied_head else 0)


@pytest.mark.parametrize(
    "name, tied, expected",
    [
        ("gpt3-175b", True, 175e9),
        ("gpt3-13b", True, 13e9),
        ("gpt3-1.3b", True, 1.3e9),
        ("gpt2", True, 124e6),
        ("gpt2-xl", True, 1.56e9),
        ("dit-xl/2", False, 675e6),
        ("dit-b/2", False, 130e6),
    ],
)
def test_parameter_counts_match_the_papers(name: str, tied: bool, expected: float) -> None:
    assert _params(name, tied) == pytest.approx(expected, rel=0.03)


def test_layer_formulas() -> None:
    shape = SHAPES["gpt3-175b"]
    s, h, a = shape.seq_len, shape.d_model, shape.n_head
    plain = analytic_profile(shape, 2, A100)
    block = plain.layers[1]
    assert len(plain.layers) == shape.n_layer + 2
    assert block.backward_s == pytest.approx(2 * block.forward_s)
    flops = 2 * (24 * s * h * h + 4 * s * s * h)
    assert block.forward_s == pytest.approx(flops / (A100.peak_flops * A100.efficiency))
    params = 12 * h * h + 13 * h
    assert (block.param_bytes, block.grad_bytes, block.optimizer_bytes) == (2 * params, 2 * params, 12 * params)
    assert block.activation_bytes == int(s * 2 * h * (34 + 5 * a * s / h))
    assert block.output_bytes == s * 2 * h * 2
    recompute = analytic_profile(shape, 2, A100, recompute=True).layers[1]
    assert recompute.activation_bytes == s * 2 * h * 2
    assert recompute.backward_s == pytest.approx(3 * recompute.forward_s)
    fp32 = analytic_profile(shape, 2, A100, dtype_bytes=4, optimizer="sgd").layers[1]
    assert (fp32.param_bytes, fp32.optimizer_bytes) == (4 * params, 4 * params)


def test_fingerprint_marks_analytic_and_changes_with_inputs() -> None:
    fp = analytic_profile(SHAPES["gpt2"], 4, A100).fingerprint
    assert fp["source"] == "analytic" and fp["microbatch"] == 4 and fp["device"] == "a100-80g"
    assert fp["model"]["name"] == "gpt2" and fp["model"]["recompute"] is False
    assert analytic_profile(SHAPES["gpt2"], 4, DEVICES["h100-80g"]).fingerprint != fp


def test_bad_inputs() -> None:
    with pytest.raises(PlanningError, match="microbatch: got 0"):
        analytic_profile(SHAPES["gpt2"], 0, A100)
    with pytest.raises(PlanningError, match="dtype_bytes: got 3"):
        analytic_profile(SHAPES["gpt2"], 1, A100, dtype_bytes=3)
    with pytest.raises(PlanningError, match="optimizer: got 'adam'"):
        analytic_profile(SHAPES["gpt2"], 1, A100, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(PlanningError, match="known analytic shapes: gpt3-125m"):
        shape_named("gpt-4")
    with pytest.raises(PlanningError, match="device spec: got 'tpu'"):
        device_named("tpu")
