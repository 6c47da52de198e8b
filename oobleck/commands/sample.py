"""Draw a PNG grid of images from a diffusion model's checkpoint (built-in dit or moe, or diffusers). Reads
only the checkpoint and the job config saved in its meta.json: one row per class the run trained on
(data.classes, or all; labelled), or --rows rows for an unconditional model, --per-class images per row,
generated with DDIM from the model's noise schedule and the run's sampling section (steps, cfg_scale)."""

from __future__ import annotations

import argparse

from oobleck.bounds import MAX_STEPS, int_flag

HELP = "draw a PNG grid of samples from a diffusion model's checkpoint"

EXAMPLES = (
    "oobleck sample runs/dit-tiny --out samples.png",
    "oobleck sample runs/diffusers-unet-tiny --step 150 --rows 4 --per-class 6",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "examples:\n" + "".join(f"  {example}\n" for example in EXAMPLES)
    parser.add_argument("run", metavar="RUN", help="run folder (its latest checkpoint) or one checkpoints/step_* folder")
    parser.add_argument("--step", type=int_flag(0, MAX_STEPS), metavar="N", help="use the checkpoint of step N (default: the latest)")
    parser.add_argument("--out", metavar="PNG", help="the PNG to write (default: samples.png in the checkpoint folder)")
    parser.add_argument("--rows", type=int_flag(1, 1000), metavar="R", help="rows: the first R classes, or R rows of an unconditional model (default: all classes, 4)")
    parser.add_argument("--per-class", type=int_flag(1, 64), default=8, metavar="K", help="images per row (default 8)")
    parser.add_argument("--sample-steps", type=int_flag(1, 10_000), metavar="S", help="DDIM denoising steps (default: the run's sampling.steps)")
    parser.add_argument("--seed", type=int_flag(0, 2**31 - 1), default=0, metavar="SEED", help="seed of the initial noise (default 0)")


def run(args: argparse.Namespace) -> int:
    from oobleck.checkpoint_samples import write_sample_grid

    path, width, height = write_sample_grid(
        args.run, args.out, step=args.step, rows=args.rows, per_class=args.per_class, steps=args.sample_steps, seed=args.seed
    )
    print(f"samples: {path} ({width}x{height} px)")
    return 0
