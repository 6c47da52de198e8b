"""Where a layer's tensors cross between host memory and a CUDA device: staged through pinned host memory.

A worker's layers (parameters, AdamW moments) cross host memory in two places:

* a checkpoint loaded onto the device (a restore, a recovery that falls back to the latest checkpoint,
  ``model.init_checkpoint``): ``torch.load`` gives host tensors, and :func:`to_device` moves them;
* the snapshot a background checkpoint write takes (:func:`snapshot`), which training must not change
  while the writer thread serialises it.

On CUDA, :func:`to_device` pins each tensor (page-locked host memory) and queues its copy with
``non_blocking=True``, and :func:`snapshot` copies device tensors into pinned buffers the same way, with one
synchronisation of the stream at the end. What pinning buys: a copy from pageable memory is synchronous and
goes through the driver's own pinned bounce buffer in chunks; from pinned memory it is one DMA that the host
does not wait for, so a layer's copies are queued back to back and overlap reading the next layer file
(loading), and the snapshot leaves nothing on the device (a clone there would hold a second copy of the
layers in GPU memory until the writer thread's ``torch.save`` copied them to the host, synchronously).

Layer copies between workers in a recovery from memory (:mod:`oobleck.engine.layer_moves`) do not cross host
memory: on CUDA the engine's process group is NCCL, which sends device tensors to device tensors, so staging
them on the host would add two copies. (Over gloo, CPU tensors are sent as they are.)

On CPU both functions keep the old path exactly: :func:`to_device` returns its input, :func:`snapshot`
clones every tensor. ``pin_memory`` is never called there (it raises on a CPU-only torch).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def map_tensors(value: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """``value`` with ``fn`` applied to every tensor in it, through nested dicts, lists and tuples (a
    :func:`oobleck.checkpoint.layer_payload`, say); other values are kept. The containers are new:
    ``value`` itself is left as it was."""
    if isinstance(value, torch.Tensor):
        return fn(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)  # type: ignore[return-value]
    return value


def to_device(value: T, device: torch.device) -> T:
    """``value`` (a checkpoint's layer dict, say) with its host tensors on ``device``, for a
    ``load_state_dict`` into the layer and its optimizer there.

    CUDA: every host tensor of at least one dimension is pinned and copied with ``non_blocking=True`` on the
    current stream; what then reads the copies on that stream (``load_state_dict``'s ``copy_``) runs after
    them, and torch's caching host allocator keeps each pinned buffer until its copy has ended. Scalars
    stay on the host: AdamW keeps its ``step`` counts there (moved, they would make every optimizer step
    wait on the device), and ``load_state_dict`` moves a scalar parameter itself. CPU (any other device
    type): ``value`` unchanged."""
    if device.type != "cuda":
        return value

    def staged(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if t.dim() and t.device.type == "cpu" else t

    return map_tensors(value, staged)


def snapshot(value: T, device: torch.device) -> T:
    """A copy of ``value`` (a :func:`oobleck.checkpoint.layer_payload`) that later training does not change,
    in host memory, to be written from another thread.

    CUDA: each device tensor is copied into a new pinned host tensor with ``non_blocking=True``, and the
    current stream is synchronised once before returning, so the copies are complete (host tensors, such
    as AdamW's step counts, are cloned). CPU: every tensor cloned, as before there was a CUDA path."""
    if device.type != "cuda":
        return map_tensors(value, lambda t: t.detach().clone())

    def to_pinned(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.detach().clone()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)

    copies = map_tensors(value, to_pinned)
    torch.cuda.current_stream(device).synchronize()
    return copies

