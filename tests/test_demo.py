"""The demo's job (``examples/demo.yaml``) shows what it claims, checked without running it: the planner
covers its 5 nodes with a 3-node and a 2-node pipeline, and losing the configured node re-plans the 4
survivors as 2+2 pipelines in which survivors must receive layers from surviving replicas (which ones
depends on the measured profile's timings; that some must does not)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.jobs import QUICK_PROFILE
from oobleck.commands import demo
from oobleck.config import load_config
from oobleck.control.planning import job_planner


def test_demo_plans_heterogeneous_pipelines_and_its_failure_moves_layers(tmp_path: Path) -> None:
    config = load_config(demo.EXAMPLE)
    # a quick profile in a private cache: the plan depends on memory (exact bytes), not on the timings
    config.profile = dataclasses.replace(config.profile, cache_dir=str(tmp_path / "profiles"), **QUICK_PROFILE)
    planner = job_planner(config)
    nodes = [f"node{i}" for i in range(config.cluster.nodes)]
    [fault] = config.faults
    survivors = [name for i, name in enumerate(nodes) if i not in fault.nodes]

    before = demo._layout(planner(nodes), nodes, config.cluster.devices_per_node)
    after = demo._layout(planner(survivors), survivors, config.cluster.devices_per_node)

    assert [len(stages) for stages in before] == [3, 2]
    assert [len(stages) for stages in after] == [2, 2]
    copies = demo._copies(before, after, survivors)
    assert copies and all(holders for _, _, holders in copies), "every copy needs a surviving holder"
    # where the stages are cut depends on the measured timings, but node1 always takes the pipeline's new last
    # stage, whose last layer only node4 (the last stage of the other pipeline) still holds
    received = {(node, layer): holders for node, layers, holders in copies for layer in layers}
    assert received[("node1", 5)] == ["node4"]
