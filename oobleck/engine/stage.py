"""One pipeline stage: the layers it holds and the 1F1B execution of one step's microbatches.

Layers are built one by one with ``spec.build_layer(i)``, so a stage's weights are exactly those a single
process gets from ``build_all``. Tied parameters (GPT's embedding and head) are shared within a stage when
it holds several layers of a tied group, as ``build_all`` shares them; copies on different stages are
kept equal by summing their gradients (see :mod:`oobleck.engine.gradsync`). Optimizers follow the
reference trainer: one AdamW per layer, and a Parameter several layers share belongs to the first of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from models.base import Carry, Layer, MicroBatch, ModelSpec, carry_tensors, set_parameter
from oobleck import checkpoint
from oobleck.config import Precision, TrainingConfig
from oobleck.engine.memory import StageMemory
from oobleck.engine.p2p import FromPrevious, ToNext
from planner.schedule import Op, max_in_flight, one_f_one_b
from oobleck.precision import LossScale, forward_layers, initial_scale
from oobleck.training import layer_optimizers


@dataclass
class HeldLayer:
    """A layer a worker holds, with its optimizer, ``step`` (the number of training steps applied to it, a
    step fp16 skipped included) and ``scale``, the job's loss scale for step ``step``. Recovery moves layers
    between workers as :meth:`state` dicts, so the step and the scale travel with the weights."""

    index: int
    module: Layer
    optimizer: torch.optim.AdamW
    step: int = 0
    scale: LossScale = field(default_factory=LossScale)

    def state(self) -> dict[str, Any]:
        """The layer in the checkpoint format of :func:`oobleck.checkpoint.save_layer` (its tensors themselves,
        not copies)."""
        return checkpoint.layer_payload(self.step, self.module, self.optimizer, loss_scale=self.scale.encode())

    def load(self, state: dict[str, Any]) -> None:
        """Take parameters, optimizer state, step and loss scale from a :meth:`state` dict or a checkpoint's
        layer file (one without a loss scale, written before there was one, keeps the current scale)."""
        checkpoint.restore_layer(state, self.module, self.optimizer)
        self.step = int(state["step"])
        if "loss_scale" in state:
            self.scale = LossScale.decode(state["loss_scale"])


def build_stage_layers(
    spec: ModelSpec, first: int, last: int, cfg: TrainingConfig, device: torch.device, step: int = 0
) -> list[HeldLayer]:
    """Layers ``[first, last)`` of ``spec`` on ``device``, tied parameters shared within the stage, each with
    its own optimizer, all at ``step`` and at ``cfg.precision``'s initial loss scale."""
    modules = {i: spec.build_layer(i).to(device) for i in range(first, last)}
    for group in spec.tied:
        local = [(i, name) for i, name in group if i in modules]
        if len(local) > 1:
            (i0, name0), *rest = local
            shared = modules[i0].get_parameter(name0)
            for i, name in rest:
                set_parameter(modules[i], name, shared)
    optimizers = layer_optimizers([modules[i] for i in range(first, last)], cfg)
    scale = initial_scale(cfg.precision)
    return [HeldLayer(i, modules[i], opt, step, scale) for i, opt in zip(range(first, last), optimizers)]


#: ops whose receives are posted ahead of the op being run. One: two ops ahead (both the next forward's
#: activation and the next backward's gradient in flight in 1F1B's steady state) measured no gain here
#: (1.28, 0.97, 0.91 in three rounds) and leaves more point-to-point operations pending when a generation
#: ends, the kind the socket sweep cannot always release (docs/fault-tolerance.md#limitations)
LOOKAHEAD = 1


@dataclass
class _Saved:
    """What a forward pass keeps for its backward pass."""

    inputs: Carry | None
    outputs: list[torch.Tensor]  # tensors to backpropagate from (sent carry tensors, then the aux loss)
    local: list[torch.Tensor]  # the part of ``outputs`` whose gradient this stage seeds itself (losses)


def _kept_apart(carry: Carry | None, inputs: Carry | None) -> Carry | None:
    """``carry`` detached from autograd, with a copy of each tensor that shares memory with ``inputs``. A
    stage may pass an input tensor through unchanged (DiT's condition), and a received input lives in a
    receive buffer the link refills for a later microbatch, so a carry kept for later must not alias one."""
    if carry is None:
        return None
    received = {t.untyped_storage().data_ptr() for t in carry_tensors(inputs)}
    kept = tuple(
        t.detach().clone() if t.untyped_storage().data_ptr() in received else t.detach() for t in carry_tensors(carry)
    )
    return kept if isinstance(carry, tuple) else kept[0]


