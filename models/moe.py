"""A RAPHAEL-style mixture-of-experts diffusion transformer (Xue et al. 2023) as a layer list.

Layer list: ``[MoEStem, MoEBlockLayer x n_layer, MoEHead]``; carry ``(h, c, prompt, t)``:

* ``h [N, T, D]``: the image tokens; ``c [N, D]``: the timestep embedding, which drives adaLN;
* ``prompt [N, P, D]``: the condition's tokens. Class labels stand in for text: each class owns
  ``n_prompt`` learned token embeddings (plus a null class when ``class_dropout > 0``, for
  classifier-free guidance). The stem looks them up once and the carry takes them downstream, rather
  than every stage recomputing them from the label: recomputing would put a copy of the table in every
  stage, tied across stages, with an extra gradient all-reduce per step, to save ``P * D`` elements per
  sample on each boundary (a quarter of ``h`` in the tiny preset). Carrying keeps one table, trained by
  ordinary backpropagation through the carry.
* ``t [N]`` (int64): the diffusion timestep, which picks each sample's time expert. It rides in the
  carry so that a block depends on its carry alone, also on the inference path of
  :func:`models.sampling.sample_images`, whose microbatches hold labels only.

Each block is ``x += gate_a * SelfAttn(adaLN(x))``; ``x += CrossAttn(LN(x), prompt)``;
``x += gate_t * TimeMoE(adaLN(x), t)``; ``x += gate_s * SpaceMoE(adaLN(x))`` with shift, scale and gate
from ``c`` (adaLN-Zero). The **time-MoE** sends every token of a sample to feed-forward expert
``t * num_time_experts // num_timesteps`` (equal buckets of the schedule). The **space-MoE** routes each
token by a learned linear gate: ``p = softmax(x W_g)``, the ``top_k`` experts by ``p`` process the token
and their outputs are summed weighted by their ``p`` (Switch Transformer's combine, which keeps a
gradient path from the main loss to the gate for any ``top_k``). Experts have no capacity limit, so no
token is dropped. Routing is a deterministic function of the inputs: there is no router noise.

Every block appends the Switch load-balancing loss ``aux = E * sum_e f_e * P_e`` (``f_e``: fraction of
the microbatch's token-to-expert assignments that go to ``e``; ``P_e``: mean router probability of
``e``; 1 when balanced, ``E / top_k`` at worst) to ``mb.aux_losses`` as ``aux_coef * mb.size * aux``:
the engine divides all summed losses by the global sample count, so each block contributes
``aux_coef * aux / num_microbatches`` (for equal microbatches), a mean over microbatches.

The head is DiT's: adaLN final layer, unpatchify, summed per-sample mean squared epsilon error.
Initialisation draws only from ``layer_generator(seed, i)``: Xavier linears and gates, N(0, 0.02)
prompt table and timestep MLP, zero adaLN modulation and output layer unless ``adaln_zero=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Carry, Layer, MicroBatch
from models.diffusion import NoiseSchedule
from models.dit import PATCH_POSITIVE, DiTHead, PatchConfig, PatchDiffusionSpec, PatchStem, check_patch_config
from models.dit_blocks import Attention, LabelEmbedder, Mlp, init_modulation, modulate, xavier_init
from models.errors import ModelConfigError


@dataclass(frozen=True)
class MoEConfig(PatchConfig):
    """The MoE model's shape, experts and options; the first seven fields, ``image_size`` to
    ``num_classes``, are :class:`PatchConfig`'s (positional construction keeps its order)."""

    #: learned prompt tokens per class (the cross-attention context)
    n_prompt: int = 4
    num_time_experts: int = 4
    num_space_experts: int = 4
    #: experts per token in the space-MoE (1 or 2)
    top_k: int = 2
    #: hidden width of every expert, as a multiple of d_model
    mlp_ratio: float = 2.0
    #: weight of the load-balancing loss of each block
    aux_coef: float = 0.01
    num_timesteps: int = 1000
    #: probability of training a sample with the null prompt (classifier-free guidance)
    class_dropout: float = 0.0
    #: zero-initialise adaLN modulation and the output layer (adaLN-Zero); False is plain adaLN
    adaln_zero: bool = True


