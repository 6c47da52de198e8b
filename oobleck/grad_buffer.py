"""Gradients laid out in one flat buffer: what the gradient sync all-reduces and what the profiler times.

A :class:`GradBuffer` holds its parameters' gradients one after another, followed by one flag per
parameter: 1 where the parameter had a gradient, 0 where it had none (a layer this rank's microbatches did
not reach). Summed across the holders, the flags say which parameters any holder had a gradient for, so
that :meth:`unpack` leaves ``None`` exactly where every holder did (the optimizer then skips the parameter,
as single-process training would).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


#: elements squared at a time by :meth:`GradBuffer.squared_norm` (512 KiB in float64)
NORM_CHUNK = 1 << 16


class GradBuffer:
    """The flat buffer of ``params``' gradients in the given order, then their flags (module notes)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        self.params = list(params)
        #: where each parameter's gradient starts in :attr:`flat`
        self.offsets: list[int] = []
        offset = 0
        for param in self.params:
            self.offsets.append(offset)
            offset += param.numel()
        #: gradient elements; the flags follow them in :attr:`flat`
        self.numel = offset
        self.flat = torch.zeros(offset + len(self.params), dtype=dtype, device=device)

    def pack(self, indices: Iterable[int] | None = None) -> None:
        """Copy the gradients of the parameters at ``indices`` (default: all) into the buffer, with their
        flags (a parameter without a gradient packs zeros and flag 0)."""
        flags = self.flat[self.numel :]
        for j in range(len(self.params)) if indices is None else indices:
            param, offset = self.params[j], self.offsets[j]
            view = self.flat[offset : offset + param.numel()]
            if param.grad is None:
                view.zero_()
                flags[j] = 0
            else:
                view.copy_(param.grad.reshape(-1))
                flags[j] = 1

    def unpack(self) -> None:
        """Point every parameter's gradient at its slice of the buffer (None where its flag is 0)."""
        present = self.flat[self.numel :].tolist()
        for param, offset, flag in zip(self.params, self.offsets, present):
            param.grad = self.flat[offset : offset + param.numel()].view_as(param) if flag > 0 else None

    def squared_norm(self, share: int = 0, shares: int = 1) -> torch.Tensor:
        """The squared L2 norm of the gradients' ``share``-th of ``shares`` equal contiguous slices (default:
        all of them), summed in float64 (exact enough to compare runs bitwise), :data:`NORM_CHUNK` elements at
        a time: the float64 copies then stay small (a whole stage's at once held twice its gradients' bytes
        at the peak of a CUDA step) and in the caches (8 times faster on this machine's CPU)."""
        if not 0 <= share < shares:
            raise ValueError(f"share {share} of {shares}: need 0 <= share < shares")
        start, stop = share * self.numel // shares, (share + 1) * self.numel // shares
        total = torch.zeros((), dtype=torch.float64, device=self.flat.device)
        for lo in range(start, stop, NORM_CHUNK):
            total += self.flat[lo : min(lo + NORM_CHUNK, stop)].double().square().sum()
        return total

    def scale(self, factor: float) -> None:
        """Multiply the gradients (not the flags) by ``factor``."""
        self.flat[: self.numel].mul_(factor)
