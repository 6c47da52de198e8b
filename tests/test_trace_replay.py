"""``oobleck run`` with ``trace:``: a short node-availability trace is replayed against the running job (nodes
leave and join by name) and the job still computes exactly what one process computes.

The trace's removes must show up as lost nodes, and the two nodes it adds at one instant (node6, node7) must
both join: in one generation (one re-plan, one recovery record naming both) when their workers come up within
``oobleck.control.state.GATHER_S`` of each other, else one after the other. They are not required to stay: the local
launcher started them from the replay thread, and their agents' PR_SET_PDEATHSIG (SIGTERM) fired when that
thread ended after the last event (benchmarks/trace_replay.py worked around it with a sentinel event), so they
may be lost then too."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oobleck import checkpoint
from oobleck.metrics import METRICS_FILE, RECOVERIES_FILE, read_metrics
from tests.run_helpers import ROOT, TAG_ENV, start_run, tagged, tiny_gpt, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # every test runs a real job

#: trace seconds per wall second
COMPRESSION = 10.0
#: wall seconds from the launch to the first event. A node lost before the job's first step is committed
#: fails the job, and the first step is committed ~10-17 s after the trace clock starts on a loaded 2-core machine.
FIRST_EVENT_S = 25.0
#: enough steps for training to outlast the joins: the added nodes are ready 7-10 s after the events, a node
#: ready after the last step never joins, and a step takes 0.04-0.12 s here (at 450 steps a run of session 17
#: ended at the first of the two joins)
STEPS = 800


def trace_lines() -> list[str]:
    """Five nodes start the job; then node2 is lost, node6 and node7 join together and node3 is lost, a second
    apart."""
    ms = lambda wall_s: round(wall_s * COMPRESSION * 1000)  # noqa: E731
    start = [f"0,add,node{i}" for i in range(1, 6)]
    return start + [
        f"{ms(FIRST_EVENT_S)},remove,node2",
        f"{ms(FIRST_EVENT_S + 1)},add,node6",
        f"{ms(FIRST_EVENT_S + 1)},add,node7",
        f"{ms(FIRST_EVENT_S + 2)},remove,node3",
    ]


def test_trace_replay_matches_the_single_process_reference(tmp_path: Path, profile_dir: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(trace_lines()) + "\n")
    raw = tiny_gpt(profile_dir, nodes=5, steps=STEPS)
    raw["cluster"]["device_memory_gib"] = 0.002  # n0 = 2: two-stage pipelines, so a lost node's layers move
    raw["trace"] = {"path": str(trace), "compression": COMPRESSION}
    config = write_config(tmp_path / "job.yaml", raw)
    run_dir = tmp_path / "run"
    proc, tag = start_run(config, run_dir)
    reference: subprocess.Popen | None = None
    try:
        # the single-process reference runs beside the job once it trains (it would slow the workers' start)
        deadline = time.monotonic() + 120
        while not (run_dir / METRICS_FILE).exists() or not (run_dir / METRICS_FILE).read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.1)
        reference = subprocess.Popen(
            [sys.executable, "-m", "oobleck.cli", "train-local", str(config), "--run-dir", str(tmp_path / "reference")],
            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **{TAG_ENV: tag}),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = proc.communicate(timeout=240)
        _, reference_err = reference.communicate(timeout=240)
    finally:
        for started in (proc, reference):
            if started is not None and started.poll() is None:
                started.kill()
                started.wait()
        for left in tagged(tag):
            left.kill()
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert "trace: replayed 4 of 4 events after the start" in out + err, out[-3000:]
    assert not tagged(tag), "processes outlived the run"

    # the trace's removes are lost nodes in the recovery records (the added nodes may be too: see the module
    # notes); the nodes added together joined
    records = read_metrics(run_dir, RECOVERIES_FILE)
    lost = {node for row in records for node in row["lost"]}
    assert {"node2", "node3"} <= lost <= {"node2", "node3", "node6", "node7"}, lost
    joins = [(row["joined"], row["joined_ready_s"]) for row in records if row["joined"]]
    # the master's log lines on registrations and joins, to tell why nodes added together did not join
    # together (e.g. registered further apart than oobleck.control.state.TOGETHER_S)
    master_log = (run_dir / "logs" / "master.log").read_text()
    joining = [line for line in master_log.splitlines() if "registered" in line or "join" in line]
    assert sum("registered mid-run (after the last registration: " in line for line in joining) == 2, joining
    # and one line per recovery, as the console prints it
    assert sum(": recovered (" in line for line in master_log.splitlines()) == len(records), master_log[-3000:]
    # both joined: in one generation when their workers came up within GATHER_S of each other, else one
    # after the other (a ready node does not wait longer for its partner)
    assert sorted(n for names, _ in joins for n in names) == ["node6", "node7"], (joins, joining)
    assert len(joins) in (1, 2) and all(0 < s < 30 for _, times in joins for s in times), (joins, joining)
    losses = {row["step"]: row["loss"] for row in read_metrics(run_dir)}  # a re-run step keeps its last loss
    assert sorted(losses) == list(range(STEPS))

    assert reference.returncode == 0, reference_err[-3000:]
    expected = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "reference")}
    for step in range(STEPS):
        assert math.isclose(losses[step], expected[step], rel_tol=1e-9), (step, losses[step], expected[step])
    ours = checkpoint.checkpoint_dir(run_dir, STEPS)
    theirs = checkpoint.checkpoint_dir(tmp_path / "reference", STEPS)
    assert checkpoint.is_complete(ours) and checkpoint.is_complete(theirs)
    for index in range(checkpoint.read_meta(theirs)["num_layers"]):
        got = checkpoint.load_layer_state(ours, index)["params"]
        want = checkpoint.load_layer_state(theirs, index)["params"]
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            diff = float((got[key] - tensor).norm()) / max(float(tensor.norm()), 1e-300)
            assert diff < 1e-9, (index, key, diff)
