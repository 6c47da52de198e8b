"""The Hugging Face causal-LM architectures the ``hf`` family adapts, described by what differs between them:
the library classes, where each piece sits in the library model's state dict, which config fields must be
positive integers and which are dropout probabilities, and how the embedding and final norm are built.

Everything else (the layer list, initialisation, loading, export) is written once in terms of this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """One causal-LM architecture of ``transformers``.

    The library model's state dict names the embedding modules ``{base}.{name}.*``, decoder block ``i``
    ``{base}.{blocks}.{i}.*``, the final norm ``{base}.{final_norm}.*`` and the output projection
    ``lm_head.weight``; checkpoints saved from the base model alone (GPT-2's original files) lack the
    ``{base}.`` prefix and the head.
    """

    #: the name model.architecture uses, which is also the model_type of its config.json
    name: str
    #: the library module defining the classes below (imported on first use: a worker imports only its own)
    module: str
    config_class_name: str
    model_class_name: str
    block_class_name: str
    base: str
    blocks: str
    final_norm: str
    #: embedding module names; the first is the token embedding (the one the head may be tied to)
    embeddings: tuple[str, ...]
    #: (library module, config) -> the embedding modules, in :attr:`embeddings` order, then any parameter-free
    #: ones applied after them (dropout)
    make_embeddings: Callable[[ModuleType, Any], dict[str, nn.Module]]
    #: (library module, config) -> the final norm module
    make_final_norm: Callable[[ModuleType, Any], nn.Module]
    #: config fields that must be positive integers
    sizes: tuple[str, ...]
    #: config fields that are dropout probabilities (must be 0, see HFSpec)
    dropouts: tuple[str, ...]
    #: the config field holding the context length (the learned or rotary positions)
    context: str
    #: weights whose name ends so are residual projections, initialised with std / sqrt(2 * layers) (GPT-2)
    residual_suffix: str | None = None
    #: the library module's class computing the rotary (cos, sin) of positions, if the blocks need one
    rotary_class_name: str | None = None

    @property
    def library(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config_class(self) -> Any:
        return getattr(self.library, self.config_class_name)

    @property
    def model_class(self) -> Any:
        return getattr(self.library, self.model_class_name)

    @property
    def block_class(self) -> Any:
        return getattr(self.library, self.block_class_name)

    @property
    def rotary_class(self) -> Any:
        return None if self.rotary_class_name is None else getattr(self.library, self.rotary_class_name)


def _gpt2_embeddings(lib: ModuleType, c: Any) -> dict[str, nn.Module]:
    return {
        "wte": nn.Embedding(c.vocab_size, c.n_embd),
        "wpe": nn.Embedding(c.n_positions, c.n_embd),
        "drop": nn.Dropout(c.embd_pdrop),
    }


def _llama_embeddings(lib: ModuleType, c: Any) -> dict[str, nn.Module]:
    return {"embed_tokens": nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id)}


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        "gpt2", "transformers.models.gpt2.modeling_gpt2", "GPT2Config", "GPT2LMHeadModel", "GPT2Block",
        base="transformer", blocks="h", final_norm="ln_f", embeddings=("wte", "wpe"), make_embeddings=_gpt2_embeddings,
        make_final_norm=lambda lib, c: nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon),
        sizes=("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"), dropouts=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
        context="n_positions", residual_suffix="c_proj.weight",
    ),  # fmt: skip
    "llama": Architecture(
        "llama", "transformers.models.llama.modeling_llama", "LlamaConfig", "LlamaForCausalLM", "LlamaDecoderLayer",
        base="model", blocks="layers", final_norm="norm", embeddings=("embed_tokens",), make_embeddings=_llama_embeddings,
        make_final_norm=lambda lib, c: lib.LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps),
        sizes=(
            "vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads",
        ),
        dropouts=("attention_dropout",), context="max_position_embeddings", rotary_class_name="LlamaRotaryEmbedding",
    ),  # fmt: skip
}
