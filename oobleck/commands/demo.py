"""Train the tiny GPT of ``examples/demo.yaml`` on 5 local nodes (f=1) and explain what happened.

The planner covers the 5 nodes with two pipelines of different lengths, 3 nodes + 2 nodes. During the
backward pass of step 11 node2 (the last stage of the 3-node pipeline) is killed with SIGKILL. The 4
survivors are re-planned as 2+2 pipelines from the same templates, and each layer that a survivor now
needs is copied from a surviving replica in memory. No step is lost.

After training the demo prints the layout before and after the failure, and which layers each survivor
received from which holders. It then checks three things: the master's recovery record copied exactly those
layers from memory, the record lost no step, and every step's loss equals (within float32 rounding) that of
the same config trained failure-free in this one process. It exits 1 when a check fails.
``--no-failure`` trains without the failure and still compares the losses.

It takes about 25 s on two idle cores once the model's layer profile is cached (its first run profiles the
layers first; other work on the CPUs makes it slower).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from oobleck.commands.run import train
from oobleck.config import JobConfig, load_config
from oobleck.errors import OobleckError

if TYPE_CHECKING:
    from oobleck.control.placement import PipelineShape

#: each pipeline's stages as (node, the layers the stage holds)
Layout = list[list[tuple[str, range]]]

HELP = "train a tiny GPT on 5 local nodes, kill one, recover and check the losses"

#: the repository's examples folder (the demo runs from a source checkout)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
#: largest difference allowed between a step's loss and the single-process reference's. The pipelines sum
#: the same float32 terms in another order (per stage, then across pipelines), which moved a loss by at
#: most 1.4e-5 in 20 steps here; a wrong step (a lost or repeated microbatch, stale weights) moves it by
#: 1e-2 or more
LOSS_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--no-failure", action="store_true", help="do not kill a node half way")


def run(args: argparse.Namespace) -> int:
    if not EXAMPLE.exists():
        raise OobleckError(f"demo config {EXAMPLE} is missing; run the demo from a source checkout of Oobleck")
    config = load_config(EXAMPLE)
    config.run.dir = args.run_dir
    if args.no_failure:
        config.faults = []
    victims = sorted({node for fault in config.faults for node in fault.nodes})
    for fault in config.faults:
        print(
            f"demo: {', '.join(f'node{n}' for n in fault.nodes)} will be killed (SIGKILL) during the "
            f"{fault.phase} pass of step {fault.step + 1}"
        )
    code = train(config)
    if code != 0:
        return code
    ok = _explain_recovery(config, victims) if victims else True
    return 0 if _compare_losses(config) and ok else 1


def _explain_recovery(config: JobConfig, victims: list[int]) -> bool:
    """Print the layouts before and after losing ``victims`` and the layers the survivors had to receive;
    True when the master's recovery record copied that many layers from memory and lost no step."""
    from oobleck.control.planning import job_planner
    from oobleck.metrics import RECOVERIES_FILE, read_metrics

    # the master places pipelines on the live nodes in name order, with the planner the run used (its
    # profile is cached by now); the local launcher names nodes node0, node1, ...
    planner = job_planner(config)
    nodes = [f"node{i}" for i in range(config.cluster.nodes)]
    survivors = [name for i, name in enumerate(nodes) if i not in victims]
    before = _layout(planner(nodes), nodes, config.cluster.devices_per_node)
    after = _layout(planner(survivors), survivors, config.cluster.devices_per_node)
    print(f"demo: before the failure, {len(nodes)} nodes: {_describe(before)}")
    lost = ", ".join(nodes[i] for i in victims)
    print(f"demo: after losing {lost}, {len(survivors)} nodes: {_describe(after)}")

    copies = _copies(before, after, survivors)
    moved = sum(len(layers) for _, layers, _ in copies)
    if copies:
        listed = "; ".join(f"{node} gets {_span(layers)} from {' or '.join(held)}" for node, layers, held in copies)
        print(f"demo: the re-plan needs {moved} layers copied from surviving replicas: {listed}")

    records = read_metrics(config.run.dir, RECOVERIES_FILE)
    if len(records) != 1:
        print(f"demo: CHECK FAILED: expected one recovery, the run recorded {len(records)}")
        return False
    record = records[0]
    print(
        f"demo: the master's recovery record: {record['layers_moved']} layers copied from {record['mode']}, "
        f"{record['steps_lost']} steps lost"
    )
    if (record["mode"], record["layers_moved"], record["steps_lost"]) != ("memory", moved, 0):
        print(f"demo: CHECK FAILED: expected {moved} layers copied from memory and 0 steps lost")
        return False
    return True


