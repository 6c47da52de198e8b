"""Offline text for the GPT family, tokenised as UTF-8 bytes (vocabulary 256).

Byte tokens need no tokenizer files and no download: any text is a token sequence, and a model's output
decodes back to text (invalid UTF-8 shows as U+FFFD).
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from models.data import Dataset
from models.errors import ModelConfigError

VOCAB_SIZE = 256


def pydoc_corpus() -> str:
    """The Python standard library's own documentation topics (``pydoc_data.topics.topics``), in key
    order, joined by blank lines: about 0.5 MB of English technical prose that every Python install has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


#: how many leading bytes of a text file :func:`text_file_size` decodes: the check stays cheap on a file of
#: any size; a bad byte further in is found when the file is loaded (:func:`read_text_file`)
CHECK_PREFIX_BYTES = 1 << 20


def _regular_file(path: str | Path) -> Path:
    """``path`` after checking that it names a non-empty regular file; ModelConfigError naming ``data.path``
    (missing, a folder, something else, unreadable, empty) otherwise."""
    p = Path(path)
    got = f"data.path: got {str(path)!r}"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelConfigError(f"{got}; no such file; give the path of a UTF-8 text file") from None
    except OSError as e:
        raise _unreadable(path, e) from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelConfigError(f"{got}; that is a folder; data.dataset text-file reads one UTF-8 text file: give its path")
    if not stat.S_ISREG(st.st_mode):
        raise ModelConfigError(f"{got}; not a regular file; give the path of a UTF-8 text file")
    if st.st_size == 0:
        raise ModelConfigError(f"{got}; the file is empty; give a file with text in it")
    return p


def _unreadable(path: str | Path, err: OSError) -> ModelConfigError:
    return ModelConfigError(f"data.path: got {str(path)!r}; cannot read it ({err.strerror}); give a readable UTF-8 text file")


def _not_utf8(path: str | Path, at: int) -> ModelConfigError:
    return ModelConfigError(f"data.path: got {str(path)!r}; not valid UTF-8 at byte {at}; convert the file to UTF-8")


def text_file_size(path: str | Path) -> int:
    """The size in bytes (= tokens) of the UTF-8 text file ``path``, after a check that reads at most
    :data:`CHECK_PREFIX_BYTES` of it: the file exists, is a regular file, is not empty, and its first
    :data:`CHECK_PREFIX_BYTES` bytes are valid UTF-8 (a character cut by that limit counts as valid). Raises
    :class:`ModelConfigError` naming ``data.path`` otherwise."""
    p = _regular_file(path)
    try:
        with p.open("rb") as f:
            head = f.read(CHECK_PREFIX_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start) from None
    return size


def read_text_file(path: str | Path) -> str:
    """The contents of a UTF-8 text file. Raises :class:`ModelConfigError` naming ``data.path`` when the file
    is missing, a folder or not a regular file, unreadable, empty, or not valid UTF-8."""
    p = _regular_file(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start) from None


def check_windows(count: int, seq_len: int, what: str = "the text has {count} bytes") -> int:
    """The number of windows of ``seq_len + 1`` tokens a sequence of ``count`` tokens holds; ModelConfigError
    when ``seq_len`` is not positive or the sequence is shorter than one window. ``what`` describes the
    sequence in the message (``{count}`` is filled in)."""
    if seq_len <= 0:
        raise ModelConfigError(f"model.overrides.seq_len: got {seq_len}; must be a positive integer")
    windows = count // (seq_len + 1)
    if windows == 0:
        raise ModelConfigError(
            f"data: {what.format(count=count)}, fewer than one window of seq_len + 1 = {seq_len + 1}; "
            "use longer data (data.path) or a smaller seq_len"
        )
    return windows


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D LongTensor of tokens in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | Iterable[int]) -> str:
    """Text from byte tokens; byte sequences that are not valid UTF-8 become U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens of a 1-D integer array (in memory or memory-mapped);
    a trailing partial window is dropped.

    Item ``i`` covers tokens ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))`` and is
    ``{"tokens": window[:-1], "targets": window[1:]}``, both LongTensor ``[seq_len]``. With ``vocab_size``,
    a window holding a token id >= ``vocab_size`` raises ModelConfigError naming ``data.path`` (``source``)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int | None = None, source: str = "") -> None:
        self.seq_len = seq_len
        self.num_windows = check_windows(len(tokens), seq_len, "the data has {count} tokens")
        self._tokens = tokens
        self._vocab_size = vocab_size
        self._source = source

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        width = self.seq_len + 1
        # widened to int64 on access, so the array keeps its compact dtype (bytes, uint16, uint32)
        window = torch.from_numpy(np.asarray(self._tokens[index * width : (index + 1) * width], dtype=np.int64))
        if self._vocab_size is not None and int(window.max()) >= self._vocab_size:
            raise ModelConfigError(
                f"data.path: {self._source} holds token id {int(window.max())} in window {index}, but the model's "
                f"vocab_size is {self._vocab_size}; raise vocab_size or fix the data"
            )
        return {"tokens": window[:-1], "targets": window[1:]}


class TokenWindows(Windows):
    """:class:`Windows` of a text's UTF-8 bytes (one byte a token, held as uint8)."""

    def __init__(self, text: str, seq_len: int) -> None:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        check_windows(len(data), seq_len)
        super().__init__(data, seq_len)
