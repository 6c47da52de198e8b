"""Point-to-point transfer of carries (forward) and their gradients (backward) between adjacent stages.

A carry is a tensor or a tuple of tensors whose shapes are the same for every microbatch. The first
carry a stage sends is preceded by a fixed-size header describing it (whether it is a tuple, and each
tensor's dtype, shape and whether it requires a gradient); afterwards only the raw tensors travel, into
receive buffers allocated once. Gradients travel back only for the tensors that require one.

Every send is asynchronous (``isend``) and its handle is kept until :meth:`flush`, so a stage never
blocks on a neighbour that is busy; receives are posted ahead (``post_*``) and waited for when the data is
needed (``take_*``), which lets transfers overlap compute; ``ready`` tells without blocking whether a
posted receive has completed (:class:`oobleck.engine.p2p_stream.Receives`). Between any two ranks
activations travel only one way and gradients only the other, so messages pair up in posting order.
On CUDA each link posts and waits on a stream of its own (:mod:`oobleck.engine.p2p_stream`).

Under ``training.precision`` bf16 or fp16 the carry a stage sends is already in 16 bits (every layer's
output is cast, :func:`oobleck.precision.forward_layers`), so the header announces 16-bit tensors, the
receiver's buffers are 16-bit, and the gradients autograd computes for them (sent back) are 16-bit too:
half the bytes of float32 each way. ``sent_bytes`` counts what a link has sent (header excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.base import Carry, carry_tensors
from oobleck.engine import p2p_stream

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
MAX_TENSORS = 8
MAX_DIMS = 6
_PER_TENSOR = 3 + MAX_DIMS  # dtype code, requires_grad, ndim, dims
HEADER_LEN = 2 + MAX_TENSORS * _PER_TENSOR


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass(frozen=True)
class CarrySpec:
    """The static description of the carry crossing one stage boundary."""

    tensors: tuple[TensorSpec, ...]
    is_tuple: bool

    @classmethod
    def of(cls, carry: Carry) -> "CarrySpec":
        tensors = carry_tensors(carry)
        if not 1 <= len(tensors) <= MAX_TENSORS:
            raise ValueError(f"a carry must hold 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
        specs = []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() > MAX_DIMS or t.dtype not in _DTYPES:
                raise ValueError(f"carries must be tensors of at most {MAX_DIMS} dims in {_DTYPES}, got {t!r:.80}")
            specs.append(TensorSpec(tuple(t.shape), t.dtype, t.requires_grad))
        return cls(tuple(specs), isinstance(carry, tuple))

    def encode(self, device: torch.device) -> torch.Tensor:
        header = [int(self.is_tuple), len(self.tensors)]
        for t in self.tensors:
            dims = list(t.shape) + [0] * (MAX_DIMS - len(t.shape))
            header += [_DTYPES.index(t.dtype), int(t.requires_grad), len(t.shape), *dims]
        header += [0] * (HEADER_LEN - len(header))
        return torch.tensor(header, dtype=torch.int64, device=device)

    @classmethod
    def decode(cls, header: torch.Tensor) -> "CarrySpec":
        h = header.tolist()
        specs = []
        for i in range(h[1]):
            code, grad, ndim, *dims = h[2 + i * _PER_TENSOR : 2 + (i + 1) * _PER_TENSOR]
            specs.append(TensorSpec(tuple(dims[:ndim]), _DTYPES[code], bool(grad)))
        return cls(tuple(specs), bool(h[0]))

    @property
    def grad_specs(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.requires_grad]


def _buffers(specs: list[TensorSpec], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(s.shape, dtype=s.dtype, device=device) for s in specs]


class _Link:
    """State shared by both directions: the peer, the device, the pending sends and the posted receives by
    microbatch index."""

    def __init__(self, peer: int, device: torch.device) -> None:
        self.peer = peer
        self.device = device
        self.spec: CarrySpec | None = None
        self._stream = p2p_stream.comm_stream(device)  # None on CPU (oobleck.engine.p2p_stream)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._pending: dict[int, p2p_stream.Receives] = {}
        #: bytes of carries or gradients sent so far (headers not counted)
        self.sent_bytes = 0

    def _isend(self, tensor: torch.Tensor, header: bool = False) -> None:
        # the tensor is kept with its handle: it must stay alive until the send completes
        self._sends.append((p2p_stream.post(dist.isend, tensor, self.peer, self._stream), tensor))
        if not header:
            self.sent_bytes += tensor.numel() * tensor.element_size()

    def flush(self) -> None:
        """Wait for every send posted so far."""
        if self._sends:
            p2p_stream.wait_all_sent([work for work, _ in self._sends], self._stream)
        self._sends.clear()

    def _irecv(self, tensors: list[torch.Tensor]) -> p2p_stream.Receives:
        works = [p2p_stream.post(dist.irecv, t, self.peer, self._stream) for t in tensors]
        return p2p_stream.Receives(works, self._stream)

    def _post_pending(self, k: int, buffers: list[torch.Tensor]) -> None:
        self._pending[k] = self._irecv(buffers)

    def ready(self, k: int) -> bool:
        """Whether microbatch ``k``'s posted receive (its carry from the previous stage, or its gradients from
        the next) has completed, without blocking; the receive must have been posted."""
        return self._pending[k].ready()


class FromPrevious(_Link):
    """The link to the previous stage: receives carries, sends back their gradients.

    ``in_flight`` is the most microbatches whose received carries are alive at once (the schedule's
    in-flight bound plus the receives posted ahead); that many buffer sets are allocated and reused
    round-robin by microbatch index.
    """

    def __init__(self, peer: int, device: torch.device, in_flight: int) -> None:
        super().__init__(peer, device)
        self._slots = in_flight
        self._buffers: list[list[torch.Tensor]] = []

    def post_forward(self, k: int) -> None:
        """Post the receive of microbatch ``k``'s carry (the first call first receives the header)."""
        if self.spec is None:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self._irecv([header]).wait()
            self.spec = CarrySpec.decode(header)
            self._buffers = [_buffers(list(self.spec.tensors), self.device) for _ in range(self._slots)]
        self._post_pending(k, self._buffers[k % self._slots])

    def take_forward(self, k: int) -> Carry:
        """Microbatch ``k``'s carry (its receive must have been posted): fresh leaves over the receive
        buffers, requiring a gradient where the sender's tensor did."""
        self._pending.pop(k).wait()
        assert self.spec is not None
        tensors = tuple(
            b.detach().requires_grad_() if s.requires_grad else b
            for b, s in zip(self._buffers[k % self._slots], self.spec.tensors)
        )
        return tensors if self.spec.is_tuple else tensors[0]

    def send_backward(self, carry: Carry) -> None:
        """Send the gradients of a received carry's tensors that require one (zeros where autograd left
        none, i.e. the tensor did not influence this stage's outputs)."""
        for t in carry_tensors(carry):
            if t.requires_grad:
                self._isend(t.grad if t.grad is not None else torch.zeros_like(t))


