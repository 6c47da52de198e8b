"""Offline text corpus and byte-level token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.errors import ModelConfigError
from models.text import TokenWindows, decode, encode, pydoc_corpus, read_text_file


def test_pydoc_corpus_is_real_documentation() -> None:
    corpus = pydoc_corpus()
    assert len(corpus) > 300_000
    from pydoc_data.topics import topics

    assert all(text in corpus for text in topics.values())
    assert 'The "for" statement' in corpus
    assert corpus == pydoc_corpus()  # deterministic


def test_encode_decode_round_trip_utf8() -> None:
    text = "naïve café — π ≈ 3.14 🐍"
    tokens = encode(text)
    assert tokens.dtype == torch.long and len(tokens) == len(text.encode("utf-8"))
    assert int(tokens.max()) < 256
    assert decode(tokens) == text
    assert decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 shows, it does not raise


def test_token_windows_are_non_overlapping_shifted_pairs() -> None:
    text = "héllo world, " * 40
    data = text.encode("utf-8")
    seq_len = 16
    windows = TokenWindows(text, seq_len)
    assert len(windows) == len(data) // (seq_len + 1)
    rebuilt = b""
    for i in range(len(windows)):
        item = windows[i]
        assert item["tokens"].shape == item["targets"].shape == (seq_len,)
        assert item["tokens"].dtype == item["targets"].dtype == torch.long
        assert torch.equal(item["tokens"][1:], item["targets"][:-1])
        rebuilt += bytes(item["tokens"].tolist() + item["targets"][-1:].tolist())
    assert rebuilt == data[: len(rebuilt)] and len(data) - len(rebuilt) < seq_len + 1
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_text_shorter_than_one_window_is_a_config_error() -> None:
    with pytest.raises(ModelConfigError, match="fewer than one window of seq_len \\+ 1 = 65"):
        TokenWindows("short", 64)


def test_read_text_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("some text ✓", encoding="utf-8")
    assert read_text_file(good) == "some text ✓"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    for path, why in [(tmp_path / "missing.txt", "no such file"), (tmp_path, "that is a folder"),
                      (empty, "the file is empty"), (bad, "not valid UTF-8 at byte 3")]:
        with pytest.raises(ModelConfigError, match=f"data.path: got .*; {why}"):
            read_text_file(path)
