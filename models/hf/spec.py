"""``HFSpec``: a Hugging Face causal LM (GPT-2, Llama) as an Oobleck layer list.

Layers: ``0`` the embeddings (GPT-2: ``wte`` + ``wpe`` + dropout; Llama: ``embed_tokens``), ``1 .. n`` the
library's decoder blocks, ``n + 1`` the final norm, ``lm_head`` and the summed token cross-entropy. A layer's
state-dict names are the library model's with a fixed prefix (:meth:`HFSpec.library_names`), which is how
pretrained weights are sliced per layer and how :meth:`HFSpec.export_pretrained` reassembles the model.

Initialisation without pretrained weights follows the library's scheme but draws only from
``layer_generator(seed, i)``: every matrix and embedding from N(0, initializer_range) (GPT-2's residual
projections ``c_proj`` scaled by ``1 / sqrt(2 * n_layer)``), biases 0, norm weights 1, a padding row 0. A
tied head (``tie_word_embeddings``) draws its weight from layer 0's generator exactly as the token embedding
does, so a last stage built alone starts with the first stage's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from models.base import Layer, LayerMeta, MicroBatch, ModelSpec, TiedGroup, layer_generator
from models.hf.architectures import Architecture
from models.hf.config import quiet_library
from models.hf.layers import HFBlock, HFEmbedding, HFHead
from models.hf.weights import load_slice, weight_map

_MATRICES = (nn.Linear, nn.Embedding, Conv1D)


@dataclass(frozen=True)
class HFTextConfig:
    """What the framework's text datasets read of a model: the training window and the vocabulary size."""

    architecture: str
    seq_len: int
    vocab_size: int


