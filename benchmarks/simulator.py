"""Cluster-scale simulator: Oobleck against Varuna-style and Bamboo-style fault tolerance on the same model,
cluster and node-availability timeline (docs/benchmarks.md, "Cluster scale, simulated").

``python -m benchmarks.simulator [--models gpt3-2.7b gpt3-6.7b] [--nodes 30] [--intervals 6h 1h 30m 10m 5m]
[--trace PATH] [--out benchmarks/results/simulator.json] [--plot benchmarks/results/simulator.png]``

For each model it prints and writes (JSON and a PNG plot, one panel per model) the average throughput of the
three policies under failures at a fixed interval (a node lost every interval, a replacement added some minutes
later; traces generated with a seeded RNG) and on a real spot-instance trace (``../shared/traces/p3-trace.csv``),
each as samples/s and relative to Oobleck's fault-free throughput on all nodes, the time breakdown (useful
training, redundant work, recovery/restart, checkpoints, lost work, waiting for nodes) and Oobleck's ratio to
each baseline. Pure Python; never imports torch.

The simulation (``benchmarks/sim_engine.py``) is discrete-event over the timeline: between two membership
changes a policy trains at the step time of its current configuration, is busy (recovery, restart, takeover,
reconfiguration, foreground checkpoint) or waits for nodes. Step times come from the planner's cost model
(``planner/analytic.py`` profile of the model shape on the device, ``planner.templates`` cuts, 1F1B step
``fill + (m-1) * bottleneck``; ``benchmarks/sim_model.py``); no throughput is hard-coded.

Policies
--------
* **Oobleck**: templates built once (``make_plan`` on the full cluster); for n usable nodes the planner's
  instantiation (``Plan.replan``; degraded below (f+1)*n0; below n0 the job waits). A membership change that
  hits nodes in use costs ``recovery_fixed_s + bytes(lost nodes' layers: parameters + optimizer state) /
  inter-node bandwidth`` and loses only the interrupted step; failures during a recovery restart it with the
  union of lost nodes. If the lost nodes held every copy of some layer (checked exactly from the pipelines'
  layer ranges) or fewer than n0 nodes remain: restart from the latest *background* checkpoint (taken every
  ``oobleck_checkpoint_every`` steps, no stall, valid once written). Joining nodes fold in at the next step
  boundary when the plan for the larger count is faster (cost: fixed + bytes of the layers the new nodes hold).
* **Varuna-style**: one depth for all pipelines; for n nodes the depth and replica count (depth x replicas <=
  n) with the best planner step time. A foreground checkpoint every ``checkpoint_every`` steps. Losing a node
  in use: stop, lose the steps since the latest complete checkpoint (and the partial step, and a checkpoint
  being written), restart (``restart_s``: processes, rendezvous, checkpoint load) on the nodes alive then; a
  loss during the restart starts it over (nodes ready during a restart wait). A joined node waits for the
  next periodic checkpoint, after which the job restarts to take it in when the best configuration for the
  new count is faster (Varuna morphs on membership change); otherwise it waits as a spare.
* **Bamboo-style**: homogeneous pipelines of >= 2 nodes where every stage also holds a shadow of the stage on
  the next node (parameters and optimizer state) and runs its forward redundantly for every microbatch. The cut
  is searched on a profile with doubled forward time and doubled parameter/optimizer bytes (so the extra memory
  can force deeper pipelines), then costed exactly: stage i's load is its own forward+backward plus the forward
  of stage i+G (wrapping), memory its own state + the shadow + its activations in flight. Losing a node whose
  pipeline has no lost neighbour: the predecessor takes over (``bamboo_takeover_s``, interrupted step lost; it
  then runs both stages, so that pipeline and the synchronous step slow down). Two consecutive nodes of one
  pipeline lost (wrapping): fatal, restart (``bamboo_reconfigure_s``) from the latest checkpoint (foreground,
  every ``bamboo_checkpoint_every`` steps). At a step boundary Bamboo re-partitions onto the alive nodes
  (``bamboo_reconfigure_s``, no lost work; best depth and replica count again) when spares can replace the
  overloaded nodes, when 2 x overloaded / active nodes exceeds 5%, or when the alive nodes fit another pipeline
  of the current depth (the artifact's three rules); never when no pipeline fits the alive nodes (it then keeps
  running taken over). A failure during a re-partition or restart starts it over.
* All: the global batch is constant; at most ``--nodes`` nodes are in the job (more alive nodes queue); a node
  added after the start trains ``node_ready_s`` after its add; a lost node that was not in use costs nothing.

Published figures (GPU-scale runs; ``benchmarks/sim_model.py`` ``PUBLISHED``)
----------------------------------------------------------------------------
From the simulators of the Oobleck SOSP'23 artifact (github.com/SymbioticLab/Oobleck, branch sosp23-artifact,
``tools/simulator``), which produced the paper's throughput-vs-failure-frequency and spot-trace figures:
Oobleck reconfiguration 6 s (GPT-3 2.7B) / 10 s (6.7B); Varuna restart 515 s / 701 s and checkpoint 50 s /
120 s every 10 iterations; Bamboo reconfiguration 230 s / 450 s and its "2 x overloaded / active > 5%" rule;
45 s from a spot instance's add to ready; global batch 512 (2.7B) / 1024 (6.7B). Varuna's checkpoint
interval: ``--save-interval 10`` in Varuna's own example (github.com/microsoft/varuna,
``Megatron-LM/examples/pretrain_gpt2_varuna.sh``). Device: GCP a2-highgpu-1g (one A100 40 GB, 24 Gb/s network),
the GCP spot nodes of the Oobleck paper; peak 312 TFLOP/s and 50% efficiency as the planner's A100. The p3 trace
is Bamboo's (NSDI'23) EC2 p3 spot availability trace (uclasystem/bamboo, MIT).

Assumptions (each a parameter; see ``--help`` and :class:`benchmarks.sim_model.Costs`)
------------------------------------------------------------------------------------
* The planner's cost model has no data-parallel all-reduce term; all policies are costed the same way.
* Oobleck's fixed recovery cost is the artifact's whole reconfiguration time; the copy time is added on top
  (conservative for Oobleck). Bamboo's takeover rebuilds groups like Oobleck's recovery: the same fixed cost.
* Oobleck's fatal-case restart costs Varuna's restart figure; Bamboo's fatal restart costs its reconfiguration.
* Bamboo checkpoints every 100 steps (its redundancy makes frequent checkpoints unnecessary); Oobleck every
  10 steps in the background.
* Fixed-interval traces: 30 nodes at t=0, a uniformly random alive node lost every interval, its replacement
  added 5 minutes later (then 45 s to ready), 24 hours simulated, seed 0.

Validation against the measured harness (``benchmarks/fault_tolerance.py``) goes through
:func:`predict_throughput`, which takes a measured run's inputs (its profile, nodes, schedule and measured
costs) and returns each policy's predicted samples/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

if not __package__:  # run as a file: use the repo root so that `planner` and `benchmarks` import
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.sim_engine import (
    CATEGORIES,
    PolicyConfigs,
    SimResult,
    check_policies,
    fixed_interval_trace,
    parse_interval,
    simulate,
)
from benchmarks.sim_model import (
    A100_40G_1GPU,
    NODE_READY_S,
    POLICIES,
    PUBLISHED,
    Costs,
    Setup,
    SimulatorError,
    describe_config,
    published_costs,
)
from launcher.trace import TraceEvent, load_trace, summary
from oobleck.errors import OobleckError
from planner.analytic import DEVICES, DeviceSpec, analytic_profile, shape_named
from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.profile import ModelProfile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
P3_TRACE = ROOT.parent / "shared" / "traces" / "p3-trace.csv"
INTERVALS = ("6h", "1h", "30m", "10m", "5m")
#: global batch per model: the Oobleck artifact's samples per step
MODELS: dict[str, int] = {"gpt3-2.7b": 512, "gpt3-6.7b": 1024}
FIXED_DURATION_S = 24 * 3600.0
REPLACEMENT_DELAY_S = 300.0

SOURCES = [
    "Oobleck SOSP'23 artifact simulators: github.com/SymbioticLab/Oobleck branch sosp23-artifact, "
    "tools/simulator/{oobleck,varuna,bamboo}_simulator.py (reconfiguration 6 s / 10 s; Varuna restart 515 s / "
    "701 s, checkpoint 50 s / 120 s every 10 iterations; Bamboo reconfiguration 230 s / 450 s, 5% rule; "
    "45 s instance start; batch 512 / 1024 for GPT-3 2.7B / 6.7B)",
    "Varuna (EuroSys'22) example: github.com/microsoft/varuna Megatron-LM/examples/pretrain_gpt2_varuna.sh "
    "(--save-interval 10)",
    "Oobleck (SOSP'23) abstract: up to 13.9x higher throughput than Bamboo and Varuna",
    "Bamboo (NSDI'23): redundant computation, a stage runs its successor's forward; EC2 p3 trace from "
    "github.com/uclasystem/bamboo (MIT)",
    "GCP a2-highgpu-1g: 1x A100 40 GB, 24 Gb/s network; A100 312 TFLOP/s 16-bit peak",
]


def device_named(name: str) -> DeviceSpec:
    if name == A100_40G_1GPU.name:
        return A100_40G_1GPU
    if name in DEVICES:
        return DEVICES[name]
    raise SimulatorError(f"device: got {name!r}; known: {', '.join([A100_40G_1GPU.name, *DEVICES])}")


def build_setup(
    model: str,
    nodes: int = 30,
    gpus_per_node: int = 1,
    device: str = A100_40G_1GPU.name,
    f: int = 1,
    global_batch: int | None = None,
    microbatch: int = 1,
    recompute: bool = False,
    **cost_overrides: Any,
) -> Setup:
    """The shared setup for one GPT-3 shape: analytic profile on ``device``, cluster, published costs."""
    shape = shape_named(model)
    spec = device_named(device)
    profile = analytic_profile(shape, microbatch, spec, recompute=recompute)
    cluster = ClusterSpec(nodes, gpus_per_node, spec.memory_bytes, spec.intra_node_bandwidth, spec.inter_node_bandwidth)
    batch = global_batch if global_batch is not None else MODELS.get(model, 512)
    return Setup(profile, cluster, f, batch, microbatch, published_costs(model, profile, cluster, **cost_overrides))


# ---------------------------------------------------------------------------------------------------------
# Validation hook


@dataclass(frozen=True)
class MeasuredRun:
    """A measured run's inputs, as the simulator needs them to predict its throughput.

    ``profile``: the profile the run was planned with (e.g. the tiny GPT's measured profile);
    ``cluster.nodes``: the nodes in the job; ``costs``: the run's measured recovery, restart and checkpoint
    figures and checkpoint intervals; ``events``: the failure schedule as replayed (wall-clock seconds, i.e.
    after compression); ``duration_s``: the measured wall time over which throughput was averaged;
    ``fault_free_samples_per_s``: optional measured fault-free throughput per policy, which scales that
    policy's step times so that its fault-free prediction equals the measurement (the cost model's absolute
    step time is then not part of the error)."""

    profile: ModelProfile
    cluster: ClusterSpec
    f: int
    global_batch: int
    microbatch: int
    costs: Costs
    events: Sequence[TraceEvent]
    duration_s: float
    node_ready_s: float = 0.0
    fault_free_samples_per_s: Mapping[str, float] | None = None


def predict(run: MeasuredRun, policies: Sequence[str] = POLICIES) -> dict[str, SimResult]:
    """Simulate a measured run for each policy (see :class:`MeasuredRun`)."""
    policies = check_policies(policies)
    configs = PolicyConfigs(Setup(run.profile, run.cluster, run.f, run.global_batch, run.microbatch, run.costs))
    out = {}
    for policy in policies:
        scale = 1.0
        if run.fault_free_samples_per_s and policy in run.fault_free_samples_per_s:
            measured = run.fault_free_samples_per_s[policy]
            if not (math.isfinite(measured) and measured > 0):
                raise SimulatorError(f"fault_free_samples_per_s[{policy!r}]: got {measured!r}; must be > 0")
            model = simulate(policy, configs, run.events, run.duration_s, run.node_ready_s).fault_free_samples_per_s
            scale = model / measured
        out[policy] = simulate(policy, configs, run.events, run.duration_s, run.node_ready_s, step_scale=scale)
    return out


def predict_throughput(run: MeasuredRun, policies: Sequence[str] = POLICIES) -> dict[str, float]:
    """Predicted average samples/s of each policy on a measured run (see :class:`MeasuredRun`)."""
    return {p: r.samples_per_s for p, r in predict(run, policies).items()}


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def scenarios(
    nodes: int,
    intervals: Sequence[str],
    trace: Path | None,
    duration_s: float,
    replacement_delay_s: float,
    seed: int,
) -> list[tuple[str, list[TraceEvent], float, str]]:
    """(label, events, duration, description) for each fixed interval and the trace."""
    out = []
    for label in intervals:
        interval = parse_interval(label)
        events = fixed_interval_trace(nodes, interval, duration_s, replacement_delay_s, seed)
        removes = sum(1 for e in events if e.kind == "remove")
        what = f"a node lost every {label} ({removes} over {duration_s / 3600:g} h), replaced after {replacement_delay_s:g} s"
        out.append((label, events, duration_s, what))
    if trace is not None:
        events = load_trace(trace)
        s = summary(events)
        out.append((trace.stem, events, s.duration_s, s.describe()))
    return out


#: checkpoint intervals (steps) tried for the tuned-Varuna sensitivity row
TUNED_CHECKPOINT_EVERY = (10, 30, 100, 300, 1000)


def run_model(
    setup: Setup,
    cases: Sequence[tuple[str, list[TraceEvent], float, str]],
    node_ready_s: float,
    policies: Sequence[str] = POLICIES,
    tuned_intervals: Sequence[int] = TUNED_CHECKPOINT_EVERY,
) -> dict[str, Any]:
    """Every policy on every timeline for one setup, plus Varuna with its best checkpoint interval among
    ``tuned_intervals`` (``varuna_tuned``, a sensitivity row: the default interval is Varuna's published one)."""
    configs = PolicyConfigs(setup)
    n = setup.cluster.nodes
    fault_free: dict[str, tuple[float, str]] = {}
    for policy, table in (("oobleck", configs.oobleck), ("varuna", configs.varuna), ("bamboo", configs.bamboo)):
        cfg = table.config(n)
        if cfg is None:
            raise SimulatorError(f"{policy}: no configuration fits {n} nodes")
        fault_free[policy] = (setup.global_batch / cfg.step_time_s, describe_config(policy, cfg))
    bamboo_cfg = configs.bamboo.config(n)
    reference = fault_free["oobleck"][0]
    out: dict[str, Any] = {
        "setup": {
            "nodes": n,
            "devices_per_node": setup.cluster.devices_per_node,
            "device_memory_bytes": setup.cluster.device_memory_bytes,
            "inter_node_bandwidth": setup.cluster.inter_node_bandwidth,
            "f": setup.f,
            "global_batch": setup.global_batch,
            "microbatch": setup.microbatch,
            "profile": setup.profile.fingerprint,
            "n0": {"oobleck": configs.oobleck.n0, "varuna": configs.varuna.n0, "bamboo": configs.bamboo.n0},
            "costs": setup.costs.to_dict(),
            "node_ready_s": node_ready_s,
        },
        "fault_free": {
            p: {"samples_per_s": v, "relative": v / reference, "config": d} for p, (v, d) in fault_free.items()
        },
        "bamboo_redundancy_overhead": (
            1 - bamboo_cfg.no_redundancy_step_s / bamboo_cfg.step_time_s if bamboo_cfg is not None else None
        ),
        "scenarios": {},
    }
    for label, events, duration, description in cases:
        results = {p: simulate(p, configs, events, duration, node_ready_s) for p in policies}
        if "varuna" in results and tuned_intervals:
            # sensitivity: Varuna with the checkpoint interval that suits this timeline best
            tries = []
            for k in tuned_intervals:
                costs = dataclasses.replace(setup.costs, checkpoint_every=k)
                tries.append((simulate("varuna", configs, events, duration, node_ready_s, costs=costs), k))
            best, best_k = max(tries, key=lambda rk: rk[0].samples_per_s)
            best.policy = "varuna_tuned"
            best.counts["checkpoint_every"] = best_k
            results["varuna_tuned"] = best
        entry: dict[str, Any] = {"description": description, "duration_s": duration, "policies": {}}
        for p, r in results.items():
            d = r.to_dict()
            d["relative"] = r.samples_per_s / reference
            entry["policies"][p] = d
        oob = results.get("oobleck")
        if oob is not None:
            entry["ratios"] = {
                f"oobleck/{p}": (oob.samples_per_s / r.samples_per_s if r.samples_per_s > 0 else None)
                for p, r in results.items()
                if p != "oobleck"
            }
        out["scenarios"][label] = entry
    return out


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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.simulator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="analytic GPT shapes (planner.analytic.SHAPES)")
    ap.add_argument("--nodes", type=int, default=30, help="nodes in the job (default 30)")
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--device", default=A100_40G_1GPU.name, help=f"device spec (default {A100_40G_1GPU.name})")
    ap.add_argument("--f", type=int, default=1, help="Oobleck's simultaneous failures tolerated (default 1)")
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--intervals", nargs="*", default=list(INTERVALS), help="fixed failure intervals (6h 1h 30m ...)")
    ap.add_argument("--trace", default=str(P3_TRACE), help="a node-availability trace file; 'none' to skip")
    ap.add_argument("--duration-h", type=float, default=FIXED_DURATION_S / 3600, help="length of the fixed-interval runs")
    ap.add_argument("--replacement-delay-s", type=float, default=REPLACEMENT_DELAY_S)
    ap.add_argument("--node-ready-s", type=float, default=NODE_READY_S)
    ap.add_argument("--checkpoint-every", type=int, default=None, help="Varuna's checkpoint interval in steps (default 10)")
    ap.add_argument("--bamboo-checkpoint-every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "simulator.json"))
    ap.add_argument("--plot", default=str(RESULTS / "simulator.png"), help="PNG path; 'none' to skip")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    try:
        trace = None if args.trace.lower() == "none" else Path(args.trace)
        if trace is not None and not trace.exists():
            print(f"trace {trace} not found; skipping the trace runs", file=sys.stderr)
            trace = None
        cases = scenarios(args.nodes, args.intervals, trace, args.duration_h * 3600, args.replacement_delay_s, args.seed)
        overrides = {}
        if args.checkpoint_every is not None:
            overrides["checkpoint_every"] = args.checkpoint_every
        if args.bamboo_checkpoint_every is not None:
            overrides["bamboo_checkpoint_every"] = args.bamboo_checkpoint_every
        results = {}
        for model in args.models:
            setup = build_setup(model, args.nodes, args.gpus_per_node, args.device, args.f, None, args.microbatch, **overrides)
            results[model] = run_model(setup, cases, args.node_ready_s)
            print(format_tables(model, results[model]))
            print()
    except (SimulatorError, ValueError, OobleckError, PlanningError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    doc = {
        "format": "oobleck-simulator/1",
        "command": "python -m benchmarks.simulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sources": SOURCES,
        "published_costs": PUBLISHED,
        "timelines": {
            "fixed_interval": {
                "duration_s": args.duration_h * 3600,
                "replacement_delay_s": args.replacement_delay_s,
                "seed": args.seed,
            },
            "trace": str(trace) if trace is not None else None,
            "node_ready_s": args.node_ready_s,
        },
        "models": results,
        "runtime_s": elapsed,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {out}")
    if args.plot.lower() != "none":
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")
    print(f"simulated in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
