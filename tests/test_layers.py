"""The layers contract (pyproject.toml, checked by ``lint-imports`` in ``make test``) covers every module of
``oobleck/``: a module missing from it would be constrained by no layer. Packages and the entry points are
named whole; the plain modules of ``oobleck/`` are the core and are listed one by one."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layered_names() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return {name.strip() for layer in layers["layers"] for name in layer.split(":")}


def test_every_module_of_oobleck_is_in_a_layer() -> None:
    package = ROOT / "oobleck"
    modules = {f"oobleck.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    packages = {f"oobleck.{p.parent.name}" for p in package.glob("*/__init__.py")}
    missing = sorted((modules | packages) - _layered_names())
    assert not missing, f"add {missing} to the layers contract in pyproject.toml [tool.importlinter]"
