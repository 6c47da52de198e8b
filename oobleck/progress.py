"""The live progress line of ``oobleck run``: phase, step, loss, samples/s, nodes alive, pipelines; and
the run's closing summary (:func:`summary`).

On a terminal it is one line redrawn in place (rich); otherwise (logs, CI, tests) it prints a plain line
per ``every`` steps so that output stays readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.live import Live
from rich.text import Text

from oobleck.nodes import node_list


class Progress:
    """Use as a context manager; call :meth:`phase` for what happens before training and :meth:`step`
    for each committed step (any object with StepRecord's fields)."""

    def __init__(self, total_steps: int, every: int = 1, console: Console | None = None) -> None:
        self.total = total_steps
        self.every = every
        self.console = console or Console(stderr=True)
        self._live: Live | None = None
        #: generations that began with a recovery (their recovery line gives the time before their first step)
        self._recovered: set[int] = set()

    def __enter__(self) -> "Progress":
        if self.console.is_terminal:
            self._live = Live(Text(""), console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def phase(self, text: str) -> None:
        """Show what the job is doing now (profiling, waiting for nodes, ...)."""
        self._show(text, always=True)

    def step(self, record: Any) -> None:
        """Show a committed step. Its samples/s leave out start-up; the job's first step shows the start-up
        (workers starting, joining and loading layers) as ``start-up S s``. A recovered generation's first
        step does not: its :meth:`recovery` line, printed before it, has already given that time."""
        line = (
            f"step {record.step + 1}/{self.total}  loss {record.loss:.4f}  "
            f"{record.samples_per_s:.1f} samples/s  nodes {record.nodes_alive}  pipelines {record.pipelines}"
        )
        if record.startup_s > 0 and record.generation not in self._recovered:
            line += f"  start-up {record.startup_s:.1f} s"
        last = record.step + 1 == self.total
        self._show(line, always=last or (record.step + 1) % self.every == 0)

    def recovery(self, record: Any) -> None:
        """Report a recovery (any object with RecoveryRecord's fields) on its own line."""
        self._recovered.add(record.generation)
        line = recovery_line(record)
        if self._live is not None:
            self._live.console.print(line, highlight=False, soft_wrap=True)
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def _show(self, line: str, always: bool) -> None:
        if self._live is not None:
            self._live.update(Text(line))
        elif always:
            self.console.print(line, highlight=False, soft_wrap=True)


def recovery_line(record: Any) -> str:
    """One line for a recovery (any object with RecoveryRecord's fields): what changed, its phases, where
    the layers came from and where training resumes."""
    what = f"lost {', '.join(record.lost)}" if record.lost else ""
    if record.joined:
        what += ("; " if what else "") + f"joined {', '.join(record.joined)}"
    detect = f"detect {_ms(record.detect_s)}, " if record.detect_s is not None else ""
    return (
        f"recovered ({what}) in {record.total_s:.2f} s: {detect}end {_ms(record.end_s)}, "
        f"leave {_ms(record.leave_s)}, assign {_ms(record.assign_s)} (plan {_ms(record.plan_s)}), "
        f"rebuild {_ms(record.rebuild_s)}, transfer {_ms(record.transfer_s)}, setup {_ms(record.setup_s)} "
        f"({record.layers_moved} layers, from {record.mode}); {record.steps_lost} steps lost; "
        f"now {record.nodes_alive} nodes, {record.pipelines} pipelines, resuming at step {record.start_step + 1}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def summary(steps: Sequence[Any], recoveries: Sequence[Any], elapsed_s: float, global_batch: int, run_dir: str | Path) -> str:
    """The line ``oobleck run`` ends with: steps trained (``steps``, StepRecord-like, at least one), the
    nodes the job started and ended on with the nodes lost and joined on the way (``recoveries``,
    RecoveryRecord-like), wall time, final loss, overall samples/s (start-up included) and pipelines.

    The job ended on the nodes of its last step, or of its last recovery when that came after the last step
    (a node lost while the final checkpoint was written), and started on those plus the nodes lost, less
    those that joined."""
    last = steps[-1]
    ended = recoveries[-1].nodes_alive if recoveries and recoveries[-1].start_step > last.step else last.nodes_alive
    lost = [node for r in recoveries for node in r.lost]
    joined = [node for r in recoveries for node in r.joined]
    if lost or joined:
        changes = [f"{len(names)} {what}: {node_list(names)}" for what, names in (("lost", lost), ("joined", joined)) if names]
        nodes = f"starting on {ended + len(lost) - len(joined)} nodes and ending on {ended} ({'; '.join(changes)})"
    else:
        nodes = f"on {ended} nodes"
    return (
        f"trained {len(steps)} steps {nodes} in {elapsed_s:.1f} s; final loss {last.loss:.4f}; "
        f"{global_batch * len(steps) / elapsed_s:.1f} samples/s overall; {last.pipelines} pipelines; run directory {run_dir}"
    )
