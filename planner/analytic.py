"""Analytic profiles: per-layer costs of a transformer computed from its shape and a device spec.

Used to plan models far larger than this machine can run (GPT-3 175B on a cluster of A100s) and as a
profile that costs nothing to make. Layers: the embedding, each transformer block, and the final norm
plus head (GPT: the vocabulary projection and loss; DiT: adaLN-modulated final layer).

Formulas (s tokens per sample, b samples per microbatch, h hidden size, a heads, V vocabulary):

* Forward FLOPs of a block: ``24 b s h^2 + 4 b s^2 h`` (QKV, attention scores, attention over values,
  output projection, 4h MLP; Narayanan et al. 2021). DiT blocks add the adaLN modulation ``12 b h^2``.
  Backward = 2 x forward; with ``recompute`` the forward runs again in backward, so backward = 3 x.
  GPT head: ``2 b s h V``. Times are FLOPs / (peak_flops * efficiency).
* Parameter memory: ``dtype_bytes`` per parameter, the same again for gradients; AdamW keeps two fp32
  moments, plus an fp32 master copy when training in 16 bits (so 12 B/param for mixed precision, 8 B in
  fp32); SGD with momentum keeps one moment (plus the master copy in 16 bits).
* Activations kept per microbatch by a block, without recomputation: ``s b h (34 + 5 a s / h)`` bytes
  for 16-bit training (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 1: 16-bit
  tensors plus 1-byte dropout masks), scaled by dtype_bytes / 2 for other dtypes. With full
  recomputation a block keeps only its input, ``s b h dtype_bytes`` (the transient activations of the
  one block being recomputed are not counted). The GPT head keeps its input and fp32 logits for the loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from planner.errors import PlanningError
from planner.profile import LayerProfile, ModelProfile

GiB = 2**30
GB = 10**9


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: ``peak_flops`` (16-bit dense, FLOP/s), ``memory_bytes``, one-direction link
    bandwidths in bytes/s, and ``efficiency``, the fraction of peak a training kernel mix reaches."""

    name: str
    peak_flops: float
    memory_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    efficiency: float


DEVICES: dict[str, DeviceSpec] = {
    # NVLink3 600 GB/s both ways; 8x200 Gb/s InfiniBand per 8-GPU node -> 25 GB/s per GPU
    "a100-80g": DeviceSpec("a100-80g", 312e12, 80 * GiB, 300 * GB, 25 * GB, 0.5),
    # NVLink4 900 GB/s both ways; 400 Gb/s InfiniBand per GPU
    "h100-80g": DeviceSpec("h100-80g", 989e12, 80 * GiB, 450 * GB, 50 * GB, 0.5),
    # NVLink2 300 GB/s both ways; 100 Gb/s per GPU
    "v100-32g": DeviceSpec("v100-32g", 125e12, 32 * GiB, 150 * GB, 12.5 * GB, 0.4),
    # a CPU worker as this project runs it (gloo over loopback and Ethernet); matches ClusterConfig's defaults
    "cpu": DeviceSpec("cpu", 1e11, 16 * GiB, 10 * GB, 1 * GB, 0.3),
}


