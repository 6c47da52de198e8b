"""Fixtures shared by the test files. torch and the datasets are imported inside the fixtures, so that
tests that need neither (the planner's, the CLI's) do not pay for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


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
