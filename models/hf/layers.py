"""The layers of a Hugging Face causal LM: embeddings, one library decoder block each, final norm + head + loss.

Only the hidden states ``[B, T, hidden]`` cross a stage boundary. Each block layer recomputes from the carry's
shape what the library's whole model computes once and hands every block: the position ids ``0 .. T-1``, the
causal attention mask (the library's own ``create_causal_mask``) and, for rotary models, the rotary cos/sin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask

from models.base import Carry, Layer, MicroBatch


class HFEmbedding(Layer):
    """Token embedding (plus learned positions and dropout where the architecture has them): tokens ``[B, T]``
    from ``mb.data["tokens"]`` -> hidden states ``[B, T, hidden]``."""

    def __init__(self, modules: dict[str, nn.Module], token: str, context: int) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.token = token
        self.context = context

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        tokens = mb.data["tokens"]
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"sequence of {length} tokens exceeds the context length {self.context}")
        hidden = self.get_submodule(self.token)(tokens)
        positions = torch.arange(length, device=tokens.device)
        for name, module in self.named_children():
            if name == self.token:
                continue
            # learned position embeddings add; dropout (probability 0, see HFSpec) applies last, as in GPT2Model
            hidden = hidden + module(positions) if isinstance(module, nn.Embedding) else module(hidden)
        return hidden


class HFBlock(Layer):
    """One library decoder block (``GPT2Block``, ``LlamaDecoderLayer``) on the hidden states, with the position
    ids, causal mask and rotary embedding computed here from the carry's shape."""

    def __init__(self, config: PretrainedConfig, block: nn.Module, rotary: nn.Module | None) -> None:
        super().__init__()
        self.hf_config = config
        self.block = block
        self.rotary = rotary  # buffers only, not persistent: no state of its own

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        assert isinstance(carry, torch.Tensor)
        positions = torch.arange(carry.shape[1], device=carry.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.hf_config, inputs_embeds=carry, attention_mask=None, cache=None, position_ids=positions
        )
        extra = {} if self.rotary is None else {"position_embeddings": self.rotary(carry, position_ids=positions)}
        return self.block(carry, attention_mask=mask, position_ids=positions, **extra)


class HFHead(Layer):
    """The final norm and the output projection; returns the summed cross-entropy of every target token of
    ``mb.data["targets"]`` (computed in the model's dtype)."""

    def __init__(self, norm_name: str, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.add_module(norm_name, norm)
        self.norm_name = norm_name
        self.lm_head = lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab]`` of the hidden states (no loss)."""
        return self.lm_head(self.get_submodule(self.norm_name)(hidden))

    def forward(self, carry: Carry | None, mb: MicroBatch) -> torch.Tensor:
        assert isinstance(carry, torch.Tensor)
        logits = self.logits(carry)
        targets = mb.data["targets"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
