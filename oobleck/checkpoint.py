"""Per-layer checkpoints: any process writes and reads just the layers it holds.

Layout of one checkpoint (step ``N`` = number of optimizer steps applied when it was written)::

    RUN/checkpoints/step_{N:08d}/
        layer_{i:04d}.pt   {"step": N, "params": layer.state_dict(), "optimizer": optimizer.state_dict() or None,
                            "param_names": names of the optimizer's parameters in its own order}
        meta.json          {"format": 2, "step": N, "num_layers": L, "config": job config dict,
                            "layers": [{"size": bytes, "sha256": hex digest} for each layer file]}

Every file is written to a temporary name in the same folder (:mod:`oobleck.durable_files`),
fsynced and renamed into place, so a file that exists is whole. ``meta.json`` is written last, after every
layer file (by whoever knows that all holders have finished, e.g. the master after every worker reported),
with each layer file's size and SHA-256; completing is idempotent, so any number of threads and processes
may complete the same checkpoint at once. A checkpoint counts only when its ``meta.json`` is valid and every
layer file matches it: :func:`latest_checkpoint` verifies the newest candidates and falls back (with one
warning line per skipped checkpoint) to the newest one that verifies, so a writer killed half way or a
damaged file leaves the previous checkpoint as the latest. Format-1 checkpoints (no sizes or digests) are
still read, unverified, with a warning.

Housekeeping: :func:`prune` keeps the newest ``keep`` complete checkpoints, :func:`discard_after` removes the
folders of steps after a restored one (so a re-run cannot complete a mix of two runs' files), and
:func:`remove_stale_temporaries` removes the temporary files of writers that died. A checkpoint is removed by
renaming its folder out of the ``step_*`` namespace first (one atomic step), so a half-deleted folder never
counts as a checkpoint.

``param_names`` lets a reader match optimizer state to parameters by name: the optimizer's
``state_dict()`` numbers parameters by position across its groups, which is only meaningful next to the
list of names in that order.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from oobleck.durable_files import TRASH_PREFIX, atomic_write, file_digest, remove_folder, remove_stale_in
from oobleck.errors import OobleckError, one_line

log = logging.getLogger(__name__)

FORMAT = 2
#: formats this version reads; format 1 has no sizes or digests and is used unverified
READABLE_FORMATS = (1, 2)
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(OobleckError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the model."""


def _error_summary(e: BaseException) -> str:
    """One line for an exception whose text may span many lines (torch's weights-only unpickler explains
    itself in a paragraph): the line that names the error when there is one, else the first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return _short(next((line for line in lines if "error:" in line.lower()), lines[0]))


def _short(text: Any, limit: int = 300) -> str:
    """``text`` as one line (:func:`oobleck.errors.one_line`) of at most ``limit`` characters."""
    return one_line(str(text), limit)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under a run directory."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def layer_file(ckpt_dir: str | Path, index: int) -> Path:
    return Path(ckpt_dir) / f"layer_{index:04d}.pt"


def optimizer_param_names(layer: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names (in ``layer``) of the optimizer's parameters, in the order its ``state_dict()`` numbers them."""
    names = {id(p): name for name, p in layer.named_parameters(remove_duplicate=False)}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the layer") from None


def layer_payload(
    step: int,
    layer: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    loss_scale: list[int] | None = None,
) -> dict[str, Any]:
    """The dict a layer file holds, its tensors those of ``layer`` and ``optimizer`` themselves (to write it
    later while training goes on, snapshot it first: :func:`oobleck.engine.host_staging.snapshot`).
    ``loss_scale`` (the engine's :class:`~oobleck.precision.LossScale` as ``[log2, good_steps]``) is stored
    under that key when given."""
    payload: dict[str, Any] = {
        "step": step,
        "params": layer.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "param_names": optimizer_param_names(layer, optimizer) if optimizer is not None else [],
    }
    if loss_scale is not None:
        payload["loss_scale"] = list(loss_scale)
    return payload


