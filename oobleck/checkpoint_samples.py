"""Sample grids from a diffusion model's checkpoint (``oobleck sample``).

Reads only the checkpoint: its ``meta.json`` (the job config saved with it) and its layer files. The model
is rebuilt from that config, every layer takes the checkpoint's parameters, and :mod:`models.sampling`
draws the images (DDIM from the model's own noise schedule). Works for every layer list with a diffusion
inference path: the built-in dit and moe families and the diffusers models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.base import Layer, ModelSpec
from oobleck import checkpoint
from oobleck.config import JobConfig, config_from_dict
from oobleck.errors import ConfigError
from oobleck.model_building import build_model

#: rows drawn for an unconditional model when ``rows`` is not given
UNCONDITIONAL_ROWS = 4


@dataclass
class CheckpointModel:
    """A model rebuilt from a checkpoint: its config, spec and layers holding the saved parameters."""

    config: JobConfig
    spec: ModelSpec
    layers: list[Layer]
    checkpoint: Path


def find_checkpoint(run: str | Path, step: int | None) -> Path:
    """The checkpoint folder of ``run`` (a run folder or one ``checkpoints/step_*`` folder): the one of
    ``step`` when given, else the latest that verifies. One-line CheckpointError (naming RUN) otherwise."""
    run = Path(run)
    if (run / checkpoint.META).exists() and step is None:
        checkpoint.verify(run)
        return run
    if step is not None:
        ckpt = checkpoint.checkpoint_dir(run, step)
        if not (ckpt / checkpoint.META).exists():
            raise checkpoint.CheckpointError(f"--step: got {step}; {run} has no checkpoint of that step ({ckpt.name})")
        checkpoint.verify(ckpt)
        return ckpt
    found = checkpoint.latest_checkpoint(run)
    if found is None:
        raise checkpoint.CheckpointError(
            f"RUN: got {str(run)!r}; no complete checkpoint there (a run folder holding checkpoints/step_*, or one step_* folder)"
        )
    return found


def load_checkpoint_model(run: str | Path, step: int | None = None) -> CheckpointModel:
    """Rebuild the model saved in ``run``'s checkpoint (see :func:`find_checkpoint`) on the CPU."""
    ckpt = find_checkpoint(run, step)
    config = config_from_dict(checkpoint.read_meta(ckpt)["config"])
    spec = build_model(config.model, config.training.seed)
    layers = spec.build_all()
    for index, layer in enumerate(layers):
        checkpoint.restore_layer(checkpoint.load_layer_state(ckpt, index), layer)
    return CheckpointModel(config, spec, layers, ckpt)


def grid_labels(model: CheckpointModel, rows: int | None, per_class: int) -> torch.Tensor:
    """The label of each image, row-major: a row per class (the classes the run trained on, ``data.classes``
    or all; the first ``rows`` of them when given) for a class-conditional model, ``rows`` rows of label 0
    for an unconditional one (``num_classes`` 0)."""
    num_classes = getattr(model.spec.config, "num_classes", 0) or 0  # type: ignore[attr-defined]
    if num_classes:
        classes = model.config.data.classes or list(range(num_classes))
        classes = classes[:rows] if rows else classes
    else:
        classes = [0] * (rows or UNCONDITIONAL_ROWS)
    return torch.tensor(classes).repeat_interleave(per_class)


def write_sample_grid(
    run: str | Path,
    out: str | Path | None = None,
    step: int | None = None,
    rows: int | None = None,
    per_class: int = 8,
    steps: int = 50,
    seed: int = 0,
) -> tuple[Path, int, int]:
    """Draw ``per_class`` images per row (:func:`grid_labels`) with ``steps`` DDIM steps and noise from a
    generator seeded by ``seed``, and write them as one PNG grid (tiles enlarged 4x) to ``out`` (default:
    ``samples.png`` in the checkpoint folder). Returns the path and the PNG's width and height."""
    from models import sampling

    model = load_checkpoint_model(run, step)
    spec = model.spec
    if not hasattr(spec, "schedule") or not hasattr(model.layers[0], "embed") or not hasattr(model.layers[-1], "predict"):
        raise ConfigError(
            f"RUN: the checkpoint holds a {model.config.model.family} model, not a diffusion model; sample needs "
            "family dit, moe or diffusers"
        )
    path = Path(out) if out is not None else model.checkpoint / "samples.png"
    labels = grid_labels(model, rows, per_class)
    images = sampling.sample_images(
        model.layers, spec, labels, min(steps, spec.schedule.num_timesteps), torch.Generator().manual_seed(seed)  # type: ignore[attr-defined]
    )
    width, height = sampling.save_grid(images, path, nrow=per_class, scale=4)
    return path, width, height