class ToNext(_Link):
    """The link to the next stage: sends carries, receives their gradients (``slots`` buffer sets, reused
    round-robin by microbatch index: the one a backward pass is using and those being filled ahead)."""

    def __init__(self, peer: int, device: torch.device, slots: int = 2) -> None:
        super().__init__(peer, device)
        self._slots = slots
        self._buffers: list[list[torch.Tensor]] = []
        #: gradient receives posted before the first carry was sent, whose buffers' shapes were unknown
        self._deferred: list[int] = []

    def send_forward(self, carry: Carry) -> list[torch.Tensor]:
        """Send a carry (the first call sends the header first); returns the carry's tensors that require a
        gradient, in order, for the backward pass."""
        tensors = carry_tensors(carry)
        if self.spec is None:
            self.spec = CarrySpec.of(carry)
            self._isend(self.spec.encode(self.device), header=True)
            self._buffers = [_buffers(self.spec.grad_specs, self.device) for _ in range(self._slots)]
            for k in self._deferred:
                self._irecv_grads(k)
            self._deferred.clear()
        for t in tensors:
            self._isend(t.detach().contiguous())
        return [t for t in tensors if t.requires_grad]

    def post_backward(self, k: int) -> None:
        """Post the receive of the gradients of microbatch ``k``'s carry. Before the first carry is sent
        the gradients' shapes are unknown, so the receive is posted by that send instead (a stage with a
        single microbatch posts its backward ahead, before its forward has run); only gradients
        come from the next stage, so receives still match messages in posting order."""
        if self.spec is None:
            self._deferred.append(k)
        else:
            self._irecv_grads(k)

    def _irecv_grads(self, k: int) -> None:
        self._post_pending(k, self._buffers[k % self._slots])

    def take_backward(self, k: int) -> list[torch.Tensor]:
        """The gradients of microbatch ``k``'s carry (their receive must have been posted)."""
        self._pending.pop(k).wait()
        return self._buffers[k % self._slots]
