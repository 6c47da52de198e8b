"""DeepSpeed's pipeline engine on exactly the layers, partition, data and optimizer our engine uses.

The benchmark in :mod:`benchmarks.engine` runs this side by side with our engine. Everything that decides
the amount of work is shared with it: the layers come from ``ModelSpec.build_layer`` (same seed, same
dtype), the microbatches from the job's :class:`~models.data.BatchSource`, the optimizer from
:func:`oobleck.training.make_optimizer`, and the stage boundaries are given explicitly. What differs is
only what each engine does around the layers (schedule, p2p, tied-gradient sync, step).

Adapting our layers to DeepSpeed
    DeepSpeed's layers take one input and the last stage's loss function gets the labels, while our
    layers take ``(carry, mb)`` and our head computes the loss itself. So the first layer is fed
    ``MicroBatch({"tokens": x})``, the middle layers get an empty microbatch, and the head's logits path
    (``GPTHead.logits``) feeds DeepSpeed's ``loss_fn``, the mean cross-entropy. DeepSpeed divides that by
    the number of microbatches; our engine divides the summed loss by the global token count: the same
    arithmetic, so the same work.

Tied weights
    The embedding and the head share one weight (``ModelSpec.tied``). DeepSpeed ties through a
    ``TiedLayerSpec``: one module, built on every stage that holds either end, whose tied attribute has its
    gradient all-reduced between those stages. :class:`TiedEnds` holds both end layers with the tied
    Parameter shared, and the two ends of the list call its ``embed`` and ``logits``.

The op build DeepSpeed does at start
    ``deepspeed.comm.torch.TorchBackend.__init__`` calls ``build_shm_op()``, which JIT-compiles the CPU
    accelerator's ``ShareMemCommBuilder`` op (``csrc/cpu/comm/shm.cpp``, ~50 s here) whenever
    ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` is true. No environment variable skips it
    (``DS_BUILD_SHM_COMM`` only matters when DeepSpeed itself is installed with prebuilt ops). The
    compatibility table is computed lazily on first access and cached as a module attribute, so assigning
    it before ``init_distributed`` skips the build (:func:`skip_shm_op_build`). Nothing in training loses
    by it: the op only serves ``inference_all_reduce``; the pipeline engine's p2p and all-reduces go
    through ``torch.distributed`` (gloo) either way.

Run one worker per stage with ``python -m benchmarks.ds_pipeline RUN_JSON OUT_JSON`` and the usual
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` environment; :func:`run_deepspeed`
does that for all stages and collects the results.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Layer, MicroBatch, ModelSpec
from models.data import BatchSource

REPO_ROOT = Path(__file__).resolve().parent.parent

#: the name DeepSpeed's compatibility table gives the shared-memory communication op
SHM_OP_NAME = "deepspeed_shm_comm"


@dataclass(frozen=True)
class DSRun:
    """What every DeepSpeed worker of one run needs (JSON-able).

    ``parts`` are DeepSpeed's stage boundaries: stage ``s`` holds layers ``[parts[s], parts[s + 1])``;
    ``parts[0] == 0`` and ``parts[-1]`` is the number of layers. The run does ``warmup + steps`` training
    steps; step ``i`` trains on the job's global batch of step ``i``.
    """

    config: dict[str, Any]
    parts: tuple[int, ...]
    warmup: int
    steps: int
    threads: int
    timeout_s: float


class TiedEnds(nn.Module):
    """The first and the last layer of a model whose tied groups join exactly those two layers, with each
    tied Parameter shared, so DeepSpeed can build it on both end stages as one tied module."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        last = spec.num_layers - 1
        self.first = spec.build_layer(0)
        self.last = spec.build_layer(last)
        for group in spec.tied:
            if len(group) != 2 or (group[0][0], group[1][0]) != (0, last):
                raise ValueError(f"tied group {group} does not join the first and the last layer")
            (_, first_name), (_, last_name) = group
            module_path, _, leaf = last_name.rpartition(".")
            owner = self.last.get_submodule(module_path) if module_path else self.last
            setattr(owner, leaf, self.first.get_parameter(first_name))

    @staticmethod
    def tied_attributes(spec: ModelSpec) -> list[str]:
        """The attribute paths (on a :class:`TiedEnds`) of the Parameters whose gradients DeepSpeed sums."""
        return [f"first.{group[0][1]}" for group in spec.tied]


def _embed(ends: TiedEnds, tokens: torch.Tensor) -> torch.Tensor:
    return ends.first(None, MicroBatch({"tokens": tokens}))


def _logits(ends: TiedEnds, x: torch.Tensor) -> torch.Tensor:
    return ends.last.logits(x)


