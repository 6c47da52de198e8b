"""Per-layer checkpoints: any process writes and reads just the layers it holds.

Layout of one checkpoint (step ``N`` = number of optimizer steps applied when it was written)::

    RUN/checkpoints/step_{N:08d}/
        layer_{i:04d}.pt   {"step": N, "params": layer.state_dict(), "optimizer": optimizer.state_dict() or None,
                            "param_names": names of the optimizer's parameters in its own order}
        meta.json          {"format": 1, "step": N, "num_layers": L, "config": job config dict}

Every file is written to a temporary name in the same folder, fsynced and renamed into place, so a file
that exists is whole. ``meta.json`` is written last, after every layer file (by whoever knows that all
holders have finished, e.g. the master after every worker reported); a checkpoint counts only when its
``meta.json`` and all ``L`` layer files exist. A writer killed half way therefore leaves the previous
checkpoint as the latest complete one.

``param_names`` lets a reader match optimizer state to parameters by name: the optimizer's
``state_dict()`` numbers parameters by position across its groups, which is only meaningful next to the
list of names in that order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oobleck.errors import OobleckError

FORMAT = 1
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(OobleckError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under a run directory."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def layer_file(ckpt_dir: str | Path, index: int) -> Path:
    return Path(ckpt_dir) / f"layer_{index:04d}.pt"


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync it and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # make the rename itself durable
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_param_names(layer: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (in ``layer``) of the optimizer's parameters, in the order its ``state_dict()`` numbers them."""
    names = {id(p): name for name, p in layer.named_parameters(remove_duplicate=False)}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the layer") from None


def layer_payload(
    step: int, layer: nn.Module, optimizer: torch.optim.Optimizer | None, *, copy: bool = False
) -> dict[str, Any]:
    """The dict a layer file holds; ``copy`` clones every tensor, so that the payload can be written later
    (e.g. from a background thread) while training goes on."""
    payload = {
        "step": step,
        "params": layer.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "param_names": optimizer_param_names(layer, optimizer) if optimizer is not None else [],
    }
    if copy:
        payload = _cloned(payload)
    return payload


def write_layer(ckpt_dir: str | Path, index: int, payload: dict[str, Any]) -> Path:
    """Atomically write layer ``index``'s :func:`layer_payload`."""
    path = layer_file(ckpt_dir, index)
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


def save_layer(
    ckpt_dir: str | Path, step: int, index: int, layer: nn.Module, optimizer: torch.optim.Optimizer | None
) -> Path:
    """Atomically write layer ``index``'s parameters and optimizer state (``None`` for none) as of ``step``."""
    return write_layer(ckpt_dir, index, layer_payload(step, layer, optimizer))


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def complete_if_written(ckpt_dir: str | Path, step: int, num_layers: int, config: dict[str, Any]) -> bool:
    """Write ``meta.json`` when every layer file of the checkpoint exists (the writers are separate processes
    that write their layers in the background); returns whether the checkpoint is complete now."""
    if not all(layer_file(ckpt_dir, i).exists() for i in range(num_layers)):
        return False
    if not (Path(ckpt_dir) / META).exists():
        write_meta(ckpt_dir, step, num_layers, config)
    return True


def write_meta(ckpt_dir: str | Path, step: int, num_layers: int, config: dict[str, Any]) -> Path:
    """Atomically write ``meta.json``, which marks the checkpoint complete; call it after every layer file
    has been written."""
    ckpt_dir = Path(ckpt_dir)
    missing = [i for i in range(num_layers) if not layer_file(ckpt_dir, i).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir}: layer files {missing} not written yet; write them before meta.json")
    meta = {"format": FORMAT, "step": step, "num_layers": num_layers, "config": config}
    path = ckpt_dir / META
    _atomic_write(path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return path


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint; raises :class:`CheckpointError` if it is missing or unreadable."""
    path = Path(ckpt_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: no {META}; the checkpoint is incomplete, use an earlier one") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {META} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("num_layers"), int):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META} is not a format-{FORMAT} checkpoint description")
    return meta


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when ``meta.json`` is readable and every layer file it counts exists."""
    try:
        meta = read_meta(ckpt_dir)
    except CheckpointError:
        return False
    return all(layer_file(ckpt_dir, i).exists() for i in range(meta["num_layers"]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir``, or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), entry) for entry in root.iterdir() if (m := _STEP_DIR.match(entry.name)) and entry.is_dir()),
        reverse=True,
    )
    for _, entry in steps:
        if is_complete(entry):
            return entry
    return None


def load_layer_state(ckpt_dir: str | Path, index: int) -> dict[str, Any]:
    """The saved dict of layer ``index`` (keys ``step``, ``params``, ``optimizer``, ``param_names``), on CPU."""
    path = layer_file(ckpt_dir, index)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: layer {index} missing ({path.name})") from None
    except Exception as e:  # a foreign or damaged file: torch raises many kinds
        raise CheckpointError(f"checkpoint {ckpt_dir}: cannot read {path.name} ({type(e).__name__}: {e})") from None


def restore_layer(
    state: dict[str, Any], layer: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, strict: bool = True
) -> None:
    """Load a saved layer dict into ``layer`` and, when given, ``optimizer``.

    Parameters load with ``strict`` (``strict=False`` leaves parameters the file lacks, e.g. new DiffFit
    scale factors, at their initial values, but still refuses unexpected ones). The optimizer state loads
    only when the saved ``param_names`` are exactly the optimizer's own, in order; otherwise the state would
    attach to the wrong tensors, so that raises :class:`CheckpointError`.
    """
    missing, unexpected = layer.load_state_dict(state["params"], strict=False)
    if unexpected or (strict and missing):
        raise CheckpointError(
            f"checkpoint layer does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}; "
            "use a checkpoint of the same model config"
        )
    if optimizer is None or state.get("optimizer") is None:
        return
    want = optimizer_param_names(layer, optimizer)
    if state.get("param_names") != want:
        raise CheckpointError(
            f"checkpoint optimizer state covers {state.get('param_names')} but this optimizer holds {want}; "
            "load parameters only (optimizer=None)"
        )
    optimizer.load_state_dict(state["optimizer"])
