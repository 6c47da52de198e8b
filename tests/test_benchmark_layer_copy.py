"""The layer-copy benchmark: a smoke run (two real processes, both ways of copying, bitwise copies) and its
bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.layer_copy", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [(["--rounds", "0"], "--rounds: got 0"), (["--config", "no-such.yaml"], "--config: config no-such.yaml: cannot read")],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _run(*args, "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # two rank processes per placement, each importing torch: ~15 s
def test_both_ways_copy_every_layer_bitwise(tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    proc = _run("--rounds", "1", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["rows"][-1]["cores"]) == 1  # the last run puts both processes on one core
    for row in report["rows"]:
        assert row["layers"] == 6 and row["copies_equal"] is True
        assert row["packed_s"] > 0 and row["per_tensor_s"] > 0
    assert "per tensor / packed" in proc.stdout
