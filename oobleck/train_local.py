"""The single-process reference trainer: the numbers the pipeline engine must reproduce.

One step ``s`` (0-based):

1. zero every gradient;
2. for every microbatch ``k`` of the step, in order: run all layers (``spec.build_all()``, so a tied group
   is one Parameter), ``total = summed main loss + sum(aux losses)``, and backpropagate
   ``total / U``, where ``U`` is the sum of ``spec.loss_units`` over all of the step's microbatches;
3. the step's loss is ``sum of main losses / U`` (auxiliary losses reported apart, in the same units);
4. the global gradient norm over the trainable parameters (each distinct Parameter once) and the clip
   coefficient from :func:`oobleck.training.clip_coefficient` scale every gradient;
5. every optimizer gets ``lr_at(s)`` and steps. There is one AdamW per layer (a shared Parameter belongs
   to the first layer that holds it), exactly as the engine keeps them.

``training.recompute: full`` recomputes every layer in backward (:mod:`oobleck.recompute`), which changes
no number; ``auto`` follows a plan, and one process has none, so it keeps every activation like ``none``.

With ``training.precision`` bf16 or fp16 the layers run as the engine runs them
(:func:`oobleck.precision.forward_layers`: autocast, the carry cast to 16 bits at every layer boundary),
and step 2 backpropagates ``total * S`` (``S`` the loss scale, 1 for bf16) and divides every gradient by
``U * S`` afterwards, as the engine does, so that the 16-bit gradients at layer boundaries are the engine's
numbers. Under fp16 a step whose gradient norm is not finite is skipped (no optimizer steps) and halves
the scale (:class:`oobleck.precision.LossScale`); a fault of kind ``overflow`` at step ``s`` forces that, as
it does in a job. fp32 is exactly the five steps above.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from models.base import Layer, MicroBatch, ModelSpec
from models.data import BatchSource
from models.difffit import LoadReport
from models.sampling import WeightAverage
from oobleck import checkpoint
from oobleck.config import JobConfig, SamplingConfig, TrainingConfig
from oobleck.devices import resolve_device
from oobleck.errors import ConfigError
from oobleck.model_building import build_batches, build_model, load_pretrained_layers
from oobleck.precision import LossScale, compute_dtype, forward_layers, initial_scale, skips_overflow
from oobleck.training import (
    clip_coefficient,
    grad_square_sum,
    layer_optimizers,
    lr_at,
    scale_grads,
    set_lr,
)


@dataclass(frozen=True)
class StepStats:
    """What one step reports (``metrics.jsonl`` holds one of these per line)."""

    step: int
    loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    samples_per_s: float


@dataclass
class LocalResult:
    """The outcome of :func:`train_local`: per-step losses (main loss only), the trained layers and their
    per-layer optimizers, every step's stats, the final checkpoint's folder when one was written, and the
    moving average of the weights when one was kept; ``scale`` is the loss scale after the last step."""

    losses: list[float]
    layers: list[Layer]
    optimizers: list[torch.optim.AdamW]
    spec: ModelSpec
    stats: list[StepStats] = field(default_factory=list)
    checkpoint: Path | None = None
    ema: WeightAverage | None = None
    scale: LossScale = field(default_factory=LossScale)


def trainable_parameters(layers: list[Layer]) -> list[torch.nn.Parameter]:
    """Every distinct trainable Parameter of the layer list, each once, in layer order."""
    seen: set[int] = set()
    params = []
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    return MicroBatch({k: v.to(device) for k, v in mb.data.items()})


def train_step(
    spec: ModelSpec,
    layers: list[Layer],
    optimizers: list[torch.optim.AdamW],
    batches: BatchSource,
    step: int,
    cfg: TrainingConfig,
    device: torch.device = torch.device("cpu"),
    scale: LossScale = LossScale(),
    overflow: bool = False,
) -> StepStats:
    """Run step ``step`` as the module docstring describes and return its stats; ``scale`` is the step's
    loss scale and ``overflow`` forces an inf into the first parameter's gradient (an ``overflow`` fault)."""
    start = time.perf_counter()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    microbatches = [batches.microbatch(step, k) for k in range(batches.num_microbatches)]
    units = sum(spec.loss_units(mb) for mb in microbatches)
    mixed = compute_dtype(cfg.precision) is not None
    main_sum = aux_sum = 0.0
    for mb in microbatches:
        mb = _to_device(mb, device)
        loss = forward_layers(layers, None, mb, cfg.precision, device, ends_model=True, recompute=cfg.recompute == "full")
        aux = sum(mb.aux_losses) if mb.aux_losses else None  # left to right, as a stage adds its own
        total = loss if aux is None else loss + aux
        (total * scale.value if mixed else total / units).backward()
        main_sum += float(loss.detach())
        aux_sum += 0.0 if aux is None else float(aux.detach())
    params = trainable_parameters(layers)
    if overflow:
        params[0].grad.view(-1)[0] = math.inf
    if mixed:
        scale_grads(params, 1.0 / (units * scale.value))
    grad_norm = math.sqrt(grad_square_sum(params))
    lr = lr_at(step, cfg)
    if not (skips_overflow(cfg.precision) and not math.isfinite(grad_norm)):
        scale_grads(params, clip_coefficient(grad_norm, cfg.grad_clip))
        for optimizer in optimizers:
            set_lr(optimizer, lr)
            optimizer.step()
    elapsed = time.perf_counter() - start
    return StepStats(step, main_sum / units, aux_sum / units, lr, grad_norm, batches.global_batch / elapsed)