class HFSpec(ModelSpec):
    """A transformers causal LM as ``num_hidden_layers + 2`` independently buildable layers.

    ``seq_len`` is the training window (tokens per sample), at most the config's context length, which is the
    default. With ``config_dir`` holding weights, every layer loads exactly its slice of them (cast to
    ``dtype``) instead of being initialised from the seed.
    """

    def __init__(
        self,
        arch: Architecture,
        hf_config: PretrainedConfig,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        seq_len: int | None = None,
        config_dir: str | None = None,
    ) -> None:
        self.arch = arch
        self.hf_config = hf_config
        self.seed = seed
        self.dtype = dtype
        self.context = int(getattr(hf_config, arch.context))
        self.config = HFTextConfig(arch.name, seq_len or self.context, int(hf_config.vocab_size))
        self.config_dir = config_dir
        self.weights = weight_map(config_dir) if config_dir is not None else None
        self._params: dict[str, int] = {}

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers) + 2

    def _kind(self, index: int) -> str:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        return "embedding" if index == 0 else "head" if index == self.num_layers - 1 else "block"

    def _skeleton(self, index: int) -> Layer:
        """Layer ``index`` with uninitialised float32 parameters (on the current default device)."""
        c, arch = self.hf_config, self.arch
        kind = self._kind(index)
        if kind == "embedding":
            return HFEmbedding(arch.make_embeddings(arch.library, c), arch.embeddings[0], self.context)
        if kind == "head":
            return HFHead(arch.final_norm, arch.make_final_norm(arch.library, c), nn.Linear(c.hidden_size, c.vocab_size, bias=False))
        return HFBlock(c, arch.block_class(c, layer_idx=index - 1), None)

    def build_layer(self, index: int) -> Layer:
        with torch.device("meta"):
            layer = self._skeleton(index)
        layer = layer.to_empty(device="cpu").to(self.dtype)
        if isinstance(layer, HFBlock) and self.arch.rotary_class is not None:
            layer.rotary = self.arch.rotary_class(self.hf_config).to(self.dtype)
        with torch.no_grad():
            if self.weights is not None:
                wanted = self._candidates(index, layer)
                layer.load_state_dict(load_slice(self.weights, wanted, str(self.config_dir), self.dtype))
            else:
                self._initialise(index, layer)
        return layer

    def _initialise(self, index: int, layer: Layer) -> None:
        c = self.hf_config
        gen = layer_generator(self.seed, index)
        residual_std = c.initializer_range / math.sqrt(2 * c.num_hidden_layers)
        for module_name, module in layer.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    nn.init.zeros_(p)
                elif not isinstance(module, _MATRICES):
                    nn.init.ones_(p)  # norm weights
                else:
                    full = f"{module_name}.{name}"
                    residual = self.arch.residual_suffix is not None and full.endswith(self.arch.residual_suffix)
                    nn.init.normal_(p, 0.0, residual_std if residual else c.initializer_range, generator=gen)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(layer, HFHead) and self.tied:
            layer.lm_head.weight.copy_(self._skeleton_token_weight())

    def _skeleton_token_weight(self) -> torch.Tensor:
        """The token-embedding matrix layer 0 starts with (its generator's first draw)."""
        with torch.device("meta"):
            embedding = self._skeleton(0)
        embedding = embedding.to_empty(device="cpu").to(self.dtype)
        with torch.no_grad():
            self._initialise(0, embedding)
        return embedding.get_parameter(f"{self.arch.embeddings[0]}.weight")

    def library_names(self, index: int) -> dict[str, str]:
        """Layer ``index``'s state-dict names -> the library model's (``GPT2LMHeadModel``, ``LlamaForCausalLM``)."""
        arch = self.arch
        kind = self._kind(index)
        with torch.device("meta"):
            keys = list(self._skeleton(index).state_dict())
        if kind == "block":
            return {k: f"{arch.base}.{arch.blocks}.{index - 1}.{k.removeprefix('block.')}" for k in keys}
        return {k: k if k.startswith("lm_head.") else f"{arch.base}.{k}" for k in keys}

    def _candidates(self, index: int, layer: Layer) -> dict[str, tuple[str, ...]]:
        """For each state-dict name of layer ``index``: the names its tensor may have in saved weights, best
        first (the full model's; a base model's, without the prefix; for a tied head, the token embedding)."""
        prefix = f"{self.arch.base}."
        token = f"{prefix}{self.arch.embeddings[0]}.weight"
        out = {}
        for local, name in self.library_names(index).items():
            names = [name, name.removeprefix(prefix)]
            if name == "lm_head.weight" and self.tied:
                names += [token, token.removeprefix(prefix)]
            out[local] = tuple(dict.fromkeys(names))
        return out

    @property
    def tied(self) -> list[TiedGroup]:
        if not self.hf_config.tie_word_embeddings:
            return []
        return [((0, f"{self.arch.embeddings[0]}.weight"), (self.num_layers - 1, "lm_head.weight"))]

    def layer_meta(self, index: int) -> LayerMeta:
        """Sizes and forward FLOPs of one sample of ``seq_len`` tokens (a multiply-add counts 2): a block costs
        ``2 * params * seq_len`` plus the attention products ``4 * seq_len^2 * heads * head_dim``; the head
        ``2 * params * seq_len``; the embedding one add per element. Every layer but the head sends the hidden
        states, ``seq_len * hidden_size`` elements, downstream; the head's loss crosses no boundary."""
        kind = self._kind(index)
        if kind not in self._params:
            with torch.device("meta"):
                self._params[kind] = sum(p.numel() for p in self._skeleton(index).parameters())
        c, t = self.hf_config, self.config.seq_len
        params, stream = self._params[kind], t * c.hidden_size
        if kind == "embedding":
            return LayerMeta("embedding", params, params, float(stream), stream)
        if kind == "head":
            return LayerMeta("head", params, params, 2.0 * params * t, 0)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        flops = 2.0 * params * t + 4.0 * t * t * c.num_attention_heads * head_dim
        return LayerMeta(f"block{index - 1}", params, params, flops, stream)

    def loss_units(self, mb: MicroBatch) -> int:
        """The number of target tokens in ``mb``."""
        return int(mb.data["targets"].numel())

    def fingerprint(self) -> dict:
        return {
            "family": "hf",
            "architecture": self.arch.name,
            "config": self.hf_config.to_diff_dict(),
            "seq_len": self.config.seq_len,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "pretrained": self.weights is not None,
        }

    def export_pretrained(self, states: list[dict[str, torch.Tensor]], out_dir: str) -> bool:
        """Assemble the library model from every layer's state dict and ``save_pretrained`` it (config.json and
        model.safetensors) under ``out_dir``, in the states' dtype, for ``AutoModelForCausalLM.from_pretrained``."""
        if len(states) != self.num_layers:
            raise ValueError(f"export_pretrained needs {self.num_layers} layer states, got {len(states)}")
        full = {}
        for index, state in enumerate(states):
            names = self.library_names(index)
            full.update({names[k]: v for k, v in state.items()})
        config = self.arch.config_class.from_dict(self.hf_config.to_dict())
        config.dtype = next(iter(full.values())).dtype
        with torch.device("meta"):
            model = self.arch.model_class(config)
        model.load_state_dict(full, strict=True, assign=True)
        model.tie_weights()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with quiet_library():
            model.save_pretrained(out_dir)
        return True
