"""Sample grids from a diffusion model's checkpoint (``oobleck sample``).

Reads only the checkpoint: :func:`oobleck.generation.load_checkpoint_model` rebuilds the model from the job
config saved in its ``meta.json`` and gives every layer the checkpoint's parameters; :mod:`models.sampling`
draws the images (DDIM from the model's own noise schedule, with the saved ``sampling`` section's steps and
guidance scale). Works for every layer list with a diffusion inference path: the built-in dit and moe
families and the diffusers models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oobleck.errors import ConfigError
from oobleck.generation import CheckpointModel, find_checkpoint, load_checkpoint_model

#: rows drawn for an unconditional model when ``rows`` is not given
UNCONDITIONAL_ROWS = 4


def grid_rows(model: CheckpointModel, rows: int | None) -> list[int] | None:
    """The class of each row for a class-conditional model: the classes the run trained on
    (``data.classes``, or all), the first ``rows`` of them when given; None for an unconditional model
    (``num_classes`` 0), which gets ``rows`` rows (default :data:`UNCONDITIONAL_ROWS`) of label 0."""
    num_classes = getattr(model.spec.config, "num_classes", 0) or 0  # type: ignore[attr-defined]
    if not num_classes:
        return None
    classes = model.config.data.classes or list(range(num_classes))
    return classes[:rows] if rows else classes


def write_sample_grid(
    run: str | Path,
    out: str | Path | None = None,
    step: int | None = None,
    rows: int | None = None,
    per_class: int = 8,
    steps: int | None = None,
    seed: int = 0,
) -> tuple[Path, int, int]:
    """Draw ``per_class`` images per row (:func:`grid_rows`; rows of a class-conditional model are labelled
    with their class) with ``steps`` DDIM steps (default: the saved ``sampling.steps``, at most the
    schedule's timesteps) and noise from a generator seeded by ``seed``, and write them as one PNG grid
    (tiles enlarged 4x) to ``out`` (default: ``samples.png`` in the checkpoint folder). Returns the path and
    the PNG's width and height."""
    from models import sampling

    model = load_checkpoint_model(find_checkpoint(run, step))
    spec = model.spec
    if not hasattr(spec, "schedule") or not hasattr(model.layers[0], "embed") or not hasattr(model.layers[-1], "predict"):
        raise ConfigError(
            f"RUN: the checkpoint holds a {model.config.model.family} model, not a diffusion model; sample needs "
            "family dit, moe or diffusers"
        )
    path = Path(out) if out is not None else model.path / "samples.png"
    classes = grid_rows(model, rows)
    row_labels = [0] * (rows or UNCONDITIONAL_ROWS) if classes is None else classes
    labels = torch.tensor(row_labels).repeat_interleave(per_class)
    timesteps = spec.schedule.num_timesteps  # type: ignore[attr-defined]
    images = sampling.sample_images(
        model.layers,
        spec,
        labels,
        min(steps or model.config.sampling.steps, timesteps),
        torch.Generator().manual_seed(seed),
        cfg_scale=model.config.sampling.cfg_scale if classes is not None else 1.0,
    )
    names = [str(c) for c in classes] if classes is not None else None
    width, height = sampling.save_grid(images, path, nrow=per_class, scale=4, row_labels=names)
    return path, width, height
