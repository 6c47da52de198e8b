"""One schedule over several seeds: the summary of its runs' ratios and simulator errors (pure; see the
package notes)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from benchmarks.jobs import median

#: the baselines the summary names a ratio field for (``median_ratio_vs_bamboo``, ...)
BASELINES = ("bamboo", "varuna")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def sim_max_abs_error(report: dict[str, Any]) -> float | None:
    """The simulator's largest ``|predicted / measured - 1|`` over the policies of one run's report (None
    without a prediction)."""
    return max((abs(p["relative_error"]) for p in report["simulator"]["policies"].values()), default=None)


def seed_summary(reports: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """The summary over ``reports`` (seed -> the report of :func:`benchmarks.fault_tolerance.bench.run_bench`).

    For each of :data:`BASELINES`: ``median_ratio_vs_B``, ``min_ratio_vs_B`` and ``max_ratio_vs_B``, over the
    seeds, of Oobleck's throughput under failures over B's (a run where B committed nothing counts as an
    infinite ratio; a figure that comes out infinite, or that no run measured because Oobleck or B did not
    run, is None). ``sim_max_abs_error``: the simulator's largest ``|predicted / measured - 1|`` over every
    policy and seed (a fraction; None without a prediction)."""
    out: dict[str, Any] = {}
    for baseline in BASELINES:
        ratios = []
        for report in reports.values():
            ratio = report["ratios"].get(f"oobleck/{baseline}")
            if ratio is not None:
                ratios.append(math.inf if ratio["failures"] is None else ratio["failures"])
        for stat, f in (("median", median), ("min", min), ("max", max)):
            out[f"{stat}_ratio_vs_{baseline}"] = _finite_or_none(f(ratios)) if ratios else None
    errors = [e for e in map(sim_max_abs_error, reports.values()) if e is not None]
    out["sim_max_abs_error"] = max(errors, default=None)
    return out
