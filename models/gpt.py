"""GPT (decoder-only transformer LM) as a layer list: ``[embedding, block x n_layer, head]``.

The shapes follow GPT-2 (pre-LayerNorm blocks, learned positions, tanh GELU, output head tied to the token
embedding, residual projections initialised with std ``0.02 / sqrt(2 * n_layer)``). The code reads like
nanoGPT, cut into independently buildable layers:

* layer 0, :class:`GPTEmbedding`, reads ``mb.data["tokens"]`` (LongTensor ``[B, T]``) and returns the
  residual stream ``[B, T, d_model]``;
* layers ``1 .. n_layer``, :class:`GPTBlock`, map the residual stream to itself;
* layer ``n_layer + 1``, :class:`GPTHead`, applies the final LayerNorm and the tied output projection and
  returns the **summed** cross-entropy over every target token of ``mb.data["targets"]``.

Every layer draws its initial weights only from ``layer_generator(seed, i)``. The head's tied weight is
drawn from ``layer_generator(seed, 0)`` exactly as the embedding draws it, so a last stage built alone
starts with the same weight the first stage holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Carry, Layer, LayerMeta, MicroBatch, ModelSpec, TiedGroup, layer_generator
from models.causal_lm import continue_tokens
from models.errors import ModelConfigError

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. ``seq_len`` is the context length (the number of learned positions)."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True

    def num_params(self) -> int:
        """Distinct parameters of the whole model: the tied embedding/head weight counts once, learned
        positions count (GPT-2 small gives 124,439,808)."""
        return (
            _embedding_params(self)
            + self.n_layer * _block_params(self)
            + _head_params(self)
            - self.vocab_size * self.d_model
        )


_GPT2 = dict(vocab_size=50257, seq_len=1024)
_GPT3 = dict(vocab_size=50257, seq_len=2048)

#: Named shapes. ``tiny`` (~0.8M params) and ``small`` (~2.7M) are for CPU runs and tests; the GPT-2 and
#: GPT-3 shapes are for planning and profiling at scale. GPT-3's table lists 24 heads for 1.3B and
#: d_model 5140 for 13B, neither of which divides into heads; the 16 heads of 128 and d_model 5120 used
#: by the public replications are taken instead.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, d_model=128, seq_len=64),
    "small": GPTConfig(n_layer=6, n_head=6, d_model=192, seq_len=128),
    "gpt2": GPTConfig(n_layer=12, n_head=12, d_model=768, **_GPT2),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, d_model=1024, **_GPT2),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, d_model=1280, **_GPT2),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, d_model=1600, **_GPT2),
    "gpt3-125m": GPTConfig(n_layer=12, n_head=12, d_model=768, **_GPT3),
    "gpt3-350m": GPTConfig(n_layer=24, n_head=16, d_model=1024, **_GPT3),
    "gpt3-760m": GPTConfig(n_layer=24, n_head=16, d_model=1536, **_GPT3),
    "gpt3-1.3b": GPTConfig(n_layer=24, n_head=16, d_model=2048, **_GPT3),
    "gpt3-2.7b": GPTConfig(n_layer=32, n_head=32, d_model=2560, **_GPT3),
    "gpt3-6.7b": GPTConfig(n_layer=32, n_head=32, d_model=4096, **_GPT3),
    "gpt3-13b": GPTConfig(n_layer=40, n_head=40, d_model=5120, **_GPT3),
    "gpt3-175b": GPTConfig(n_layer=96, n_head=96, d_model=12288, **_GPT3),
}


# Parameter counts from the shapes alone, so the planner can describe models too large to build.
def _layernorm_params(c: GPTConfig) -> int:
    return c.d_model * (2 if c.bias else 1)


def _embedding_params(c: GPTConfig) -> int:
    return (c.vocab_size + c.seq_len) * c.d_model


def _block_params(c: GPTConfig) -> int:
    d = c.d_model
    weights = 3 * d * d + d * d + 4 * d * d + 4 * d * d  # qkv, attention out, MLP up, MLP down
    biases = (3 * d + d + 4 * d + d) if c.bias else 0
    return weights + biases + 2 * _layernorm_params(c)


def _head_params(c: GPTConfig) -> int:
    return _layernorm_params(c) + c.vocab_size * c.d_model


def _validate(c: GPTConfig) -> None:
    for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"model.overrides.{name}: got {value!r}; must be a positive integer")
    if c.d_model % c.n_head:
        raise ModelConfigError(
            f"model.overrides.d_model: got {c.d_model} with n_head {c.n_head}; d_model must be a multiple of n_head"
        )
    if c.dropout != 0:
        # Dropout masks would come from each worker's running RNG, so re-running a step under a new plan
        # after a failure would not reproduce the same numbers.
        raise ModelConfigError(
            f"model.overrides.dropout: got {c.dropout!r}; GPT supports only 0 (dropout breaks exact replay of "
            "a step after recovery); remove the override"
        )
    if not isinstance(c.bias, bool):
        raise ModelConfigError(f"model.overrides.bias: got {c.bias!r}; expected true or false")


def _token_embedding(c: GPTConfig, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Generator]:
    """The token-embedding matrix, drawn first from layer 0's generator, and that generator (for the
    draws that follow it). Both ends of the tie call this, which keeps their initial copies equal."""
    gen = layer_generator(seed, 0)
    weight = torch.empty(c.vocab_size, c.d_model, dtype=dtype)
    nn.init.normal_(weight, 0.0, INIT_STD, generator=gen)
    return weight, gen


class GPTEmbedding(Layer):
    """Token embedding plus learned position embedding: tokens ``[B, T]`` -> residual ``[B, T, d]``."""

    def __init__(self, c: GPTConfig, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        weight, gen = _token_embedding(c, seed, dtype)
        self.wte = nn.Embedding(c.vocab_size, c.d_model, _weight=weight)
        self.wpe = nn.Embedding(c.seq_len, c.d_model, dtype=dtype)
        nn.init.normal_(self.wpe.weight, 0.0, INIT_STD, generator=gen)

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        tokens = mb.data["tokens"]
        length = tokens.shape[1]
        if length > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {length} tokens exceeds the context length {self.wpe.num_embeddings}")
        positions = torch.arange(length, device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias, dtype=dtype)
        self.c_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        # [B, T, d] -> [B, heads, T, d_head]
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.d_model, 4 * c.d_model, bias=c.bias, dtype=dtype)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * c.d_model, c.d_model, bias=c.bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(Layer):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, c: GPTConfig, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, bias=c.bias, dtype=dtype)
        self.attn = CausalSelfAttention(c, dtype)
        self.ln_2 = nn.LayerNorm(c.d_model, bias=c.bias, dtype=dtype)
        self.mlp = MLP(c, dtype)
        # GPT-2: projections that write into the residual stream are scaled down by the number of such
        # writes, so the stream's variance does not grow with depth.
        residual_std = INIT_STD / math.sqrt(2 * c.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else INIT_STD
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        assert isinstance(carry, torch.Tensor)
        x = carry + self.attn(self.ln_1(carry))
        return x + self.mlp(self.ln_2(x))


class GPTHead(Layer):
    """Final LayerNorm and the output projection (tied to the token embedding); returns the summed
    cross-entropy of every target token."""

    def __init__(self, c: GPTConfig, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(c.d_model, bias=c.bias, dtype=dtype)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False, dtype=dtype)
        weight, _ = _token_embedding(c, seed, dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab]`` for the residual stream ``x`` (no loss)."""
        return self.lm_head(self.ln_f(x))

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        assert isinstance(carry, torch.Tensor)
        logits = self.logits(carry)
        targets = mb.data["targets"]
        # reshape, not view: targets may be a strided slice of a larger batch
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


