"""The data formats users bring: image folders, token files and text cut by a local tokenizer. Their items,
labels and windows, the deterministic batches, and bad input as one line (exit 2 through the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from examples.make_data import train_tokenizer, write_token_file
from models.text import pydoc_corpus
from models.tokens import load_tokenizer, tokenize
from oobleck.config import config_from_dict
from oobleck.errors import ConfigError
from oobleck.model_building import build_batches, build_dataset, build_model, check_data
from tests.run_helpers import ROOT

GPT = {"family": "gpt", "preset": "tiny", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2, "seq_len": 16}}
DIT = {"family": "dit", "preset": "tiny", "overrides": {"n_layer": 1, "d_model": 16, "n_head": 2, "num_classes": 3}}


def job(model: dict[str, Any], data: dict[str, Any], **training: Any) -> Any:
    return config_from_dict({"model": model, "data": data, "training": {"global_batch": 4, "microbatch": 2, **training}})


def dataset(model: dict[str, Any], data: dict[str, Any]) -> Any:
    config = job(model, data)
    return build_dataset(config.data, build_model(config.model, 0))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, text=pydoc_corpus()[:100_000])


def write_folder(root: Path, classes: dict[str, list[int]], size: int = 12) -> Path:
    """One uniform grayscale ``size``x``size`` PNG per value under ``root/<class>/``; a JPEG for class ``b``."""
    for name, values in classes.items():
        (root / name).mkdir(parents=True)
        for n, value in enumerate(values):
            image = Image.new("L", (size, size), value)
            if name == "b":
                image.convert("RGB").save(root / name / f"{n}.JPG", quality=100)
            else:
                image.save(root / name / f"{n}.png")
    return root


def test_image_folder_labels_resize_normalise_and_classes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", {"c": [255], "a": [0, 51], "b": [102]})
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    items = dataset(DIT, {"dataset": "image-folder", "path": str(root)})
    assert len(items) == 4 and items.images.shape == (4, 1, 8, 8)
    # labels by sorted folder name (a, b, c -> 0, 1, 2), files sorted within a folder; [0, 255] -> [-1, 1]
    assert items.labels.tolist() == [0, 0, 1, 2]
    expected = [-1.0, 51 * 2 / 255 - 1, 102 * 2 / 255 - 1, 1.0]
    for image, value in zip(items.images, expected):
        assert torch.allclose(image, torch.full_like(image, value), atol=2 / 255)  # the JPEG may be off by one level
    rgb = dataset({**DIT, "overrides": {**DIT["overrides"], "channels": 3}}, {"dataset": "image-folder", "path": str(root)})
    assert rgb.images.shape == (4, 3, 8, 8)
    only = dataset(DIT, {"dataset": "image-folder", "path": str(root), "classes": [2]})
    assert only.labels.tolist() == [2]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_and_batches_are_deterministic(tmp_path: Path, dtype: str) -> None:
    ids = (np.arange(17 * 5 + 3) * 7) % 256
    path = write_token_file(tmp_path / "train.bin", ids, dtype)
    config = job(GPT, {"dataset": "token-file", "path": str(path), "token_dtype": dtype})
    spec = build_model(config.model, 0)
    windows = build_dataset(config.data, spec)
    assert len(windows) == 5  # 88 ids hold five windows of 17; the last 3 are dropped
    item = windows[2]
    assert item["tokens"].dtype == torch.long and item["tokens"].tolist() == ids[34:50].tolist()
    assert item["targets"].tolist() == ids[35:51].tolist()
    one, two = build_batches(config, spec), build_batches(config, build_model(config.model, 0))
    for step in (0, 3):
        assert torch.equal(one.microbatch(step, 1).data["tokens"], two.microbatch(step, 1).data["tokens"])


def test_token_file_ids_beyond_the_vocabulary(tmp_path: Path) -> None:
    big = write_token_file(tmp_path / "big.bin", np.full(40, 300), "uint16")
    with pytest.raises(ConfigError, match="data.path: the start of .* holds token id 300 but the model's vocab_size is 256"):
        check_data(job(GPT, {"dataset": "token-file", "path": str(big)}))


def test_text_with_a_tokenizer_matches_its_token_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = {**GPT, "overrides": {**GPT["overrides"], "vocab_size": 300}}
    text = dataset(model, {"dataset": "pydoc", "tokenizer": str(tokenizer_dir)})
    ids = tokenize(pydoc_corpus(), load_tokenizer(str(tokenizer_dir)))
    assert int(ids.max()) < 300 and len(ids) < 0.8 * len(pydoc_corpus().encode())  # BPE merges bytes
    path = write_token_file(tmp_path / "pydoc.bin", ids, "uint16")
    file = dataset(model, {"dataset": "token-file", "path": str(path)})
    assert len(text) == len(file) == len(ids) // 17
    for i in (0, len(text) - 1):
        assert torch.equal(text[i]["tokens"], file[i]["tokens"]) and torch.equal(text[i]["targets"], file[i]["targets"])
    with pytest.raises(ConfigError, match="data.tokenizer: the tokenizer in .* has 300 tokens but the model's vocab_size is 256; set"):
        check_data(job(GPT, {"dataset": "pydoc", "tokenizer": str(tokenizer_dir)}))


def _cli(tmp_path: Path, model: dict[str, Any], data: dict[str, Any]) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": model, "data": data, "training": {"steps": 1, "global_batch": 2, "microbatch": 2}}))
    return subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(config), "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty image folder", "data.path: '{tmp}/imgs' has no class subfolders"),
        ("token file size", "data.token_dtype: uint32 ids take 4 bytes but data.path '{tmp}/odd.bin' holds 10 bytes, not a multiple"),
        ("no tokenizer.json", "data.tokenizer: no tokenizer.json in '{tmp}'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, case: str, message: str) -> None:
    if case == "empty image folder":
        (tmp_path / "imgs").mkdir()
        model, data = DIT, {"dataset": "image-folder", "path": str(tmp_path / "imgs")}
    elif case == "token file size":
        (tmp_path / "odd.bin").write_bytes(b"\x01" * 10)
        model, data = GPT, {"dataset": "token-file", "path": str(tmp_path / "odd.bin"), "token_dtype": "uint32"}
    else:
        model, data = GPT, {"dataset": "pydoc", "tokenizer": str(tmp_path)}
    done = _cli(tmp_path, model, data)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message.format(tmp=tmp_path) in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dataset": "image-folder"}, "data.path: missing; data.dataset image-folder reads"),
        ({"dataset": "digits", "tokenizer": "x"}, "data.tokenizer: got 'x'; only the text datasets"),
        ({"dataset": "token-file", "path": "/nonexistent/t.bin"}, "data.path: got '/nonexistent/t.bin'; no such file"),
    ],
)
def test_field_checks(data: dict[str, Any], message: str) -> None:
    model = GPT if data["dataset"] == "token-file" else DIT
    with pytest.raises(ConfigError, match=message):
        check_data(job(model, data))


def test_image_folder_checks(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs", {"a": [0], "b": [1], "c": [2], "d": [3]})
    with pytest.raises(ConfigError, match="data.dataset image-folder uses labels up to 3"):
        check_data(job(DIT, {"dataset": "image-folder", "path": str(root)}))  # num_classes 3
    check_data(job(DIT, {"dataset": "image-folder", "path": str(root), "classes": [0, 2]}))
    (root / "e").mkdir()
    with pytest.raises(ConfigError, match="class folder .*/e' holds no PNG/JPEG image"):
        check_data(job(DIT, {"dataset": "image-folder", "path": str(root), "classes": [0]}))
