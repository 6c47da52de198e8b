"""A worker: runs one pipeline stage of the current generation's plan.

``run_worker(assignment, store_key)`` joins the generation's world through the master's store, builds its stage's
layers, creates the gradient-sync groups and trains steps ``[assignment.start_step, training.steps)``.
One step on a worker:

1. load the pipeline's microbatches (every stage loads them itself; the data is a function of seed and
   step; a helper thread loads the next step's while this one synchronises) and run them under 1F1B
   (:mod:`oobleck.engine.stage`);
2. sum every gradient over the ranks holding it (:mod:`oobleck.engine.gradsync`; with
   ``training.overlap_grad_sync`` the sums start during step 1's last backward pass);
3. one world all-reduce of (squared-norm shares, unit count): the global unit count ``U`` and
   norm follow, and every gradient is scaled by ``clip_coefficient(norm) / U`` (the reference divides the
   loss by ``U`` before backward; dividing after the sum gives the same numbers up to rounding);
4. report ready and wait for the master's commit (:mod:`oobleck.engine.commit`); an abort raises
   :class:`~oobleck.engine.commit.StepAborted` before any optimizer has stepped;
5. every layer's optimizer steps at ``lr_at(step)``, its step count advances, gradients are dropped.

After the last step the final checkpoint is written: each layer by its lowest-rank holder, then (after a
barrier) ``meta.json`` by rank 0. ``fault_tolerance.checkpoint_every`` adds periodic checkpoints the same
way. ``python -m oobleck.engine.worker --assignment-file PATH --token-file TOKEN`` runs a worker from an
assignment's JSON (the token signs its store values, see :mod:`oobleck.engine.signed_store`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

# Both must be imported before the first process group exists: torch.distributed.nn binds the WORLD group
# as a default argument at import (gloo sockets then leak and failures stop cascading), and torch._dynamo,
# which any optimizer imports, imports it.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401

from models.base import MicroBatch, ModelSpec
from models.data import BatchSource
from oobleck import checkpoint
from oobleck.config import JobConfig, config_from_dict
from oobleck.engine import host_staging, interrupt
from oobleck.engine.api import Assignment, Restore
from oobleck.engine.commit import report_ready
from oobleck.engine.gradsync import GradSync, layer_holders
from oobleck.engine.layer_moves import export_layer, import_layer, moments_by_param, run_moves
from oobleck.engine.shadow import Shadow
from oobleck.engine.signed_store import SignedStore, store_key
from oobleck.engine.stage import HeldLayer, StageExecutor, build_stage_layers
from oobleck.errors import OobleckError
from oobleck.model_building import build_batches, build_model
from oobleck.precision import LossScale, skips_overflow
from oobleck.training import clip_coefficient, lr_at, set_lr

log = logging.getLogger(__name__)

#: backstop for every collective and p2p operation (gloo's default is 30 minutes); failures are normally
#: seen far sooner, when a dead peer's sockets close
COLLECTIVE_TIMEOUT = timedelta(seconds=120)

#: called with (step, phase) as a step passes "forward", "backward" (first of each in the step), "sync",
#: "optimizer", "checkpoint", and "recovery" (layers about to move in a new generation), and with
#: (training.steps, "exit") once the final checkpoint is written (:mod:`oobleck.engine.elastic`); failure
#: injection hooks in here. A hook returning True at "sync" puts an inf into this rank's summed gradients of
#: the step and its norm share (the ``overflow`` fault, fp16 only; any other return value is ignored)
PhaseHook = Callable[[int, str], object]


class StageWorker:
    """The state of one worker in one generation: its layers, links, sync groups and step loop.

    Constructing it is collective (it creates the sync groups); the process group must exist. ``spec`` and
    ``batches`` are the job's model spec and batch source (``build_model``/``build_batches`` of ``config``).
    """

    def __init__(
        self,
        assignment: Assignment,
        config: JobConfig,
        store: SignedStore,
        spec: ModelSpec,
        batches: BatchSource,
        pool: dict[int, HeldLayer] | None = None,
        on_phase: PhaseHook | None = None,
    ) -> None:
        self.assignment = assignment
        self.config = config
        self.store = store
        self.rank = assignment.rank
        self.device = torch.device(assignment.device)
        self.spec = spec
        self.batches = batches
        self.on_phase = on_phase or (lambda step, phase: None)
        _, self.plan = assignment.my_pipeline
        stage = self.plan.stage_of(self.rank)
        assert stage is not None
        num_stages = len(self.plan.ranks)
        shadowed = self.plan.shadow_stage(stage) if assignment.redundant else None
        started = time.perf_counter()
        ranges = [self.plan.layer_ranges[stage]] + ([self.plan.layer_ranges[shadowed]] if shadowed is not None else [])
        held = self._take_layers(pool or {}, [i for a, b in ranges for i in range(a, b)])
        self.transfer_s = time.perf_counter() - started
        first, last = self.plan.layer_ranges[stage]
        self.layers = held[: last - first]
        #: the Bamboo-style baseline's shadow of the successor stage (None otherwise)
        self.shadow: Shadow | None = None
        if shadowed is not None:
            self.shadow = Shadow(
                held[last - first :], self.plan.ranks[stage - 1], self.plan.ranks[shadowed], config.training.precision, self.device
            )
        self.executor = StageExecutor(
            self.spec,
            self.layers,
            stage,
            num_stages,
            self.plan.num_microbatches,
            prev=self.plan.ranks[stage - 1] if stage > 0 else None,
            next_=self.plan.ranks[stage + 1] if stage + 1 < num_stages else None,
            device=self.device,
            redundant=self.shadow.forward if self.shadow is not None else None,
            recompute=self.plan.recomputes(stage) or config.training.recompute == "full",
            precision=config.training.precision,
        )
        #: the plan's predicted peak memory of this stage (0 without one), reported with the measured peak
        self.predicted_bytes = self.plan.prediction(stage)
        self.sync = GradSync(
            self.rank,
            assignment.pipelines,
            self.spec.num_layers,
            self.spec.tied,
            self.layers,
            self.device,
            COLLECTIVE_TIMEOUT,
            overlap=config.training.overlap_grad_sync,
        )
        holders = layer_holders(assignment.pipelines, self.spec.num_layers)
        #: layers this rank writes into checkpoints (it is their lowest-rank holder)
        self.writes = [h for h in self.layers if min(holders[h.index]) == self.rank]
        self.run_dir = Path(config.run.dir)
        #: one thread loads microbatches (the batch source is used from that thread only)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._loading: dict[int, Future[list[MicroBatch]]] = {}
        #: one thread writes periodic checkpoints while training goes on
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        #: a step whose gradients are reported ready but not applied yet (see :meth:`settle`)
        self.pending: int | None = None
        #: whether the pending step's gradients overflowed (fp16): applying it then skips the optimizers
        self.overflow = False
        #: the job's loss scale for the next step: every held layer carries the same one
        self.scale = held[0].scale
        if any(h.scale != self.scale for h in held):
            raise RuntimeError(f"rank {self.rank}: layers carry different loss scales {[h.scale for h in held]}")
        #: whether this generation committed a step: then its layers are the ones the master counts on
        self.committed_any = False
        #: seconds of foreground checkpoint writing to report with the next step
        self._checkpoint_s = 0.0

    @property
    def held(self) -> list[HeldLayer]:
        """Every layer this worker holds at the committed step: its stage's, then its shadow's."""
        return self.layers + (self.shadow.layers if self.shadow is not None else [])

    def _take_layers(self, pool: dict[int, HeldLayer], wanted: list[int]) -> list[HeldLayer]:
        """Layers ``wanted`` (its stage's, then any shadow's; each a contiguous run) at ``start_step``, from
        where ``assignment.restore`` says (see :class:`~oobleck.engine.api.Assignment`). For ``memory``,
        layers held already are reused (or copied, when the stage's range changed) and the plan's moves run,
        in order, on every rank."""
        a = self.assignment
        # layers from an older step (this worker sat out generations as a spare) are not offered or used
        pool = {i: held for i, held in pool.items() if held.step == a.start_step}
        if a.restore == Restore.MEMORY and all(i in pool for i in wanted) and _tied_as_built(self.spec, pool, wanted):
            layers = [pool[i] for i in wanted]  # held already, tied within each run as built: nothing to copy
        else:
            # a layer neither held nor received keeps step -1 and fails the check below
            step = a.start_step if a.restore != Restore.MEMORY else -1
            layers = [
                held
                for first, last in _runs(wanted)
                for held in build_stage_layers(self.spec, first, last, self.config.training, self.device, step)
            ]
        if a.restore == Restore.CHECKPOINT:
            self._load_checkpoint(layers, a.start_step)
        elif a.restore == Restore.INIT:
            self._load_init(layers)
        elif layers[0] is not pool.get(wanted[0]):
            moments = moments_by_param(pool.values())
            for held in layers:
                if held.index in pool:
                    import_layer(export_layer(pool[held.index], moments), held)
        if a.restore == Restore.MEMORY and a.moves:
            self.on_phase(a.start_step, "recovery")
            run_moves(a.moves, self.rank, pool, {h.index: h for h in layers}, self.device)
        stale = [(h.index, h.step) for h in layers if h.step != a.start_step]
        if stale:
            raise RuntimeError(f"rank {self.rank}: layers (index, step) {stale} are not at step {a.start_step}")
        return layers

    def _load_checkpoint(self, layers: list[HeldLayer], step: int) -> None:
        """Load ``layers`` from the run's checkpoint of ``step``."""
        ckpt = checkpoint.checkpoint_dir(self.config.run.dir, step)
        if not checkpoint.is_complete(ckpt):
            raise checkpoint.CheckpointError(
                f"start_step {step}: no complete checkpoint at {ckpt}; start from a step that has one"
            )
        for held in layers:
            held.load(host_staging.to_device(checkpoint.load_layer_state(ckpt, held.index), self.device))

    def _load_init(self, layers: list[HeldLayer]) -> None:
        """Load ``model.init_checkpoint``'s parameters into ``layers`` when one is named."""
        if not self.config.model.init_checkpoint:
            return
        ckpt = checkpoint.init_checkpoint_dir(self.config.model.init_checkpoint)
        for held in layers:
            # DiffFit adds scale factors a pretrained model lacks: they keep their initial values
            state = host_staging.to_device(checkpoint.load_layer_state(ckpt, held.index), self.device)
            checkpoint.restore_layer(state, held.module, strict=not self.config.model.difffit)

    def microbatches(self, step: int) -> list[MicroBatch]:
        start = self.plan.microbatch_start
        return [
            MicroBatch({k: v.to(self.device) for k, v in self.batches.microbatch(step, start + j).data.items()})
            for j in range(self.plan.num_microbatches)
        ]

    def train_step(self, step: int) -> None:
        """Run, synchronise, commit and apply ``step`` (see the module notes)."""
        loading = self._loading.pop(step, None) or self._loader.submit(self.microbatches, step)
        scale = self.scale.value
        arm = self.sync.arm if self.config.training.overlap_grad_sync else None
        try:
            loss_sum, units = self.executor.run(loading.result(), lambda phase: self.on_phase(step, phase), scale, arm)
        except Exception:  # gradient pieces posted during the backward pass must not block the groups' end
            self.sync.abandon()
            raise
        if step + 1 < self.config.training.steps:
            # load the next step's data while this one syncs and waits for the commit (cores are idle then)
            self._loading[step + 1] = self._loader.submit(self.microbatches, step + 1)
        overflow_fault = self.on_phase(step, "sync") is True
        squares = self.sync.reduce()
        if overflow_fault:
            squares = _inject_overflow(self.layers)
        totals = torch.tensor([squares, units], dtype=torch.float64, device=self.device)
        interrupt.wait(interrupt.post(dist.all_reduce, totals, async_op=True), None)
        global_squares, global_units = totals.tolist()
        # the norm (of the unscaled gradients) is one all-reduced number, the same on every rank: a non-finite
        # gradient anywhere makes it non-finite everywhere, so the overflow decision is the job's (fp16)
        self.overflow = skips_overflow(self.config.training.precision) and not math.isfinite(global_squares)
        grad_norm = math.sqrt(global_squares) / (global_units * scale)
        if not self.overflow:  # unscale and clip in one multiply (the scale is a power of two: exact)
            self.sync.scale(clip_coefficient(grad_norm, self.config.training.grad_clip) / (global_units * scale))
        if self.shadow is not None:
            self.shadow.exchange_gradients(self.layers)
        self.pending = step
        redundant_s = self.shadow.take_seconds() if self.shadow is not None else 0.0
        checkpoint_s, self._checkpoint_s = self._checkpoint_s, 0.0
        memory = (self.executor.memory.peak_bytes(), self.predicted_bytes)
        report_ready(self.store, step, self.rank, loss_sum, units, grad_norm, redundant_s, checkpoint_s, memory)
        self.apply(step)

    def apply(self, step: int) -> None:
        """Apply the committed ``step``: every layer's optimizer steps at ``lr_at(step)`` (a shadow's too;
        its time counts as redundant work of the next step). A step whose gradients overflowed (fp16) steps
        no optimizer and only drops the gradients, on every rank alike. Under fp16 the loss scale is then
        updated (:meth:`~oobleck.precision.LossScale.after`); every held layer carries the new one."""
        lr = lr_at(step, self.config.training)
        if skips_overflow(self.config.training.precision):
            self.scale = self.scale.after(self.overflow)
        for j, held in enumerate(self.layers):
            _step_layer(held, lr, step, self.scale, skip=self.overflow)
            if j == 0:
                self.on_phase(step, "optimizer")  # one layer stepped, the others not yet
        if self.shadow is not None:
            started = time.perf_counter()
            for held in self.shadow.layers:
                _step_layer(held, lr, step, self.scale, skip=self.overflow)
            self.shadow.seconds += time.perf_counter() - started
        self.pending = None
        self.overflow = False
        self.committed_any = True

    def settle(self, next_start: int) -> None:
        """After this generation was interrupted: apply the step whose gradients were reported ready if the
        master committed it (the next generation starts right after it); otherwise drop every gradient,
        including the partial sums of an interrupted backward pass."""
        if self.pending is not None and next_start == self.pending + 1:
            self.apply(self.pending)
            return
        for held in self.held:
            held.optimizer.zero_grad(set_to_none=True)
        self.pending = None
        self.overflow = False

    def save_checkpoint(self, step: int) -> Path:
        """Write this rank's share of the checkpoint of ``step`` (steps applied); rank 0 marks it complete
        once every rank has written its share (collective)."""
        ckpt = checkpoint.checkpoint_dir(self.run_dir, step)
        for j, held in enumerate(self.writes):
            checkpoint.write_layer(ckpt, held.index, held.state())
            if j == 0:
                self.on_phase(step, "checkpoint")  # one layer file written, the others not yet
        if not self.writes:
            self.on_phase(step, "checkpoint")
        interrupt.wait(interrupt.post(dist.barrier, async_op=True), None)
        if self.rank == 0:
            checkpoint.write_meta(ckpt, step, self.spec.num_layers, self.config.to_dict())
            checkpoint.prune(self.run_dir, self.config.fault_tolerance.checkpoint_keep, verified=ckpt)
        return ckpt

    def save_checkpoint_async(self, step: int) -> None:
        """Copy this rank's share of the checkpoint of ``step`` now (to pinned host memory on CUDA,
        :func:`~oobleck.engine.host_staging.snapshot`) and write it from a background thread while training
        goes on; the master writes ``meta.json`` once every layer file exists."""
        payloads = [(h.index, host_staging.snapshot(h.state(), self.device)) for h in self.writes]
        self._writer.submit(self._write_share, step, payloads).add_done_callback(_log_failure)

    def _write_share(self, step: int, payloads: list[tuple[int, dict]]) -> None:
        ckpt = checkpoint.checkpoint_dir(self.run_dir, step)
        for j, (index, payload) in enumerate(payloads):
            if j + 1 == len(payloads):
                self.on_phase(step, "checkpoint")  # the other files are written, this one not yet
            checkpoint.write_layer(ckpt, index, payload)
        if not payloads:
            self.on_phase(step, "checkpoint")

    def train(self) -> None:
        """Train the generation's steps, with periodic checkpoints in the background and the final one at
        the end."""
        steps = self.config.training.steps
        background = self.config.fault_tolerance.policy == "oobleck"
        for step in range(self.assignment.start_step, steps):
            self.train_step(step)
            if self.config.periodic_checkpoint_after(step):
                if background:
                    self.save_checkpoint_async(step + 1)
                else:  # the baselines stall for their checkpoints, as Varuna and Bamboo do
                    started = time.perf_counter()
                    self.save_checkpoint(step + 1)
                    self._checkpoint_s = time.perf_counter() - started
        self.save_checkpoint(steps)

    def close(self) -> None:
        """Stop the loader thread (dropping data loaded ahead) and finish the checkpoint writes under way."""
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)


