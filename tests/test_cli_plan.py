"""`oobleck plan` as a user runs it. A few cases run the installed command as subprocesses (all started
at once); the rest call the same entry point, ``oobleck.cli.main``, in this process, which saves an
interpreter start per case. tests/test_cli.py checks that an analytic plan never imports torch."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from oobleck.commands.plan import _assumptions
from planner.analytic import DEVICES, SHAPES, analytic_profile
from planner.cluster import ClusterSpec
from planner.plan import make_plan
from planner.profile import LayerProfile, ModelProfile

ROOT = Path(__file__).resolve().parent.parent
OOBLECK = Path(sys.executable).with_name("oobleck")
GIB = 2**30

ERROR_CASES = {
    "negative nodes": (["--model", "gpt3-175b", "--nodes", "-4"], "argument --nodes: got -4; must be in [1, 4096]"),
    "f too large": (["--model", "gpt3-175b", "--nodes", "64", "--f", "40"], "f=40 needs at least"),
    "unknown model": (["--model", "gpt5", "--nodes", "8"], "model: got 'gpt5'; known analytic shapes: gpt3-125m"),
    "batch not divisible": (
        ["--model", "gpt2", "--nodes", "8", "--global-batch", "10", "--microbatch", "3"],
        "global_batch 10 is not a multiple of microbatch 3; use 9 or 12",
    ),
    "no config": (["--nodes", "8"], "CONFIG: missing"),
    "not a number": (["--model", "gpt2", "--nodes", "many"], "argument --nodes: got 'many'; expected an integer in [1, 4096]"),
    "truncated profile": (["--model", "gpt2", "--nodes", "8", "--profile", "{truncated}"], "truncated or malformed JSON"),
    "stale profile": (["--model", "gpt2", "--nodes", "8", "--microbatch", "1", "--profile", "{stale}"], "is stale: fingerprint differs in microbatch"),
}

OK_CASES = {
    "gpt3 json": ["--model", "gpt3-175b", "--nodes", "64", "--devices-per-node", "8", "--f", "3", "--json"],
    "table": ["--model", "gpt2", "--nodes", "6", "--devices-per-node", "2", "--f", "1", "--device-spec", "v100-32g"],
    "example config": [str(ROOT / "examples" / "gpt3-175b.yaml"), "--json"],
}


#: cases run as real subprocesses; the others go through oobleck.cli.main in-process
SUBPROCESS_CASES = ("gpt3 json", "negative nodes", "stale profile")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("profiles")
    stale = tmp / "stale.json"
    analytic_profile(SHAPES["gpt2"], 4, DEVICES["a100-80g"]).save(stale)
    truncated = tmp / "truncated.json"
    truncated.write_text(stale.read_text()[:100])
    files = {"truncated": str(truncated), "stale": str(stale)}
    cases = {name: [a.format(**files) for a in argv] for name, (argv, _) in ERROR_CASES.items()} | OK_CASES
    procs = {
        name: subprocess.Popen([str(OOBLECK), "plan", *cases[name]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in SUBPROCESS_CASES
    }
    done = {}
    try:
        for name, argv in cases.items():
            if name not in procs:
                done[name] = _in_process(["plan", *argv])
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    from oobleck.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_is_one_line_and_exit_2(runs: dict[str, subprocess.CompletedProcess], name: str) -> None:
    result = runs[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ERROR_CASES[name][1] in lines[0]
    assert result.stdout == ""


def _check_plan(d: dict, nodes: int, layers: int, microbatches: int) -> None:
    assert len(d["pipelines"]) >= d["f"] + 1
    assert sum(p["num_nodes"] for p in d["pipelines"]) == nodes
    assert sum(p["num_microbatches"] for p in d["pipelines"]) == microbatches
    for p in d["pipelines"]:
        ranges = p["layer_ranges"]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) == p["num_nodes"] * d["cluster"]["devices_per_node"]
        assert max(p["stage_memory_bytes"]) <= d["cluster"]["device_memory_bytes"]
    assert d["step_time_s"] == max(p["iteration_time_s"] for p in d["pipelines"])
    assert d["samples_per_s"] > 0


def test_gpt3_175b_json_plan(runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = runs["gpt3 json"]
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["cluster"]["device_memory_bytes"] == 80 * GIB
    assert d["f"] == 3 and d["n0"] * 4 <= 64
    _check_plan(d, nodes=64, layers=98, microbatches=512)
    assert d["profile"]["fingerprint"]["source"] == "analytic"
    assert [t["num_nodes"] for t in d["templates"]] == list(range(d["n0"], d["n0"] + len(d["templates"])))


def test_example_config(runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = runs["example config"]
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["global_batch"] == 1536 and d["f"] == 3
    _check_plan(d, nodes=64, layers=98, microbatches=1536)


def test_table(runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = runs["table"]
    assert result.returncode == 0, result.stderr
    for text in ("pipeline templates", "instantiated pipelines", "predicted step time", "/ 32.00", "v100-32g"):
        assert text in result.stdout
    # the assumptions, as v100-32g and gpt2 define them, and what each column is
    lines = result.stdout.splitlines()
    assert lines[1] == (
        "assumes: 16-bit mixed precision, adamw with fp32 state; 125 TFLOP/s peak at 40% efficiency; "
        "sequence length 1024, microbatch 1"
    )
    assert lines[2] == "links: 150 GB/s within a node, 12.5 GB/s between nodes (for the transfers between stages)"
    assert any(line.startswith("bottleneck s: the slowest stage's forward + backward time") and "fill s: " in line for line in lines)
    assert any(line.startswith("iteration s = fill s + (microbatches - 1) x bottleneck s (1F1B)") for line in lines)
    # one unit of time: seconds, in the headers and the last line
    assert " ms" not in result.stdout and "bottleneck s" in result.stdout and "iteration s" in result.stdout
    assert re.search(r"predicted step time 0\.\d{4} s \(the slowest pipeline's iteration\)", lines[-1]), lines[-1]


def test_measured_profile_states_where_it_was_measured() -> None:
    fingerprint = {"model": {"family": "gpt", "seq_len": 64}, "microbatch": 4, "dtype": "float32", "device": "cpu", "source": "measured"}
    profile = ModelProfile(tuple(LayerProfile(f"l{i}", 1e-3, 2e-3, 10, 10, 20, 5, 8) for i in range(4)), fingerprint)
    plan = make_plan(profile, ClusterSpec(2, 1, 1e6, 10e9, 1e9), 1, 8, 4)
    assert _assumptions(plan).splitlines() == [
        "assumes: each layer's time and memory as measured on cpu in float32; sequence length 64, microbatch 4",
        "links: 10 GB/s within a node, 1 GB/s between nodes (for the transfers between stages)",
    ]
