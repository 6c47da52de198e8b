"""Planner speed: all templates plus an instantiation for every node count a failure sequence can leave.

For each cluster size N (G=8 devices per node, f=3) the timed work is ``build_templates`` followed by
``instantiate`` for every N' in [(f+1)*n0, N], i.e. everything recovery could ever ask for. Profiles
are analytic 96-block GPT-3 shapes on A100-80GB devices, global batch 1536 sequences of 2048 tokens,
microbatch 1:

* ``gpt3-96x4096``: GPT-3's depth at width 4096 (about 19B parameters), no activation recomputation;
  it fits on 16 nodes with f=3;
* ``gpt3-175b``: the full model, which needs full activation recomputation to fit at all (n0=6, so
  f=3 needs at least 24 nodes; N=16 is reported as infeasible).

Each figure is the best of ``--repeats`` runs (the machine is shared). Writes
``benchmarks/results/planner.json``. Run: ``.venv/bin/python benchmarks/planner.py`` (or
``-m benchmarks.planner``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: this file's folder comes first on sys.path and would shadow the
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # planner package; use the repo root

from planner.analytic import DEVICES, SHAPES, TransformerShape, analytic_profile
from planner.cluster import ClusterSpec
from planner.errors import PlanningError
from planner.instantiate import instantiate
from planner.profile import ModelProfile
from planner.templates import build_templates

RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"
G = 8
F = 3
GLOBAL_BATCH = 1536
MICROBATCH = 1
SIZES = (16, 64, 256, 1024)


def _profiles() -> dict[str, ModelProfile]:
    device = DEVICES["a100-80g"]
    narrow: TransformerShape = dataclasses.replace(SHAPES["gpt3-175b"], name="gpt3-96x4096", d_model=4096, n_head=32)
    return {
        "gpt3-96x4096": analytic_profile(narrow, MICROBATCH, device),
        "gpt3-175b (recompute)": analytic_profile(SHAPES["gpt3-175b"], MICROBATCH, device, recompute=True),
    }


def _plan_everything(profile: ModelProfile, cluster: ClusterSpec) -> dict[str, Any]:
    start = time.perf_counter()
    templates = build_templates(profile, cluster, F)
    built = time.perf_counter()
    n0 = min(templates)
    counts = range((F + 1) * n0, cluster.nodes + 1)
    last = None
    for nodes in counts:
        last = instantiate(templates, nodes, F, GLOBAL_BATCH // MICROBATCH)
    done = time.perf_counter()
    assert last is not None
    return {
        "n0": n0,
        "templates": len(templates),
        "template_nodes": [min(templates), max(templates)],
        "instantiations": len(counts),
        "templates_s": built - start,
        "instantiate_s": done - built,
        "total_s": done - start,
        "pipelines_at_N": len(last.pipelines),
        "step_time_at_N_s": last.step_time_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    device = DEVICES["a100-80g"]
    rows = []
    print(f"{'profile':<24}{'N':>6}{'n0':>4}{'templ':>6}{'N values':>9}{'templates s':>13}{'instantiate s':>15}{'total s':>9}")
    for name, profile in _profiles().items():
        for nodes in args.sizes:
            cluster = ClusterSpec(nodes, G, device.memory_bytes, device.intra_node_bandwidth, device.inter_node_bandwidth)
            try:
                runs = [_plan_everything(profile, cluster) for _ in range(args.repeats)]
            except PlanningError as e:
                rows.append({"profile": name, "nodes": nodes, "infeasible": str(e)})
                print(f"{name:<24}{nodes:>6}  infeasible: {e}")
                continue
            best = min(runs, key=lambda r: r["total_s"])
            rows.append({"profile": name, "nodes": nodes, **best})
            print(
                f"{name:<24}{nodes:>6}{best['n0']:>4}{best['templates']:>6}{best['instantiations']:>9}"
                f"{best['templates_s']:>13.3f}{best['instantiate_s']:>15.3f}{best['total_s']:>9.3f}"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "build_templates + instantiate for every N' in [(f+1)*n0, N]; best of repeats",
                "devices_per_node": G,
                "f": F,
                "global_batch": GLOBAL_BATCH,
                "microbatch": MICROBATCH,
                "device": "a100-80g",
                "repeats": args.repeats,
                "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
