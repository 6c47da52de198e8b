"""The hf family: transformers' GPT-2 and Llama as layer lists.

In float64: running the layers split at every possible set of stage boundaries equals the unsplit library
model (``GPT2LMHeadModel``, ``LlamaForCausalLM``: summed loss and every gradient within 1e-12 relative); a
layer built alone equals ``build_all()``'s; weights saved by ``save_pretrained`` land exactly in each layer;
``export_pretrained`` of a checkpoint's layer states loads with ``from_pretrained`` and gives the checkpoint's
loss; ``oobleck generate`` continues text greedily as a hand-written argmax loop over the same layers does; bad
input is one line. One real job (slow): ``oobleck profile``, ``oobleck plan``, then ``oobleck run`` on 4 nodes
with a node killed reproduces ``train-local``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks.jobs import QUICK_PROFILE
from models.base import MicroBatch, run_layers
from models.hf import HFSpec, build_hf_spec
from models.text import encode
from oobleck.config import config_from_dict
from oobleck.errors import ConfigError, OobleckError
from oobleck.generation import find_checkpoint, generate_text, load_checkpoint_model
from oobleck.model_building import build_model, check_data
from oobleck.train_local import train_local
from tests.model_checks import assert_split_equivalent, whole_model_grads
from tests.run_helpers import ROOT, ReferenceRun, assert_matches_reference, recoveries, run_job

pytestmark = pytest.mark.usefixtures("one_thread")
os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub, here or in the jobs this module starts

VOCAB, SEQ = 64, 16
TINY: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": VOCAB, "n_positions": SEQ, "n_embd": 16, "n_layer": 3, "n_head": 2},
    "llama": {
        "vocab_size": VOCAB, "max_position_embeddings": SEQ, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    },  # fmt: skip
}
#: (architecture, extra config): GPT-2 (tied), Llama untied with grouped-query attention, Llama tied
CASES = [("gpt2", {}), ("llama", {}), ("llama", {"tie_word_embeddings": True})]


def spec_of(arch: str, extra: dict[str, Any] | None = None, seed: int = 1, **kw: Any) -> HFSpec:
    return build_hf_spec(arch, {**TINY[arch], **(extra or {})}, None, {}, seed=seed, dtype=torch.float64, **kw)


def batch(seed: int = 0, size: int = 2, length: int = SEQ) -> MicroBatch:
    window = torch.randint(0, VOCAB, (size, length + 1), generator=torch.Generator().manual_seed(seed))
    return MicroBatch({"tokens": window[:, :-1], "targets": window[:, 1:]})


def library_model(spec: HFSpec, states: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """The library's whole model (eager attention, float64) holding the given layer states."""
    model = spec.arch.model_class(spec.hf_config).to(torch.float64)
    full = {}
    for index, state in enumerate(states):
        names = spec.library_names(index)
        full.update({names[k]: v for k, v in state.items()})
    model.load_state_dict(full, strict=True)
    return model


def summed_loss(logits: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb.data["targets"].reshape(-1), reduction="sum")


@pytest.mark.parametrize("arch,extra", CASES)
def test_split_at_every_boundary_set_equals_the_library_model(arch: str, extra: dict[str, Any]) -> None:
    spec = spec_of(arch, extra)
    mb = batch()
    inner = range(1, spec.num_layers)
    for count in range(len(inner) + 1):
        for cuts in itertools.combinations(inner, count):
            assert_split_equivalent(spec, mb, list(cuts), rtol=1e-12)

    loss, grads = whole_model_grads(spec, mb)
    model = library_model(spec, [layer.state_dict() for layer in spec.build_all()])
    assert model.config._attn_implementation == "eager"
    out = model(input_ids=mb.data["tokens"])
    reference = summed_loss(out.logits, mb)
    reference.backward()
    assert abs(loss - reference.item()) <= 1e-12 * abs(loss), (loss, reference.item())
    library = dict(model.named_parameters(remove_duplicate=False))
    for (index, local), grad in grads.items():
        want = library[spec.library_names(index)[local]].grad
        assert (grad - want).abs().max().item() <= 1e-12 * want.abs().max().item(), (index, local)
    assert {spec.library_names(i)[k] for i, k in grads} == set(library)  # every parameter compared
    # the library's own loss is the mean over tokens, computed in float32 (it upcasts logits with .float())
    with torch.no_grad():
        mean = model(input_ids=mb.data["tokens"], labels=mb.data["targets"], shift_labels=mb.data["targets"].contiguous()).loss
    assert mean.item() * spec.loss_units(mb) == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("arch,extra", CASES)