class GPTSpec(ModelSpec):
    """A GPT as ``n_layer + 2`` independently buildable layers (see the module docstring).

    Raises :class:`ModelConfigError` for a config that cannot be built: non-positive sizes, ``d_model`` not a
    multiple of ``n_head``, or ``dropout != 0`` (not supported, because dropout masks are not a function
    of (seed, step, sample) and would break exact replay of a step under a new plan).
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        _validate(config)
        if not dtype.is_floating_point:
            raise ModelConfigError(f"model.dtype: got {dtype}; expected a floating-point dtype")
        self.config = config
        self.seed = seed
        self.dtype = dtype

    @property
    def num_layers(self) -> int:
        return self.config.n_layer + 2

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")

    def build_layer(self, index: int) -> Layer:
        self._check_index(index)
        if index == 0:
            return GPTEmbedding(self.config, self.seed, self.dtype)
        if index == self.num_layers - 1:
            return GPTHead(self.config, self.seed, self.dtype)
        return GPTBlock(self.config, layer_generator(self.seed, index), self.dtype)

    def layer_meta(self, index: int) -> LayerMeta:
        """Sizes and forward FLOPs of one sample (``seq_len`` tokens).

        FLOPs count a multiply-add as 2: a block costs ``2 * params * seq_len`` plus the attention
        products ``QK^T`` and ``AV``, ``4 * seq_len^2 * d_model`` (the causal mask is not credited, as in
        the usual GPT FLOP counts); the head costs ``2 * params * seq_len`` (LayerNorm and projection);
        the embedding does lookups and one add per element, ``seq_len * d_model``. Every layer but the
        head sends ``seq_len * d_model`` elements downstream; the head's output is the microbatch's loss,
        which crosses no stage boundary, so it counts 0.
        """
        self._check_index(index)
        c = self.config
        stream = c.seq_len * c.d_model
        if index == 0:
            name, params, flops, out = "embedding", _embedding_params(c), float(stream), stream
        elif index == self.num_layers - 1:
            name, params, out = "head", _head_params(c), 0
            flops = 2.0 * params * c.seq_len
        else:
            name, params, out = f"block{index - 1}", _block_params(c), stream
            flops = 2.0 * params * c.seq_len + 4.0 * c.seq_len * c.seq_len * c.d_model
        return LayerMeta(name, params, params, flops, out)

    def loss_units(self, mb: MicroBatch) -> int:
        """The number of target tokens in ``mb`` (the head's loss sums over all of them)."""
        return int(mb.data["targets"].numel())

    @property
    def tied(self) -> list[TiedGroup]:
        return [((0, "wte.weight"), (self.num_layers - 1, "lm_head.weight"))]

    def fingerprint(self) -> dict:
        return {
            "family": "gpt",
            **dataclasses.asdict(self.config),
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def generate(
    layers: Sequence[Layer],
    prompt_tokens: torch.Tensor,
    n: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend a 1-D token prompt by ``n`` tokens with a whole GPT layer list (``GPTSpec.build_all()``):
    :func:`models.causal_lm.continue_tokens` over at most the last ``seq_len`` tokens (the argmax when
    ``temperature == 0``, otherwise a draw from ``softmax(logits / temperature)`` using ``generator``).
    Returns the prompt followed by the new tokens (1-D LongTensor)."""
    head, embedding = layers[-1], layers[0]
    if not isinstance(head, GPTHead) or not isinstance(embedding, GPTEmbedding):
        raise TypeError("generate needs a whole GPT layer list, from GPTEmbedding to GPTHead")
    return continue_tokens(
        layers, prompt_tokens, n, window=embedding.wpe.num_embeddings, temperature=temperature, generator=generator
    )
