"""Fault-free cost of heterogeneous pipelines: Oobleck's plan against the best homogeneous one on the same
nodes (the target: Oobleck loses at most 5% to the homogeneous plan).

``python -m benchmarks.heterogeneous [--nodes 5 7] [--steps 40] [--rounds 2] [--cpu-share node|shared] [--out PATH]``

For each node count it runs the tiny GPT fault-free with ``fault_tolerance.policy: oobleck`` (the planner's
f+1 heterogeneous pipelines, e.g. 3+2+2 nodes on 7) and with ``policy: varuna`` and checkpoints off, which
is exactly the best homogeneous plan (``planner/homogeneous.py``: the depth and replica count with the
shortest step; nodes left over stay idle) in the same engine, with nothing else different. The two runs of a
round go back to back and the rounds alternate their order, since the machine is shared and noisy.
Throughput is the global batch over the median step time after ``--warmup`` steps; the table gives each
plan, both throughputs and Oobleck's ratio, and the JSON goes to ``benchmarks/results/heterogeneous.json``.

By default each node is held to ``cores / nodes`` CPUs (:mod:`benchmarks.cpu_shares`), as if it were a
machine of its own: otherwise the homogeneous plan's idle node would hand its CPU to the nodes that work and
the comparison would measure this machine's scheduler, not the plans. ``--cpu-share shared`` measures without
the caps (and needs no root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.cpu_shares import CpuShares, add_cpu_share_flag, cpus_per_node, flag_check, remove_stale_groups
from benchmarks.jobs import bad_flag, launch, machine_info, median, read_jsonl, tiny_gpt, write_config
from oobleck.nodes import node_name

RESULTS = Path(__file__).resolve().parent / "results" / "heterogeneous.json"
GLOBAL_BATCH = 16


def measure(work: Path, nodes: int, steps: int, warmup: int, policy: str, tag: str, per_node: bool) -> dict[str, Any]:
    """One fault-free run; its plan (as the launcher printed it) and steady-state samples/s. With
    ``per_node``, each node is held to :func:`cpus_per_node` CPUs."""
    # float64 on the simulated 2 MiB devices: n0 = 2, so the plans differ (in float32 one node holds it all)
    raw = tiny_gpt(work / "profiles", nodes=nodes, steps=steps)
    raw["fault_tolerance"].update({"policy": policy, "checkpoint_every": 0})
    run_dir = work / f"{tag}-{policy}"
    caps = CpuShares([node_name(i) for i in range(1, nodes + 1)], cpus_per_node(nodes)) if per_node else None
    with caps or contextlib.nullcontext():
        job = launch(write_config(work / f"{tag}-{policy}.yaml", raw), run_dir)
        if caps is not None:
            caps.follow(job, workers=nodes)
        code = job.wait(900)
    if code != 0:
        raise RuntimeError(f"{policy} on {nodes} nodes failed: {job.output()[-1500:]}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    step_s = median([r["step_time_s"] for r in rows[warmup:]])
    plan = next((line.split(": ", 1)[1] for line in job.output().splitlines() if line.startswith(("plan:", "plan ("))), "")
    return {"policy": policy, "plan": plan, "median_step_s": step_s, "samples_per_s": GLOBAL_BATCH / step_s}


def run_bench(node_counts: list[int], steps: int, warmup: int, rounds: int, per_node: bool, work: Path) -> dict[str, Any]:
    if per_node:
        remove_stale_groups()  # those of an earlier benchmark that was killed
    cases = []
    for nodes in node_counts:
        runs: dict[str, list[dict[str, Any]]] = {"oobleck": [], "varuna": []}
        for r in range(rounds):
            order = ("oobleck", "varuna") if r % 2 == 0 else ("varuna", "oobleck")
            for policy in order:
                runs[policy].append(measure(work, nodes, steps, warmup, policy, f"n{nodes}-r{r}", per_node))
        rate = {p: median([x["samples_per_s"] for x in xs]) for p, xs in runs.items()}
        cases.append(
            {
                "nodes": nodes,
                "cpus_per_node": cpus_per_node(nodes) if per_node else None,
                "oobleck_plan": runs["oobleck"][0]["plan"],
                "homogeneous_plan": runs["varuna"][0]["plan"],
                "oobleck_samples_per_s": rate["oobleck"],
                "homogeneous_samples_per_s": rate["varuna"],
                "ratio": rate["oobleck"] / rate["varuna"],
                "runs": runs,
            }
        )
    cpu_share = "per node: cores / nodes CPUs each (cgroup quota)" if per_node else "shared: no caps"
    return {"machine": machine_info(), "steps": steps, "warmup": warmup, "rounds": rounds, "cpu_share": cpu_share, "cases": cases}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'nodes':>5}  {'oobleck plan':<44} {'homogeneous plan':<44} {'oobleck':>9} {'homog.':>9} {'ratio':>6}"]
    for c in report["cases"]:
        lines.append(
            f"{c['nodes']:>5}  {c['oobleck_plan'][:44]:<44} {c['homogeneous_plan'][:44]:<44} "
            f"{c['oobleck_samples_per_s']:>9.1f} {c['homogeneous_samples_per_s']:>9.1f} {c['ratio']:>6.3f}"
        )
    lines.append("samples/s: global batch / median step time after the warmup steps; ratio = oobleck / homogeneous")
    lines.append(f"CPU: {report['cpu_share']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heterogeneous", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 7], help="node counts (default 5 7)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per plan and node count (default 2)")
    add_cpu_share_flag(parser, "cores/nodes")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    if bad_flag(
        "benchmarks.heterogeneous",
        [
            ("--nodes", args.nodes, all(4 <= n <= 8 for n in args.nodes), "each must be in [4, 8] on this machine"),
            ("--warmup", args.warmup, 0 <= args.warmup < args.steps - 4, "must leave at least 5 measured steps"),
            ("--rounds", args.rounds, args.rounds >= 1, "must be at least 1"),
            flag_check(args.cpu_share),
        ],
    ):
        return 2
    with tempfile.TemporaryDirectory(prefix="oobleck-hetero-") as work:
        report = run_bench(args.nodes, args.steps, args.warmup, args.rounds, args.cpu_share == "node", Path(work))
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
