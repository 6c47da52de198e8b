"""The layer profiler: real measurements, fingerprinted cache files, stale profiles redone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.jobs import QUICK_PROFILE
from oobleck.config import JobConfig, config_from_dict
from oobleck.model_building import build_model
from oobleck.profiler import ensure_profile, expected_fingerprint, profile_path
from planner.errors import ProfileError
from planner.profile import ModelProfile

REPO = Path(__file__).resolve().parent.parent
SMALL_GPT = {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 16}


@pytest.fixture(autouse=True)
def _a_core_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A core for each of the configs' 4 workers, so that these tests of what a profile holds and how it is
    cached start no processes beside the profiler (tests/test_shared_cores.py covers those)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)))


def _config(tmp_path: Path, model: dict, microbatch: int = 2) -> JobConfig:
    return config_from_dict(
        {
            "model": model,
            "data": {"dataset": "pydoc" if model["family"] == "gpt" else "digits"},
            "training": {"global_batch": 8 * microbatch, "microbatch": microbatch},
            "cluster": {"device": "cpu", "nodes": 4},
            "profile": {"cache_dir": str(tmp_path / "cache"), **QUICK_PROFILE},
        }
    )


@pytest.mark.parametrize("family", ["gpt", "dit", "moe"])
def test_tiny_preset_profile_loads_with_its_fingerprint_and_plans(tmp_path: Path, family: str) -> None:
    config = _config(tmp_path, {"family": family, "preset": "tiny"})
    profile = ensure_profile(config)
    path = profile_path(config)
    loaded = ModelProfile.load(path, expect=expected_fingerprint(config))
    assert loaded == profile
    spec = build_model(config.model, config.training.seed)
    assert profile.num_layers == spec.num_layers
    assert [layer.name for layer in profile.layers] == [spec.layer_meta(i).name for i in range(spec.num_layers)]
    assert all(layer.forward_s > 0 and layer.backward_s > 0 and layer.activation_bytes > 0 for layer in profile.layers)
    assert profile.layers[-1].output_bytes == 0

    plan_module = pytest.importorskip("planner.plan")
    from oobleck.cluster_spec import cluster_spec

    plan = plan_module.make_plan(profile, cluster_spec(config.cluster), 1, config.training.global_batch, config.training.microbatch)
    assert sum(t.num_nodes for t, _ in plan.instantiation.pipelines) == 4


def test_sizes_come_from_the_tensors(tmp_path: Path) -> None:
    config = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT})
    profile = ensure_profile(config)
    spec = build_model(config.model, 0)
    for index, layer in enumerate(profile.layers):
        built = spec.build_layer(index)
        params = sum(p.numel() * p.element_size() for p in built.parameters())
        assert layer.param_bytes == layer.grad_bytes == params  # a tied copy counts in each layer holding it
        assert layer.optimizer_bytes == 2 * params
    carry = 2 * 16 * 32 * 4  # microbatch x seq_len x d_model x float32
    assert [layer.output_bytes for layer in profile.layers] == [carry, carry, carry, 0]
    # a block keeps far more for backward than its input; the embedding keeps only token indices
    assert profile.layers[1].activation_bytes > 4 * carry
    assert profile.layers[0].activation_bytes < carry
    # on CPU every layer's once-a-step work is timed: packing, the norm and AdamW
    assert all(layer.update_s > 0 for layer in profile.layers)


def test_frozen_parameters_have_no_gradient_or_optimizer_bytes(tmp_path: Path) -> None:
    profile = ensure_profile(_config(tmp_path, {"family": "dit", "preset": "tiny", "difffit": True}))
    block = profile.layers[1]
    assert 0 < block.grad_bytes < block.param_bytes / 4 and block.optimizer_bytes == 2 * block.grad_bytes


def test_cache_is_reused_and_force_measures_again(tmp_path: Path) -> None:
    config = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT})
    first = ensure_profile(config)
    path = profile_path(config)
    stamp = path.stat().st_mtime_ns
    assert ensure_profile(config) == first and path.stat().st_mtime_ns == stamp
    ensure_profile(config, force=True)
    assert path.stat().st_mtime_ns != stamp


def test_changed_config_makes_a_profile_stale_and_it_is_redone(tmp_path: Path) -> None:
    old = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT})
    new = _config(tmp_path, {"family": "gpt", "overrides": {**SMALL_GPT, "n_layer": 3}})
    path = tmp_path / "fixed.json"
    ensure_profile(old, path=path)
    assert profile_path(old) != profile_path(new)
    with pytest.raises(ProfileError, match="stale: fingerprint differs in model"):
        ModelProfile.load(path, expect=expected_fingerprint(new))

    logged: list[str] = []
    redone = ensure_profile(new, path=path, log=logged.append)
    assert redone.num_layers == 5 and len(logged) == 2 and "stale" in logged[0]
    assert logged[1].startswith("profiling 5 layers") and logged[1].endswith(f"into {path}")
    assert ModelProfile.load(path, expect=expected_fingerprint(new)) == redone


def test_other_microbatch_is_another_fingerprint(tmp_path: Path) -> None:
    a = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT}, microbatch=2)
    b = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT}, microbatch=4)
    assert expected_fingerprint(a)["microbatch"] == 2 and profile_path(a) != profile_path(b)


def test_truncated_cache_file_is_redone(tmp_path: Path) -> None:
    config = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT})
    ensure_profile(config)
    path = profile_path(config)
    path.write_text(path.read_text()[:100])
    logged: list[str] = []
    ensure_profile(config, log=logged.append)
    assert "truncated" in logged[0]
    assert ModelProfile.load(path, expect=expected_fingerprint(config)).num_layers == 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "profile", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_table_and_where_it_saved(tmp_path: Path) -> None:
    config = tmp_path / "gpt.yaml"
    raw = {"model": {"family": "gpt", "overrides": SMALL_GPT}, "cluster": {"device": "cpu"}, "profile": QUICK_PROFILE}
    config.write_text(json.dumps(raw))  # JSON is YAML
    out = tmp_path / "p.json"
    done = _cli(str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "layer", "fwd", "ms"]
    assert [line.split()[1] for line in lines[1:5]] == ["embedding", "block0", "block1", "head"]
    assert lines[-1] == f"profile: {out}"
    assert ModelProfile.load(out).num_layers == 4
    assert done.stderr == f"profiling 4 layers (0 rounds of warm-up, then at least 1 timed rounds and 0 s) into {out}\n"


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: {family: gpt, preset: huge}\n")
    done = _cli(str(config))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "model.preset: got 'huge'" in done.stderr


def test_timing_goes_on_past_repeats_until_the_seconds_have_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import oobleck.profiler as profiler

    rounds: list[float] = []
    timed_round = profiler._timed_round

    def counted(*args, **kwargs):  # the real round, its end time noted
        result = timed_round(*args, **kwargs)
        rounds.append(time.perf_counter())
        return result

    monkeypatch.setattr(profiler, "_timed_round", counted)
    config = _config(tmp_path, {"family": "gpt", "overrides": SMALL_GPT})
    config.profile.warmup, config.profile.repeats = 1, 2
    ensure_profile(config)
    assert len(rounds) == 3, "seconds 0: exactly warmup + repeats rounds"

    rounds.clear()
    config.profile.seconds = 0.4
    ensure_profile(config, force=True)
    # a round of this model takes milliseconds, so 0.4 s takes many more than the two repeats
    assert len(rounds) > 10 and rounds[-1] - rounds[0] >= 0.4 - 0.1
