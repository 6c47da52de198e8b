"""Bounds on every number a user can give (config fields and command-line flags), and argparse types
that enforce them. Every accepted value is finite and within these bounds, so that planning any accepted
input takes about a second and nothing overflows or spins; out-of-range input is a one-line error."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

MAX_NODES = 4096
MAX_DEVICES_PER_NODE = 64
MAX_BATCH = 2**31
MAX_STEPS = 10**9
#: upper bound of ``fault_tolerance.checkpoint_keep`` (a larger count is almost surely a typo; 0 keeps all)
MAX_CHECKPOINT_KEEP = 1000
#: layer seeds are seed * 1_000_003 + index, which must stay within torch's 64-bit seeds
MAX_SEED = 2**32 - 1
#: 1 PiB per device
MAX_MEMORY_GIB = 2**20
MIN_BANDWIDTH_GBPS, MAX_BANDWIDTH_GBPS = 1e-3, 1e6
#: heartbeats and timeouts: a shorter interval makes the master's monitor spin under its lock
MIN_INTERVAL_S = 0.01
#: ``sampling.cfg_scale``: guidance far past 10 only saturates the images
MAX_CFG_SCALE = 100.0
#: ``sampling.steps``: no schedule here has more timesteps than this
MAX_SAMPLING_STEPS = 100_000
MAX_INTERVAL_S = 7 * 86400.0


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_flag(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (argparse turns the error into one line, exit code 2)."""
    return _number_flag(int, lo, hi, f"an integer in [{lo}, {hi}]", f"in [{lo}, {hi}]")


def float_flag(lo: float, hi: float) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi]."""
    return _number_flag(float, lo, hi, f"a number in [{lo:g}, {hi:g}]", f"a number in [{lo:g}, {hi:g}]")


def _number_flag(kind: Callable[[str], Any], lo: float, hi: float, expected: str, within: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {_cut(text)!r}; expected {expected}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"got {_cut(text)}; must be {within}")
        return value

    parse.produces = kind  # type: ignore[attr-defined]  # checked by oobleck.cli
    return parse
