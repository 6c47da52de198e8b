"""``oobleck run`` end to end: 5 local nodes train the tiny GPT with exactly the reference losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from oobleck.metrics import read_metrics
from tests.run_helpers import ReferenceRun, start_run, tagged, tiny_gpt, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # every test runs a real job


def test_run_matches_the_single_process_reference(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    raw = tiny_gpt(profile_dir, nodes=5, steps=3)
    config = write_config(tmp_path / "job.yaml", raw)
    run_dir = tmp_path / "run"
    proc, tag = start_run(config, run_dir)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.startswith("trained 3 steps on 5 nodes"), out
    assert not tagged(tag), "processes outlived the run"

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["nodes_alive"] == 5 and r["pipelines"] >= 2 for r in rows)
    assert any((run_dir / "tensorboard").iterdir())

    reference = reference_run(raw).losses
    for row, expected in zip(rows, reference):
        assert math.isclose(row["loss"], expected, rel_tol=1e-9), (row["step"], row["loss"], expected)