def _step_layer(held: HeldLayer, lr: float, step: int, scale: LossScale, skip: bool) -> None:
    if not skip:
        set_lr(held.optimizer, lr)
        held.optimizer.step()
    held.optimizer.zero_grad(set_to_none=True)
    held.step = step + 1
    held.scale = scale


def _inject_overflow(layers: list[HeldLayer]) -> float:
    """The ``overflow`` fault, after the gradients are summed (they may be summed during the backward pass):
    put an inf into this rank's summed gradient of its first trainable parameter and return inf, this rank's
    share of the squared norm, as an inf from this rank's backward pass would have made them."""
    param = next(p for held in layers for p in held.module.parameters() if p.requires_grad)
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.view(-1)[0] = math.inf
    return math.inf


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """``indices`` as maximal runs of consecutive layers ``[first, last)``, in order."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _tied_as_built(spec: ModelSpec, pool: dict[int, HeldLayer], wanted: list[int]) -> bool:
    """Whether ``pool``'s layers for ``wanted`` share tied parameters exactly as :func:`build_stage_layers`
    shares them within each run of consecutive layers, and nothing across runs. A stage merged from two
    (a Bamboo takeover) holds two copies where one shared tensor is wanted: it is rebuilt and copied."""
    runs = _runs(wanted)
    run_of = {i: r for r, (first, last) in enumerate(runs) for i in range(first, last)}
    for group in spec.tied:
        by_run: dict[int, set[int]] = {}
        for i, name in group:
            if i in run_of:
                by_run.setdefault(run_of[i], set()).add(id(pool[i].module.get_parameter(name)))
        if any(len(ids) > 1 for ids in by_run.values()) or len(set().union(*by_run.values())) != len(by_run):
            return False
    return True


def _log_failure(done: Future) -> None:
    if done.exception() is not None:
        log.error("writing a checkpoint failed: %s", done.exception())


def settle_imports() -> None:
    """Collect once and freeze what the imports left: later collections then skip torch's huge module
    graph (one collection costs 150-500 ms with torch._dynamo loaded, otherwise)."""
    gc.collect()
    gc.freeze()


def join_world(assignment: Assignment, store_key: bytes) -> SignedStore:
    """Join the generation's process group through the master's store; returns the generation's view of the
    store, whose values are signed with ``store_key`` (torch's own rendezvous keys are not)."""
    base = dist.TCPStore(assignment.store_host, assignment.store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    signed = SignedStore(base, store_key, assignment.store_prefix)
    if assignment.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(assignment.device))

    def init() -> None:
        if assignment.device.startswith("cuda"):  # the current device is per thread
            torch.cuda.set_device(torch.device(assignment.device))
        dist.init_process_group(
            assignment.backend,
            store=signed.raw,
            rank=assignment.rank,
            world_size=assignment.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )

    interrupt.build(init)  # abandoned if the generation ends during it (oobleck.engine.interrupt)
    return signed


def run_worker(assignment: Assignment, store_key: bytes) -> None:
    """Run this worker's stage for the assignment's generation until training ends; raises on failure
    (including :class:`~oobleck.engine.commit.StepAborted` when the master aborts a step)."""
    config = config_from_dict(assignment.config)
    spec = build_model(config.model, config.training.seed)
    batches = build_batches(config, spec)  # imports the model's and the dataset's modules, before the freeze
    settle_imports()
    store = join_world(assignment, store_key)
    try:
        worker = StageWorker(assignment, config, store, spec, batches)
        try:
            worker.train()
        finally:
            worker.close()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oobleck.engine.worker", description="Run one worker.")
    parser.add_argument("--assignment-file", required=True, help="JSON of an oobleck.engine.api.Assignment")
    parser.add_argument("--token-file", required=True, help="the job's token: the store's values are signed with it")
    args = parser.parse_args(argv)
    try:
        assignment = Assignment.from_json(Path(args.assignment_file).read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"error: --assignment-file {args.assignment_file}: {e}; pass an Assignment's JSON", file=sys.stderr)
        return 2
    try:
        key = store_key(Path(args.token_file).read_text().strip())
    except (OSError, ValueError) as e:
        print(f"error: --token-file {args.token_file}: {e}; pass the job's token file", file=sys.stderr)
        return 2
    try:
        run_worker(assignment, key)
    except OobleckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
