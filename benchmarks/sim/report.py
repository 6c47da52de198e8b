"""The simulator's printed tables and its plot, from :func:`benchmarks.sim.experiment.run_model`'s results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.sim.core import CATEGORIES
from benchmarks.sim.experiment import INTERVALS


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "n/a (0)"
    return f"{x:.0f}x" if x >= 100 else f"{x:.2f}x"


def format_tables(model: str, res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [
        f"== {model}: {s['nodes']} nodes x {s['devices_per_node']} GPU, global batch {s['global_batch']}, "
        f"microbatch {s['microbatch']}, f={s['f']}; n0 oobleck/varuna/bamboo = "
        f"{s['n0']['oobleck']}/{s['n0']['varuna']}/{s['n0']['bamboo']} ==",
        "fault-free: "
        + "; ".join(f"{p} {v['samples_per_s']:.1f} samples/s ({v['config']})" for p, v in res["fault_free"].items())
        + (
            f"; Bamboo redundancy overhead {100 * res['bamboo_redundancy_overhead']:.0f}% of its step"
            if res["bamboo_redundancy_overhead"] is not None
            else ""
        ),
        "costs: " + ", ".join(f"{k}={v:g}" for k, v in s["costs"].items() if v is not None),
        "",
        "throughput, samples/s (relative to fault-free Oobleck on all nodes)",
    ]
    policies = list(next(iter(res["scenarios"].values()))["policies"]) if res["scenarios"] else []
    header = f"{'timeline':<11}" + "".join(f"{p:>17}" for p in policies) + "".join(
        f"{'oob/' + p:>17}" for p in policies if p != "oobleck"
    )
    lines.append(header)
    for label, entry in res["scenarios"].items():
        row = f"{label:<11}" + "".join(
            f"{entry['policies'][p]['samples_per_s']:>10.1f} ({entry['policies'][p]['relative']:.2f})" for p in policies
        )
        row += "".join(f"{_fmt_ratio(entry['ratios']['oobleck/' + p]):>17}" for p in policies if p != "oobleck" and "ratios" in entry)
        lines.append(row)
    lines.append("")
    lines.append("time breakdown, % of the duration: " + " / ".join(CATEGORIES) + "; events")
    for label, entry in res["scenarios"].items():
        for p in policies:
            r = entry["policies"][p]
            share = r["breakdown_share"]
            c = r["counts"]
            events = ", ".join(f"{k} {v}" for k, v in c.items() if v)
            lines.append(
                f"{label:<11}{p:<13}" + " ".join(f"{100 * share[k]:>6.1f}" for k in CATEGORIES) + f"   {events}"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    colors = {"oobleck": "tab:blue", "varuna": "tab:orange", "varuna_tuned": "tab:orange", "bamboo": "tab:green"}
    names = {"varuna_tuned": "varuna, best checkpoint interval"}
    for ax, model in zip(axes[0], models):
        res = results[model]
        labels = list(res["scenarios"])
        fixed = [lab for lab in labels if lab in INTERVALS or lab[-1:] in "hms" and lab[:-1].replace(".", "").isdigit()]
        others = [lab for lab in labels if lab not in fixed]
        xs = list(range(len(fixed)))
        for p in colors:
            if not labels or p not in res["scenarios"][labels[0]]["policies"]:
                continue
            style = "--" if p == "varuna_tuned" else "-"
            face = "white" if p == "varuna_tuned" else colors[p]
            ys = [res["scenarios"][lab]["policies"][p]["samples_per_s"] for lab in fixed]
            ax.plot(xs, ys, marker="o", color=colors[p], linestyle=style, markerfacecolor=face, label=names.get(p, p))
            for j, lab in enumerate(others):
                y = res["scenarios"][lab]["policies"][p]["samples_per_s"]
                ax.plot([len(fixed) + 0.6 + j], [y], marker="D", color=colors[p], markerfacecolor=face, linestyle="none")
        ax.axhline(res["fault_free"]["oobleck"]["samples_per_s"], color="tab:blue", linestyle=":", linewidth=1, label="oobleck fault-free")
        if others:
            ax.axvline(len(fixed) - 0.2, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(xs + [len(fixed) + 0.6 + j for j in range(len(others))])
        ax.set_xticklabels([f"every {lab}" for lab in fixed] + [lab.removesuffix("-trace") + " trace" for lab in others], rotation=20)
        ax.set_ylabel("samples/s")
        ax.set_xlabel("failure interval (a node lost, replaced)  |  real trace")
        s = res["setup"]
        ax.set_title(f"{model}, {s['nodes']} nodes x {s['devices_per_node']} A100-40GB (simulated)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
