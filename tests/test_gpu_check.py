"""benchmarks.gpu_check: its whole path on the CPU (``--device cpu``), its skip without CUDA, its bad flags.
The CUDA branch itself (allocator peaks, bf16 support, the JSON) runs only on a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")  # the CPU run trains in this process


def test_cpu_run_trains_profiles_plans_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--preset", "tiny", "--warmup", "1", "--steps", "1", "--nodes", "1,2,4", "--out", str(out)]
    assert gpu_check.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny GPT on cpu: 1 timed steps after 1 warm-up, global batch 32")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    assert list(rows) == ["fp32", "bf16"]  # the CPU always has bf16
    for samples_per_s, first, last, peak in rows.values():
        assert float(samples_per_s) > 0 and peak == "-"  # no allocator peak on the CPU
        # from about ln(256) (the tiny preset's byte vocabulary, untrained) down: two real optimizer steps
        assert float(last) < float(first) == pytest.approx(math.log(256), rel=0.05)
    # both precisions start from the same weights and batch: bf16 rounding moves the first loss only a little
    assert float(rows["bf16"][1]) == pytest.approx(float(rows["fp32"][1]), rel=1e-2)
    profile = lines[4]
    assert profile.startswith("profile (cpu, 6 layers, microbatch 4): forward ")
    plans = {line.split()[0]: line for line in lines[6:]}
    # f = 1 needs two pipelines: one node cannot hold them; each tiny-GPT pipeline fits on one node
    assert plans["1"].startswith("1      no plan: ")
    assert plans["2"].split()[1:4] == ["1", "+", "1"] and plans["4"].split()[1:8] == ["1", "+", "1", "+", "1", "+", "1"]
    assert float(plans["4"].split()[-1]) < float(plans["2"].split()[-1])  # twice the pipelines, half the step
    assert not out.exists()  # CPU figures are not GPU figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_without_cuda_it_skips_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and "skipped: no CUDA device visible" in printed.out and not printed.err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "flag, value, says",
    [("--device", "tpu", "use cuda or cpu"), ("--preset", "huge", "use one of"), ("--steps", "0", "must be at least 1"),
     ("--nodes", "2,x", "give positive node counts")],
)  # fmt: skip
def test_bad_flag_is_one_line_and_exit_code_2(flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag}: got {value}; {says}" in err
