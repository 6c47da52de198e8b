"""Checks every model family must pass; imported by the per-family test files."""

from __future__ import annotations

import torch

from models.base import Carry, Layer, MicroBatch, ModelSpec, run_layers
from models.data import BatchSource


def _as_tuple(carry: Carry) -> tuple[torch.Tensor, ...]:
    return carry if isinstance(carry, tuple) else (carry,)


def whole_model_grads(spec: ModelSpec, mb: MicroBatch) -> tuple[float, dict[tuple[int, str], torch.Tensor]]:
    """Loss and gradients of the whole model in one autograd graph (tied weights shared)."""
    layers = spec.build_all()
    mb = mb.fresh()
    loss = run_layers(layers, mb)
    total = loss + sum(mb.aux_losses) if mb.aux_losses else loss
    total.backward()
    grads = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            if p.grad is not None:
                grads[(i, name)] = p.grad.clone()
    return total.item(), grads


def split_model_grads(
    spec: ModelSpec, mb: MicroBatch, boundaries: list[int]
) -> tuple[float, dict[tuple[int, str], torch.Tensor]]:
    """Run the layer list as separate stages, as the engine does: each stage is built on its own with
    ``build_layer``, carries are detached at boundaries and gradients are sent back by hand; each stage
    adds its own auxiliary losses; tied copies' gradients are summed."""
    cuts = [0, *boundaries, spec.num_layers]
    stages = [[spec.build_layer(i) for i in range(a, b)] for a, b in zip(cuts, cuts[1:])]
    inputs, outputs, auxes = [], [], []
    carry: Carry | None = None
    for stage in stages:
        if carry is not None:
            carry = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in _as_tuple(carry))
            carry = carry if len(carry) > 1 else carry[0]
        inputs.append(carry)
        stage_mb = mb.fresh()
        out = run_layers(stage, stage_mb, carry)
        outputs.append(out)
        auxes.append(sum(stage_mb.aux_losses) if stage_mb.aux_losses else None)
        carry = out
    loss_value = outputs[-1].item() + sum(a.item() for a in auxes if a is not None)
    grad_out: tuple[torch.Tensor, ...] | None = None
    for s in reversed(range(len(stages))):
        outs = [outputs[s]] if s == len(stages) - 1 else list(_as_tuple(outputs[s]))
        grads = [torch.ones_like(outputs[s])] if s == len(stages) - 1 else list(grad_out)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if auxes[s] is not None:
            pairs.append((auxes[s], torch.ones_like(auxes[s])))
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if inputs[s] is not None:
            grad_out = tuple(t.grad if t.requires_grad else None for t in _as_tuple(inputs[s]))
    grads: dict[tuple[int, str], torch.Tensor] = {}
    offset = 0
    for stage in stages:
        for j, layer in enumerate(stage):
            for name, p in layer.named_parameters():
                if p.grad is not None:
                    grads[(offset + j, name)] = p.grad.clone()
        offset += len(stage)
    for group in spec.tied:  # the engine sums tied copies; compare against the shared parameter
        total = sum(grads[key] for key in group if key in grads)
        for key in group:
            grads[key] = total
    return loss_value, grads


def assert_split_equivalent(spec: ModelSpec, mb: MicroBatch, boundaries: list[int], rtol: float = 1e-12) -> None:
    """Split execution equals whole-model execution in loss and every gradient (float64 specs)."""
    loss_a, grads_a = whole_model_grads(spec, mb)
    loss_b, grads_b = split_model_grads(spec, mb, boundaries)
    assert abs(loss_a - loss_b) <= rtol * abs(loss_a), (loss_a, loss_b)
    tied_followers = {key for group in spec.tied for key in group[1:]}
    for key, g in grads_a.items():
        assert key in grads_b, f"missing gradient {key}"
        scale = max(g.abs().max().item(), 1e-300)
        assert (g - grads_b[key]).abs().max().item() <= rtol * scale, key
    for key in grads_b:
        assert key in grads_a or key in tied_followers, f"unexpected gradient {key}"


def held_out_loss_before_after(
    layers: list[Layer], source: BatchSource, held_out: MicroBatch, steps: int, optimizer: torch.optim.Optimizer
) -> tuple[float, float]:
    """The per-sample main loss on ``held_out`` before and after ``steps`` optimizer steps on microbatch 0
    of steps ``0 .. steps-1`` of ``source`` (training adds the auxiliary losses; the evaluation does not)."""

    def eval_loss() -> float:
        with torch.no_grad():
            return float(run_layers(layers, held_out.fresh())) / held_out.size

    before = eval_loss()
    for step in range(steps):
        mb = source.microbatch(step, 0)
        loss = run_layers(layers, mb)
        total = (loss + sum(mb.aux_losses) if mb.aux_losses else loss) / mb.size
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return before, eval_loss()
