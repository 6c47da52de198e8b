"""Your own layers, two examples for ``model.family: examples.my_layers:<factory>`` (docs/models.md, "Your own
layers"). Run ``oobleck`` from the repository root, so that ``examples.my_layers`` is importable on every
worker (the current directory is searched).

* :func:`mlp`: a classifier for images, a plain ``nn.Sequential``-style list (``examples/my-layers.yaml``);
* :func:`char_lm`: a small language model whose output head is tied to its token embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from models.user_layers import LayerList


def mlp(image_size: int, channels: int, num_classes: int, hidden: int = 64, depth: int = 2) -> list:
    """``depth + 2`` layers: flatten and project the image, ``depth`` hidden blocks, then the class logits. The
    last layer's logits go through the default loss (summed cross-entropy against the labels)."""
    pixels = channels * image_size * image_size
    layers = [lambda: nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.GELU())]
    layers += [lambda: nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())] * depth
    layers.append(lambda: nn.Linear(hidden, num_classes))
    return layers


class _Residual(nn.Module):
    """``x + mlp(norm(x))`` over the last dimension of ``[B, T, width]`` (tokens do not mix)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _CausalMix(nn.Module):
    """Each position adds a learned mix of the positions before it (a causal, attention-free token mixer)."""

    def __init__(self, seq_len: int, width: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(0.02 * torch.randn(seq_len, seq_len))
        self.norm = nn.LayerNorm(width)
        self.block = _Residual(width)

    def forward(self, x):
        length = x.shape[1]
        mix = self.weights[:length, :length].tril()
        return self.block(x + mix @ self.norm(x))


def char_lm(seq_len: int, vocab_size: int, width: int = 32, depth: int = 2) -> LayerList:
    """Token embedding, ``depth`` causal mixing blocks, then a head whose weight is tied to the embedding's."""
    layers = [lambda: nn.Embedding(vocab_size, width)]
    layers += [lambda: _CausalMix(seq_len, width)] * depth
    layers.append(lambda: nn.Linear(width, vocab_size, bias=False))
    return LayerList(layers, tied=[((0, "weight"), (len(layers) - 1, "weight"))])