PRESETS: dict[str, MoEConfig] = {
    # 8x8 scikit-learn digits: 16 tokens, 4 time x 4 space experts, about 0.8M parameters
    "tiny": MoEConfig(image_size=8, channels=1, patch=2, d_model=64, n_layer=4, n_head=4, num_classes=10),
    # 28x28 Fashion-MNIST: 49 tokens
    "tiny-28": MoEConfig(image_size=28, channels=1, patch=4, d_model=96, n_layer=4, n_head=4, num_classes=10),
    # a DiT-S/2-sized latent model (32x32x4 latents, 1000 classes) for planning at scale
    "moe-s/2": MoEConfig(
        image_size=32, channels=4, patch=2, d_model=384, n_layer=12, n_head=6, num_classes=1000,
        n_prompt=8, num_time_experts=4, num_space_experts=8, mlp_ratio=4.0, class_dropout=0.1,
    ),
}


@dataclass(frozen=True)
class Routing:
    """The expert choices of one block for one microbatch.

    ``time_expert [N]``: each sample's time expert; ``space_expert [N, T, top_k]``: each token's space
    experts, best first; ``space_probs [N, T, E]``: the router's softmax probabilities."""

    time_expert: torch.Tensor
    space_expert: torch.Tensor
    space_probs: torch.Tensor

    def space_load(self) -> torch.Tensor:
        """Fraction of the token-to-expert assignments each space expert received, ``[E]``, sums to 1."""
        e = self.space_probs.shape[-1]
        counts = torch.bincount(self.space_expert.reshape(-1), minlength=e)
        return counts.to(torch.float64) / self.space_expert.numel()


