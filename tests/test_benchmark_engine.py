"""The engine benchmark: a smoke run that writes both pipeline engines' figures and the overlap gain, and its
pure helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.engine import stage_boundaries, steady_rate

REPO = Path(__file__).resolve().parent.parent


def test_stage_boundaries_put_the_ends_on_the_outer_stages() -> None:
    assert stage_boundaries(6, 4) == (0, 2, 3, 4, 6)  # tiny GPT: embedding+block, block, block, block+head
    assert stage_boundaries(8, 4) == (0, 3, 5, 6, 8)  # 6 blocks: the first stages take the extra ones
    with pytest.raises(ValueError, match="cannot fill 4 stages"):
        stage_boundaries(5, 4)


def test_steady_rate_skips_the_warmup_steps() -> None:
    # steps 0..3 end at 10, 11, 12.5 and 13 s; the timed steps start when the last warm-up step ends
    rate, durations = steady_rate([10.0, 11.0, 12.5, 13.0], warmup=1, global_batch=8)
    assert durations == [1.0, 1.5, 0.5] and rate == pytest.approx(8.0 * 3 / 3.0)
    rate, durations = steady_rate([10.0, 11.0, 12.5, 13.0], warmup=3, global_batch=8)
    assert durations == [0.5] and rate == pytest.approx(16.0)


def test_bad_flag_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--warmup", "0", "--out", str(tmp_path / "x.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--warmup: got 0" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.slow  # a benchmark run: ~60 s
def test_quick_run_writes_both_engines_figures_and_the_overlap_gain(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--quick", "--presets", "tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    config = report["config"]
    assert (config["warmup"], config["steps"], config["microbatches"]) == (1, 2, 4)
    assert list(report["presets"]) == ["tiny"]
    tiny = report["presets"]["tiny"]
    assert tiny["partition"] == [[0, 2], [2, 3], [3, 4], [4, 6]]
    engines = tiny["engines"]
    for name in ("deepspeed", "oobleck", "single_process"):
        assert engines[name]["samples_per_s"] > 0
        assert engines[name]["cpu_ms_per_step"]["stages"] > 0
        assert len(engines[name]["losses"]) == 3
    # the engines train the same model on the same data with the same optimizer: equal losses
    for name, diff in tiny["max_loss_diff_vs_single_process"].items():
        assert diff < 1e-4, (name, engines[name]["losses"], engines["single_process"]["losses"])
    ratio = engines["oobleck"]["samples_per_s"] / engines["deepspeed"]["samples_per_s"]
    assert tiny["ratios"]["oobleck_over_deepspeed"] == pytest.approx(ratio)
    assert tiny["ratios"]["oobleck_over_deepspeed_per_round"] == [pytest.approx(ratio)]  # one round
    overlap = report["overlap"]
    assert overlap["pipelines"] == [[[0, 3], [3, 6]]] * 2 and overlap["microbatches_per_pipeline"] == 2
    assert overlap["gain"] == pytest.approx(overlap["samples_per_s"]["on"] / overlap["samples_per_s"]["off"])
    assert overlap["max_loss_diff_on_vs_off"] == 0.0  # the overlap changes when the sums happen, not what they are
    assert "ours / DeepSpeed" in proc.stdout and "overlap (tiny GPT" in proc.stdout


def test_profile_table_is_per_step_and_shares_sum_to_the_total() -> None:
    from benchmarks.engine_profile import format_profile

    records = [
        {"rank": 0, "steps": 2, "phases": {"forward compute": [0.2, 0.1], "p2p receive wait": [0.6, 0.0]}},
        {"rank": 1, "steps": 2, "phases": {"forward compute": [0.4, 0.3]}},
    ]
    lines = format_profile(records).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["forward", "p2p", "total"]  # by wall time, largest first
    # forward: rank 0 100 ms wall / 50 ms CPU per step, rank 1 200 / 150; 300 of 600 ms wall, all 200 ms CPU
    assert "100.0 / 50.0" in lines[1] and "200.0 /150.0" in lines[1] and lines[1].endswith("50.0% /100.0%")
    assert lines[3].endswith("100.0% /100.0%")


def test_timeline_counts_the_workers_not_waiting_by_their_innermost_phase() -> None:
    from benchmarks.engine_profile import concurrency, innermost

    # rank 0: a step 0-10 s whose forward 0-4 s holds a receive wait 1-3 s, then a commit wait 8-10 s
    rank0 = [["forward compute", 0.0, 4.0], ["p2p receive wait", 1.0, 3.0], ["commit wait", 8.0, 10.0], ["step other", 0.0, 10.0]]
    assert innermost(rank0) == [
        (0.0, 1.0, "forward compute"), (1.0, 3.0, "p2p receive wait"), (3.0, 4.0, "forward compute"),
        (4.0, 8.0, "step other"), (8.0, 10.0, "commit wait"),
    ]  # fmt: skip
    # rank 1 works 0-5 s and waits on the all-reduce 5-10 s
    rank1 = [["backward compute", 0.0, 5.0], ["grad all-reduce wait", 5.0, 10.0]]
    shares, idle = concurrency([{"events": rank0}, {"events": rank1}])
    # both work 0-1, 3-4 (forward) and 4-5 (step other): 3 s; one works 1-3 and 5-8: 5 s; none 8-10: 2 s
    assert shares == pytest.approx({0: 0.2, 1: 0.5, 2: 0.3})
    assert idle[0] == (pytest.approx(0.3), ("grad all-reduce wait", "step other"))
    assert sum(share for share, _ in idle) == pytest.approx(0.7)
