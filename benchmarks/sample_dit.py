"""Train the tiny DiT on scikit-learn's 8x8 digits in one process, then draw a grid of samples.

Usage::

    .venv/bin/python -m benchmarks.sample_dit [--steps 3000] [--batch 128] [--out benchmarks/results/dit_samples.png]

Row ``k`` of the grid holds samples of class ``k``, labelled at its left (DDIM, classifier-free guidance with
``--cfg-scale``). Sampling uses an exponential moving average of the weights, as DiT does
(:class:`models.sampling.WeightAverage`, which ``oobleck train-local --samples`` uses too). Prints the
training loss every 10% of the steps and writes the grid PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from models.base import run_layers
from models.data import BatchSource
from models.dit import PRESETS, DiTSpec
from models.images import digits_dataset
from models.sampling import WeightAverage, sample_images, save_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling weights")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/dit_samples.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = DiTSpec(dataclasses.replace(PRESETS["tiny"], class_dropout=0.1), seed=args.seed)
    layers = spec.build_all()
    ema = WeightAverage(layers, args.ema)
    source = BatchSource(digits_dataset(), args.batch, args.batch, seed=args.seed, randomness=spec.sample_randomness)
    params = [p for layer in layers for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start, window = time.perf_counter(), []
    for step in range(args.steps):
        mb = source.microbatch(step, 0)
        loss = run_layers(layers, mb) / mb.size
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(layers)
        window.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0:
            mean = sum(window) / len(window)
            print(f"step {step + 1}: loss {mean:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            window = []

    labels = torch.arange(10).repeat_interleave(10)
    gen = torch.Generator().manual_seed(args.seed)
    images = sample_images(ema.layers, spec, labels, args.sample_steps, gen, cfg_scale=args.cfg_scale)
    width, height = save_grid(images, args.out, nrow=10, scale=4, row_labels=[str(k) for k in range(10)])
    print(f"wrote {args.out} ({width}x{height}); row k holds class k")


if __name__ == "__main__":
    main()