def _layout(shapes: list[PipelineShape], nodes: list[str], devices_per_node: int) -> Layout:
    """Each pipeline's stages as (node, layers), placed the way the master places them (``node:device``
    when a node has several devices)."""
    from oobleck.control.placement import place

    placement = place(shapes, nodes, devices_per_node)
    where = {
        rank: f"{node}:{device}" if devices_per_node > 1 else node for (node, device), rank in placement.ranks.items()
    }
    return [[(where[r], range(a, b)) for r, (a, b) in zip(p.ranks, p.layer_ranges)] for p in placement.pipelines]


def _copies(before: Layout, after: Layout, survivors: list[str]) -> list[tuple[str, range, list[str]]]:
    """The layers each stage of ``after`` needs and did not hold in ``before``, as (receiver, consecutive
    layers, the survivors that held them), in receiver order."""
    held = {where: set(layers) for stages in before for where, layers in stages}
    copies: list[tuple[str, range, list[str]]] = []
    for stages in after:
        for where, layers in stages:
            for layer in sorted(set(layers) - held[where]):
                holders = [n for n in survivors if layer in held[n]]
                last = copies[-1] if copies else None
                if last is not None and (last[0], last[1].stop, last[2]) == (where, layer, holders):
                    copies[-1] = (where, range(last[1].start, layer + 1), holders)
                else:
                    copies.append((where, range(layer, layer + 1), holders))
    return copies


def _describe(layout: Layout) -> str:
    return "; ".join(
        f"pipeline {i} = " + " | ".join(f"{where} {_span(layers)}" for where, layers in stages)
        for i, stages in enumerate(layout)
    )


def _span(layers: range) -> str:
    """``layer 3`` or ``layers 3-5`` (inclusive, as the plan's tables print layer ranges)."""
    return f"layer {layers.start}" if len(layers) == 1 else f"layers {layers.start}-{layers.stop - 1}"


def _compare_losses(config: JobConfig) -> bool:
    """Train ``config`` failure-free in this process and compare every step's loss with the run's."""
    import torch

    from oobleck.metrics import read_metrics
    from oobleck.train_local import train_local

    # one thread: with two, OpenMP's threads spin against other work, and on this 2-core machine under load the
    # reference took minutes instead of seconds
    torch.set_num_threads(1)
    print(f"demo: training the same config failure-free in one process for reference ({config.training.steps} steps)")
    reference = train_local(config)  # one process runs no pipelines: config.faults play no part
    # a step re-run after a checkpoint restore appears again; its later row counts
    losses = {row["step"]: row["loss"] for row in read_metrics(config.run.dir)}
    if sorted(losses) != list(range(len(reference.losses))):
        print(f"demo: CHECK FAILED: the run committed steps {sorted(losses)}, not 0..{len(reference.losses) - 1}")
        return False
    worst = max(abs(losses[step] - loss) for step, loss in enumerate(reference.losses))
    if worst > LOSS_TOLERANCE:
        print(f"demo: CHECK FAILED: a loss differs from the reference by {worst:.1e} (tolerance {LOSS_TOLERANCE:.0e})")
        return False
    print(
        f"demo: all {len(losses)} losses equal the failure-free reference's (largest difference {worst:.1e}, "
        f"tolerance {LOSS_TOLERANCE:.0e}): "
        + ("the failure did not change the training" if config.faults else "the pipelines compute what one process does")
    )
    return True