def write_layer(ckpt_dir: str | Path, index: int, payload: dict[str, Any]) -> Path:
    """Atomically write layer ``index``'s :func:`layer_payload`."""
    path = layer_file(ckpt_dir, index)
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def save_layer(
    ckpt_dir: str | Path,
    step: int,
    index: int,
    layer: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss_scale: list[int] | None = None,
) -> Path:
    """Atomically write layer ``index``'s parameters and optimizer state (``None`` for none) as of ``step``
    (and ``loss_scale``, see :func:`layer_payload`)."""
    return write_layer(ckpt_dir, index, layer_payload(step, layer, optimizer, loss_scale=loss_scale))


# ---------------------------------------------------------------------------------------------------
# Completion and verification

_LOCKS_GUARD = threading.Lock()
_LOCKS: dict[str, threading.RLock] = {}


def _lock_for(checkpoints_root: Path) -> threading.RLock:
    """One lock per ``checkpoints`` folder in this process: completion, pruning and the choice of the
    checkpoint to restore do not interleave (other processes are safe through atomic renames)."""
    key = str(checkpoints_root.absolute())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


def complete_if_written(ckpt_dir: str | Path, step: int, num_layers: int, config: dict[str, Any]) -> bool:
    """Write ``meta.json`` when every layer file of the checkpoint exists (the writers are separate processes
    that write their layers in the background); returns whether the checkpoint is complete now.

    Idempotent and safe to call from any number of threads and processes at once. An existing ``meta.json``
    is never rewritten: if it is valid and its sizes match the files the checkpoint is complete, otherwise
    it is damaged and stays incomplete (rewriting it would bless whatever the files hold now)."""
    ckpt_dir = Path(ckpt_dir)
    with _lock_for(ckpt_dir.parent):
        if not all(layer_file(ckpt_dir, i).exists() for i in range(num_layers)):
            return False
        if (ckpt_dir / META).exists():
            try:
                verify(ckpt_dir, deep=False)
            except CheckpointError:
                return False
            return True
        try:
            write_meta(ckpt_dir, step, num_layers, config)
        except CheckpointError:
            if (ckpt_dir / META).exists():  # another process completed it meanwhile
                return is_complete(ckpt_dir)
            return False
        return True


