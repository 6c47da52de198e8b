"""Example counts for property tests that follow the Hypothesis profile (see tests/conftest.py).

A test's ``@settings(max_examples=n)`` overrides the profile's value, so a fuzz profile could not raise
it. Tests write ``@settings(max_examples=examples(n))`` instead: n under the dev and ci profiles (both keep
Hypothesis's default of 100), n * max_examples / 100 under ``fuzz``.
"""

from __future__ import annotations

from hypothesis import settings


def examples(n: int) -> int:
    """``n`` scaled by the loaded profile's max_examples relative to Hypothesis's default 100."""
    return max(1, n * settings.default.max_examples // 100)
