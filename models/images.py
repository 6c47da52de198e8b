"""Image datasets that work offline: scikit-learn's 8x8 digits and MNIST-format IDX files.

Every item is ``{"image": FloatTensor[C, H, W] in [-1, 1], "label": LongTensor[]}``. Labels keep their
original values when a dataset is restricted to some classes, so a model trained on all ten classes
and one fine-tuned on a subset agree on what label 3 means.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from models.errors import ModelConfigError

#: where Debian's ``dataset-fashion-mnist`` package puts the IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: IDX type byte -> big-endian numpy dtype (the format's specification lists exactly these)
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class ImageDataset:
    """A labelled image collection held in memory.

    ``images`` is ``[N, C, H, W]`` already scaled to [-1, 1]; ``labels`` is ``[N]`` (int64). Indexing
    returns views, so the dataset costs no copies per sample.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}

    @property
    def num_classes(self) -> int:
        """One more than the largest label (labels are class indices, possibly with gaps)."""
        return int(self.labels.max()) + 1

    def select_classes(self, classes: list[int] | None) -> "ImageDataset":
        """The samples whose label is in ``classes`` (all of them for None), labels unchanged.

        Raises ModelConfigError naming ``data.classes`` if the list is empty or names a label the dataset
        does not have."""
        if classes is None:
            return self
        present = sorted(set(self.labels.tolist()))
        unknown = [c for c in classes if c not in present]
        if not classes or unknown:
            raise ModelConfigError(
                f"data.classes: got {classes!r}; allowed: a non-empty list of labels from {present[0]}..{present[-1]}"
            )
        keep = torch.isin(self.labels, torch.tensor(sorted(set(classes)), dtype=torch.int64))
        return ImageDataset(self.images[keep], self.labels[keep])


def _to_unit_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """Map pixel values in [0, max_value] linearly onto [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) * (2.0 / max_value) - 1.0)


def digits_dataset(classes: list[int] | None = None) -> ImageDataset:
    """scikit-learn's 1797 handwritten digits as 1x8x8 images (raw values 0..16 scaled to [-1, 1]),
    labels 0..9, optionally restricted to ``classes``."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn takes ~1 s to import

    digits = load_digits()
    images = _to_unit_range(digits.images, 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageDataset(images, labels).select_classes(classes)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (the MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type byte, a dimension count ``d``, ``d`` big-endian uint32 sizes, then
    the big-endian data. Raises ModelConfigError naming the file for a missing file, bad magic, an unknown
    type byte, or a file shorter or longer than its header says."""
    path = Path(path)
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise ModelConfigError(f"data.path: {path} does not exist; pass an existing IDX file") from None
    except IsADirectoryError:
        raise ModelConfigError(f"data.path: {path} is a folder; pass an IDX file inside it") from None
    except (OSError, EOFError) as exc:  # a truncated gzip stream ends in EOFError
        raise ModelConfigError(f"data.path: cannot read {path} ({exc}); the file is damaged, fetch it again") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES:
        raise ModelConfigError(
            f"data.path: {path} is not an IDX file (magic {blob[:4].hex() or 'empty'}); "
            "expected 0000 followed by a type byte (08, 09, 0b, 0c, 0d, 0e) and a dimension count"
        )
    dtype, ndim = _IDX_DTYPES[blob[2]], blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise ModelConfigError(f"data.path: {path} is truncated inside its header; fetch the file again")
    shape = tuple(int(n) for n in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(blob) != expected:
        raise ModelConfigError(
            f"data.path: {path} holds {len(blob)} bytes but its header {shape} needs {expected}; "
            "the file is truncated or damaged, fetch it again"
        )
    return np.frombuffer(blob, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``folder``; ModelConfigError with the install hint if neither exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ModelConfigError(
        f"data.path: no {stem}[.gz] in {folder}; run `apt-get install dataset-fashion-mnist` "
        f"(installs {FASHION_MNIST_DIR}) or set data.path to a folder holding the Fashion-MNIST IDX files"
    )


def fashion_mnist_dataset(path: str | None = None, train: bool = True, classes: list[int] | None = None) -> ImageDataset:
    """Fashion-MNIST as 1x28x28 images in [-1, 1] with labels 0..9.

    ``path`` is the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (default
    :data:`FASHION_MNIST_DIR`); ``train`` picks the 60000-image training split or the 10000-image test
    split; ``classes`` restricts the labels."""
    folder = Path(path or FASHION_MNIST_DIR)
    split = "train" if train else "t10k"
    images = read_idx(_find_idx(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ModelConfigError(
            f"data.path: {folder} holds images {images.shape} and labels {labels.shape}; "
            "expected [N, H, W] images and [N] labels of the same split"
        )
    return ImageDataset(
        _to_unit_range(images, 255.0).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    ).select_classes(classes)
