"""An image folder: one subfolder per class holding PNG or JPEG files (torchvision's ``ImageFolder`` layout).

Labels come from the class folders' names sorted by code point: the first name is label 0, the next 1, and
so on (``cat/``, ``dog/`` -> 0, 1). Hidden entries (a leading ``.``) are skipped; every other subfolder is a
class and must hold at least one image, read from its top level (``.png``, ``.jpg``, ``.jpeg``, any case), in
sorted order. Each image is converted to grayscale (1 channel) or RGB (3), resized to ``image_size`` squared
(bilinear) and scaled from [0, 255] to [-1, 1], like the built-in image datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import ModelConfigError
from models.images import ImageDataset, to_unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: channels -> Pillow mode
MODES = {1: "L", 3: "RGB"}


def scan(path: str) -> list[tuple[str, list[Path]]]:
    """(class name, sorted image files) for each class folder of ``path``, in label order, reading folder
    listings only (no image is decoded). ModelConfigError naming ``data.path`` when the folder is missing, has
    no class subfolders, or a class folder holds no image."""
    root = Path(path)
    if not root.is_dir():
        what = "no such folder" if not root.exists() else "not a folder"
        raise ModelConfigError(f"data.path: got {path!r}; {what}; image-folder reads a folder of class subfolders of PNG/JPEG images")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ModelConfigError(
            f"data.path: {path!r} has no class subfolders; put each class's PNG/JPEG images in a subfolder named for it"
        )
    found = []
    for folder in classes:
        files = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise ModelConfigError(f"data.path: class folder {str(folder)!r} holds no PNG/JPEG image; add images or remove it")
        found.append((folder.name, files))
    return found


def check_channels(channels: int) -> str:
    """The Pillow mode for ``channels``; ModelConfigError unless 1 (grayscale) or 3 (RGB)."""
    if channels not in MODES:
        raise ModelConfigError(f"model channels: got {channels}; image-folder gives 1 (grayscale) or 3 (RGB) channels")
    return MODES[channels]


def _load(file: Path, mode: str, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # deferred: only image folders need Pillow

    try:
        with Image.open(file) as image:
            pixels = image.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(pixels, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise ModelConfigError(f"data.path: cannot read image {str(file)!r} ({e}); remove or replace it") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_folder_dataset(path: str, image_size: int, channels: int, classes: list[int] | None = None) -> ImageDataset:
    """Every image of the folder (see the module docstring) in memory as ``[N, channels, image_size,
    image_size]`` in [-1, 1], labels by class folder, optionally restricted to ``classes``."""
    mode = check_channels(channels)
    images, labels = [], []
    for label, (_, files) in enumerate(scan(path)):
        for file in files:
            images.append(_load(file, mode, image_size))
            labels.append(label)
    pixels = to_unit_range(np.stack(images), 255.0)
    return ImageDataset(pixels, torch.tensor(labels, dtype=torch.int64)).select_classes(classes)
