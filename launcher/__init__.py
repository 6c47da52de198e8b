"""Launchers start a job's agents (and through them its workers) somewhere: ``local`` on this machine,
``ray`` on the nodes of a Ray cluster. :func:`launch` picks the one ``cluster.launcher`` names."""

from __future__ import annotations

import importlib
from typing import Callable

from oobleck.config import JobConfig
from oobleck.control.master import Planner, RecoveryRecord, StepRecord
from oobleck.errors import ConfigError


def launch(
    config: JobConfig,
    planner: Planner,
    on_step: Callable[[StepRecord], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
) -> list[StepRecord]:
    """Run the job with the launcher ``config.cluster.launcher`` names; see :func:`launcher.local.run`
    for the contract every launcher keeps."""
    name = config.cluster.launcher
    try:
        module = importlib.import_module(f"launcher.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"launcher.{name}":
            raise
        raise ConfigError(f"cluster.launcher: got {name!r}; this installation has no {name} launcher; use local") from None
    return module.run(config, planner, on_step=on_step, on_phase=on_phase, on_recovery=on_recovery)
