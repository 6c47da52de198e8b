"""Host staging of layer tensors (:mod:`oobleck.engine.host_staging`): on CPU the old path exactly (no copy
when loading, a clone of every tensor for a background checkpoint). The CUDA branch (pinned buffers,
non-blocking copies) needs a GPU and is not run here."""

from __future__ import annotations

import torch

from oobleck.config import config_from_dict
from oobleck.engine.host_staging import map_tensors, snapshot, to_device
from oobleck.engine.stage import build_stage_layers
from oobleck.model_building import build_model

CPU = torch.device("cpu")


def trained_layer_state() -> dict:
    """A tiny GPT block's checkpoint dict after one AdamW step: parameters, moments, a step count."""
    config = config_from_dict({"model": {"family": "gpt", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2, "seq_len": 8}}})
    (held,) = build_stage_layers(build_model(config.model, 0), 1, 2, config.training, CPU)
    for p in held.module.parameters():
        p.grad = torch.ones_like(p)
    held.optimizer.step()
    return held.state()


def test_map_tensors_reaches_every_tensor_and_keeps_the_rest() -> None:
    value = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(()), 3)], "c": None, "d": "x"}
    doubled = map_tensors(value, lambda t: t + 1)
    assert torch.equal(doubled["a"], torch.full((2,), 2.0)) and torch.equal(doubled["b"][0], torch.ones(1))
    assert isinstance(doubled["b"][1], tuple) and doubled["b"][1][0].item() == 2.0 and doubled["b"][1][1] == 3
    assert (doubled["c"], doubled["d"]) == (None, "x")
    assert torch.equal(value["a"], torch.ones(2))  # the input is left as it was


def test_loading_on_cpu_moves_nothing() -> None:
    state = trained_layer_state()
    assert to_device(state, CPU) is state


def test_a_cpu_snapshot_is_a_clone_that_training_does_not_change() -> None:
    state = trained_layer_state()
    copy = snapshot(state, CPU)
    pairs = [(state["params"][key], copy["params"][key]) for key in state["params"]]
    for index, moments in state["optimizer"]["state"].items():
        pairs += [(moments[k], copy["optimizer"]["state"][index][k]) for k in moments]
    assert pairs and all(torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for a, b in pairs)
    assert (copy["step"], copy["param_names"], copy["loss_scale"]) == (state["step"], state["param_names"], state["loss_scale"])
    with torch.no_grad():
        for original, _ in pairs:
            original.add_(1.0)
    assert all(not torch.equal(a, b) for a, b in pairs)
