"""The Bamboo-style baseline's redundancy on one worker: a shadow copy of the successor stage.

Under ``fault_tolerance.policy: bamboo`` (``Assignment.redundant``) stage ``i`` of a pipeline of ``n >= 2``
stages holds the layers of stage ``(i + 1) % n`` as well (:meth:`~oobleck.engine.api.PipelinePlan.shadow_stage`)
and keeps them exactly at the committed step:

* **redundant forward**: for every microbatch it runs the shadow layers forward on what the successor gets
  as input (its own output; the last stage, shadowing the first, the microbatch itself), under
  ``no_grad`` (and at ``training.precision``, as the successor runs them) and discarding the result. This
  is the computation Bamboo spends so that the predecessor could take over a stage's forward pass at once;
  here it is paid every step and measured (``seconds``). As in Bamboo it fills the pipeline's bubbles:
  the stage queues each call (:class:`~oobleck.engine.stage.StageExecutor`) and runs the queue, oldest
  first, while it waits for a receive that has not come yet (before each of its 1F1B forward and backward
  passes that needs one), and runs what is left once its schedule is done, before the gradient sync. So
  every step still does and measures every redundant forward; the queue holds at most the stage's
  microbatches in flight, whose carries the plan counts in the stage's memory
  (:func:`planner.templates.build_templates`, ``holds_sent_carry``). On a CPU machine with fewer cores
  than workers a bubble is not idle time (the other workers' processes use the core), so the saving
  there is smaller than on devices of their own;
* **refresh**: once the step's gradients are final (synchronised and clipped), each stage sends its own
  layers' gradients to its predecessor and receives its successor's, then applies them to the shadow with
  the shadow's own optimizer at the same learning rate. Replaying the same update on the same state keeps
  the shadow equal to the successor's layers, parameters and optimizer moments alike, at a cost of one
  gradient transfer per step instead of a parameter-and-moment transfer.

A parameter without a gradient (an expert no microbatch was routed to) stays without one on both sides: a
mask travels with the gradients.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from models.base import Carry, MicroBatch
from oobleck.config import Precision
from oobleck.engine import interrupt
from oobleck.engine.stage import HeldLayer
from oobleck.precision import forward_layers


def _params(layers: list[HeldLayer]) -> list[torch.nn.Parameter]:
    return [p for held in layers for p in held.module.parameters()]


class Shadow:
    """The shadow of the successor stage (``layers``), refreshed from rank ``successor``; this worker's own
    gradients go to rank ``predecessor``. ``seconds`` accumulates the time spent on redundancy."""

    def __init__(
        self, layers: list[HeldLayer], predecessor: int, successor: int, precision: Precision, device: torch.device
    ) -> None:
        self.layers = layers
        self.precision = precision
        self.device = device
        self.predecessor = predecessor
        self.successor = successor
        self.seconds = 0.0

    def forward(self, inputs: Carry | None, microbatch: MicroBatch) -> None:
        """The successor's forward pass on ``inputs``, redundantly (result discarded)."""
        started = time.perf_counter()
        mb = microbatch.fresh()
        with torch.no_grad():  # the output is discarded: whether its last cast happens does not matter
            forward_layers([h.module for h in self.layers], inputs, mb, self.precision, self.device, ends_model=True)
        self.seconds += time.perf_counter() - started

    def exchange_gradients(self, own: list[HeldLayer]) -> None:
        """Send ``own`` layers' final gradients to the predecessor and take the successor's into the shadow's
        ``.grad`` (collective between the two neighbours)."""
        started = time.perf_counter()
        mine = _params(own)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in mine])
        mask = torch.tensor([p.grad is not None for p in mine], dtype=torch.uint8, device=flat.device)
        theirs = _params(self.layers)
        incoming = torch.empty(sum(p.numel() for p in theirs), dtype=theirs[0].dtype, device=theirs[0].device)
        incoming_mask = torch.empty(len(theirs), dtype=torch.uint8, device=incoming.device)
        works = [
            interrupt.post(dist.isend, mask, self.predecessor),
            interrupt.post(dist.isend, flat, self.predecessor),
            interrupt.post(dist.irecv, incoming_mask, self.successor),
            interrupt.post(dist.irecv, incoming, self.successor),
        ]
        for work in works:
            work.wait()
        offset = 0
        for param, present in zip(theirs, incoming_mask.tolist()):
            chunk = incoming[offset : offset + param.numel()].view_as(param)
            param.grad = chunk.clone() if present else None
            offset += param.numel()
        self.seconds += time.perf_counter() - started

    def take_seconds(self) -> float:
        """The time accumulated since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