def dispatch(experts: nn.ModuleList, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_j weight[m, j] * experts[index[m, j]](x[m])`` for every row ``m`` of ``x [M, D]``.

    ``index, weight [M, k]`` (``weight=None`` means 1). Each expert runs once, on its rows only, so the
    cost is that of ``k`` experts per row; rows are added back in a fixed order (deterministic)."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows, slot = (index == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        y = expert(x[rows])
        if weight is not None:
            y = y * weight[rows, slot].unsqueeze(1)
        out = out.index_add(0, rows, y)
    return out


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens ``x [N, T, D]`` to context tokens ``ctx [N, P, D]``."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def reset_parameters(self, gen: torch.Generator) -> None:
        for linear in (self.q, self.kv, self.proj):
            xavier_init(linear, gen)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        heads = d // self.n_head
        q = self.q(x).view(n, t, self.n_head, heads).transpose(1, 2)
        k, v = self.kv(ctx).view(n, ctx.shape[1], 2, self.n_head, heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TimeMoE(nn.Module):
    """Feed-forward experts chosen by the diffusion timestep: expert ``t * E // num_timesteps``."""

    def __init__(self, dim: int, hidden: int, num_experts: int, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))

    def reset_parameters(self, gen: torch.Generator) -> None:
        for expert in self.experts:
            expert.reset_parameters(gen)

    def route(self, t: torch.Tensor) -> torch.Tensor:
        """Each sample's expert, ``[N]`` int64 (timesteps outside the schedule are clamped into it)."""
        return (t.long().clamp(0, self.num_timesteps - 1) * len(self.experts)) // self.num_timesteps

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        index = expert.repeat_interleave(t).unsqueeze(1)  # every token follows its sample
        return dispatch(self.experts, x.reshape(n * t, d), index, None).view(n, t, d)


class SpaceMoE(nn.Module):
    """Feed-forward experts chosen per token by a learned linear gate (top-k, probability-weighted)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))

    def reset_parameters(self, gen: torch.Generator) -> None:
        xavier_init(self.gate, gen)  # the gate has no bias
        for expert in self.experts:
            expert.reset_parameters(gen)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [..., E], experts [..., top_k])``: softmax router probabilities and the top-k
        experts by probability (ties go to the lower index, as ``torch.topk`` does on CPU)."""
        probs = F.softmax(self.gate(x), dim=-1)
        return probs, probs.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        index = experts.reshape(n * t, self.top_k)
        weight = probs.reshape(n * t, -1).gather(1, index)
        return dispatch(self.experts, x.reshape(n * t, d), index, weight).view(n, t, d)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's ``E * sum_e f_e * P_e`` over all tokens of ``probs [..., E]`` and their
    chosen ``experts [..., k]``; differentiable through ``P_e`` only (``f_e`` is a count)."""
    e = probs.shape[-1]
    f = torch.bincount(experts.reshape(-1), minlength=e).to(probs.dtype) / experts.numel()
    p = probs.reshape(-1, e).mean(dim=0)
    return e * (f * p).sum()


class MoEBlock(nn.Module):
    """Self-attention, cross-attention, time-MoE and space-MoE, each a residual branch (see the
    module docstring); adaLN(-Zero) from ``c`` modulates and gates all but the cross-attention."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden
        self.norm_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, config.n_head)
        self.norm_cross = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.cross = CrossAttention(d, config.n_head)
        self.norm_time = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.time_moe = TimeMoE(d, hidden, config.num_time_experts, config.num_timesteps)
        self.norm_space = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.space_moe = SpaceMoE(d, hidden, config.num_space_experts, config.top_k)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d))

    def reset_parameters(self, gen: torch.Generator, adaln_zero: bool) -> None:
        self.attn.reset_parameters(gen)
        self.cross.reset_parameters(gen)
        self.time_moe.reset_parameters(gen)
        self.space_moe.reset_parameters(gen)
        init_modulation(self.adaLN_modulation[1], gen, adaln_zero)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, prompt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """``(x', aux, routing)``: the new tokens, this microbatch's load-balancing loss (unscaled)
        and the expert choices."""
        mods = self.adaLN_modulation(c).chunk(9, dim=1)
        shift_a, scale_a, gate_a, shift_t, scale_t, gate_t, shift_s, scale_s, gate_s = mods
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm_attn(x), shift_a, scale_a))
        x = x + self.cross(self.norm_cross(x), prompt)
        time_expert = self.time_moe.route(t)
        x = x + gate_t.unsqueeze(1) * self.time_moe(modulate(self.norm_time(x), shift_t, scale_t), time_expert)
        h = modulate(self.norm_space(x), shift_s, scale_s)
        probs, space_expert = self.space_moe.route(h)
        x = x + gate_s.unsqueeze(1) * self.space_moe(h, probs, space_expert)
        return x, load_balancing_loss(probs, space_expert), Routing(time_expert, space_expert, probs.detach())


class MoEStem(PatchStem):
    """Layer 0: noising, patch embedding, positions, the timestep embedding ``c`` and the prompt."""

    def __init__(self, config: MoEConfig, schedule: NoiseSchedule) -> None:
        super().__init__(config, schedule)
        d = config.d_model
        # one row of n_prompt * d per class: the class's prompt tokens, flattened
        self.prompt_embedder = LabelEmbedder(config.num_classes, config.n_prompt * d, with_null=config.class_dropout > 0)
        # a pure function of the config: recomputed by every build, never checkpointed
        self.register_buffer("pos_embed", torch.zeros(config.tokens, d), persistent=False)

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor | None = None) -> Carry:
        """The carry ``(h, c, prompt, t)`` for noisy images ``x_t [N, C, H, W]`` at timesteps ``t [N]``
        (the inference path); ``drop [N]`` (bool) selects the null prompt."""
        h = self.patch_tokens(x_t)
        prompt = self.prompt_embedder(labels, drop).view(labels.shape[0], self.config.n_prompt, self.config.d_model)
        return h, self.t_embedder(t), prompt, t.long()


