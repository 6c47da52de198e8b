"""Pretrained weights saved by ``save_pretrained`` (safetensors), read one layer's slice at a time.

A folder holds ``model.safetensors`` or, when sharded, ``model.safetensors.index.json`` naming the shard of
every tensor. Files are opened lazily (:func:`safetensors.safe_open`), so building layer ``i`` reads only
layer ``i``'s tensors, whatever the size of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from models.errors import ModelConfigError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: weight files of other formats, which are refused rather than silently ignored
OTHER_FORMATS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def weight_map(config_dir: str) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, for the weights in ``config_dir``; None when the
    folder holds no weights (the model is then initialised from the seed). ModelConfigError naming
    ``model.config_dir`` for weights in another format or an unreadable index or file."""
    folder = Path(config_dir)
    try:
        if (folder / INDEX).exists():
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
            return {name: folder / shard for name, shard in index["weight_map"].items()}
        if (folder / WEIGHTS).exists():
            with safe_open(str(folder / WEIGHTS), framework="pt") as f:
                return {name: folder / WEIGHTS for name in f.keys()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelConfigError(
            f"model.config_dir: cannot read the weights in {config_dir} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); save them again with save_pretrained"
        ) from None
    other = [name for name in OTHER_FORMATS if (folder / name).exists()]
    if other:
        raise ModelConfigError(
            f"model.config_dir: {config_dir} holds {other[0]} but no {WEIGHTS}; save the model with "
            "save_pretrained(safe_serialization=True)"
        )
    return None


def load_slice(
    files: dict[str, Path], wanted: dict[str, tuple[str, ...]], config_dir: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """For each local name of ``wanted``, the first of its candidate tensor names present in ``files``, read
    from its file alone and cast to ``dtype``. ModelConfigError naming the first local name none of whose
    candidates is there."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, dict[str, str]] = {}
    for local, candidates in wanted.items():
        found = next((name for name in candidates if name in files), None)
        if found is None:
            raise ModelConfigError(
                f"model.config_dir: the weights in {config_dir} lack {candidates[0]}; they do not fit this config "
                "(save the model and its config together with save_pretrained)"
            )
        by_file.setdefault(files[found], {})[local] = found
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for local, name in names.items():
                out[local] = f.get_tensor(name).to(dtype)
    return out
