"""Per-step metrics of a run: ``RUN/metrics.jsonl`` (one JSON object per committed step) and TensorBoard
scalars under ``RUN/tensorboard``.

Each line holds the fields of :class:`oobleck.control.records.StepRecord`: ``step``, ``loss``, ``units``,
``grad_norm``, ``step_time_s``, ``samples_per_s`` (without the ``startup_s`` that a generation's first step
spends before its workers are ready to train), ``generation``, ``nodes_alive``, ``pipelines``, ``startup_s``,
the baselines' ``redundant_s`` and ``checkpoint_s``, per rank the measured ``peak_bytes`` of its stage
next to the plan's ``predicted_bytes``, and the plan's ``predicted_step_s`` for a local run (to compare with
``step_time_s - startup_s``). A step that is re-run after the job restored an earlier checkpoint (every copy of some layer was lost) appears again, in
a later generation; the later row supersedes the earlier one. ``RUN/recoveries.jsonl`` holds one line per
recovery (the fields of :class:`oobleck.control.records.RecoveryRecord`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
#: one JSON object per recovery (the fields of oobleck.control.records.RecoveryRecord)
RECOVERIES_FILE = "recoveries.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: StepRecord fields plotted in TensorBoard
_SCALARS = ("loss", "grad_norm", "samples_per_s", "step_time_s", "nodes_alive", "pipelines")


class MetricsWriter:
    """Appends step records to ``run_dir/metrics.jsonl`` (flushed per line, so a crash keeps every
    committed step) and to TensorBoard. Starts a fresh file: a run directory holds one run's metrics."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, append: bool = False) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        mode = "a" if append else "w"
        self._file = self.path.open(mode)
        self._recoveries = (run_dir / RECOVERIES_FILE).open(mode)
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def write(self, record: Any) -> None:
        """Record one committed step (a dataclass such as StepRecord)."""
        row = dataclasses.asdict(record)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name in _SCALARS:
                self._tb.add_scalar(f"train/{name}", row[name], row["step"])

    def write_recovery(self, record: Any) -> None:
        """Record one recovery (a dataclass such as RecoveryRecord)."""
        self._recoveries.write(json.dumps(dataclasses.asdict(record)) + "\n")
        self._recoveries.flush()

    def close(self) -> None:
        self._file.close()
        self._recoveries.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (or another JSONL file of the run, e.g. RECOVERIES_FILE)."""
    with (Path(run_dir) / name).open() as f:
        return [json.loads(line) for line in f if line.strip()]