def write_meta(ckpt_dir: str | Path, step: int, num_layers: int, config: dict[str, Any]) -> Path:
    """Atomically write ``meta.json``, with each layer file's size and SHA-256, which marks the checkpoint
    complete; call it after every layer file has been written. Removes the temporary files of dead writers
    in the folder."""
    ckpt_dir = Path(ckpt_dir)
    missing = [i for i in range(num_layers) if not layer_file(ckpt_dir, i).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir}: layer files {missing} not written yet; write them before meta.json")
    layers = []
    for i in range(num_layers):
        try:
            size, sha256 = file_digest(layer_file(ckpt_dir, i))
        except OSError as e:
            name = layer_file(ckpt_dir, i).name
            raise CheckpointError(f"checkpoint {ckpt_dir}: cannot hash {name} ({_short(e)})") from None
        layers.append({"size": size, "sha256": sha256})
    meta = {"format": FORMAT, "step": step, "num_layers": num_layers, "config": config, "layers": layers}
    _check_meta(meta, ckpt_dir)
    path = ckpt_dir / META
    try:
        atomic_write(path, lambda f: f.write(json.dumps(meta, indent=1).encode()), create_parent=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: the folder was removed while meta.json was written") from None
    remove_stale_in(ckpt_dir, None)
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta: Any, ckpt_dir: Path) -> dict[str, Any]:
    """``meta`` when every field is valid; else CheckpointError naming the first bad one (one line)."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {ckpt_dir}: {META} {what}; the checkpoint is damaged, use an earlier one")

    if not isinstance(meta, dict):
        raise bad(f"holds {type(meta).__name__}, not an object")
    fmt = meta.get("format")
    if not _is_int(fmt) or fmt not in READABLE_FORMATS:
        raise bad(f"format {_short(repr(fmt), 40)} is not one of {list(READABLE_FORMATS)}")
    for name in ("step", "num_layers", "config") + (("layers",) if fmt >= 2 else ()):
        if name not in meta:
            raise bad(f"lacks {name!r}")
    step, num_layers = meta["step"], meta["num_layers"]
    if not _is_int(step) or step < 0:
        raise bad(f"step {_short(repr(step), 40)} is not an integer >= 0")
    if not _is_int(num_layers) or num_layers < 1:
        raise bad(f"num_layers {_short(repr(num_layers), 40)} is not an integer >= 1")
    if not isinstance(meta["config"], dict):
        raise bad("config is not an object")
    m = _STEP_DIR.match(ckpt_dir.name)
    if m and int(m.group(1)) != step:
        raise bad(f"step {step} does not match the folder name")
    if fmt >= 2:
        layers = meta["layers"]
        if not isinstance(layers, list) or len(layers) != num_layers:
            raise bad(f"layers is not a list of {num_layers} entries")
        for i, entry in enumerate(layers):
            if (
                not isinstance(entry, dict)
                or not _is_int(entry.get("size"))
                or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str)
                or not _SHA256.match(entry["sha256"])
            ):
                raise bad(f"layers[{i}] is not {{size: bytes, sha256: 64 hex digits}}")
    return meta


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The validated ``meta.json`` of a checkpoint; raises :class:`CheckpointError` (one line) if it is
    missing, unreadable, or any field is missing or of the wrong type."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: no {META}; the checkpoint is incomplete, use an earlier one") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: unreadable {META} ({_short(e)}); the checkpoint is damaged, use an earlier one"
        ) from None
    return _check_meta(meta, ckpt_dir)


_WARNED_FORMAT1: set[str] = set()


def verify(ckpt_dir: str | Path, *, deep: bool = True) -> dict[str, Any]:
    """The checkpoint's validated ``meta.json`` when every layer file matches it: present and of the recorded
    size, and with ``deep`` also of the recorded SHA-256. Raises :class:`CheckpointError` (one line) naming
    the first problem. A format-1 checkpoint (no sizes or digests) only needs its files present; it is used
    unverified, with a warning (once per process)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if meta["format"] == 1:
        missing = [i for i in range(meta["num_layers"]) if not layer_file(ckpt_dir, i).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt_dir}: layer files {missing} missing; the checkpoint is incomplete")
        if str(ckpt_dir) not in _WARNED_FORMAT1:
            _WARNED_FORMAT1.add(str(ckpt_dir))
            log.warning("checkpoint %s is format 1 (no file digests): using it unverified", ckpt_dir)
        return meta
    for i, entry in enumerate(meta["layers"]):
        path = layer_file(ckpt_dir, i)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {path.name} missing; the checkpoint is incomplete") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint {ckpt_dir}: cannot stat {path.name} ({_short(e)})") from None
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}: {path.name} has {size} bytes, {META} records {entry['size']} (truncated or damaged)"
            )
    if deep:
        for i, entry in enumerate(meta["layers"]):
            path = layer_file(ckpt_dir, i)
            try:
                size, sha256 = file_digest(path)
            except OSError as e:
                raise CheckpointError(f"checkpoint {ckpt_dir}: cannot read {path.name} ({_short(e)})") from None
            if size != entry["size"] or sha256 != entry["sha256"]:
                raise CheckpointError(f"checkpoint {ckpt_dir}: {path.name} does not match its SHA-256 in {META} (damaged)")
    return meta


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when ``meta.json`` is valid and every layer file it counts exists with the recorded size (a cheap
    check; :func:`verify` also compares digests)."""
    try:
        verify(ckpt_dir, deep=False)
    except CheckpointError:
        return False
    return True


def _step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step_*`` folder under ``run_dir/checkpoints``, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint under ``run_dir`` that verifies (:func:`verify`), or None if there is none.
    Each newer one that does not is skipped with one warning line naming it and why."""
    with _lock_for(Path(run_dir) / "checkpoints"):
        for _, entry in _step_dirs(run_dir):
            try:
                verify(entry)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", entry.name, _short(e, 400))
                continue
            return entry
    return None


