"""Loss curves of fp32, bf16 and fp16 runs, with and without a node killed, against train-local.

``python -m benchmarks.precision_losses [--steps S] [--keep DIR] [--out PATH] [--png PATH]``

The tiny GPT of the other benchmarks (:func:`benchmarks.jobs.tiny_gpt`) in float32 on 4 single-device
local nodes with 2 MiB devices (n0 = 1) and f = 2, with a global batch of 3 microbatches: at least 3
pipelines, each with at least one microbatch, on 4 nodes is a 2-node and two 1-node pipelines, whatever
the measured profile. It trains ``S`` steps (default 50) with ``oobleck run`` at each
``training.precision``; bf16 and fp16 run a second time with node 1 (in the 2-node pipeline) killed at
step ``S // 2`` (forward), after which the 3 survivors train on as three 1-node pipelines, the layers
each lacks copied from replicas. Each precision is also trained by ``oobleck train-local``, the reference.

The PNG (``benchmarks/results/precision_losses.png`` or ``--png``) plots every run's loss per step, the
references dashed; the JSON (``benchmarks/results/precision_losses.json`` or ``--out``) holds the losses,
each run's comparison with its reference (:func:`benchmarks.jobs.compare_with_reference`), the steps fp16
skipped, the plans each run trained on, and the machine. It passes when every run finished, started as 3
pipelines on 4 nodes, recovered from memory where a node was killed, and its losses are within
``LOSS_RTOL`` of its reference's (docs/design.md#mixed-precision says why they are close but not equal).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks.jobs import (
    compare_with_reference,
    launch,
    machine_info,
    read_jsonl,
    run_and_report,
    step_losses,
    tiny_gpt,
    train_reference,
    write_config,
)

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16", "fp16")
#: the loss bound against train-local over the whole run, as in tests/test_precision.py: both compute the
#: same values at every layer boundary; only float32 gradient sums run in another order, and a 16-bit cast
#: can turn that rounding into a 2**-8 (bf16) or 2**-11 (fp16) relative change of an element, which grows
#: over the steps (measured over 50 steps: at most 1.5e-4 in bf16, 3.6e-5 in fp16)
LOSS_RTOL = 1e-3
RUN_TIMEOUT_S = 900.0


def job(work: Path, precision: str, steps: int, kill: bool) -> dict[str, Any]:
    faults = [{"step": steps // 2, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]}] if kill else []
    raw = tiny_gpt(work / "profiles", 4, steps, f=2, faults=faults, heartbeat_timeout_s=2.0)
    raw["model"]["dtype"] = "float32"
    raw["training"]["global_batch"] = 3 * raw["training"]["microbatch"]
    raw["training"]["precision"] = precision
    return raw


def run(work: Path, steps: int, png: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    references: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        ref_dir = train_reference(write_config(work / f"{precision}-ref.yaml", job(work, precision, steps, False)), work / f"{precision}-ref")
        references[precision] = {"losses": step_losses(ref_dir), "dir": ref_dir}
    for precision, kill in [(p, False) for p in PRECISIONS] + [("bf16", True), ("fp16", True)]:
        name = f"{precision}{'-kill' if kill else ''}"
        config = write_config(work / f"{name}.yaml", job(work, precision, steps, kill))
        launched = launch(config, work / name)
        code = launched.wait(RUN_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"oobleck run of {name} failed ({code}); log: {launched.log}")
        metrics = read_jsonl(work / name / "metrics.jsonl")
        runs.append(
            {
                "name": name,
                "precision": precision,
                "killed_node_at_step": steps // 2 if kill else None,
                "losses": step_losses(work / name),
                "skipped_steps": [r["step"] for r in metrics if not math.isfinite(r["grad_norm"])],
                # (nodes alive, pipelines) in step order, each change once
                "plans": [list(p) for p in dict.fromkeys((r["nodes_alive"], r["pipelines"]) for r in metrics)],
                "recoveries": read_jsonl(work / name / "recoveries.jsonl"),
                "reference": compare_with_reference(work / name, references[precision]["dir"], steps),
            }
        )
    checks = {
        f"{r['name']} within {LOSS_RTOL:g} of train-local": r["reference"]["max_loss_rel_diff"] < LOSS_RTOL
        and not r["reference"]["missing_steps"]
        for r in runs
    }
    checks.update({f"{r['name']} started as 3 pipelines on 4 nodes": r["plans"][0] == [4, 3] for r in runs})
    checks.update(
        {f"{r['name']} recovered from memory": [x["mode"] for x in r["recoveries"]] == ["memory"] for r in runs if r["killed_node_at_step"]}
    )
    report = {
        "steps": steps,
        "runs": runs,
        "references": {p: ref["losses"] for p, ref in references.items()},
        "checks": checks,
        "passed": all(checks.values()),
        "machine": machine_info(),
    }
    plot(report, png)
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Top: every run's loss per step (train-local dashed, a killed run's as crosses, the kill as a dotted
    line, fp16's skipped steps as circles). Bottom: each run's relative loss difference from train-local."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 2])
    references = {p: {int(s): v for s, v in losses.items()} for p, losses in report["references"].items()}
    for precision, losses in references.items():
        steps = sorted(losses)
        top.plot(steps, [losses[s] for s in steps], "--", color=colors[precision], lw=3, alpha=0.3, label=f"{precision} train-local")
    for r in report["runs"]:
        losses = {int(s): v for s, v in r["losses"].items()}
        steps = sorted(losses)
        color = colors[r["precision"]]
        killed = r["killed_node_at_step"] is not None
        style: dict[str, Any] = {"marker": "x", "ls": "none", "ms": 4} if killed else {"lw": 1}
        top.plot(steps, [losses[s] for s in steps], color=color, label=f"{r['name']} oobleck run", **style)
        if r["skipped_steps"] and not killed:
            top.plot(r["skipped_steps"], [losses[s] for s in r["skipped_steps"]], "o", mfc="none", color=color, label=f"{r['precision']}: step skipped (overflow)")
        if killed:
            top.axvline(r["killed_node_at_step"], color="gray", ls=":", lw=1)
        want = references[r["precision"]]
        diffs = [abs(losses[s] - want[s]) / want[s] for s in steps]
        bottom.plot(steps, diffs, color=color, ls=":" if killed else "-", lw=1, label=r["name"])
    top.text(report["steps"] // 2, top.get_ylim()[1], " node 1 killed (-kill runs)", va="top", fontsize=8, color="gray")
    top.set_ylabel("loss")
    top.set_title("tiny GPT on 4 nodes: 2 + 1 + 1 pipelines (1 + 1 + 1 after the kill)")
    top.legend(fontsize=7, ncol=2)
    bottom.set_yscale("symlog", linthresh=1e-9)
    bottom.set_ylim(0, 1e-3)
    bottom.set_ylabel("|run - train-local| / train-local")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(report: dict[str, Any]) -> str:
    lines = []
    for r in report["runs"]:
        c = r["reference"]
        lines.append(
            f"{r['name']:10} final loss {r['losses'][report['steps'] - 1]:.4f}; vs train-local max relative difference "
            f"{c['max_loss_rel_diff']:.1e} (losses), {c['max_param_rel_diff']:.1e} (final parameters); "
            f"skipped steps {r['skipped_steps']}"
        )
    lines.append(
        "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items())
        + f" -> {'PASSED' if report['passed'] else 'FAILED'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_losses", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "precision_losses.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "precision_losses.png")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error(f"--steps: got {args.steps}; must be at least 4 (a node is killed half-way)")
    work = lambda path: run(path, args.steps, args.png)  # noqa: E731
    return run_and_report(parser.prog, "oobleck-precision-", args.keep, args.out, work, summary)


if __name__ == "__main__":
    raise SystemExit(main())