def test_layer_built_alone_equals_build_all_and_ties_share(arch: str, extra: dict[str, Any]) -> None:
    spec = spec_of(arch, extra, seed=4)
    whole = spec.build_all()
    for index in range(spec.num_layers):
        alone = spec.build_layer(index).state_dict()
        together = whole[index].state_dict()
        assert alone.keys() == together.keys()
        assert all(torch.equal(alone[k], together[k]) for k in alone), index
        assert all(t.dtype == torch.float64 for t in alone.values())
    token = f"{spec.arch.embeddings[0]}.weight"
    tied = spec.hf_config.tie_word_embeddings
    assert spec.tied == ([((0, token), (spec.num_layers - 1, "lm_head.weight"))] if tied else [])
    assert (whole[-1].lm_head.weight is whole[0].get_parameter(token)) == tied
    assert torch.equal(spec.build_layer(spec.num_layers - 1).lm_head.weight, whole[0].get_parameter(token)) == tied
    # the weights depend on the seed and on the layer
    def largest(layer: torch.nn.Module) -> torch.Tensor:
        return max(layer.parameters(), key=lambda p: p.numel())

    assert not torch.equal(largest(spec_of(arch, extra, seed=5).build_layer(1)), largest(whole[1]))
    assert not torch.equal(largest(whole[2]), largest(whole[1]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layer_meta_and_fingerprint(arch: str) -> None:
    spec = spec_of(arch)
    layers = spec.build_all()
    for index, layer in enumerate(layers):
        meta = spec.layer_meta(index)
        assert meta.params == sum(p.numel() for p in spec.build_layer(index).parameters())
        hidden = spec.hf_config.hidden_size
        assert meta.output_numel_per_sample == (0 if index == spec.num_layers - 1 else SEQ * hidden)
        assert meta.flops_per_sample > 0
    base = spec.fingerprint()
    assert json.loads(json.dumps(base)) == base and base["family"] == "hf" and base["architecture"] == arch
    assert spec_of(arch, seed=2).fingerprint() != base
    assert spec_of(arch, {"vocab_size": VOCAB + 1}).fingerprint() != base
    assert spec.config.seq_len == SEQ and spec.config.vocab_size == VOCAB


@pytest.mark.parametrize("arch,extra", CASES)
def test_pretrained_weights_land_exactly_in_each_layer(tmp_path: Path, arch: str, extra: dict[str, Any]) -> None:
    probe = spec_of(arch, extra)
    torch.manual_seed(11)  # the library initialises from the global generator
    model = probe.arch.model_class(probe.hf_config).to(torch.float64)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    library = {k: v for k, v in model.state_dict().items()}
    for folder in ("one", "sharded"):
        spec = build_hf_spec(None, {}, str(tmp_path / folder), {}, seed=0, dtype=torch.float64)
        assert spec.arch.name == arch and spec.fingerprint()["pretrained"]
        for index in range(spec.num_layers):
            names = spec.library_names(index)
            for local, tensor in spec.build_layer(index).state_dict().items():
                assert torch.equal(tensor, library[names[local]]), (folder, index, local)
        mb = batch(3)
        with torch.no_grad():
            want = summed_loss(model(input_ids=mb.data["tokens"]).logits, mb).item()
            assert run_layers(spec.build_all(), mb).item() == pytest.approx(want, rel=1e-12)
    if arch == "gpt2":  # the original GPT-2 files: the base model alone, no prefix, no lm_head (tied)
        model.transformer.save_pretrained(tmp_path / "base")
        spec = build_hf_spec("gpt2", {}, str(tmp_path / "base"), {}, seed=0, dtype=torch.float64)
        head = spec.build_layer(spec.num_layers - 1)
        assert torch.equal(head.lm_head.weight, library["transformer.wte.weight"])


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A run directory of 3 train-local steps of a tiny float64 Llama on pydoc bytes, and its config."""
    raw = {
        "model": {"family": "hf", "architecture": "llama", "dtype": "float64", "config": {**TINY["llama"], "vocab_size": 256}},
        "data": {"dataset": "pydoc"},
        "training": {"steps": 3, "global_batch": 4, "microbatch": 2, "lr": 3e-3, "seed": 2},
    }
    run_dir = tmp_path_factory.mktemp("llama-run")
    train_local(config_from_dict(raw), run_dir=run_dir)
    return run_dir, raw


def test_export_round_trip_from_a_checkpoint(trained_llama: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_llama
    loaded = load_checkpoint_model(find_checkpoint(run_dir, None))
    states = [layer.state_dict() for layer in loaded.layers]
    assert loaded.spec.export_pretrained(states, str(tmp_path / "out")) is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float64
    window = encode("def generate(layers, prompt):\n    return")[: SEQ + 1].unsqueeze(0)
    mb = MicroBatch({"tokens": window[:, :-1], "targets": window[:, 1:]})
    with torch.no_grad():
        own = run_layers(loaded.layers, mb).item()
        exported = summed_loss(model(input_ids=mb.data["tokens"]).logits, mb).item()
    assert exported == pytest.approx(own, rel=1e-12)
    untrained = build_model(loaded.config.model, seed=loaded.config.training.seed)
    with torch.no_grad():
        assert run_layers(untrained.build_all(), mb).item() != pytest.approx(own, rel=1e-6)  # training moved it


def _oobleck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oobleck.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def greedy_reference(run_dir: Path, prompt: str, n: int) -> str:
    """The greedy byte continuation written out: load the latest checkpoint's layers, then ``n`` times run the
    last ``seq_len`` tokens through them and append the argmax of the last position's logits."""
    loaded = load_checkpoint_model(find_checkpoint(run_dir, None))
    window, tokens = loaded.spec.config.seq_len, encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            hidden = run_layers(loaded.layers[:-1], MicroBatch({"tokens": tokens[-window:].unsqueeze(0)}))
            tokens = torch.cat([tokens, loaded.layers[-1].logits(hidden)[0, -1, :256].argmax().view(1)])
    return bytes(tokens[len(prompt) :].tolist()).decode("utf-8", errors="replace")


def test_generate_from_a_gpt_checkpoint(tmp_path: Path) -> None:
    raw = {
        "model": {"family": "gpt", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2, "seq_len": 8}},
        "training": {"steps": 2, "global_batch": 2, "microbatch": 2, "lr": 1e-2},
    }
    train_local(config_from_dict(raw), run_dir=tmp_path)
    prompt = "import os"
    assert generate_text(tmp_path, prompt, 5) == greedy_reference(tmp_path, prompt, 5)


def test_generate_is_the_greedy_continuation_of_the_checkpoint(trained_llama: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = trained_llama
    prompt = "x = [i for i in range(10)] if y else None"  # longer than the window: the context is cut to it
    want = greedy_reference(run_dir, prompt, 6)
    assert generate_text(run_dir, prompt, 6) == want
    assert generate_text(run_dir, prompt, 6, step=3) == want
    sampled = [generate_text(run_dir, prompt, 6, temperature=1.0, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1]

    done = _oobleck("generate", str(run_dir), "--prompt", prompt, "--tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout == prompt + want + "\n"
    bad = _oobleck("generate", str(run_dir / "nope"), "--prompt", "x")
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "RUN: got" in bad.stderr, bad.stderr
    with pytest.raises(OobleckError, match="^--step: got 7; .* has no checkpoint of that step"):
        generate_text(run_dir, prompt, 1, step=7)
    with pytest.raises(OobleckError, match="^--prompt: got ''"):
        generate_text(run_dir, "", 1)


def _config_error(model: dict[str, Any], dataset: str = "pydoc") -> str:
    with pytest.raises(ConfigError) as info:
        check_data(config_from_dict({"model": {"family": "hf", **model}, "data": {"dataset": dataset}}))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_naming_the_field(tmp_path: Path) -> None:
    gpt2 = {**TINY["gpt2"], "vocab_size": 256}
    assert _config_error({"architecture": "bert", "config": gpt2}).startswith("model.architecture: got 'bert'; allowed")
    assert _config_error({"config_dir": str(tmp_path / "missing")}).startswith("model.config_dir: got")
    assert "holds no config.json" in _config_error({"config_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text("{not json")
    assert "is not readable JSON" in _config_error({"config_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({**gpt2, "model_type": "gpt2"}))
    message = _config_error({"architecture": "llama", "config_dir": str(tmp_path)})
    assert message.startswith("model.architecture: got 'llama' but") and "model_type 'gpt2'" in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type 'bert'; family hf supports gpt2, llama" in _config_error({"config_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({**gpt2, "model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "holds pytorch_model.bin but no model.safetensors" in _config_error({"config_dir": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({**gpt2, "model_type": "gpt2", "resid_pdrop": 0.1}))
    assert "config.json: resid_pdrop: got 0.1; family hf supports only 0" in _config_error({"config_dir": str(tmp_path)})
    for config, start in (
        ({**gpt2, "n_layers": 2}, "model.config.n_layers: not a field of GPT2Config"),
        ({**gpt2, "n_embd": "wide"}, "model.config: GPT2Config refuses it"),
        ({**gpt2, "n_embd": 15}, "model.config.n_embd: got 15; must be a multiple of n_head"),
        ({**gpt2, "n_layer": 0}, "model.config.n_layer: got 0; must be a positive integer"),
        ({**gpt2, "attn_pdrop": 0.1}, "model.config.attn_pdrop: got 0.1"),
        ({**TINY["llama"], "vocab_size": 256, "num_key_value_heads": 3}, "model.config.num_attention_heads: got 4"),
    ):
        arch = "llama" if "hidden_size" in config else "gpt2"
        assert _config_error({"architecture": arch, "config": config}).startswith(start)
    assert _config_error({"architecture": "gpt2", "config": gpt2, "overrides": {"seq_len": SEQ + 1}}).startswith(
        f"model.overrides.seq_len: got {SEQ + 1}; must be an integer in [1, {SEQ}]"
    )
    assert "vocab_size is 64; set vocab_size" in _config_error({"architecture": "gpt2", "config": TINY["gpt2"]})
    assert "image datasets need an image model" in _config_error({"architecture": "gpt2", "config": gpt2}, "digits")
    short = build_model(config_from_dict({"model": {"family": "hf", "architecture": "gpt2", "config": gpt2, "overrides": {"seq_len": 8}}}).model, 0)
    assert short.config.seq_len == 8 and short.layer_meta(1).output_numel_per_sample == 8 * 16


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_profile_plan_and_run_with_a_node_killed_matches_train_local(
    architecture: str, tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    model_config = {**TINY[architecture], "vocab_size": 256, "tie_word_embeddings": True}
    raw = {
        "model": {"family": "hf", "architecture": architecture, "dtype": "float64", "config": model_config},
        "data": {"dataset": "pydoc"},
        "training": {"steps": 6, "global_batch": 8, "microbatch": 2, "lr": 3e-3, "seed": 3},
        # small enough that a pipeline needs 2 nodes: 4 nodes run 2 pipelines
        "cluster": {"nodes": 4, "devices_per_node": 1, "device": "cpu", "device_memory_gib": {"gpt2": 0.0009, "llama": 0.0006}[architecture]},
        "fault_tolerance": {"f": 1, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 2.0},
        "profile": {"cache_dir": str(profile_dir), **QUICK_PROFILE},
        "faults": [{"step": 3, "phase": "backward", "kind": "kill", "target": "node", "nodes": [1]}],
    }
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(raw))
    profiled = _oobleck("profile", str(config))
    assert profiled.returncode == 0 and "block2" in profiled.stdout and "head" in profiled.stdout, profiled.stderr
    planned = _oobleck("plan", str(config))
    assert planned.returncode == 0 and "pipeline" in planned.stdout.lower(), planned.stderr
    run_dir, output = run_job(tmp_path, raw)
    assert_matches_reference(run_dir, raw, reference_run(raw))
    found = recoveries(run_dir)
    assert [r["lost"] for r in found] == [["node1"]], output[-2000:]
    # two 2-node pipelines: the intact one trains on from memory, the lost node's partner idles as a spare
    assert found[0]["start_step"] == 3 and found[0]["mode"] == "memory" and found[0]["steps_lost"] == 0
