"""Image datasets that work offline: scikit-learn's 8x8 digits and MNIST-format IDX files.

Every item is ``{"image": FloatTensor[C, H, W] in [-1, 1], "label": LongTensor[]}``. Labels keep their
original values when a dataset is restricted to some classes, so a model trained on all ten classes
and one fine-tuned on a subset agree on what label 3 means.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from models.errors import ModelConfigError

#: where Debian's ``dataset-fashion-mnist`` package puts the IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: what :func:`digits_dataset` holds, known without loading scikit-learn (a test compares them with the data)
DIGITS_IMAGE_SHAPE = (1, 8, 8)
DIGITS_LABELS = tuple(range(10))

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
        check_classes(classes, sorted(set(self.labels.tolist())))
        keep = torch.isin(self.labels, torch.tensor(sorted(set(classes)), dtype=torch.int64))
        return ImageDataset(self.images[keep], self.labels[keep])


def check_classes(classes: list[int] | None, present: list[int]) -> None:
    """ModelConfigError naming ``data.classes`` when ``classes`` is an empty list or names a label not in
    ``present`` (the dataset's labels, sorted); None selects every label."""
    if classes is None:
        return
    unknown = [c for c in classes if c not in present]
    if not classes or unknown:
        raise ModelConfigError(
            f"data.classes: got {classes!r}; allowed: a non-empty list of labels from {present[0]}..{present[-1]}"
        )


def to_unit_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """Map pixel values in [0, max_value] linearly onto [-1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) * (2.0 / max_value) - 1.0)


def digits_dataset(classes: list[int] | None = None) -> ImageDataset:
    """scikit-learn's 1797 handwritten digits as 1x8x8 images (raw values 0..16 scaled to [-1, 1]),
    labels 0..9, optionally restricted to ``classes``."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn takes ~1 s to import

    digits = load_digits()
    images = to_unit_range(digits.images, 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return ImageDataset(images, labels).select_classes(classes)


@contextmanager
def _open_idx(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, through gzip when it starts with gzip's magic; errors while opening or
    reading it become ModelConfigErrors naming ``data.path``."""
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            yield f  # type: ignore[misc]
    except FileNotFoundError:
        raise ModelConfigError(f"data.path: {path} does not exist; pass an existing IDX file") from None
    except IsADirectoryError:
        raise ModelConfigError(f"data.path: {path} is a folder; pass an IDX file inside it") from None
    except (OSError, EOFError) as exc:  # a truncated gzip stream ends in EOFError
        raise ModelConfigError(f"data.path: cannot read {path} ({exc}); the file is damaged, fetch it again") from None


def _read_header(f: BinaryIO, path: Path) -> tuple[np.dtype, tuple[int, ...], bytes]:
    """The element type and shape of the IDX stream ``f``, read up to the end of its header (returned too)."""
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise ModelConfigError(
            f"data.path: {path} is not an IDX file (magic {head.hex() or 'empty'}); "
            "expected 0000 followed by a type byte (08, 09, 0b, 0c, 0d, 0e) and a dimension count"
        )
    dims = f.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise ModelConfigError(f"data.path: {path} is truncated inside its header; fetch the file again")
    shape = tuple(int(n) for n in np.frombuffer(dims, dtype=">u4"))
    return _IDX_DTYPES[head[2]], shape, head + dims


def read_idx_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The shape an IDX file's header declares, reading the header only (a few bytes, also when gzipped).
    Raises ModelConfigError like :func:`read_idx` for a missing file, bad magic or a truncated header."""
    path = Path(path)
    with _open_idx(path) as f:
        return _read_header(f, path)[1]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (the MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type byte, a dimension count ``d``, ``d`` big-endian uint32 sizes, then
    the big-endian data. Raises ModelConfigError naming the file for a missing file, bad magic, an unknown
    type byte, or a file shorter or longer than its header says."""
    path = Path(path)
    with _open_idx(path) as f:
        dtype, shape, header = _read_header(f, path)
        body = f.read()
    size = len(header) + len(body)
    expected = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise ModelConfigError(
            f"data.path: {path} holds {size} bytes but its header {shape} needs {expected}; "
            "the file is truncated or damaged, fetch it again"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``folder``; ModelConfigError with the install hint if neither exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ModelConfigError(
        f"data.path: no {stem}[.gz] in {folder}; run `apt-get install dataset-fashion-mnist` "
        f"(installs {FASHION_MNIST_DIR}) or set data.path to a folder holding the Fashion-MNIST IDX files"
    )


def fashion_mnist_files(path: str | None = None, train: bool = True) -> tuple[Path, Path]:
    """The images and labels IDX files of a split in the Fashion-MNIST folder ``path`` (default
    :data:`FASHION_MNIST_DIR`); ModelConfigError naming ``data.path`` for a missing folder, a file given
    instead of a folder, or a folder without the split's files."""
    folder = Path(path or FASHION_MNIST_DIR)
    wanted = "fashion-mnist reads a folder holding its IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])"
    if path is not None and not folder.exists():
        raise ModelConfigError(f"data.path: got {path!r}; no such folder; {wanted}: give that folder")
    if path is not None and not folder.is_dir():
        raise ModelConfigError(f"data.path: got {path!r}; that is a file, but {wanted}: give the folder")
    split = "train" if train else "t10k"
    return _find_idx(folder, f"{split}-images-idx3-ubyte"), _find_idx(folder, f"{split}-labels-idx1-ubyte")


def _check_split(folder: Path, images: tuple[int, ...], labels: tuple[int, ...]) -> None:
    if len(images) != 3 or len(labels) != 1 or images[0] != labels[0]:
        raise ModelConfigError(
            f"data.path: {folder} holds images {images} and labels {labels}; "
            "expected [N, H, W] images and [N] labels of the same split"
        )


def fashion_mnist_summary(path: str | None = None, train: bool = True) -> tuple[tuple[int, int, int], list[int]]:
    """The image shape ``(1, H, W)`` and the sorted distinct labels of a Fashion-MNIST split, reading the
    images file's header and the labels file only (one byte a sample): what a model must accept, checked
    without loading the images. Raises ModelConfigError as :func:`fashion_mnist_dataset` does for missing,
    damaged or mismatched files (a damaged images body is found only when the images are loaded)."""
    images_file, labels_file = fashion_mnist_files(path, train)
    shape = read_idx_shape(images_file)
    labels = read_idx(labels_file)
    _check_split(images_file.parent, shape, labels.shape)
    if not labels.size:
        raise ModelConfigError(f"data.path: {labels_file} holds no samples; give a folder with a non-empty split")
    return (1, shape[1], shape[2]), sorted(int(x) for x in np.unique(labels))


def fashion_mnist_dataset(path: str | None = None, train: bool = True, classes: list[int] | None = None) -> ImageDataset:
    """Fashion-MNIST as 1x28x28 images in [-1, 1] with labels 0..9.

    ``path`` is the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (default
    :data:`FASHION_MNIST_DIR`); ``train`` picks the 60000-image training split or the 10000-image test
    split; ``classes`` restricts the labels."""
    images_file, labels_file = fashion_mnist_files(path, train)
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    _check_split(images_file.parent, images.shape, labels.shape)
    return ImageDataset(
        to_unit_range(images, 255.0).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    ).select_classes(classes)
