"""The processes that compute beside the profiler when a local run's workers outnumber the cores
(oobleck/shared_cores.py): started with the model built, computing while the body runs, reaped after."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from oobleck.config import config_from_dict
from oobleck.profiler import ensure_profile, expected_fingerprint
from oobleck.shared_cores import computing_neighbours, neighbours_for


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children() -> set[int]:
    me = os.getpid()
    return {int(t) for t in Path(f"/proc/{me}/task/{me}/children").read_text().split()}


def test_neighbours_fill_the_run_up_to_twice_the_cores() -> None:
    assert [neighbours_for(w, 2) for w in (1, 2, 3, 4, 5, 9)] == [0, 0, 2, 3, 3, 3]
    assert neighbours_for(8, 8) == 0 and neighbours_for(12, 8) == 11 and neighbours_for(40, 8) == 15


def test_neighbours_compute_during_the_body_and_are_reaped_after(tmp_path: Path) -> None:
    config = config_from_dict({"model": {"family": "gpt", "preset": "tiny"}, "data": {"dataset": "pydoc"}})
    before = _children()
    with computing_neighbours(config, 2, threads=1):
        started = _children() - before
        assert len(started) == 2
        first = {pid: _cpu_s(pid) for pid in started}
        time.sleep(0.5)  # they compute on their own: their CPU time grows while this process sleeps
        assert all(_cpu_s(pid) > first[pid] for pid in started)
    assert not (_children() - before)  # stopped and reaped


def test_a_neighbour_that_cannot_start_is_one_error_and_nothing_is_left(tmp_path: Path) -> None:
    # a data file that vanished after the config was read: the neighbour exits on it, the profiler reports it
    data = {"dataset": "text-file", "path": str(tmp_path / "gone.txt")}
    bad = config_from_dict({"model": {"family": "gpt", "preset": "tiny"}, "data": data})
    before = _children()
    with pytest.raises(RuntimeError, match="exited"):
        with computing_neighbours(bad, 2, threads=1):
            pass
    assert not (_children() - before)


def test_a_profile_with_neighbours_is_timed_by_cpu_and_cached_under_their_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})  # two workers on one core: one neighbour
    config = config_from_dict(
        {"model": {"family": "gpt", "preset": "tiny"}, "data": {"dataset": "pydoc"},
         "cluster": {"nodes": 2, "device": "cpu"}, "profile": {"cache_dir": str(tmp_path), "seconds": 0}}  # fmt: skip
    )
    profile = ensure_profile(config)
    assert profile.fingerprint["neighbours"] == 1 == expected_fingerprint(config)["neighbours"]
    assert all(layer.forward_s > 0 and layer.backward_s > 0 for layer in profile.layers)
