"""diffusers' UNet2DModel and DiTTransformer2DModel through ``oobleck run`` with a node killed mid-run reproduce
``train-local`` (fp64).

The UNet is the interesting case: its skip connections cross the stage boundary (the 2-node template cuts
its 7 layers in two; every cut but the one before the head leaves skip tensors pending), so the carry the
engine sends, and sends again after the recovery, holds them.

Neither job's model has an attention key bias: its gradient is 0 up to rounding, and AdamW's moments of that
noise depend on the summation order, so they could not be compared at 1e-9 (the split equivalence with
attention biases is tests/test_diffusers_models.py's). The UNet has no attention; the DiT's attention has no
biases (``attention_bias: false``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.jobs import QUICK_PROFILE
from tests.run_helpers import ReferenceRun, assert_matches_reference, recoveries, run_job
from tests.test_diffusers_models import DIT, UNET

PLAIN_UNET = {**UNET, "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2, "add_attention": False}
#: (architecture, config, device memory in GiB: small enough that a pipeline needs 2 nodes, so 4 nodes run 2)
JOBS = {"unet2d": (PLAIN_UNET, 0.0012), "dit": ({**DIT, "attention_bias": False}, 0.0009)}

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.mark.parametrize("architecture", sorted(JOBS))
def test_run_with_a_node_killed_matches_train_local(
    architecture: str, tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    config, memory_gib = JOBS[architecture]
    raw = {
        "model": {"family": "diffusers", "architecture": architecture, "dtype": "float64", "config": config},
        "data": {"dataset": "digits"},
        "training": {"steps": 5, "global_batch": 8, "microbatch": 2, "lr": 3e-3, "seed": 1},
        "cluster": {"nodes": 4, "devices_per_node": 1, "device": "cpu", "device_memory_gib": memory_gib},
        "fault_tolerance": {"f": 1, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 2.0},
        "profile": {"cache_dir": str(profile_dir), **QUICK_PROFILE},
        "faults": [{"step": 2, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]}],
    }
    run_dir, output = run_job(tmp_path, raw)
    assert_matches_reference(run_dir, raw, reference_run(raw))
    found = recoveries(run_dir)
    assert [r["lost"] for r in found] == [["node1"]], output[-2000:]
    assert found[0]["start_step"] == 2 and found[0]["steps_lost"] == 0
