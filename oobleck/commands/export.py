"""Write the whole model of a run's checkpoint to a folder, for use outside the framework. Reads only the
checkpoint (the latest complete one that verifies, or that of --step, verified) and the job config saved in
its meta.json. A model with a library format (Hugging Face transformers, diffusers) is written as a folder
that from_pretrained loads; any other as model.safetensors (tensors named <layer index>.<name>, tied weights
once) plus config.json (the model section of the job config); docs/models.md shows how to load it back.

  oobleck export runs/gpt-tiny --out /tmp/gpt-tiny-export
  oobleck export runs/gpt-tiny --step 20 --out /tmp/gpt-tiny-step20
"""

from __future__ import annotations

import argparse

from oobleck.bounds import MAX_STEPS, int_flag
from oobleck.export import export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (run.dir of the job) holding checkpoints/")
    parser.add_argument(
        "--step", type=int_flag(0, MAX_STEPS), metavar="N", help="the checkpoint of step N (default: the latest complete one)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder; must be new or empty")


def run(args: argparse.Namespace) -> int:
    done = export(args.run, args.out, args.step)
    kind = "from_pretrained folder" if done.pretrained else "model.safetensors + config.json"
    print(f"exported step {done.step} from {done.checkpoint} to {done.out_dir} ({kind})")
    return 0
