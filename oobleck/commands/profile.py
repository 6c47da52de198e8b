"""Measure every layer of the configured model (forward and backward time, parameter, gradient,
optimizer, activation and output bytes) and cache the profile under its fingerprint. A cached profile
that matches the config is reused; a stale one is measured again."""

from __future__ import annotations

import argparse
import sys

from oobleck.config import load_config
from oobleck.profiler import ensure_profile, profile_path

HELP = "profile the model's layers and cache the result"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config (YAML)")
    parser.add_argument("--force", action="store_true", help="measure again even if a matching profile is cached")
    parser.add_argument("--out", metavar="PATH", help="profile file to read or write (default: the cache file)")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = args.out or profile_path(config)
    profile = ensure_profile(config, path=path, force=args.force, log=lambda m: print(m, file=sys.stderr))
    header = f"{'#':>3} {'layer':<14} {'fwd ms':>9} {'bwd ms':>9} {'params':>11} {'optimizer':>11} {'activations':>11} {'output':>11}"
    print(header)
    for i, layer in enumerate(profile.layers):
        print(
            f"{i:>3} {layer.name:<14} {layer.forward_s * 1e3:>9.3f} {layer.backward_s * 1e3:>9.3f} "
            f"{_bytes(layer.param_bytes):>11} {_bytes(layer.optimizer_bytes):>11} "
            f"{_bytes(layer.activation_bytes):>11} {_bytes(layer.output_bytes):>11}"
        )
    total_f = sum(layer.forward_s for layer in profile.layers)
    total_b = sum(layer.backward_s for layer in profile.layers)
    print(f"{'':>3} {'total':<14} {total_f * 1e3:>9.3f} {total_b * 1e3:>9.3f}")
    print(f"profile: {path}")
    return 0
