"""Every example config for the models and data users bring trains a few steps with ``oobleck train-local``,
offline, the way docs/models.md says: from a folder where ``examples`` is importable, after
``python -m examples.make_data`` wrote the data files (``runs/data``). Fine-tuning examples follow the run
they start from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: in order: a fine-tuning example comes after the example whose run it starts from
EXAMPLES = [
    "hf-gpt2-tiny", "hf-llama-tiny", "token-file", "text-tokenizer", "image-folder", "my-layers",
    "diffusers-unet-tiny", "diffusers-dit-tiny", "diffusers-dit-difffit",
]  # fmt: skip


def test_every_new_example_trains_a_few_steps(tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    made = run(sys.executable, "-m", "examples.make_data")
    assert made.returncode == 0, made.stderr[-2000:]
    for name in EXAMPLES:
        trained = run(sys.executable, "-m", "oobleck.cli", "train-local", f"examples/{name}.yaml", "--steps", "2")
        assert trained.returncode == 0, f"{name}: {trained.stderr[-2000:]}"
        assert "final loss" in trained.stdout, f"{name}: {trained.stdout[-1000:]}"


def test_the_list_covers_every_new_example() -> None:
    """A new example config joins the list above (the built-in families' examples have their own tests)."""
    builtin = {"demo", "dit-tiny", "dit-difffit", "gpt-tiny", "gpt3-175b", "moe-tiny"}
    configs = {p.stem for p in (ROOT / "examples").glob("*.yaml")}
    assert configs - builtin == set(EXAMPLES)
