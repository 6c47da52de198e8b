"""The whole model out of a checkpoint, for use outside the framework (``oobleck export``).

:func:`export` reads only a checkpoint (its layer files, verified against ``meta.json``) and the job config
saved in that ``meta.json``. When the model's spec writes its library's own format
(:meth:`models.base.ModelSpec.export_pretrained` returns True: a folder ``from_pretrained`` loads), that is
the output. Otherwise the folder gets:

* ``model.safetensors``: every layer's ``state_dict`` entries, named ``<layer index>.<name>`` (``3.mlp.c_fc.weight``);
  of a tied group (``ModelSpec.tied``) only the first member is stored, the others are the same tensor;
* ``config.json``: ``{"format": "oobleck-layers", "step": N, "num_layers": L, "model": the job config's model
  section, "seed": training.seed, "tied": [[[layer, name], ...], ...]}``.

:func:`load_exported` reads such a folder back into a layer list (``ModelSpec.build_all()`` with the tensors
loaded), which is how docs/models.md says to use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from models.base import Layer, ModelSpec
from oobleck import checkpoint
from oobleck.config import config_from_dict
from oobleck.errors import ConfigError
from oobleck.generation import find_checkpoint, load_checkpoint_model
from oobleck.model_building import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "oobleck-layers"


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the checkpoint's folder and step, the output folder, and whether it is the
    library's own format (``pretrained``) or safetensors plus config."""

    checkpoint: Path
    step: int
    out_dir: Path
    pretrained: bool


def _out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder; name a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Exported:
    """Write the model of a run's checkpoint (``step``, or the latest that verifies; or ``run_dir`` itself when
    it is a checkpoint folder) to ``out_dir`` (new or empty); see the module docstring. One-line errors (exit 2)
    for a missing run folder or checkpoint (:func:`oobleck.generation.find_checkpoint`'s), an occupied
    ``out_dir``, or a checkpoint that does not verify."""
    model = load_checkpoint_model(find_checkpoint(run_dir, step))
    ckpt, spec, job = model.path, model.spec, model.config
    meta = checkpoint.read_meta(ckpt)
    states = [layer.state_dict() for layer in model.layers]
    out = Path(out_dir)
    _out_dir(out)
    if spec.export_pretrained(states, str(out)):
        return Exported(ckpt, meta["step"], out, True)
    from safetensors.torch import save_file  # deferred: only this path needs it

    later = {member for group in spec.tied for member in group[1:]}
    tensors = {
        f"{i}.{name}": value.detach().contiguous().clone()
        for i, state in enumerate(states)
        for name, value in state.items()
        if (i, name) not in later
    }
    save_file(tensors, str(out / WEIGHTS))
    config = {
        "format": FORMAT,
        "step": meta["step"],
        "num_layers": spec.num_layers,
        "model": meta["config"]["model"],
        "seed": job.training.seed,
        "tied": [[list(member) for member in group] for group in spec.tied],
    }
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return Exported(ckpt, meta["step"], out, False)


def load_exported(out_dir: str | Path) -> tuple[ModelSpec, list[Layer]]:
    """The spec and the whole layer list (tied weights shared, as ``build_all`` gives them) of a folder
    :func:`export` wrote as safetensors plus config, with the exported tensors loaded (strictly: every
    tensor of every layer must be in the file, but for tied copies)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    config: dict[str, Any] = json.loads((out / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{out / CONFIG}: not an oobleck export (format {config.get('format')!r})")
    spec = build_model(config_from_dict({"model": config["model"]}).model, config["seed"])
    layers = spec.build_all()
    tensors = load_file(str(out / WEIGHTS))
    later = {member for group in spec.tied for member in group[1:]}
    for i, layer in enumerate(layers):
        prefix = f"{i}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        absent = [name for name in missing if (i, name) not in later]
        if absent or unexpected:
            raise ConfigError(f"{out / WEIGHTS}: layer {i} lacks {absent} / has unexpected {unexpected}; export again")
    return spec, layers