def save_checkpoint(
    run_dir: Path, step: int, layers: list[Layer], optimizers: list[torch.optim.AdamW], config: JobConfig
) -> Path:
    """Write the checkpoint of ``step`` (steps applied) in the per-layer format of :mod:`oobleck.checkpoint`."""
    ckpt = checkpoint.checkpoint_dir(run_dir, step)
    for index, (layer, optimizer) in enumerate(zip(layers, optimizers)):
        checkpoint.save_layer(ckpt, step, index, layer, optimizer)
    checkpoint.write_meta(ckpt, step, len(layers), config.to_dict())
    checkpoint.prune(run_dir, config.fault_tolerance.checkpoint_keep, verified=ckpt)
    return ckpt


def load_init_checkpoint(path: str | Path, spec: ModelSpec, layers: list[Layer]) -> LoadReport:
    """Load the parameters (not the optimizer state) of every layer from a checkpoint folder, or from the
    latest complete checkpoint of a run folder, with :func:`models.difffit.load_pretrained`'s rules (DiffFit
    scale factors a pretrained model lacks keep their initial value; a class table of another size is
    re-initialised; a learned position table is regridded)."""
    ckpt = checkpoint.init_checkpoint_dir(path)
    meta = checkpoint.read_meta(ckpt)
    if meta["num_layers"] != len(layers):
        raise checkpoint.CheckpointError(
            f"model.init_checkpoint: {ckpt} holds {meta['num_layers']} layers but the model has {len(layers)}; "
            "use a checkpoint of the same model depth"
        )
    states = {i: checkpoint.load_layer_state(ckpt, i)["params"] for i in range(len(layers))}
    return load_pretrained_layers(layers, states, new_num_classes=getattr(getattr(spec, "config", None), "num_classes", None))


def train_local(
    config: JobConfig,
    *,
    run_dir: Path | None = None,
    progress: bool = False,
    on_step: Callable[[StepStats], None] | None = None,
    ema_decay: float | None = None,
) -> LocalResult:
    """Train ``config`` for ``config.training.steps`` steps in this process.

    With ``run_dir``: writes ``metrics.jsonl`` (one :class:`StepStats` per line, rewritten from the
    start), a checkpoint every ``fault_tolerance.checkpoint_every`` steps when that is set, and a final
    checkpoint after the last step. ``progress`` shows a rich progress bar on the terminal; ``on_step``
    is called with each step's stats. With ``ema_decay`` (not None) ``result.ema`` is a
    :class:`~models.sampling.WeightAverage` of that decay, started from the initial (or loaded) weights and
    updated after every step; checkpoints hold the trained weights, not the average.
    """
    t = config.training
    spec = build_model(config.model, t.seed)
    batches = build_batches(config, spec)
    device = resolve_device(config.cluster.device)
    layers = [layer.to(device) for layer in spec.build_all()]
    if config.model.init_checkpoint:
        load_init_checkpoint(config.model.init_checkpoint, spec, layers)
    optimizers = layer_optimizers(layers, t)
    ema = None if ema_decay is None else WeightAverage(layers, ema_decay)
    result = LocalResult([], layers, optimizers, spec, ema=ema, scale=initial_scale(t.precision))
    overflows = {fault.step for fault in config.faults if fault.kind == "overflow"}

    metrics: IO[str] | None = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(run_dir / "metrics.jsonl", "w")
    bar = _ProgressBar(t.steps) if progress else None
    try:
        for step in range(t.steps):
            stats = train_step(spec, layers, optimizers, batches, step, t, device, result.scale, step in overflows)
            if skips_overflow(t.precision):
                result.scale = result.scale.after(not math.isfinite(stats.grad_norm))
            if ema is not None:
                ema.update(layers)
            result.losses.append(stats.loss)
            result.stats.append(stats)
            if metrics is not None:
                metrics.write(json.dumps(dataclasses.asdict(stats)) + "\n")
                metrics.flush()
            if run_dir is not None and config.periodic_checkpoint_after(step):
                save_checkpoint(run_dir, step + 1, layers, optimizers, config)
            if bar is not None:
                bar.update(stats)
            if on_step is not None:
                on_step(stats)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    if run_dir is not None:
        result.checkpoint = save_checkpoint(run_dir, t.steps, layers, optimizers, config)
    return result