@dataclass(frozen=True)
class TransformerShape:
    """A transformer's dimensions. ``kind`` "gpt": token embedding + blocks + LM head (tied); "dit":
    patch/timestep/class embedding + adaLN blocks + adaLN final layer over ``seq_len`` latent patches
    (``patch``, ``in_channels`` latent channels, ``num_classes`` labels). ``ffn_mult``: MLP width / h."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    vocab: int = 0
    kind: Literal["gpt", "dit"] = "gpt"
    ffn_mult: int = 4
    patch: int = 2
    in_channels: int = 4
    num_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gpt(name: str, n_layer: int, d_model: int, n_head: int, seq_len: int = 2048) -> TransformerShape:
    return TransformerShape(name, n_layer, d_model, n_head, seq_len, vocab=50257)


def _dit(name: str, n_layer: int, d_model: int, n_head: int) -> TransformerShape:
    # 256x256 images -> 32x32x4 latents; patch 2 -> 16x16 = 256 tokens
    return TransformerShape(name, n_layer, d_model, n_head, seq_len=256, kind="dit", patch=2, in_channels=4, num_classes=1000)


SHAPES: dict[str, TransformerShape] = {
    s.name: s
    for s in (
        # GPT-3 paper, Table 2.1 (d_model and heads as printed there, e.g. 5140 for 13B)
        _gpt("gpt3-125m", 12, 768, 12),
        _gpt("gpt3-350m", 24, 1024, 16),
        _gpt("gpt3-760m", 24, 1536, 16),
        _gpt("gpt3-1.3b", 24, 2048, 24),
        _gpt("gpt3-2.7b", 32, 2560, 32),
        _gpt("gpt3-6.7b", 32, 4096, 32),
        _gpt("gpt3-13b", 40, 5140, 40),
        _gpt("gpt3-175b", 96, 12288, 96),
        _gpt("gpt2", 12, 768, 12, 1024),
        _gpt("gpt2-medium", 24, 1024, 16, 1024),
        _gpt("gpt2-large", 36, 1280, 20, 1024),
        _gpt("gpt2-xl", 48, 1600, 25, 1024),
        # DiT paper (Peebles & Xie 2023), Table 1
        _dit("dit-s/2", 12, 384, 6),
        _dit("dit-b/2", 12, 768, 12),
        _dit("dit-l/2", 24, 1024, 16),
        _dit("dit-xl/2", 28, 1152, 16),
    )
}

Optimizer = Literal["adamw", "sgd"]
_MOMENTS = {"adamw": 2, "sgd": 1}




def shape_named(name: str) -> TransformerShape:
    """The preset shape ``name``; :class:`PlanningError` listing the presets if unknown."""
    if name not in SHAPES:
        raise PlanningError(f"model: got {name!r}; known analytic shapes: {', '.join(SHAPES)}")
    return SHAPES[name]


def device_named(name: str) -> DeviceSpec:
    """The preset device ``name``; :class:`PlanningError` listing the presets if unknown."""
    if name not in DEVICES:
        raise PlanningError(f"device spec: got {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[name]


def analytic_profile(
    shape: TransformerShape,
    microbatch: int,
    device: DeviceSpec,
    dtype_bytes: int = 2,
    optimizer: Optimizer = "adamw",
    recompute: bool = False,
) -> ModelProfile:
    """Profile of ``shape`` for ``microbatch`` samples per microbatch on ``device`` (see the module
    docstring for every formula). ``recompute``: full activation recomputation of each block."""
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
        raise PlanningError(f"microbatch: got {microbatch!r}; must be an integer >= 1")
    if dtype_bytes not in (2, 4):
        raise PlanningError(f"dtype_bytes: got {dtype_bytes!r}; allowed: 2 (16-bit mixed precision), 4 (fp32)")
    if optimizer not in _MOMENTS:
        raise PlanningError(f"optimizer: got {optimizer!r}; allowed: {', '.join(_MOMENTS)}")
    b, s, h, d = microbatch, shape.seq_len, shape.d_model, dtype_bytes
    speed = device.peak_flops * device.efficiency
    # optimizer bytes per parameter: fp32 moments, plus an fp32 master copy when the weights are 16-bit
    state = 4 * _MOMENTS[optimizer] + (4 if d < 4 else 0)
    tokens_bytes = s * b * h * d  # one hidden-state tensor of the microbatch

    def layer(name: str, flops: float, params: float, activation: float, output: float, backward: float = 2.0) -> LayerProfile:
        return LayerProfile(
            name=name,
            forward_s=flops / speed,
            backward_s=backward * flops / speed,
            param_bytes=int(params * d),
            grad_bytes=int(params * d),
            optimizer_bytes=int(params * state),
            activation_bytes=int(activation),
            output_bytes=int(output),
        )

    dit = shape.kind == "dit"
    # adaLN conditioning vector (b x h) travels with the hidden states in DiT
    carry = tokens_bytes + (b * h * d if dit else 0)
    block_params = (4 + 2 * shape.ffn_mult) * h * h + (9 + shape.ffn_mult) * h + (6 * h * h + 6 * h if dit else 0)
    block_flops = 2 * b * s * (4 + 2 * shape.ffn_mult) * h * h + 4 * b * s * s * h + (12 * b * h * h if dit else 0)
    if recompute:
        block_activation = tokens_bytes
    else:
        block_activation = s * b * h * (34 + 5 * shape.n_head * s / h) * d / 2

    if dit:
        patch_in = shape.patch**2 * shape.in_channels
        # patch projection, timestep MLP (256-dim frequency embedding -> h -> h), class table (+1 null class)
        embed_params = patch_in * h + h + 256 * h + h + h * h + h + (shape.num_classes + 1) * h
        embed_flops = 2 * b * s * patch_in * h + 2 * b * (256 * h + h * h)
        patch_out = shape.patch**2 * 2 * shape.in_channels  # learned sigma doubles the channels
        head_params = 2 * h * h + 2 * h + h * patch_out + patch_out
        head_flops = 4 * b * h * h + 2 * b * s * h * patch_out
        head_activation = 2 * tokens_bytes
    else:
        embed_params = shape.vocab * h + s * h
        embed_flops = b * s * h  # a lookup plus the position add: memory-bound, almost no FLOPs
        # final layer norm and the (tied) vocabulary projection; fp32 logits are kept for the loss
        head_params = 2 * h + shape.vocab * h
        head_flops = 2 * b * s * h * shape.vocab
        head_activation = tokens_bytes + 4 * s * b * shape.vocab

    layers = [layer("embed", embed_flops, embed_params, tokens_bytes / 2, carry)]
    layers += [
        layer(f"block{i}", block_flops, block_params, block_activation, carry, 3.0 if recompute else 2.0)
        for i in range(shape.n_layer)
    ]
    layers.append(layer("head", head_flops, head_params, head_activation, 4))
    fingerprint = {
        "model": {**shape.to_dict(), "optimizer": optimizer, "recompute": recompute},
        "microbatch": microbatch,
        "dtype": f"{8 * d}-bit",
        "device": device.name,
        "source": "analytic",
    }
    return ModelProfile(tuple(layers), fingerprint)
