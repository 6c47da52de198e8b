"""Refuse to start a communication operation once the generation has ended.

The generation watch (:class:`oobleck.engine.elastic.GenerationWatch`) releases operations blocked at the
generation's end by shutting down its sockets. An operation a worker *posts* on a socket already shut down
is another matter: gloo may queue it and never complete it, so the worker would wait out the collective
timeout (measured: a send posted ~20 ms after the shutdown waited 120 s). The watch therefore sets its
event *before* it shuts anything down, and the engine calls :func:`check` right before posting each
operation: an operation is either posted before the shutdown (and released by it) or refused.
"""

from __future__ import annotations

import threading


class GenerationEnded(RuntimeError):
    """The master ended the generation: this worker must leave it."""


_ended: threading.Event | None = None


def watch(ended: threading.Event | None) -> None:
    """Make :func:`check` refuse operations once ``ended`` is set (None: never refuse)."""
    global _ended
    _ended = ended


def check() -> None:
    """Raise :class:`GenerationEnded` if the watched generation has ended."""
    if _ended is not None and _ended.is_set():
        raise GenerationEnded("the generation ended; not starting another operation in it")
