"""Offline text for the GPT family, tokenised as UTF-8 bytes (vocabulary 256).

Byte tokens need no tokenizer files and no download: any text is a token sequence, and a model's output
decodes back to text (invalid UTF-8 shows as U+FFFD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from models.data import Dataset
from models.errors import ModelConfigError

VOCAB_SIZE = 256


def pydoc_corpus() -> str:
    """The Python standard library's own documentation topics (``pydoc_data.topics.topics``), in key
    order, joined by blank lines: about 0.5 MB of English technical prose that every Python install has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text_file(path: str | Path) -> str:
    """The contents of a UTF-8 text file. Raises :class:`ModelConfigError` naming ``data.path`` when the file
    is missing, not a regular file, empty, or not valid UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise ModelConfigError(f"data.path: got {str(path)!r}; no such file; give the path of a UTF-8 text file")
    raw = p.read_bytes()
    if not raw:
        raise ModelConfigError(f"data.path: got {str(path)!r}; the file is empty; give a file with text in it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ModelConfigError(
            f"data.path: got {str(path)!r}; not valid UTF-8 at byte {err.start}; convert the file to UTF-8"
        ) from None


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D LongTensor of tokens in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | Iterable[int]) -> str:
    """Text from byte tokens; byte sequences that are not valid UTF-8 become U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` bytes of a text; a trailing partial window is dropped.

    Item ``i`` covers bytes ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))`` and is
    ``{"tokens": window[:-1], "targets": window[1:]}``, both LongTensor ``[seq_len]``.
    """

    def __init__(self, text: str, seq_len: int) -> None:
        if seq_len <= 0:
            raise ModelConfigError(f"model.overrides.seq_len: got {seq_len}; must be a positive integer")
        data = text.encode("utf-8")
        self.seq_len = seq_len
        self.num_windows = len(data) // (seq_len + 1)
        if self.num_windows == 0:
            raise ModelConfigError(
                f"data: the text has {len(data)} bytes, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                "use a longer text or a smaller model.overrides.seq_len"
            )
        # uint8 keeps the corpus at one byte per token; items are widened to long on access.
        self._bytes = torch.frombuffer(bytearray(data[: self.num_windows * (seq_len + 1)]), dtype=torch.uint8)
        self._bytes = self._bytes.view(self.num_windows, seq_len + 1)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        window = self._bytes[index].long()
        return {"tokens": window[:-1], "targets": window[1:]}