class MoEBlockLayer(Layer):
    """One :class:`MoEBlock` on the carry; appends its scaled load-balancing loss to ``mb.aux_losses``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.block = MoEBlock(config)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.block.reset_parameters(gen, self.config.adaln_zero)

    def forward_routed(self, carry: Carry, mb: MicroBatch) -> tuple[Carry, Routing]:
        """The forward pass that also returns the block's expert choices."""
        h, c, prompt, t = carry
        h, aux, routing = self.block(h, c, prompt, t)
        mb.aux_losses.append(aux * (self.config.aux_coef * mb.size))
        return (h, c, prompt, t), routing

    def forward(self, carry: Carry | None, mb: MicroBatch) -> Carry:
        return self.forward_routed(carry, mb)[0]


class MoEHead(DiTHead):
    """Last layer, DiT's head: final adaLN layer on ``(h, c)`` of the carry, unpatchify, and the summed
    epsilon-prediction loss."""


def trace_routing(layers: Sequence[Layer], mb: MicroBatch) -> list[Routing]:
    """Run a whole layer list on ``mb`` (its aux losses are appended to ``mb.aux_losses``) and return
    every block's expert choices, in layer order."""
    carry: Carry | None = None
    routings = []
    for layer in layers:
        if isinstance(layer, MoEBlockLayer):
            carry, routing = layer.forward_routed(carry, mb)
            routings.append(routing)
        else:
            carry = layer(carry, mb)
    return routings


def _check_config(c: MoEConfig) -> None:
    """One-line ConfigErrors for shapes the model cannot take."""
    check_patch_config(c, (*PATCH_POSITIVE, "n_prompt", "num_time_experts", "num_space_experts"))
    if c.top_k not in (1, 2) or c.top_k > c.num_space_experts:
        raise ModelConfigError(f"model.overrides.top_k: got {c.top_k}; must be 1 or 2 and at most num_space_experts ({c.num_space_experts})")
    if c.mlp_hidden < 1:
        raise ModelConfigError(f"model.overrides.mlp_ratio: got {c.mlp_ratio}; d_model * mlp_ratio must be >= 1")
    if c.aux_coef < 0:
        raise ModelConfigError(f"model.overrides.aux_coef: got {c.aux_coef}; must be >= 0")


class MoESpec(PatchDiffusionSpec):
    """The MoE diffusion transformer as ``n_layer + 2`` independently buildable layers. Routing draws
    nothing: the only randomness is the diffusion's (``t``, ``noise``, ``drop_label``)."""

    family = "moe"

    def __init__(self, config: MoEConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        _check_config(config)
        super().__init__(config, seed, dtype)

    def _make_layer(self, index: int) -> Layer:
        if index == 0:
            return MoEStem(self.config, self.schedule)
        if index == self.num_layers - 1:
            return MoEHead(self.config)
        return MoEBlockLayer(self.config)

    def _block_flops(self) -> float:
        """A multiply-add counts 2; ``T`` tokens, ``P`` prompt tokens, width ``D``, expert width ``M``,
        ``E`` space experts, ``k = top_k``: modulation ``18 D^2``; self-attention ``8 T D^2 + 4 T^2 D``;
        cross-attention ``4 T D^2 + 4 P D^2 + 4 T P D``; time-MoE (one expert per token) ``4 T D M``;
        space-MoE gate ``2 T D E`` plus ``k`` experts per token ``4 k T D M``."""
        c = self.config
        t, d, p, m = c.tokens, c.d_model, c.n_prompt, c.mlp_hidden
        attn = 8.0 * t * d * d + 4.0 * t * t * d
        cross = 4.0 * t * d * d + 4.0 * p * d * d + 4.0 * t * p * d
        experts = 4.0 * t * d * m * (1 + c.top_k) + 2.0 * t * d * c.num_space_experts
        return 18.0 * d * d + attn + cross + experts

    def _carry_numel(self) -> int:
        """``(h, c, prompt, t)``: ``T D + D + P D + 1``."""
        c = self.config
        return c.tokens * c.d_model + c.d_model + c.n_prompt * c.d_model + 1
