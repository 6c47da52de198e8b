"""Train the tiny MoE diffusion transformer on scikit-learn digits in one process and save samples.

    .venv/bin/python -m benchmarks.sample_moe [--steps 1000] [--out benchmarks/results/moe_samples.png]

The grid has one column per digit class (0..9 left to right) and ``--rows`` samples per class, drawn
with DDIM and classifier-free guidance (the model trains with 10% label dropout for that). It prints
the training loss, the space-MoE expert loads, and the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from models.base import run_layers
from models.data import BatchSource
from models.images import digits_dataset
from models.moe import PRESETS, MoESpec, trace_routing
from models.sampling import sample_images, save_grid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--rows", type=int, default=8, help="samples per class")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/moe_samples.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = MoESpec(dataclasses.replace(PRESETS["tiny"], class_dropout=0.1), seed=args.seed)
    layers = spec.build_all()
    params = [p for layer in layers for p in layer.parameters()]
    print(f"moe tiny: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {args.steps} steps of {args.batch}")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # linear decay to zero: a cheap stand-in for the EMA weights diffusion models usually sample from
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / args.steps)
    source = BatchSource(digits_dataset(), args.batch, args.batch, seed=args.seed, randomness=spec.sample_randomness)

    start = time.perf_counter()
    window: list[float] = []
    for step in range(args.steps):
        mb = source.microbatch(step, 0)
        loss = run_layers(layers, mb)
        total = (loss + sum(mb.aux_losses)) / mb.size
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        window.append(float(loss.detach()) / mb.size)
        if (step + 1) % 100 == 0 or step == 0:
            print(f"step {step + 1:5d}  eps-mse {sum(window) / len(window):.4f}  {time.perf_counter() - start:6.1f}s")
            window = []

    with torch.no_grad():
        routings = trace_routing(layers, source.microbatch(args.steps, 0))
    loads = " ".join(f"[{', '.join(f'{x:.2f}' for x in r.space_load().tolist())}]" for r in routings)
    print(f"space-expert loads per block: {loads}")

    labels = torch.arange(10).repeat(args.rows)
    images = sample_images(layers, spec, labels, args.sample_steps, torch.Generator().manual_seed(args.seed), cfg_scale=args.cfg_scale)
    width, height = save_grid(images, args.out, nrow=10, scale=4)
    print(f"wrote {args.out} ({width}x{height}); total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
