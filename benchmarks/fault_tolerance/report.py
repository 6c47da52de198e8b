"""The benchmark's printed summary (each run's, then each schedule's per-seed table) and each run's plot,
from the JSON reports of :func:`benchmarks.fault_tolerance.bench.run_schedules` and
:func:`~benchmarks.fault_tolerance.bench.run_bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.fault_tolerance.accounting import rolling_throughput
from benchmarks.fault_tolerance.seeds import BASELINES, sim_max_abs_error
from benchmarks.fault_tolerance.validation import MAX_SIM_ERROR
from benchmarks.sim.core import CATEGORIES

#: trailing window of the plotted throughput, and the spacing of its points, seconds
ROLLING_S = 3.0
PLOT_GRID_S = 0.1


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """Every run's summary (:func:`format_run`), then per schedule the table of its seeds: each policy's
    samples/s under failures, Oobleck's ratio to each baseline and the simulator's largest error, and the
    ratios' median and spread (min-max) over the seeds."""
    lines = []
    for name, summary in report["schedules"].items():
        runs = summary["seeds"]
        for seed, run in runs.items():
            lines += [f"== schedule {name}, seed {seed}", format_run(run)]
        policies = next(iter(runs.values()))["config"]["policies"]
        baselines = [b for b in BASELINES if b in policies and "oobleck" in policies]
        lines.append(f"== schedule {name}: {len(runs)} seed(s)")
        lines.append(
            f"{'seed':<8}" + "".join(f"{p:>10}" for p in policies) + "".join(f"{'vs ' + b:>11}" for b in baselines) + f"{'sim error':>11}"
        )
        for seed, run in runs.items():
            error = sim_max_abs_error(run)
            lines.append(
                f"{seed:<8}" + "".join(f"{run['policies'][p]['samples_per_s']:>10.1f}" for p in policies)
                + "".join(f"{_ratio(run['ratios'][f'oobleck/{b}']['failures']):>11}" for b in baselines)
                + f"{'-' if error is None else _pct(error):>11}"
            )  # fmt: skip
        for b in baselines:
            low, mid, high = (summary[f"{stat}_ratio_vs_{b}"] for stat in ("min", "median", "max"))
            lines.append(f"Oobleck / {b}: median {_ratio(mid)}, spread {_ratio(low)} to {_ratio(high)}")
        if summary["sim_max_abs_error"] is not None:
            lines.append(f"simulator: largest error {_pct(summary['sim_max_abs_error'])} over every policy and seed")
    lines.append(f"{report['wall_s']:.0f} s in all")
    return "\n".join(lines)


