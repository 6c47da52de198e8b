"""Continue text from a causal LM's checkpoint (family gpt or hf): the latest complete checkpoint of the run
directory RUN (or the one of --step, or RUN itself when it is a checkpoint folder), with the model and the
tokenisation of the config saved in it (UTF-8 bytes, or the run's data.tokenizer). Prints the prompt followed
by the continuation. Greedy at --temperature 0 (the default); otherwise sampled, reproducibly for a --seed.

example:
  oobleck generate runs/hf-llama-tiny --prompt "def " --tokens 40
"""

from __future__ import annotations

import argparse

from oobleck.bounds import MAX_SEED, MAX_STEPS, float_flag, int_flag

HELP = "continue text from a causal LM's checkpoint (family gpt or hf)"

#: the most tokens one call generates (each is a forward pass over the window)
MAX_TOKENS = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (or one checkpoints/step_* folder)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    parser.add_argument("--tokens", type=int_flag(1, MAX_TOKENS), default=50, metavar="N", help="tokens to generate (default 50)")
    parser.add_argument("--step", type=int_flag(0, MAX_STEPS), metavar="N", help="use the checkpoint of step N (default: the latest complete one)")
    parser.add_argument(
        "--temperature", type=float_flag(0, 100), default=0.0, metavar="T", help="0: greedy (default); above 0: sample from softmax(logits / T)"
    )
    parser.add_argument("--seed", type=int_flag(0, MAX_SEED), default=0, metavar="S", help="seed of the sampling (default 0)")


def run(args: argparse.Namespace) -> int:
    from oobleck.generation import generate_text

    text = generate_text(args.run, args.prompt, args.tokens, step=args.step, temperature=args.temperature, seed=args.seed)
    print(args.prompt + text)
    return 0
