"""Image datasets: scikit-learn digits, the IDX reader, Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models import images
from models.errors import ModelConfigError

HAVE_FASHION = Path(images.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file() or Path(
    images.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte"
).is_file()


def write_idx(path: Path, array: np.ndarray, type_byte: int, compress: bool = False) -> Path:
    """An IDX file written straight from the format's definition (independent of the reader)."""
    blob = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


@pytest.fixture(scope="module")
def digits() -> images.ImageDataset:
    return images.digits_dataset()


def test_digits_items_are_scaled_images_with_labels(digits: images.ImageDataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert len(digits) == 1797
    item = digits[5]
    assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert int(item["label"]) == raw.target[5]
    # 0 -> -1, 16 -> +1, linear in between
    np.testing.assert_allclose(item["image"][0].numpy(), raw.images[5] / 8.0 - 1.0, atol=1e-6)
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_digits_class_subset_keeps_labels() -> None:
    subset = images.digits_dataset(classes=[3, 7])
    assert set(subset.labels.tolist()) == {3, 7}
    assert 300 < len(subset) < 400  # about 180 of each digit
    assert subset.num_classes == 8


@pytest.mark.parametrize("classes", [[], [3, 12]])
def test_digits_bad_classes_name_the_field(classes: list[int]) -> None:
    with pytest.raises(ModelConfigError, match=r"data\.classes: got .*0\.\.9"):
        images.digits_dataset(classes=classes)


@pytest.mark.parametrize(
    "dtype,type_byte", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips(tmp_path: Path, dtype: type, type_byte: int, compress: bool) -> None:
    offset = 0 if dtype is np.uint8 else 58  # negative values too, where the type has them
    array = (np.arange(30) * 4 - offset).astype(dtype).reshape(2, 3, 5)
    got = images.read_idx(write_idx(tmp_path / "a.idx", array, type_byte, compress))
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ModelConfigError, match=r"not an IDX file \(magic 01020801\)"):
        images.read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")  # unknown type byte
    with pytest.raises(ModelConfigError, match="not an IDX file"):
        images.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_data(tmp_path: Path, compress: bool) -> None:
    full = write_idx(tmp_path / "full", np.zeros((4, 6), np.uint8), 0x08).read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(gzip.compress(full[:-3]) if compress else full[:-3])
    with pytest.raises(ModelConfigError, match=r"holds 33 bytes but its header \(4, 6\) needs 36"):
        images.read_idx(path)
    path.write_bytes(full[:9])
    with pytest.raises(ModelConfigError, match="truncated inside its header"):
        images.read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path: Path) -> None:
    blob = gzip.compress(write_idx(tmp_path / "full", np.arange(400, dtype=np.uint8).reshape(20, 20) % 251, 0x08).read_bytes())
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelConfigError, match="damaged"):
        images.read_idx(path)


def test_read_idx_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="does not exist"):
        images.read_idx(tmp_path / "nope")
    with pytest.raises(ModelConfigError, match="is a folder"):
        images.read_idx(tmp_path)


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"apt-get install dataset-fashion-mnist.*data\.path"):
        images.fashion_mnist_dataset(str(tmp_path))


def test_fashion_mnist_reads_a_user_folder(tmp_path: Path) -> None:
    pixels = np.array([[[0, 255], [51, 102]]] * 3, dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", pixels, 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 1, 4], np.uint8), 0x08, compress=True)
    data = images.fashion_mnist_dataset(str(tmp_path), train=False, classes=[4])
    assert len(data) == 2
    np.testing.assert_allclose(data[1]["image"][0].numpy(), [[-1.0, 1.0], [-0.6, -0.2]], atol=1e-6)
    assert int(data[1]["label"]) == 4


def test_fashion_mnist_mismatched_split_is_an_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8), 0x08)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), 0x08)
    with pytest.raises(ModelConfigError, match="of the same split"):
        images.fashion_mnist_dataset(str(tmp_path))


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {images.FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_installed_test_split() -> None:
    data = images.fashion_mnist_dataset(train=False)
    assert len(data) == 10_000
    assert data[0]["image"].shape == (1, 28, 28)
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
