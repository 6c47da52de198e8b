"""Token data: a token file (a flat binary array of token ids, nanoGPT's ``train.bin`` layout) and text cut
into tokens by a tokenizer loaded from a local directory (``tokenizer.json`` of Hugging Face tokenizers).

Both feed :class:`models.text.Windows`: non-overlapping windows of ``seq_len + 1`` tokens, so the items, and
with :class:`models.data.BatchSource` every batch, are a function of (seed, step, sample) alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelConfigError
from models.text import Windows, check_windows

#: data.token_dtype -> numpy dtype (little-endian, as numpy's ``tofile`` writes on every common machine)
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

#: how many leading token ids of a token file :func:`check_token_file` compares with the vocabulary: the
#: check stays cheap on a file of any size; an id beyond it is found when its window is read
CHECK_PREFIX_TOKENS = 1 << 20

TOKENIZER_FILE = "tokenizer.json"


def _token_file_size(path: str) -> int:
    got = f"data.path: got {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelConfigError(f"{got}; no such file; give the path of a token file (a flat array of token ids)") from None
    except OSError as e:
        raise ModelConfigError(f"{got}; cannot read it ({e.strerror}); give a readable token file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelConfigError(f"{got}; not a regular file; data.dataset token-file reads one file of token ids")
    return st.st_size


def token_count(path: str, token_dtype: str) -> int:
    """The number of token ids the file holds. ModelConfigError naming ``data.path`` for a missing or
    irregular file, or naming ``data.token_dtype`` and ``data.path`` when its size is not a multiple of the
    dtype's size."""
    size, itemsize = _token_file_size(path), TOKEN_DTYPES[token_dtype].itemsize
    if size % itemsize:
        other = "uint32" if token_dtype == "uint16" else "uint16"
        raise ModelConfigError(
            f"data.token_dtype: {token_dtype} ids take {itemsize} bytes but data.path {path!r} holds {size} bytes, "
            f"not a multiple; set data.token_dtype to the type the file was written with ({other}?) or fix the file"
        )
    return size // itemsize


def read_token_file(path: str, token_dtype: str) -> np.ndarray:
    """The token ids of the file as a read-only memory map (pages are read when a window is used)."""
    if token_count(path, token_dtype) == 0:
        raise ModelConfigError(f"data.path: got {path!r}; the file is empty; give a file of token ids")
    return np.memmap(path, dtype=TOKEN_DTYPES[token_dtype], mode="r")


def _check_ids(tokens: np.ndarray, vocab_size: int | None, where: str) -> None:
    if vocab_size is None or not len(tokens):
        return
    top = int(tokens.max())
    if top >= vocab_size:
        raise ModelConfigError(
            f"data.path: {where} holds token id {top} but the model's vocab_size is {vocab_size}; raise the model's "
            "vocab_size above it, or check data.token_dtype"
        )


def check_token_file(path: str, token_dtype: str, seq_len: int, vocab_size: int | None) -> None:
    """The checks before launch: the file holds whole token ids (:func:`token_count`), at least one window of
    ``seq_len + 1`` of them, and its first :data:`CHECK_PREFIX_TOKENS` ids are below ``vocab_size`` (None
    skips that)."""
    tokens = read_token_file(path, token_dtype)
    check_windows(len(tokens), seq_len, "the token file has {count} tokens")
    _check_ids(tokens[:CHECK_PREFIX_TOKENS], vocab_size, f"the start of {path!r}")


def token_file_windows(path: str, token_dtype: str, seq_len: int, vocab_size: int | None) -> Windows:
    """The windows of a token file, memory-mapped; every window read is checked against ``vocab_size``."""
    check_token_file(path, token_dtype, seq_len, vocab_size)
    return Windows(read_token_file(path, token_dtype), seq_len, vocab_size, source=repr(path))


def load_tokenizer(directory: str) -> Any:
    """The ``tokenizers.Tokenizer`` in ``directory/tokenizer.json``; ModelConfigError naming ``data.tokenizer``
    when the folder or the file is missing or the file does not load."""
    from tokenizers import Tokenizer  # deferred: only text with a tokenizer needs it

    folder = Path(directory)
    if not folder.is_dir():
        raise ModelConfigError(f"data.tokenizer: got {directory!r}; no such folder; give a folder holding {TOKENIZER_FILE}")
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        raise ModelConfigError(
            f"data.tokenizer: no {TOKENIZER_FILE} in {directory!r}; give the folder a tokenizer was saved to "
            "(tokenizer.save(...) or save_pretrained)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exceptions with its parser's message
        raise ModelConfigError(f"data.tokenizer: {file} does not load ({' '.join(str(e).split())[:200]})") from None


def check_vocab(tokenizer: Any, directory: str, vocab_size: int | None) -> None:
    """ModelConfigError naming ``data.tokenizer`` when the model's ``vocab_size`` is below the tokenizer's
    (None: the model does not say, nothing to check)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and vocab_size < size:
        raise ModelConfigError(
            f"data.tokenizer: the tokenizer in {directory!r} has {size} tokens but the model's vocab_size is "
            f"{vocab_size}; set the model's vocab_size to {size} or more"
        )


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """The token ids of ``text`` as one uint32 array (special tokens the tokenizer's post-processor would
    add are left out: the text is one stream, not one sequence)."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)
