"""Fixtures shared by the test files. torch and the datasets are imported inside the fixtures, so that
tests that need neither (the planner's, the CLI's) do not pay for them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from oobleck.train_local import LocalResult

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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse-order",
        action="store_true",
        help="run the collected tests last to first: a test that passes only after another one shows up",
    )


#: the one failure a job test is run again for: a survivor ended by the stuck-worker backstop, after a gloo
#: operation that the generation's socket shutdown did not release (docs/fault-tolerance.md#limitations). The
#: run still trains correctly, but that node is counted lost, which the test's expectations do not foresee.
#: Two phrasings, the launcher's and the worker's own: an assertion that shows the end of a job's output may cut
#: the first (CI once cut it to "h code 75 (stuck ...)", and the rerun did not happen).
STUCK_WORKER = r"code 75 \(stuck in an ended generation\)|stuck in generation \d+ \d+ s after its end"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse-order"):
        items.reverse()
    for item in items:  # job tests: one more run when, and only when, the backstop shows in the failure
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[STUCK_WORKER]))


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


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``profile.cache_dir`` for every job of the session. The profiler names each cached profile by its
    fingerprint (model, microbatch, dtype, device), so jobs of different models share the folder safely,
    and a job whose model an earlier job profiled reads the profile instead of measuring it again."""
    return tmp_path_factory.mktemp("profiles")


#: the parts of a job config that ``train_local(config)`` reads when it writes no run directory
REFERENCE_INPUTS = ("model", "data", "training")


@pytest.fixture(scope="session")
def reference_run() -> Callable[[dict[str, Any]], LocalResult]:
    """``reference_run(raw)``: ``train_local`` of the job config dict ``raw`` (its ``faults`` ignored), run
    once per session for each distinct reference. Without a run directory ``train_local`` reads only the
    config's model, data and training sections and ``cluster.device``, so jobs that differ elsewhere (nodes,
    fault tolerance, launcher, profile folder) share one result. The result is shared: never modify it."""
    from oobleck.config import config_from_dict
    from oobleck.train_local import train_local

    results: dict[str, LocalResult] = {}

    def reference(raw: dict[str, Any]) -> LocalResult:
        config = config_from_dict({k: v for k, v in raw.items() if k != "faults"})
        sections = config.to_dict()
        key = json.dumps(
            {"device": sections["cluster"]["device"], **{name: sections[name] for name in REFERENCE_INPUTS}},
            sort_keys=True,
        )
        if key not in results:
            results[key] = train_local(config)
        return results[key]

    return reference
