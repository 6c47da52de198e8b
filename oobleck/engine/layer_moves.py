"""Moving a layer between workers: its parameters, its AdamW moments and its step travel together.

A layer's optimizer state is matched to parameters by *name within the layer*, not by optimizer position:
the same layer can sit in stages that share its tied weight with another layer (then that layer's optimizer
owns the weight) or not (then its own optimizer does), and both must accept the same state. The moments of a
parameter are looked up in whichever optimizer of the sending worker owns it (:func:`moments_by_param`).

Wire format (``send_layers`` / ``recv_layers``): the layers one source sends one receiver in a recovery
travel as their records back to back, cut at tensor boundaries into uint8 messages of at most
:data:`MESSAGE_BYTES` (a larger tensor is a message of its own, sent from and received into the tensor
itself), so a copy needs at most that much memory beyond the layers. One layer's record is

1. a header, int64 ``[layer step, loss scale's log2 and good steps (oobleck.precision.LossScale), then for each
   parameter in named_parameters() order: has_moments, adam step]``;
2. every tensor of ``module.state_dict()`` in key order (parameters and buffers);
3. ``exp_avg`` and ``exp_avg_sq`` of every parameter, zeros where ``has_moments`` is 0, so that the receiver
   knows the record's size from its own copy of the layer.

Few messages instead of one per tensor: a transformer block has some thirty tensors, and on a CPU shared by
more workers than cores each blocking message waited for both processes to be scheduled (six tiny-GPT
layers took 0.6 s over two processes sharing one core, one tensor at a time, and 0.05 s packed:
``benchmarks/layer_copy.py``).

Both sides build the layer from the same model spec, so shapes and dtypes need not be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from oobleck.engine import interrupt
from oobleck.engine.stage import HeldLayer
from oobleck.precision import LossScale

#: the most bytes packed into one message of a layer copy: enough for a small model's every layer in one,
#: while a large model's copy needs no more than this beyond its layers (a device copy of a 7B model's
#: layers with AdamW state would otherwise double tens of GB)
MESSAGE_BYTES = 64 * 2**20


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


def group_moves(moves: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, list[int]]]:
    """``moves`` ((layer, source, receiver), in the plan's order) as one entry (source, receiver, layers) per
    pair, in the order each pair first appears, its layers in move order. Every rank walks the same list and
    each entry is one send matched by one receive, so the earliest unfinished entry always has both of its
    ranks at it: no rank waits on another forever."""
    grouped: dict[tuple[int, int], list[int]] = {}
    for layer, source, receiver in moves:
        grouped.setdefault((source, receiver), []).append(layer)
    return [(source, receiver, layers) for (source, receiver), layers in grouped.items()]


def run_moves(
    moves: Iterable[tuple[int, int, int]], rank: int, pool: Mapping[int, HeldLayer], into: Mapping[int, HeldLayer], device: torch.device
) -> None:
    """This rank's part of ``moves`` ((layer, source, receiver), the same list on every rank): send the layers
    it is the source of from ``pool``, receive those it is the receiver of into ``into`` (by layer index)."""
    moments = moments_by_param(pool.values())
    for source, receiver, indices in group_moves(moves):
        if source == rank:
            send_layers([pool[i] for i in indices], moments, receiver, device)
        elif receiver == rank:
            recv_layers([into[i] for i in indices], source, device)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view of its storage (a view: writing it writes the tensor)."""
    return tensor.reshape(-1).view(torch.uint8)


def layer_record(state: LayerState, held: HeldLayer, device: torch.device) -> list[torch.Tensor]:
    """The tensors of ``state``'s record (see the module notes), on ``device``; ``held`` is a layer built
    like the one ``state`` came from (a receiver's own layer gives the record's shapes and dtypes)."""
    params = held.module.named_parameters(remove_duplicate=False)
    header = [state.step, *state.scale.encode()]
    moments = []
    for name, param in params:
        entry = state.moments.get(name)
        header += [1, int(entry[0])] if entry is not None else [0, 0]
        moments += entry[1:] if entry is not None else [torch.zeros_like(param), torch.zeros_like(param)]
    tensors = [torch.tensor(header, dtype=torch.int64), *state.tensors.values(), *moments]
    return [t.detach().to(device).contiguous() for t in tensors]


def messages(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """``tensors`` cut, in order, into runs of at most ``limit`` bytes (a larger tensor alone): the messages.
    Sender and receiver cut the same shapes and dtypes alike."""
    cut: list[list[torch.Tensor]] = []
    size = limit + 1  # nothing open yet
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if size + nbytes > limit:
            cut.append([])
            size = 0
        cut[-1].append(t)
        size += nbytes
    return cut


def _wait(work: dist.Work, device: torch.device) -> None:
    """Wait for one message: under gloo on a thread of its own, so that the generation's end abandons a
    transfer its socket shutdown did not release (:class:`oobleck.engine.interrupt.Aside`)."""
    if device.type == "cpu":
        interrupt.Aside([work]).wait()
    else:
        work.wait()


def send_layers(held: list[HeldLayer], moments: dict[int, dict[str, torch.Tensor]], dst: int, device: torch.device) -> None:
    """Send ``held`` with their AdamW state (``moments`` from :func:`moments_by_param`) to rank ``dst`` (see
    the module notes for the messages)."""
    records = [t for layer in held for t in layer_record(export_layer(layer, moments), layer, device)]
    for message in messages(records, MESSAGE_BYTES):
        data = _as_bytes(message[0]) if len(message) == 1 else torch.cat([_as_bytes(t) for t in message])
        _wait(interrupt.post(dist.isend, data, dst), device)


def recv_layers(held: list[HeldLayer], src: int, device: torch.device) -> None:
    """Receive the messages :func:`send_layers` sends from rank ``src`` into ``held`` (built from the same
    spec as the sender's layers, in the same order)."""
    def slot(like: torch.Tensor) -> torch.Tensor:  # contiguous whatever ``like``'s strides: the sender's order
        return torch.empty(like.shape, dtype=like.dtype, device=device)

    slots = []
    for layer in held:
        params = dict(layer.module.named_parameters(remove_duplicate=False))
        header = torch.empty(3 + 2 * len(params), dtype=torch.int64, device=device)
        tensors = {key: slot(like) for key, like in layer.module.state_dict().items()}
        moments = {name: (slot(p), slot(p)) for name, p in params.items()}
        slots.append((header, tensors, moments))
    flat = [t for header, tensors, moments in slots for t in (header, *tensors.values(), *(m for pair in moments.values() for m in pair))]
    for message in messages(flat, MESSAGE_BYTES):
        if len(message) == 1:
            _wait(interrupt.post(dist.irecv, _as_bytes(message[0]), src), device)
            continue
        data = torch.empty(sum(t.numel() * t.element_size() for t in message), dtype=torch.uint8, device=device)
        _wait(interrupt.post(dist.irecv, data, src), device)
        offset = 0
        for t in message:
            size = t.numel() * t.element_size()
            _as_bytes(t).copy_(data[offset : offset + size])
            offset += size
    for layer, (header, tensors, moments) in zip(held, slots):
        values = header.tolist()
        found = {
            name: (float(values[4 + 2 * j]), *pair)
            for j, (name, pair) in enumerate(moments.items())
            if values[3 + 2 * j]
        }
        import_layer(LayerState(int(values[0]), tensors, found, LossScale.decode(values[1:3])), layer)


def _scalar_dtype() -> torch.dtype:
    """The dtype AdamW gives its ``step`` on CPU (float64 when that is the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
