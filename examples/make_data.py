"""Write small offline data in each format the configs of examples/ read (docs/models.md, "Data formats"):

* ``DIR/digits-png/<digit>/NNN.png``: scikit-learn's 8x8 digits as 16x16 grayscale PNGs, one class folder a
  digit (an image folder; ``examples/image-folder.yaml``);
* ``DIR/pydoc-bpe/tokenizer.json``: a byte-level BPE tokenizer of 512 tokens trained on Python's own
  documentation (``examples/text-tokenizer.yaml``);
* ``DIR/pydoc.bin``: that documentation as uint16 token ids of the tokenizer (a token file;
  ``examples/token-file.yaml``).

Run from the repository root: ``python -m examples.make_data`` (DIR defaults to ``runs/data``; a few seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from models.text import pydoc_corpus

VOCAB_SIZE = 512


def write_image_folder(out: Path, per_class: int = 20, size: int = 16) -> Path:
    """The first ``per_class`` digits of each class as ``out/<digit>/NNN.png`` (``size`` squared, grayscale)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(digits.images[digits.target == label][:per_class]):
            pixels = Image.fromarray((image * (255 / 16)).astype(np.uint8), mode="L")
            pixels.resize((size, size), Image.Resampling.NEAREST).save(folder / f"{n:03d}.png")
    return out


def train_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE, text: str | None = None) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``text`` (default: the pydoc corpus),
    saved as ``out/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text if text is not None else pydoc_corpus()], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def write_token_file(path: Path, tokens: np.ndarray, dtype: str = "uint16") -> Path:
    """``tokens`` as a flat array of ``dtype`` (little-endian), nanoGPT's ``train.bin`` layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens).astype(np.dtype(dtype).newbyteorder("<")).tofile(path)
    return path


def main(out: Path) -> None:
    from models.tokens import load_tokenizer, tokenize

    write_image_folder(out / "digits-png")
    train_tokenizer(out / "pydoc-bpe")
    write_token_file(out / "pydoc.bin", tokenize(pydoc_corpus(), load_tokenizer(str(out / "pydoc-bpe"))))
    print(f"wrote {out}/digits-png, {out}/pydoc-bpe/tokenizer.json, {out}/pydoc.bin")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/data"))
