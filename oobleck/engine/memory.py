"""A stage's peak memory over one step, measured, for the step records (next to the plan's prediction).

CUDA: the allocator's own figure, ``torch.cuda.max_memory_allocated`` since the step began (everything the
worker allocated on its device, reset at every step's start).

CPU has no allocator statistics, so the figure is counted: the bytes of the stage's parameters, their
gradients and the optimizer state (AdamW's moments; created by the first optimizer step, so step 0 counts
none), as held when the step's backward passes are done, plus the peak over the 1F1B schedule of the
activations autograd keeps for the microbatches in flight. Those are counted with
:class:`torch.autograd.graph.saved_tensors_hooks` around each microbatch's forward pass: each storage
once, parameters left out (they are counted once above), released when the microbatch's backward pass
ends. A recomputed layer (:mod:`oobleck.recompute`) saves only its input carry this way; the activations
its recomputation rebuilds during backward (one layer's, transiently) pass through the checkpoint's own
hooks and are not counted, nor are buffers for carries in transit. This is exactly what
:meth:`planner.templates.PipelineTemplate.stage_memory` predicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the stage module builds a StageMemory
    from oobleck.engine.stage import HeldLayer


class StageMemory:
    """Counts one stage's memory over a step (see the module notes). Use :meth:`step_started`,
    :meth:`saving` around each microbatch's forward pass, :meth:`released` after its backward pass, and
    :meth:`peak_bytes` once the schedule is done."""

    def __init__(self, layers: list["HeldLayer"], device: torch.device) -> None:
        self.layers = layers
        self.device = device
        self._params = {p.untyped_storage().data_ptr() for h in layers for p in h.module.parameters()}
        #: storage -> (bytes, number of microbatches in flight that saved it)
        self._live: dict[int, list[int]] = {}
        self._by_microbatch: dict[int, set[int]] = {}
        self._live_bytes = 0
        self._peak_live = 0

    def step_started(self) -> None:
        """Start a new step's figure."""
        self._live.clear()
        self._by_microbatch.clear()
        self._live_bytes = self._peak_live = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def saving(self, microbatch: int) -> Iterator[None]:
        """Count what autograd saves for ``microbatch`` inside the block (CPU only; CUDA needs no count)."""
        if self.device.type == "cuda":
            yield
            return
        mine = self._by_microbatch.setdefault(microbatch, set())

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._params and ptr not in mine:
                mine.add(ptr)
                entry = self._live.setdefault(ptr, [storage.nbytes(), 0])
                if entry[1] == 0:
                    self._live_bytes += entry[0]
                    self._peak_live = max(self._peak_live, self._live_bytes)
                entry[1] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def released(self, microbatch: int) -> None:
        """``microbatch``'s backward pass is done: what it saved is freed."""
        for ptr in self._by_microbatch.pop(microbatch, ()):
            entry = self._live[ptr]
            entry[1] -= 1
            if entry[1] == 0:
                self._live_bytes -= entry[0]
                del self._live[ptr]

    def peak_bytes(self) -> int:
        """The step's peak so far: the allocator's on CUDA, the count of the module notes on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.static_bytes() + self._peak_live

    def static_bytes(self) -> int:
        """Parameters, gradients and optimizer state of the stage now, each storage once."""
        seen: dict[int, int] = {}
        for held in self.layers:
            tensors = list(held.module.parameters())
            tensors += [p.grad for p in held.module.parameters() if p.grad is not None]
            tensors += [v for state in held.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            for t in tensors:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())
