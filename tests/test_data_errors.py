"""Bad data is one line and exit code 2: checked before ``oobleck run`` starts anything
(:func:`oobleck.model_building.check_data`), and, for what that cheap check cannot see, reported with the
failing worker's own line."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import text
from models.images import DIGITS_IMAGE_SHAPE, DIGITS_LABELS
from oobleck.config import DataConfig
from oobleck.errors import ConfigError
from tests.run_helpers import ROOT, start_run, tagged, tiny_gpt, write_config

pytestmark = pytest.mark.timeout(180)

#: what the acceptance allows a bad-data `oobleck run` (the command's own start-up included), counted as the
#: command's CPU time: wall time on a shared 2-core machine measures the neighbours too (1.7-2.3 s idle)
BAD_DATA_S = 5.0


def _dit_job(profile_dir: Path, data: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    raw = tiny_gpt(profile_dir, nodes=3, steps=2)
    raw["model"] = {"family": "dit", "preset": "tiny", "overrides": overrides}
    raw["data"] = data
    return raw


def _text_job(profile_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    raw = tiny_gpt(profile_dir, nodes=3, steps=2)
    raw["data"] = data
    return raw


def _bad_data_cases(tmp: Path, profile_dir: Path) -> dict[str, tuple[dict[str, Any], str]]:
    binary = tmp / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    short = tmp / "short.txt"
    short.write_text("abc")
    folder = tmp / "texts"
    folder.mkdir()
    return {
        "missing file": (_text_job(profile_dir, {"dataset": "text-file", "path": str(tmp / "nope.txt")}), "no such file"),
        "no path": (_text_job(profile_dir, {"dataset": "text-file"}), "data.path: missing"),
        "binary file": (_text_job(profile_dir, {"dataset": "text-file", "path": str(binary)}), "not valid UTF-8 at byte 128"),
        "folder": (_text_job(profile_dir, {"dataset": "text-file", "path": str(folder)}), "that is a folder"),
        "3-byte file": (_text_job(profile_dir, {"dataset": "text-file", "path": str(short)}), "the text has 3 bytes"),
        "label out of range": (
            _dit_job(profile_dir, {"dataset": "digits"}, num_classes=5),
            "model.overrides.num_classes: got 5 (labels 0..4) but data.dataset digits uses labels up to 9",
        ),
    }


def _children_cpu_s() -> float:
    """CPU seconds (user and system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CASES = ["missing file", "no path", "binary file", "folder", "3-byte file", "label out of range"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line_before_any_node_starts(case: str, tmp_path: Path, profile_dir: Path) -> None:
    raw, expected = _bad_data_cases(tmp_path, profile_dir)[case]
    run_dir = tmp_path / "run"
    before = _children_cpu_s()
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    _, err = proc.communicate(timeout=60)
    elapsed = _children_cpu_s() - before
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("oobleck run: error: "), err
    assert expected in lines[0], lines[0]
    assert elapsed < BAD_DATA_S, f"{elapsed:.1f} s of CPU"
    assert not (run_dir / "logs").exists(), "nodes were started"  # the launcher creates it before any agent
    assert not tagged(tag)


@pytest.mark.slow  # a real job: its workers fail on the data
def test_a_worker_failing_on_its_data_is_reported_once_with_its_own_line(tmp_path: Path, profile_dir: Path) -> None:
    # valid UTF-8 for longer than the pre-check decodes, then a stray byte: only loading the whole file finds it
    late = tmp_path / "late.txt"
    bad_at = text.CHECK_PREFIX_BYTES + 4096
    late.write_bytes(b"x" * bad_at + b"\xff" + b"more text " * 10)
    raw = _text_job(profile_dir, {"dataset": "text-file", "path": str(late)})
    # the model's profile, measured on good data first: otherwise profiling loads the file in this process and
    # fails the run before the launch (one line too, but not the path under test)
    good = write_config(tmp_path / "good.yaml", _text_job(profile_dir, {"dataset": "pydoc"}))
    subprocess.run([sys.executable, "-m", "oobleck.cli", "profile", str(good)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), tmp_path / "run")
    _, err = proc.communicate(timeout=150)
    expected = f"data.path: got {str(late)!r}; not valid UTF-8 at byte {bad_at}; convert the file to UTF-8"
    assert proc.returncode == 2, err
    said = [line for line in err.splitlines() if expected in line]
    assert len(said) == 1 and re.fullmatch(rf"oobleck run: error: worker node\d/0: {re.escape(expected)}", said[0]), err
    assert "exited with code" not in err, err
    assert not tagged(tag), "processes outlived the run"


def test_train_local_reports_the_same_line(tmp_path: Path, profile_dir: Path) -> None:
    raw, expected = _bad_data_cases(tmp_path, profile_dir)["folder"]
    config = write_config(tmp_path / "job.yaml", raw)
    proc = subprocess.run(
        [sys.executable, "-m", "oobleck.cli", "train-local", str(config), "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr


# The check of each dataset kind, in this process (the cases above run it through the command line).


def _check(data: DataConfig, family: str = "gpt", **overrides: Any) -> None:
    from oobleck.config import ModelConfig
    from oobleck.model_building import build_model, check_dataset

    check_dataset(data, build_model(ModelConfig(family=family, preset="tiny", overrides=overrides), seed=0))


def _idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


def test_digits_constants_match_the_data(digits) -> None:
    assert tuple(digits[0]["image"].shape) == DIGITS_IMAGE_SHAPE
    assert tuple(sorted(set(digits.labels.tolist()))) == DIGITS_LABELS


def test_built_in_datasets_take_no_path_and_must_suit_the_model() -> None:
    with pytest.raises(ConfigError, match=r"data.path: got 'x.txt'; data.dataset pydoc is built in"):
        _check(DataConfig(dataset="pydoc", path="x.txt"))
    with pytest.raises(ConfigError, match="text datasets need a text model"):
        _check(DataConfig(dataset="pydoc"), family="dit")
    with pytest.raises(ConfigError, match="the text has .* bytes, fewer than one window"):
        _check(DataConfig(dataset="pydoc"), seq_len=10_000_000)
    with pytest.raises(ConfigError, match=r"data.classes: got \[12\]"):
        _check(DataConfig(dataset="digits", classes=[12]), family="dit")
    _check(DataConfig(dataset="digits", classes=[0, 1, 2]), family="moe", num_classes=3)  # labels 0..2 fit


def test_text_check_reads_a_bounded_prefix(tmp_path: Path) -> None:
    cut = tmp_path / "cut.txt"  # a two-byte character straddles the end of the checked prefix
    cut.write_bytes(b"a" * (text.CHECK_PREFIX_BYTES - 1) + "é".encode() + b"b" * 100)
    assert text.text_file_size(cut) == text.CHECK_PREFIX_BYTES + 101
    ends_cut = tmp_path / "ends-cut.txt"  # the same character cut by the end of the file is an error
    ends_cut.write_bytes(b"abc" + "é".encode()[:1])
    with pytest.raises(ConfigError, match="not valid UTF-8 at byte 3"):
        _check(DataConfig(dataset="text-file", path=str(ends_cut)))


def test_fashion_mnist_folder_checks(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    folder.mkdir()
    _idx(folder / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)), compress=True)
    _idx(folder / "train-labels-idx1-ubyte", np.array([0, 9, 3]))
    fm = DataConfig(dataset="fashion-mnist", path=str(folder))
    _check(fm, family="dit", image_size=28)
    with pytest.raises(ConfigError, match="images are 28x28 with 1 channel"):
        _check(fm, family="dit")  # tiny: 8x8
    with pytest.raises(ConfigError, match="uses labels up to 9; set model.overrides.num_classes to 10 or more"):
        _check(fm, family="dit", image_size=28, num_classes=4)
    _check(DataConfig(dataset="fashion-mnist", path=str(folder), classes=[0, 3]), family="dit", image_size=28, num_classes=4)
    with pytest.raises(ConfigError, match="that is a file, but fashion-mnist reads a folder"):
        _check(DataConfig(dataset="fashion-mnist", path=str(folder / "train-labels-idx1-ubyte")), family="dit")
    with pytest.raises(ConfigError, match="no such folder"):
        _check(DataConfig(dataset="fashion-mnist", path=str(tmp_path / "nope")), family="dit")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x89PNG\r\n"))
    with pytest.raises(ConfigError, match="is not an IDX file"):
        _check(fm, family="dit", image_size=28)
    _idx(folder / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)), compress=True)
    with pytest.raises(ConfigError, match="of the same split"):
        _check(fm, family="dit", image_size=28)
