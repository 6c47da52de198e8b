"""Config loading: defaults, typed fields, and one-line errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oobleck.config import JobConfig, config_from_dict, load_config
from oobleck.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_defaults_fill_every_section() -> None:
    config = config_from_dict({"model": {"family": "gpt"}})
    assert config == JobConfig()
    assert config.training.global_batch % config.training.microbatch == 0


def test_sampling_defaults_average_weights_without_guidance() -> None:
    sampling = config_from_dict({"model": {"family": "dit"}}).sampling
    assert (sampling.ema, sampling.cfg_scale, sampling.steps) == (0.999, 1.0, 50)


def test_numbers_in_scientific_notation_are_floats() -> None:
    config = config_from_dict({"training": {"lr": "3e-4"}})
    assert config.training.lr == pytest.approx(3e-4)


def test_nested_lists_of_faults() -> None:
    config = config_from_dict({"cluster": {"nodes": 6}, "faults": [{"step": 3, "phase": "backward", "nodes": [1, 4]}]})
    assert config.faults[0].nodes == [1, 4] and config.faults[0].phase == "backward"


def test_checkpoint_interval_defaults_to_the_policy() -> None:
    every = {p: config_from_dict({"fault_tolerance": {"policy": p}}).fault_tolerance.checkpoint_every for p in ("oobleck", "varuna", "bamboo")}
    assert every == {"oobleck": 0, "varuna": 10, "bamboo": 100}
    assert config_from_dict({"fault_tolerance": {"policy": "varuna", "checkpoint_every": 0}}).fault_tolerance.checkpoint_every == 0


def test_checkpoint_keep_defaults_to_3_and_0_keeps_all() -> None:
    assert config_from_dict({}).fault_tolerance.checkpoint_keep == 3
    assert config_from_dict({"fault_tolerance": {"checkpoint_keep": 0}}).fault_tolerance.checkpoint_keep == 0


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"modle": {}}, "modle: unknown key; allowed keys are"),
        (
            {"cluster": {"devices_per_node": 2}, "fault_tolerance": {"policy": "bamboo"}},
            "fault_tolerance.policy: got 'bamboo'; bamboo needs cluster.devices_per_node 1 (got 2)",
        ),
        ({"fault_tolerance": {"policy": "raft"}}, "fault_tolerance.policy: got 'raft'; allowed: oobleck, bamboo, varuna"),
        ({"model": {"family": "rnn"}}, "model.family: got 'rnn'; allowed: gpt, dit, moe"),
        ({"training": {"steps": -1}}, "training.steps: got -1; must be at least 1"),
        ({"training": {"steps": "ten"}}, "training.steps: got 'ten'; expected an integer"),
        ({"training": {"global_batch": 10, "microbatch": 4}}, "training.global_batch: got 10; must be a multiple of training.microbatch (4)"),
        ({"cluster": {"nodes": 0}}, "cluster.nodes: got 0; must be at least 1"),
        ({"cluster": {"device_memory_gib": -2}}, "cluster.device_memory_gib: got -2.0; must be positive"),
        ({"fault_tolerance": {"f": -1}}, "fault_tolerance.f: got -1; must be at least 0"),
        (
            {"fault_tolerance": {"stuck_after_s": -5}},
            "fault_tolerance.stuck_after_s: got -5.0; must be at least 0 seconds (0 turns the stuck-worker backstop off)",
        ),
        (
            {"fault_tolerance": {"checkpoint_keep": -1}},
            "fault_tolerance.checkpoint_keep: got -1; must be an integer in [0, 1000] (the newest complete checkpoints to keep; 0 keeps all)",
        ),
        ({"fault_tolerance": {"checkpoint_keep": 1001}}, "fault_tolerance.checkpoint_keep: got 1001; must be an integer in [0, 1000]"),
        ({"fault_tolerance": {"checkpoint_keep": "3"}}, "fault_tolerance.checkpoint_keep: got '3'; expected an integer"),
        ({"fault_tolerance": {"checkpoint_keep": 2.5}}, "fault_tolerance.checkpoint_keep: got 2.5; expected an integer"),
        ({"fault_tolerance": {"checkpoint_keep": True}}, "fault_tolerance.checkpoint_keep: got True; expected an integer"),
        ({"faults": [{"nodes": [9]}]}, "faults[0].nodes: got [9]; node indices must be in [0, 3]"),
        ({"faults": [{"phase": "lunch"}]}, "faults[0].phase: got 'lunch'; allowed: forward, backward"),
        ({"training": {"betas": [0.9]}}, "training.betas: got [0.9]; expected a list of 2 numbers"),
        ({"model": {"family": "gpt", "difffit": True}}, "model.difffit: got True; DiffFit applies to family dit (and diffusers' dit) only"),
        ([1, 2], "config: got [1, 2]; expected a mapping of JobConfig fields"),
        ({"model": {"family": "bert"}}, "model.family: got 'bert'; allowed: gpt, dit, moe, hf, diffusers, or your own layers as package.module:object"),
        ({"model": {"family": "my.pkg:"}}, "model.family: got 'my.pkg:'; allowed:"),
        ({"model": {"family": "hf"}}, "model.architecture: got None; family hf needs model.architecture"),
        ({"model": {"family": "hf", "architecture": "llama", "config": {"a": 1}, "config_dir": "d"}}, "model.config: got"),
        ({"model": {"family": "gpt", "architecture": "llama"}}, "model.architecture: got 'llama'; only families hf, diffusers read it"),
        ({"model": {"family": "gpt", "config_dir": "d"}}, "model.config_dir: got 'd'; only families hf, diffusers read it"),
        ({"model": {"family": "gpt", "config": {"n_layer": 2}}}, "model.config: got"),
        ({"model": {"family": "hf", "architecture": " "}}, "model.architecture: got ' '; must not be empty"),
    ],
)
def test_bad_values_name_the_field(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  family: gpt\n training: [\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    load_config(path)


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "oobleck.cli", "--help"], capture_output=True, text=True, check=True)
    assert "COMMAND" in out.stdout


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  steps: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training.steps: got 0" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------------------
# Bounds: every number finite and bounded, every interval with a floor, no empty hosts or folders


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"training": {"lr": float("inf")}}, "training.lr: got inf; expected a finite number"),
        ({"training": {"lr": "nan"}}, "training.lr: got nan; expected a finite number"),
        ({"training": {"lr": 10**400}}, "training.lr: got 1000000000"),
        ({"cluster": {"device_memory_gib": float("inf")}}, "cluster.device_memory_gib: got inf; expected a finite number"),
        ({"cluster": {"device_memory_gib": 1e29}}, "cluster.device_memory_gib: got 1e+29; must be at most 1048576 GiB"),
        ({"training": {"seed": 2**70}}, "training.seed: got 1180591620717411303424; out of range"),
        ({"training": {"seed": 2**40}}, "training.seed: got 1099511627776; must be in [0, 4294967295]"),
        ({"fault_tolerance": {"heartbeat_interval_s": 1e-300}}, "fault_tolerance.heartbeat_interval_s: got 1e-300; must be in [0.01, 604800] seconds"),
        ({"fault_tolerance": {"stuck_after_s": 1e-9}}, "fault_tolerance.stuck_after_s: got 1e-09; must be 0 (off) or in [0.01"),
        ({"cluster": {"master_host": ""}}, "cluster.master_host: got ''; must not be empty"),
        ({"cluster": {"master_host": "  "}}, "cluster.master_host: got '  '; must not be empty"),
        ({"run": {"dir": ""}}, "run.dir: got ''; must not be empty"),
        ({"profile": {"cache_dir": ""}}, "profile.cache_dir: got ''; must not be empty"),
        ({"profile": {"seconds": -1}}, "profile.seconds: got -1.0; must be in [0, 3600]"),
        ({"profile": {"seconds": "nan"}}, "profile.seconds: got nan; expected a finite number"),
        ({"cluster": {"nodes": 10**29}}, "cluster.nodes: got 100000000000000000000000000000; out of range"),
        ({"cluster": {"nodes": 1e29}}, "cluster.nodes: got 1e+29; expected an integer"),
        ({"cluster": {"nodes": 1000000}}, "cluster.nodes: got 1000000; must be at most 4096"),
        ({"training": {"global_batch": 2**40, "microbatch": 1}}, "training.global_batch: got 1099511627776; must be at most 2147483648"),
        ({"cluster": {"inter_node_bandwidth_gbps": 1e-30}}, "cluster.inter_node_bandwidth_gbps: got 1e-30; must be in [0.001, 1e+06] GB/s"),
        ({"sampling": {"ema": 1}}, "sampling.ema: got 1.0; must be in [0, 1) (0 samples with the last weights)"),
        ({"sampling": {"ema": -0.5}}, "sampling.ema: got -0.5; must be in [0, 1)"),
        ({"sampling": {"cfg_scale": -1}}, "sampling.cfg_scale: got -1.0; must be at least 0 (1 turns guidance off)"),
        ({"sampling": {"cfg_scale": 1e9}}, "sampling.cfg_scale: got 1000000000.0; must be at most 100"),
        ({"sampling": {"cfg_scale": "nan"}}, "sampling.cfg_scale: got nan; expected a finite number"),
        ({"sampling": {"steps": 0}}, "sampling.steps: got 0; must be at least 1"),
        ({"sampling": {"steps": 10**6}}, "sampling.steps: got 1000000; must be at most 100000"),
        ({"sampling": {"steps": 2.5}}, "sampling.steps: got 2.5; expected an integer"),
        ({"sampling": {"guidance": 2}}, "sampling.guidance: unknown key; allowed keys are cfg_scale, ema, steps"),
    ],
)
def test_numbers_are_finite_and_bounded(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message and len(message) < 300


def test_largest_accepted_values_load() -> None:
    config_from_dict(
        {
            "cluster": {"nodes": 4096, "devices_per_node": 64, "device_memory_gib": 2**20},
            "training": {"global_batch": 2**31, "microbatch": 1, "seed": 2**32 - 1, "lr": 10},
            "fault_tolerance": {"heartbeat_interval_s": 0.01, "heartbeat_timeout_s": 0.02, "worker_timeout_s": 0.02},
            "sampling": {"ema": 0.9999, "cfg_scale": 100, "steps": 100_000},
        }
    )


def _load_text(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    message = _load_text(tmp_path, "cluster:\n  nodes: 4\n  nodes: 8\n")
    assert "duplicate key 'nodes' at line 3" in message
    assert "duplicate key 'cluster' at line 3" in _load_text(tmp_path, "cluster: {}\nmodel: {}\ncluster: {nodes: 2}\n")


def test_binary_and_deeply_nested_files_are_one_line(tmp_path: Path) -> None:
    assert "not UTF-8 text" in _load_text(tmp_path, bytes(range(256)) * 4)
    assert "NUL bytes" in _load_text(tmp_path, "model: {}\n\0\0")
    assert "nested too deeply" in _load_text(tmp_path, "[" * 3000 + "]" * 3000)
    assert "nested too deeply" in _load_text(tmp_path, "model: {overrides: " + "{a: " * 3000 + "1" + "}" * 3001)


def test_cli_config_errors_are_one_line_and_fast(tmp_path: Path) -> None:
    """The real entry point: a deep, a binary and a duplicate-key config each give exit 2 and one line."""
    files = {
        "deep": "[" * 3000 + "]" * 3000,
        "dup": "cluster:\n  nodes: 4\n  nodes: 8\n",
        "nodes": "cluster:\n  nodes: 1.0e+29\n",
        "lr": "training:\n  lr: .inf\n",
    }
    for name, text in files.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "oobleck.cli", "plan", str(path)], capture_output=True, text=True, timeout=30)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-500:])