class StageExecutor:
    """Runs one stage's share of a step under 1F1B and leaves the summed gradients of the stage's
    microbatches, times the loss scale, in its parameters' ``.grad``.

    The last stage backpropagates ``(loss + aux) * loss_scale``; other stages backpropagate the gradients
    received for their outputs plus their own aux losses times the loss scale. Nothing is divided here: the
    worker scales the gradients once by ``1 / (global units * loss scale)`` after they are summed across
    pipelines. The layers run under ``precision`` (:func:`oobleck.precision.forward_layers`).

    ``redundant`` (the Bamboo-style baseline, :mod:`oobleck.engine.shadow`) is the successor's forward pass,
    run on what the successor gets from each microbatch (the last stage: None, the first's input being the
    microbatch itself). It is not run at once but queued, and the queue is run oldest first in the pipeline's
    bubbles: before each blocking receive, one queued call at a time while that receive has not completed.
    The queue holds at most the stage's microbatches in flight under 1F1B (a call beyond that runs at once),
    the bound the plan's memory accounts for (:func:`planner.templates.build_templates`'s
    ``holds_sent_carry``); what is left when the schedule ends runs then, so every call of a step is done
    when :meth:`run` returns.
    """

    def __init__(
        self,
        spec: ModelSpec,
        layers: list[HeldLayer],
        stage: int,
        num_stages: int,
        num_microbatches: int,
        prev: int | None,
        next_: int | None,
        device: torch.device,
        redundant: Callable[[Carry | None, MicroBatch], None] | None = None,
        recompute: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        self.spec = spec
        #: recompute every layer's activations in backward (:mod:`oobleck.recompute`)
        self.recompute = recompute
        self.precision = precision
        #: the stage's measured peak memory of the step being run
        self.memory = StageMemory(layers, device)
        #: the Bamboo-style redundant forward, run from ``_queued`` (class notes)
        self.redundant = redundant
        #: redundant forwards not yet run: (what the successor gets, the microbatch), oldest first
        self._queued: deque[tuple[Carry | None, MicroBatch]] = deque()
        self._most_queued = max_in_flight(stage, num_stages, num_microbatches)
        self.device = device
        self.modules = [h.module for h in layers]
        self.ops = one_f_one_b(stage, num_stages, num_microbatches) if num_microbatches else []
        in_flight = self._most_queued + LOOKAHEAD  # the schedule's in-flight bound + the receives posted ahead
        self.prev = FromPrevious(prev, device, in_flight) if prev is not None else None
        self.next = ToNext(next_, device, LOOKAHEAD + 1) if next_ is not None else None

    def run(
        self,
        microbatches: list[MicroBatch],
        on_phase: Callable[[str], None] | None = None,
        loss_scale: float = 1.0,
        before_last_backward: Callable[[], None] | None = None,
    ) -> tuple[float, float]:
        """Forward and backward every microbatch (in pipeline-local order); returns the summed main loss and
        the summed loss units of the microbatches, both 0 except on the last stage. ``on_phase`` is called
        with "forward" and "backward" before the first of each; losses are backpropagated times ``loss_scale``;
        ``before_last_backward`` is called before the step's last backward pass (the schedule's last op)."""
        self._mbs = microbatches
        self._loss_scale = loss_scale
        self._saved: dict[int, _Saved] = {}
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._units = 0
        self.memory.step_started()
        self._queued.clear()  # a step that failed may have left some
        posted = 0
        seen: set[bool] = set()
        for j, op in enumerate(self.ops):
            if on_phase is not None and op.forward not in seen:
                seen.add(op.forward)
                on_phase("forward" if op.forward else "backward")
            # post the receives of this op and the LOOKAHEAD next, in schedule order: messages from one peer
            # match receives in the order they were posted
            while posted <= min(j + LOOKAHEAD, len(self.ops) - 1):
                self._post(self.ops[posted])
                posted += 1
            if op.forward:
                self._forward(op.microbatch)
            else:
                if j == len(self.ops) - 1 and before_last_backward is not None:
                    before_last_backward()
                self._backward(op.microbatch)
        while self._queued:  # before the sends are waited for: they may still be in flight
            self._run_queued()
        for link in (self.prev, self.next):
            if link is not None:
                link.flush()
        return float(self._loss), float(self._units)

    def _post(self, op: Op) -> None:
        if op.forward and self.prev is not None:
            self.prev.post_forward(op.microbatch)
        elif not op.forward and self.next is not None:
            self.next.post_backward(op.microbatch)

    def _run_queued(self) -> None:
        carry, mb = self._queued.popleft()
        assert self.redundant is not None
        self.redundant(carry, mb)

    def _fill_bubble(self, link: FromPrevious | ToNext, k: int) -> None:
        """Run queued redundant forwards, oldest first, while microbatch ``k``'s posted receive on ``link``
        has not completed: time in which the stage would otherwise only wait."""
        while self._queued and not link.ready(k):
            self._run_queued()

    def _forward(self, k: int) -> None:
        mb = self._mbs[k].fresh()  # aux losses stay with the stage that made them
        inputs = None
        if self.prev is not None:
            self._fill_bubble(self.prev, k)
            inputs = self.prev.take_forward(k)
        with self.memory.saving(k):
            carry = forward_layers(
                self.modules, inputs, mb, self.precision, self.device, ends_model=self.next is None, recompute=self.recompute
            )
        aux = sum(mb.aux_losses) if mb.aux_losses else None
        if self.next is None:
            loss = carry
            assert isinstance(loss, torch.Tensor)
            self._loss += loss.detach().to(torch.float64)
            self._units += self.spec.loss_units(mb)
            total = loss if aux is None else loss + aux
            self._saved[k] = _Saved(inputs, [total], [total])
        else:
            outputs = self.next.send_forward(carry)
            local = [aux] if isinstance(aux, torch.Tensor) and aux.requires_grad else []
            self._saved[k] = _Saved(inputs, outputs + local, local)
        if self.redundant is not None:
            self._queued.append((_kept_apart(carry, inputs) if self.next is not None else None, self._mbs[k]))
            if len(self._queued) > self._most_queued:
                self._run_queued()

    def _backward(self, k: int) -> None:
        grads: list[torch.Tensor] = []
        if self.next is not None:
            self._fill_bubble(self.next, k)
            grads = self.next.take_backward(k)
        saved = self._saved.pop(k)
        seeds = [torch.full_like(t, self._loss_scale) for t in saved.local]
        if saved.outputs:
            torch.autograd.backward(saved.outputs, list(grads) + seeds)
        self.memory.released(k)
        if self.prev is not None:
            self.prev.send_backward(saved.inputs)