def format_run(report: dict[str, Any]) -> str:
    """One run's summary (one schedule and seed: :func:`~benchmarks.fault_tolerance.bench.run_bench`)."""
    c = report["config"]
    lines = [
        f"fault tolerance: tiny GPT (float64, n0=2, f=1), {c['steps']} steps; {c['schedule']}; "
        + (f"{c['cpus_per_node']:.2f} CPUs per node" if c.get("cpus_per_node") else "nodes share the CPUs"),
        f"{'policy':<9}{'samples/s':>10}{'useful':>8}{'redund.':>8}{'recovery':>9}{'ckpt':>7}{'lost':>7}"
        f"{'partial':>8}{'steps lost':>11}{'changes':>8}{'window s':>9}{'fault-free':>11}",
    ]
    for policy, p in report["policies"].items():
        s = p["breakdown_share"]
        note = f"  (stopped: {p['steps_kept']} of {p['steps_of']} steps)" if p["timed_out"] else ""
        lines.append(
            f"{policy:<9}{p['samples_per_s']:>10.1f}{_pct(s['useful']):>8}{_pct(s['redundant']):>8}{_pct(s['recovery']):>9}"
            f"{_pct(s['checkpoint']):>7}{_pct(s['lost']):>7}{_pct(s['partial']):>8}{p['steps_lost']:>11}{p['recoveries']:>8}"
            f"{p['window_s']:>9.1f}{p['fault_free']['samples_per_s']:>11.1f}{note}"
        )
    for name, r in report["ratios"].items():
        lines.append(f"{name}: {_ratio(r['failures'])} under failures, {_ratio(r['fault_free'])} fault-free")
    for policy, p in report["policies"].items():
        modes = ", ".join(f"{n} {m}" for m, n in p["recovery_modes"].items()) or "none"
        lines.append(f"  {policy}: recoveries by mode: {modes}; median step {1000 * p['median_step_s']:.0f} ms")
    sim = report["simulator"]
    lines.append("simulator (benchmarks.simulator.predict on each measured run; measured costs):")
    lines.append("  costs: " + ", ".join(f"{k}={v:g}" for k, v in sim["costs"].items()))
    lines.append(
        f"  {'policy':<9}{'measured':>10}{'predicted':>11}{'error':>8}{'(fault-free run':>16}{'in-run)':>9}{'node ready s':>14}"
        "   simulated breakdown: " + " / ".join(CATEGORIES)
    )
    for policy, v in sim["policies"].items():
        share = v["simulated"]["breakdown_share"]
        lines.append(
            f"  {policy:<9}{v['measured_samples_per_s']:>10.1f}{v['predicted_samples_per_s']:>11.1f}"
            f"{100 * v['relative_error']:>7.1f}%{100 * v['relative_error_fault_free_run']:>15.1f}%"
            f"{100 * v['relative_error_in_run']:>8.1f}%{v['node_ready_s']:>14.1f}   "
            + " / ".join(_pct(share[k]) for k in CATEGORIES)
            + ("" if v["within_bound"] else f"   OUTSIDE {100 * MAX_SIM_ERROR:.0f}%")
        )
    lines.append(
        "  (predicted: step times scaled to the fault-free steps of the policy's two runs; the errors in brackets"
        " scale them to the fault-free run alone, and to the failure run's first generation alone)"
    )
    for policy, v in sim["policies"].items():
        counts = ", ".join(f"{k} {n}" for k, n in v["simulated"]["counts"].items() if n) or "none"
        measured = report["policies"][policy]
        modes = ", ".join(f"{m} {n}" for m, n in measured["recovery_modes"].items()) or "none"
        lines.append(f"  {policy}: simulated events: {counts}; measured recoveries: {modes}, {measured['steps_lost']} steps lost")
    a = report["acceptance"]
    faster = {True: "yes", False: "NO", None: "not measured"}[a["oobleck_faster_than_baselines"]]
    lines.append(
        f"acceptance: Oobleck faster than the baselines: {faster}; "
        f"simulator within {100 * MAX_SIM_ERROR:.0f}%: {'yes' if a['simulator_within_20pct'] else 'NO'}"
    )
    loads = [x for p in report["policies"].values() for x in (*p["load_1m"], *p["fault_free"]["load_1m"])]
    lines.append(
        f"machine: {report['machine']['cpu_count']} cores, load average (1 min) {min(loads):.1f}-{max(loads):.1f} "
        f"at the runs' starts and ends; {report['wall_s']:.0f} s in all"
        + (f"; plot {report['plot']}" if report["plot"] else "")
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per policy: nodes alive as replayed and nodes its generations train on (top), throughput over a
    trailing :data:`ROLLING_S` window (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"oobleck": "tab:blue", "bamboo": "tab:green", "varuna": "tab:orange"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    batch = report["config"]["global_batch"]
    nodes = len(report["config"]["initial_nodes"])
    for policy, p in report["policies"].items():
        color = colors.get(policy, "gray")
        xs, ys = [0.0], [nodes]
        for e in p["replayed"]:
            if e["note"] is None:
                xs.append(e["at"])
                ys.append(ys[-1] + (1 if e["kind"] == "add" else -1))
        xs.append(p["window_s"])
        ys.append(ys[-1])
        top.step(xs, ys, where="post", color=color, label=f"{policy}: alive")
        placed_t = [0.0] + [r["t"] for r in p["rows"]]
        placed_n = [p["rows"][0]["nodes_placed"]] + [r["nodes_placed"] for r in p["rows"]]
        top.step(placed_t, placed_n, where="pre", color=color, linestyle="--", linewidth=1, label=f"{policy}: training")
        xs, ys = rolling_throughput([r["t"] for r in p["rows"]], batch, ROLLING_S, p["window_s"], PLOT_GRID_S)
        bottom.plot(xs, ys, color=color, label=f"{policy} ({p['samples_per_s']:.1f} avg)")
        bottom.axhline(p["fault_free"]["samples_per_s"], color=color, linestyle=":", linewidth=1)
    top.set_ylabel("nodes")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"samples/s ({ROLLING_S:g} s window)")
    bottom.set_xlabel("seconds from the first step's start (dotted: fault-free throughput)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.set_title(report["config"]["schedule"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
