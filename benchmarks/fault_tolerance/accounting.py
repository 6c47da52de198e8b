"""Time accounting of a measured run (pure): which steps stay committed, when each recovery was noticed and
ready, how the run's window splits into :data:`MEASURED` categories, and its summary (see the package
notes)."""

from __future__ import annotations

from typing import Any, Sequence

from benchmarks.fault_tolerance.harness import Run
from benchmarks.jobs import median

#: the measured categories; the simulator's ``lost`` is ``lost`` + ``partial`` here (it has no ``waiting``
#: that a measurement could tell apart: waiting for nodes shows inside a recovery record)
MEASURED = ("useful", "redundant", "recovery", "checkpoint", "lost", "partial")


def kept_rows(rows: Sequence[dict[str, Any]]) -> list[bool]:
    """For each row, whether its step stays committed: a step committed again later (after a restore from
    a checkpoint) keeps only its last row."""
    last = {row["step"]: i for i, row in enumerate(rows)}
    return [last[row["step"]] == i for i, row in enumerate(rows)]


def first_rows(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the rows that open a generation (the first row of all included)."""
    return [i for i, row in enumerate(rows) if i == 0 or rows[i - 1]["generation"] != row["generation"]]


def typical_step_s(rows: Sequence[dict[str, Any]]) -> float:
    """The median step time without foreground checkpoints, over the rows that do not open a generation
    (all rows if every row does)."""
    firsts = set(first_rows(rows))
    plain = [r["step_time_s"] - r.get("checkpoint_s", 0.0) for i, r in enumerate(rows) if i not in firsts]
    return median(plain or [r["step_time_s"] - r.get("checkpoint_s", 0.0) for r in rows])


def recovery_moments(
    rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], gen_starts: dict[int, float] | None = None
) -> dict[int, tuple[float, float]]:
    """generation -> (notice, ready) of the recovery that opened it (rows in commit order with ``commit_at``;
    ``records`` matched by generation). Its first step is taken to last :func:`typical_step_s` plus its own
    ``checkpoint_s``, within what is left after the previous commit, so ready = its commit minus that, but
    not before the generation's start (``gen_starts``, optional); the notice (the loss, or the moment the
    joining node was ready) is ``resume_s`` + ``detect_s`` before ready."""
    typical = typical_step_s(rows) if rows else 0.0
    by_gen = {rec["generation"]: rec for rec in records}
    out = {}
    for i in first_rows(rows)[1:]:
        row = rows[i]
        record = by_gen.get(row["generation"])
        if record is None:
            continue
        commit = row["commit_at"]
        ready = commit - min(typical + row.get("checkpoint_s", 0.0), commit - rows[i - 1]["commit_at"])
        if gen_starts and row["generation"] in gen_starts:
            ready = min(max(ready, gen_starts[row["generation"]]), commit)
        out[row["generation"]] = (ready - record["resume_s"] - (record.get("detect_s") or 0.0), ready)
    return out


def account(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    start: float,
    end: float,
    gen_starts: dict[int, float] | None = None,
) -> dict[str, float]:
    """Seconds of ``[start, end]`` in each of :data:`MEASURED` (they sum to ``end - start``; see the module
    notes). ``rows`` are in commit order with ``commit_at`` inside the window, ``records`` the recovery
    records, ``gen_starts`` as for :func:`recovery_moments`. Between the commit before a recovery and its
    ready moment, the time up to the notice is ``partial`` (the step the failure cut; nothing when the notice
    came before that commit, as for a join) and the rest ``recovery``. ``redundant_s`` and ``checkpoint_s``
    missing from a row count as 0."""
    if end < start:
        raise ValueError(f"window ends ({end}) before it starts ({start})")
    acc = dict.fromkeys(MEASURED, 0.0)
    keep = kept_rows(rows)
    moments = recovery_moments(rows, records, gen_starts)
    firsts = set(first_rows(rows))
    prev = start
    for i, row in enumerate(rows):
        commit = row["commit_at"]
        if not prev <= commit <= end:
            raise ValueError(f"row of step {row['step']} committed at {commit}, outside [{prev}, {end}]")
        busy_until = prev
        if i in firsts and row["generation"] in moments:
            notice, ready = moments[row["generation"]]
            busy_until = max(prev, ready)
            cut = min(max(notice, prev), busy_until)
            acc["partial"] += cut - prev
            acc["recovery"] += busy_until - cut
        step_part = commit - busy_until
        checkpoint = min(row.get("checkpoint_s", 0.0), step_part)
        redundant = min(row.get("redundant_s", 0.0), step_part - checkpoint)
        acc["checkpoint"] += checkpoint
        if keep[i]:
            acc["useful"] += step_part - checkpoint - redundant
            acc["redundant"] += redundant
        else:
            acc["lost"] += step_part - checkpoint
        prev = commit
    acc["partial"] += end - prev
    return acc


def summarize(run: Run) -> dict[str, Any]:
    """Throughput, breakdown and counts of a run (see the module notes)."""
    window = run.end - run.start
    global_batch = run.global_batch
    kept = sum(kept_rows(run.rows))
    seconds = account(run.rows, run.records, run.start, run.end, run.gen_starts)
    changes = [r for r in run.records if r["lost"] or r["joined"]]
    return {
        "samples_per_s": kept * global_batch / window if window > 0 else 0.0,
        "window_s": window,
        "steps_kept": kept,
        "steps_of": run.steps,
        "timed_out": run.timed_out,
        "breakdown_s": seconds,
        "breakdown_share": {k: (v / window if window > 0 else 0.0) for k, v in seconds.items()},
        "steps_lost": sum(r["steps_lost"] for r in run.records),
        "recoveries": len(changes),
        "recovery_modes": {m: sum(r["mode"] == m for r in changes) for m in sorted({r["mode"] for r in changes})},
        "median_step_s": median([r["step_time_s"] for r in run.rows[1:]]),
        "launch_to_start_s": run.launch_to_start_s,
        "load_1m": list(run.load_1m),
    }


def rolling_throughput(times: Sequence[float], batch: int, window_s: float, end: float, grid_s: float) -> tuple[list[float], list[float]]:
    """Throughput over time: at every ``grid_s`` from 0 to ``end``, the samples committed (``times``, sorted,
    from the window's start) in the trailing ``window_s`` per second (over the time elapsed, at first)."""
    xs, ys = [], []
    first = last = 0
    for k in range(int(end / grid_s) + 1):
        t = k * grid_s
        while last < len(times) and times[last] <= t:
            last += 1
        while first < last and times[first] <= t - window_s:
            first += 1
        xs.append(t)
        ys.append((last - first) * batch / min(window_s, t) if t > 0 else 0.0)
    return xs, ys
