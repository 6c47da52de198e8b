"""Sampling from a causal language model given as a whole layer list (any family whose last layer has
``logits(hidden)``: the built-in GPT's head, the hf family's head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.base import Layer, MicroBatch, run_layers


@torch.no_grad()
def continue_tokens(
    layers: Sequence[Layer],
    prompt_tokens: torch.Tensor,
    n: int,
    *,
    window: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Extend a 1-D token prompt by ``n`` tokens.

    Each new token comes from the head's logits at the last position, computed over at most the last
    ``window`` tokens: the argmax when ``temperature == 0``, otherwise a draw from
    ``softmax(logits / temperature)`` using ``generator``. With ``vocab_limit`` only ids below it are chosen
    (a byte tokenisation of a model with a larger vocabulary). Returns the prompt followed by the new tokens
    (1-D LongTensor).
    """
    head = layers[-1]
    if not callable(getattr(head, "logits", None)):
        raise TypeError("continue_tokens needs a whole causal-LM layer list whose last layer has logits()")
    if prompt_tokens.dim() != 1 or prompt_tokens.numel() == 0:
        raise ValueError(f"prompt_tokens must be a non-empty 1-D tensor, got shape {tuple(prompt_tokens.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(layers[0].parameters()).device
    tokens = prompt_tokens.to(device=device, dtype=torch.long)
    for _ in range(n):
        mb = MicroBatch({"tokens": tokens[-window:].unsqueeze(0)})
        logits = head.logits(run_layers(layers[:-1], mb))[0, -1]  # type: ignore[operator]
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
        tokens = torch.cat([tokens, nxt])
    return tokens