class CarryLayer(nn.Module):
    """A middle layer of the list as DeepSpeed calls it: one tensor in, one tensor out. Fits layers that
    read nothing from the microbatch and add no auxiliary losses (a GPT block)."""

    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.layer: Layer = spec.build_layer(index)
        self._empty = MicroBatch({})

    def forward(self, carry: torch.Tensor) -> torch.Tensor:
        return self.layer(carry, self._empty)


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's per-microbatch loss: cross-entropy averaged over the microbatch's target tokens."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def skip_shm_op_build() -> None:
    """Mark DeepSpeed's shared-memory communication op incompatible so ``init_distributed`` does not
    JIT-compile it (see the module notes). Call before ``deepspeed.init_distributed``."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {SHM_OP_NAME: False}


def pipeline_module(spec: ModelSpec, parts: tuple[int, ...]) -> nn.Module:
    """A ``deepspeed.pipe.PipelineModule`` of ``spec``'s layers cut at ``parts`` (one stage per process)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    class FixedPartition(PipelineModule):
        # DeepSpeed 0.19.8 offers only computed partitions (uniform, by parameters, by layer type);
        # overriding the hook that computes them gives the exact boundaries our engine runs.
        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    last = spec.num_layers - 1
    attrs = TiedEnds.tied_attributes(spec)
    layers = [
        TiedLayerSpec("ends", TiedEnds, spec, forward_fn=_embed, tied_weight_attr=attrs),
        *(LayerSpec(CarryLayer, spec, i) for i in range(1, last)),
        TiedLayerSpec("ends", TiedEnds, spec, forward_fn=_logits, tied_weight_attr=attrs),
    ]
    return FixedPartition(layers=layers, num_stages=len(parts) - 1, loss_fn=mean_cross_entropy)


def microbatches(batches: BatchSource, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Step ``step``'s microbatches as DeepSpeed's ``(inputs, labels)`` pairs, built only when pulled
    (DeepSpeed pulls only on the first and the last stage)."""
    for k in range(batches.num_microbatches):
        data = batches.microbatch(step, k).data
        yield data["tokens"], data["targets"]


def deepspeed_config(global_batch: int, microbatch: int) -> dict[str, Any]:
    """DeepSpeed config for one pipeline (no data parallelism), fp32, clipping off, no logging."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": microbatch,
        "gradient_accumulation_steps": global_batch // microbatch,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def worker_main(run: DSRun, out_path: Path) -> None:
    """Run one stage: init, train ``warmup + steps`` steps, write ``{"rank", "step_end_times",
    "step_end_cpu", "losses"}`` (``time.perf_counter()`` and this process's CPU time ``time.process_time()``
    after each step, and DeepSpeed's mean loss of each step) to ``out_path``."""
    torch.set_num_threads(run.threads)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from oobleck.config import config_from_dict
    from oobleck.model_building import build_batches, build_model
    from oobleck.training import lr_at, make_optimizer, set_lr

    ds_logger.setLevel(logging.WARNING)
    skip_shm_op_build()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=run.timeout_s), verbose=False)
    job = config_from_dict(run.config)
    spec = build_model(job.model, job.training.seed)
    batches = build_batches(job, spec)
    module = pipeline_module(spec, run.parts)
    optimizer = make_optimizer(module.named_parameters(), job.training)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=deepspeed_config(job.training.global_batch, job.training.microbatch),
    )
    times, cpu, losses = [], [], []
    for step in range(run.warmup + run.steps):
        set_lr(optimizer, lr_at(step, job.training))
        loss = engine.train_batch(microbatches(batches, step))
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        losses.append(float(loss))
    result = {"rank": engine.global_rank, "step_end_times": times, "step_end_cpu": cpu, "losses": losses}
    out_path.write_text(json.dumps(result))


def free_port() -> int:
    """A TCP port free on loopback right now (DeepSpeed's env:// rendezvous needs a number up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(run: DSRun) -> list[dict[str, Any]]:
    """Launch one worker process per stage on this machine, wait for all, and return their results in
    rank order. Raises RuntimeError with the failing rank's stderr tail if any worker fails or the run
    exceeds ``run.timeout_s``."""
    world = len(run.parts) - 1
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        run_file = Path(tmp, "run.json")
        run_file.write_text(json.dumps(asdict(run)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": str(run.threads),
        }
        procs = []
        for rank in range(world):
            log = open(Path(tmp, f"rank{rank}.log"), "wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.ds_pipeline", str(run_file), str(Path(tmp, f"rank{rank}.json"))],
                    cwd=REPO_ROOT,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + run.timeout_s
        try:
            for rank, proc in enumerate(procs):
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    tail = Path(tmp, f"rank{rank}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"DeepSpeed rank {rank} exited with {code}:\n{tail}")
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"DeepSpeed run exceeded {run.timeout_s} s") from None
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world)]


if __name__ == "__main__":
    raw = json.loads(Path(sys.argv[1]).read_text())
    raw["parts"] = tuple(raw["parts"])
    worker_main(DSRun(**raw), Path(sys.argv[2]))
