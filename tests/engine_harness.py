"""Runs the pipeline engine for real in tests: one ``python -m oobleck.engine.worker`` process per rank, the
TCPStore hosted in the test process (port 0), and the master's side of the step commit run by the test.

``run_engine(config, cuts, microbatches, workdir)`` starts ``len(cuts)`` pipelines: pipeline ``p`` cuts
the layer list at ``cuts[p]`` (``[0, a, b, L]`` gives three stages) and runs ``microbatches[p]``
consecutive microbatches of each step. Ranks are numbered pipeline by pipeline, stage by stage. Every
process is reaped, killed first if need be, whatever happens.
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from oobleck import checkpoint
from oobleck.config import JobConfig
from oobleck.engine.api import Assignment, PipelinePlan
from oobleck.engine.commit import CommitCoordinator, StepReport
from oobleck.engine.signed_store import SignedStore, store_key

REPO = Path(__file__).resolve().parents[1]


@dataclass
class EngineRun:
    reports: list[StepReport]
    #: the final checkpoint (None when a step was aborted)
    checkpoint: Path | None
    #: each worker's output
    logs: list[str]

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.reports]


def plan(cuts: list[list[int]], microbatches: list[int]) -> tuple[PipelinePlan, ...]:
    """Pipelines over consecutive ranks with the given layer cuts and microbatch counts."""
    pipelines = []
    rank = start = 0
    for cut, count in zip(cuts, microbatches):
        stages = len(cut) - 1
        pipelines.append(
            PipelinePlan(
                ranks=tuple(range(rank, rank + stages)),
                layer_ranges=tuple(zip(cut, cut[1:])),
                microbatch_start=start,
                num_microbatches=count,
            )
        )
        rank += stages
        start += count
    return tuple(pipelines)


def run_engine(
    config: JobConfig,
    cuts: list[list[int]],
    microbatches: list[int],
    workdir: Path,
    timeout_s: float = 120.0,
    abort_at: int | None = None,
    redundant: bool = False,
) -> EngineRun:
    """Train ``config`` with the engine over the given pipelines; returns each step's report and the final
    checkpoint. Raises AssertionError with the workers' output when a worker fails, or when a step (the
    first one including start-up) or the final exit takes longer than ``timeout_s``.

    With ``abort_at``, the master aborts that step once every rank is ready instead of committing it; then
    every worker must exit with an error, and no final checkpoint is expected. ``redundant``: every worker
    keeps the Bamboo-style shadow of its successor stage (``Assignment.redundant``)."""
    pipelines = plan(cuts, microbatches)
    world = sum(len(p.ranks) for p in pipelines)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    prefix = "gen0/"
    token = secrets.token_hex(16)
    token_file = workdir / "token"
    token_file.write_text(token)
    coordinator = CommitCoordinator(SignedStore(server, store_key(token), prefix), world)
    config_dict = config.to_dict()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(world):
            assignment = Assignment(
                generation=0,
                rank=rank,
                world_size=world,
                store_host="127.0.0.1",
                store_port=server.port,
                store_prefix=prefix,
                backend="gloo",
                device="cpu",
                pipelines=pipelines,
                config=config_dict,
                redundant=redundant,
            )
            path = workdir / f"assignment_{rank}.json"
            path.write_text(assignment.to_json())
            log = open(workdir / f"worker_{rank}.log", "w+")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "oobleck.engine.worker", "--assignment-file", str(path),
                     "--token-file", str(token_file)],  # fmt: skip
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

        deadline = time.monotonic() + timeout_s

        def failed() -> bool:
            return time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs)

        reports = []
        for step in range(config.training.steps if abort_at is None else abort_at + 1):
            report = coordinator.wait_step(step, failed)
            assert report is not None, f"a worker failed or {timeout_s} s passed at step {step}:\n{_tails(logs)}"
            deadline = time.monotonic() + timeout_s
            if step == abort_at:
                coordinator.abort(step)
            else:
                coordinator.commit(step)
                reports.append(report)
        for p in procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a worker did not finish:\n{_tails(logs)}") from None
        codes = [p.returncode for p in procs]
        assert all((c == 0) == (abort_at is None) for c in codes), f"exit codes {codes}:\n{_tails(logs)}"
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    # the master's part of periodic checkpoints: mark those whose layer files were all written complete
    every = config.fault_tolerance.checkpoint_every
    for step in range(every, config.training.steps, every or config.training.steps):
        checkpoint.complete_if_written(checkpoint.checkpoint_dir(config.run.dir, step), step, cuts[0][-1], config.to_dict())
    if abort_at is not None:
        return EngineRun(reports, None, outputs)
    ckpt = checkpoint.checkpoint_dir(config.run.dir, config.training.steps)
    assert checkpoint.is_complete(ckpt), f"no complete final checkpoint at {ckpt}"
    return EngineRun(reports, ckpt, outputs)


def _tails(logs: list) -> str:
    out = []
    for rank, log in enumerate(logs):
        log.flush()
        log.seek(0)
        out.append(f"--- rank {rank}:\n" + "".join(log.readlines()[-15:]))
    return "\n".join(out)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (absolute error when ``b`` is zero)."""
    a, b = a.double(), b.double()
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def max_param_error(ckpt: Path, layers: list[torch.nn.Module]) -> float:
    """The largest relative error, layer by layer, between a checkpoint's parameters and ``layers``' (all of
    a layer's state-dict tensors taken as one vector). Per layer rather than per tensor: in float32 a
    parameter whose true gradient is zero (an attention key bias) is driven by Adam from rounding noise alone,
    so its own relative error says nothing about the engine."""
    worst = 0.0
    for index, layer in enumerate(layers):
        saved = checkpoint.load_layer_state(ckpt, index)["params"]
        mine = layer.state_dict()
        assert saved.keys() == mine.keys(), f"layer {index}: {sorted(saved)} != {sorted(mine)}"
        flat_saved = torch.cat([saved[name].reshape(-1).double() for name in mine])
        flat_mine = torch.cat([t.reshape(-1).double() for t in mine.values()])
        worst = max(worst, relative_error(flat_saved, flat_mine))
    return worst


def max_optimizer_error(ckpt: Path, reference: Path, num_layers: int) -> float:
    """The largest relative error between two checkpoints' AdamW moments, matched by parameter name, over
    the parameters both optimizers hold (a stage holding the head without the embedding keeps the tied
    weight's state in the head's optimizer, where the single process keeps it in the embedding's). Also
    checks that both count the same number of steps."""
    worst = 0.0
    for index in range(num_layers):
        mine, theirs = (checkpoint.load_layer_state(c, index) for c in (ckpt, reference))
        assert mine["step"] == theirs["step"]
        states = [
            {name: opt["state"][i] for i, name in enumerate(s["param_names"]) if i in opt["state"]}
            for s, opt in ((mine, mine["optimizer"]), (theirs, theirs["optimizer"]))
        ]
        shared = states[0].keys() & states[1].keys()
        assert shared, f"layer {index}: no optimizer state in common"
        for name in shared:
            a, b = states[0][name], states[1][name]
            assert float(a["step"]) == float(b["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                worst = max(worst, relative_error(a[moment], b[moment]))
    return worst


def max_loss_error(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference)
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference) if not math.isnan(b))
