"""``oobleck run`` end to end: 5 local nodes train the tiny GPT with exactly the reference losses."""

from __future__ import annotations

import math
import re
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
    # the names `oobleck inject` takes, and the first step's start-up apart from its rate
    assert "starting 5 nodes: node0, node1, node2, node3, node4" in err, err
    first = next(line for line in err.splitlines() if line.startswith("step 1/3"))
    startup = re.search(r"  start-up (\d+\.\d) s$", first)
    assert startup is not None, first

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["nodes_alive"] == 5 and r["pipelines"] >= 2 for r in rows)
    assert rows[0]["startup_s"] == pytest.approx(float(startup.group(1)), abs=0.05)
    assert 0 < rows[0]["startup_s"] < rows[0]["step_time_s"] and all(r["startup_s"] == 0 for r in rows[1:])
    for row in rows:
        assert row["samples_per_s"] == pytest.approx(raw["training"]["global_batch"] / (row["step_time_s"] - row["startup_s"]))
    # the plan's local step time next to every measured one, the same for the whole generation
    assert rows[0]["predicted_step_s"] > 0 and all(r["predicted_step_s"] == rows[0]["predicted_step_s"] for r in rows)
    assert any((run_dir / "tensorboard").iterdir())

    reference = reference_run(raw).losses
    for row, expected in zip(rows, reference):
        assert math.isclose(row["loss"], expected, rel_tol=1e-9), (row["step"], row["loss"], expected)