def init_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint ``model.init_checkpoint`` names: ``path`` itself when it is a checkpoint folder (holding
    ``meta.json``), verified like any checkpoint before use, else the latest one that verifies under the run
    folder ``path``. Raises :class:`CheckpointError` (one line naming the field) when there is none."""
    path = Path(path)
    if (path / META).exists():
        try:
            verify(path)
        except CheckpointError as e:
            raise CheckpointError(f"model.init_checkpoint: {_short(e, 400)}") from None
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"model.init_checkpoint: got {str(path)!r}; no complete checkpoint there (a step_* folder with "
            "meta.json, or a run folder holding checkpoints/step_*)"
        )
    return ckpt


def restore_latest(
    run_dir: str | Path, pending: Iterable[int] = (), num_layers: int = 0, config: dict[str, Any] | None = None
) -> Path | None:
    """The checkpoint to restore a run from, with its bookkeeping done in one step (under the lock of
    :func:`complete_if_written`): complete the ``pending`` steps whose layer files are all written, choose
    :func:`latest_checkpoint`, then :func:`discard_after` it (every folder of a later step, or all of them
    when none verifies), so that the re-run cannot complete a checkpoint mixing files of two runs."""
    with _lock_for(Path(run_dir) / "checkpoints"):
        for step in pending:
            complete_if_written(checkpoint_dir(run_dir, step), step, num_layers, config or {})
        ckpt = latest_checkpoint(run_dir)
        discard_after(run_dir, read_meta(ckpt)["step"] if ckpt is not None else -1)
        return ckpt


# ---------------------------------------------------------------------------------------------------
# Housekeeping


def discard_after(run_dir: str | Path, step: int) -> list[Path]:
    """Remove the checkpoint folders of steps after ``step`` (complete or not); returns them."""
    removed = []
    with _lock_for(Path(run_dir) / "checkpoints"):
        for s, entry in _step_dirs(run_dir):
            if s > step and remove_folder(entry):
                removed.append(entry)
    if removed:
        log.warning("removed the checkpoint folders after step %d: %s", step, ", ".join(p.name for p in removed))
    return removed


def prune(run_dir: str | Path, keep: int, *, verified: Path | None = None, protect: Iterable[Path] = ()) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (0 keeps all) and every folder newer than the oldest of
    them; remove the older folders. ``verified``: a checkpoint known to verify (e.g. just completed). One
    of the kept checkpoints must verify; when none does, the newest older one that does is kept too, so the
    only good checkpoint is never removed. ``protect`` (e.g. the one being restored from) is never removed."""
    if keep <= 0:
        return []
    protected = {Path(p).absolute() for p in protect}
    removed = []
    with _lock_for(Path(run_dir) / "checkpoints"):
        folders = _step_dirs(run_dir)
        complete = [entry for _, entry in folders if is_complete(entry)]
        if len(complete) <= keep:
            return []
        kept, oldest_kept = complete[:keep], complete[keep - 1]
        older = [entry for _, entry in folders if entry.name < oldest_kept.name]

        def verifies(entry: Path) -> bool:
            try:
                verify(entry)
            except CheckpointError:
                return False
            return True

        good = verified is not None and Path(verified).absolute() in {k.absolute() for k in kept}
        if not good and not any(verifies(entry) for entry in kept):
            fallback = next((entry for entry in older if entry in complete and verifies(entry)), None)
            if fallback is not None:
                older.remove(fallback)
        for entry in older:
            if entry.absolute() not in protected and remove_folder(entry):
                removed.append(entry)
    if removed:
        log.info("checkpoint retention (keep %d): removed %s", keep, ", ".join(p.name for p in removed))
    return removed


def remove_stale_temporaries(run_dir: str | Path, *, older_than: float | None = None) -> list[Path]:
    """Remove the temporary files of dead writers in the checkpoint folders of ``run_dir``: those written on
    this host by a process that no longer runs, and with ``older_than`` (a time.time(), e.g. the start of
    the run) every temporary file last modified before it and the leftovers of interrupted deletions.
    Returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for _, folder in _step_dirs(run_dir):
        removed += remove_stale_in(folder, older_than)
    if older_than is not None and root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TRASH_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.info("removed %d stale temporary checkpoint files under %s", len(removed), root)
    return removed


def load_layer_state(ckpt_dir: str | Path, index: int) -> dict[str, Any]:
    """The saved dict of layer ``index`` (keys ``step``, ``params``, ``optimizer``, ``param_names``, and
    ``loss_scale`` when the engine wrote it), on CPU."""
    path = layer_file(ckpt_dir, index)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: layer {index} missing ({path.name})") from None
    except Exception as e:  # a foreign or damaged file: torch raises many kinds, often with multi-line text
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: cannot read {path.name} ({type(e).__name__}: {_error_summary(e)})"
        ) from None


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
