"""``python -m benchmarks.fault_tolerance``: see :mod:`benchmarks.fault_tolerance.cli`."""

import sys

from benchmarks.fault_tolerance.cli import main

sys.exit(main())
