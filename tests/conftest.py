"""Fixtures shared by the test files. torch and the datasets are imported inside the fixtures, so that
tests that need neither (the planner's, the CLI's) do not pay for them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles. Random property tests must not decide whether a submission lands, so CI (which
# sets CI=true) runs a derandomized profile: the same examples on every run, no example database, and a
# reproduction blob with any failure. A developer's run (dev) draws fresh examples each time, and
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz) explores many more: property tests take their example counts
# from tests/budget.py:examples(n), which scales n by the profile's max_examples / 100 (dev and ci: 1x,
# fuzz: 20x), because a test's own @settings(max_examples=n) overrides any profile's value.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile(
    "fuzz", max_examples=2000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI", "").lower() in ("true", "1") else "dev")
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: on a shared 2-core machine a second thread only
    adds spinning (up to 10x slower). Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as an ImageDataset, loaded once per session (never modify it)."""
    from models.images import digits_dataset

    return digits_dataset()
