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
        ({"model": {"family": "gpt", "difffit": True}}, "model.difffit: got True; DiffFit applies to family dit only"),
        ([1, 2], "config: got [1, 2]; expected a mapping of JobConfig fields"),
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
