"""Launchers start a job's agents (and through them its workers) somewhere: ``local`` on this machine,
``ray`` on the nodes of a Ray cluster. :func:`launch` picks the one ``cluster.launcher`` names."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from launcher.job import Callbacks
from oobleck.config import JobConfig
from oobleck.control.policy import Planner
from oobleck.control.records import StepRecord
from oobleck.errors import ConfigError

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 only
    from typing_extensions import Unpack


def launch(config: JobConfig, planner: Planner, **callbacks: Unpack[Callbacks]) -> list[StepRecord]:
    """Run the job with the launcher ``config.cluster.launcher`` names, passing ``callbacks`` on; see
    :func:`launcher.local.run` for the contract every launcher keeps."""
    name = config.cluster.launcher
    try:
        module = importlib.import_module(f"launcher.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"launcher.{name}":
            raise
        raise ConfigError(f"cluster.launcher: got {name!r}; this installation has no {name} launcher; use local") from None
    return module.run(config, planner, **callbacks)
