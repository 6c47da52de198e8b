"""Moving a layer between workers: its parameters, its AdamW moments and its step travel together.

A layer's optimizer state is matched to parameters by *name within the layer*, not by optimizer position:
the same layer can sit in stages that share its tied weight with another layer (then that layer's optimizer
owns the weight) or not (then its own optimizer does), and both must accept the same state. The moments of a
parameter are looked up in whichever optimizer of the sending worker owns it (:func:`moments_by_param`).

Wire format of one layer (``send_layer`` / ``recv_layer``), over the generation's process group:

1. a header, int64 ``[layer step, loss scale's log2 and good steps (oobleck.precision.LossScale), then for each
   parameter in named_parameters() order: has_moments, adam step]``;
2. every tensor of ``module.state_dict()`` in key order (parameters and buffers);
3. ``exp_avg`` and ``exp_avg_sq`` of every parameter whose ``has_moments`` flag is set.

Both sides build the layer from the same model spec, so shapes and dtypes need not be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from oobleck.engine import interrupt
from oobleck.engine.stage import HeldLayer
from oobleck.precision import LossScale

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class LayerState:
    """One layer's training state: ``tensors`` is its ``state_dict()``; ``moments`` maps a parameter name to
    (AdamW's step count for it, exp_avg, exp_avg_sq) for the parameters that have optimizer state; ``scale``
    is the job's loss scale at ``step``."""

    step: int
    tensors: dict[str, torch.Tensor]
    moments: dict[str, tuple[float, torch.Tensor, torch.Tensor]]
    scale: LossScale


def moments_by_param(layers: Iterable[HeldLayer]) -> dict[int, dict[str, torch.Tensor]]:
    """``id(parameter)`` -> its AdamW state, over every optimizer of ``layers``."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for held in layers:
        for param, state in held.optimizer.state.items():
            if state:
                found[id(param)] = state
    return found


def export_layer(held: HeldLayer, moments: dict[int, dict[str, torch.Tensor]]) -> LayerState:
    """``held``'s state (tensors by reference, not copied); ``moments`` from :func:`moments_by_param`."""
    found = {}
    for name, param in held.module.named_parameters(remove_duplicate=False):
        state = moments.get(id(param))
        if state is not None:
            found[name] = (float(state["step"]), state["exp_avg"], state["exp_avg_sq"])
    return LayerState(held.step, dict(held.module.state_dict()), found, held.scale)


def import_layer(state: LayerState, held: HeldLayer) -> None:
    """Copy ``state`` into ``held``: parameters and buffers, the moments of the parameters ``held``'s own
    optimizer owns (a tied weight another layer's optimizer owns gets its moments there), the step and the
    loss scale."""
    with torch.no_grad():
        own = held.module.state_dict()
        for key, tensor in state.tensors.items():
            own[key].copy_(tensor)
    owned = {id(p) for group in held.optimizer.param_groups for p in group["params"]}
    for name, param in held.module.named_parameters(remove_duplicate=False):
        if id(param) not in owned or name not in state.moments:
            continue
        adam_step, exp_avg, exp_avg_sq = state.moments[name]
        held.optimizer.state[param] = {
            "step": torch.tensor(adam_step, dtype=_scalar_dtype()),
            "exp_avg": exp_avg.detach().clone().to(param.device),
            "exp_avg_sq": exp_avg_sq.detach().clone().to(param.device),
        }
    held.step = state.step
    held.scale = state.scale


def send_layer(state: LayerState, held: HeldLayer, dst: int, device: torch.device) -> int:
    """Send ``state`` (a layer built like ``held``) to rank ``dst``; returns the bytes sent."""
    names = [name for name, _ in held.module.named_parameters(remove_duplicate=False)]
    header = [state.step, *state.scale.encode()]
    for name in names:
        entry = state.moments.get(name)
        header += [1, int(entry[0])] if entry is not None else [0, 0]
    tensors = [torch.tensor(header, dtype=torch.int64)] + list(state.tensors.values())
    tensors += [t for name in names if name in state.moments for t in state.moments[name][1:]]
    sent = 0
    for tensor in tensors:
        tensor = tensor.detach().to(device).contiguous()
        interrupt.post(dist.isend, tensor, dst).wait()
        sent += tensor.numel() * tensor.element_size()
    return sent


def recv_layer(held: HeldLayer, src: int, device: torch.device) -> None:
    """Receive a layer from rank ``src`` into ``held`` (built from the same spec as the sender's)."""
    names = [name for name, param in held.module.named_parameters(remove_duplicate=False)]
    params = dict(held.module.named_parameters(remove_duplicate=False))
    header = torch.empty(3 + 2 * len(names), dtype=torch.int64, device=device)
    interrupt.post(dist.irecv, header, src).wait()
    values = header.tolist()
    tensors = {}
    for key, like in held.module.state_dict().items():
        buffer = torch.empty_like(like, device=device)
        interrupt.post(dist.irecv, buffer, src).wait()
        tensors[key] = buffer
    moments = {}
    for j, name in enumerate(names):
        if values[3 + 2 * j]:
            exp_avg = torch.empty_like(params[name], device=device)
            exp_avg_sq = torch.empty_like(params[name], device=device)
            interrupt.post(dist.irecv, exp_avg, src).wait()
            interrupt.post(dist.irecv, exp_avg_sq, src).wait()
            moments[name] = (float(values[4 + 2 * j]), exp_avg, exp_avg_sq)
    import_layer(LayerState(int(values[0]), tensors, moments, LossScale.decode(values[1:3])), held)


def _scalar_dtype() -> torch.dtype:
    """The dtype AdamW gives its ``step`` on CPU (float64 when that is the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