class _ProgressBar:
    """A rich progress bar showing step, loss and samples/s."""

    def __init__(self, steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("train", total=steps, loss="-", speed="-")
        self._progress.start()

    def update(self, stats: StepStats) -> None:
        self._progress.update(
            self._task, advance=1, loss=f"{stats.loss:.4f}", speed=f"{stats.samples_per_s:.1f}"
        )

    def close(self) -> None:
        self._progress.stop()


def _sampling_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` if it is a class-conditional diffusion model (a noise schedule and a class count), else a
    ConfigError telling the user to drop ``--samples``."""
    if not hasattr(spec, "schedule") or not getattr(getattr(spec, "config", None), "num_classes", 0):
        raise ConfigError(
            "--samples: the model is not a class-conditional diffusion model; drop --samples "
            "(oobleck sample RUN draws unconditional ones from the checkpoint)"
        )
    return spec


def check_samples(config: JobConfig) -> None:
    """Refuse, before any training, a ``sampling`` section the configured model cannot honour: a guidance
    scale other than 1 without label dropout, or more DDIM steps than the schedule has timesteps. Each is a
    one-line ConfigError naming the field."""
    spec = _sampling_spec(build_model(config.model, config.training.seed))
    model, sampling = spec.config, config.sampling  # type: ignore[attr-defined]
    if sampling.cfg_scale != 1.0 and not getattr(model, "class_dropout", 0.0) > 0:
        raise ConfigError(
            f"sampling.cfg_scale: got {sampling.cfg_scale:g}; guidance needs a model trained with label dropout: "
            "set model.overrides.class_dropout (e.g. 0.1), or sampling.cfg_scale: 1"
        )
    timesteps = spec.schedule.num_timesteps  # type: ignore[attr-defined]
    if sampling.steps > timesteps:
        raise ConfigError(f"sampling.steps: got {sampling.steps}; must be at most the model's num_timesteps ({timesteps})")


def write_samples(
    result: LocalResult,
    path: str | Path,
    sampling: SamplingConfig,
    classes: list[int] | None = None,
    per_class: int = 8,
    seed: int = 0,
) -> Path:
    """Generate ``per_class`` images for each of ``classes`` (all the model's classes for None) with the
    trained diffusion model and save them as one PNG grid with a row per class, each row labelled with its
    class at the left. Samples come from ``result.ema`` when the run kept a moving average (else from the
    trained layers), with ``sampling.steps`` DDIM steps and guidance scale ``sampling.cfg_scale``, noise from
    a generator seeded by ``seed``. Sampling runs on the CPU (``models.sampling`` draws its noise there), so
    the layers are moved to the CPU first."""
    from models import sampling as sampler

    spec = _sampling_spec(result.spec)
    num_classes = spec.config.num_classes  # type: ignore[attr-defined]
    rows = list(classes) if classes else list(range(num_classes))
    layers = [layer.cpu() for layer in (result.ema.layers if result.ema is not None else result.layers)]
    labels = torch.tensor(rows).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    images = sampler.sample_images(layers, spec, labels, sampling.steps, generator, cfg_scale=sampling.cfg_scale)
    sampler.save_grid(images, path, nrow=per_class, scale=4, row_labels=[str(c) for c in rows])
    return Path(path)
