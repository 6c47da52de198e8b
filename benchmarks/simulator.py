"""``python -m benchmarks.simulator`` (or ``python benchmarks/simulator.py``): the cluster-scale simulator's
command line, :func:`benchmarks.sim.cli.main`; the simulator itself is the package :mod:`benchmarks.sim`."""

import sys
from pathlib import Path

if not __package__:  # run as a file: use the repo root so that `planner` and `benchmarks` import
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.sim.cli import main  # noqa: E402  (after the path fix above)

if __name__ == "__main__":
    sys.exit(main())
