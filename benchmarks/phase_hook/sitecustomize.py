"""Loaded by every Python process started with this folder on ``PYTHONPATH`` (:mod:`benchmarks.engine_profile`
puts it there); acts only in a worker (``oobleck.worker_main``) with ``OOBLECK_PHASE_DIR`` set.

It wraps the engine's step phases and adds up, per phase, the wall time and the main thread's CPU time spent
in it *exclusively* (a phase's time excludes the phases it calls), and keeps every phase's ``[label, start,
end]`` on the monotonic clock every process shares (``time.perf_counter``), for the timeline. After every
step past ``OOBLECK_PHASE_WARMUP`` steps it writes ``{"rank", "steps", "phases": {phase: [wall_s, cpu_s]},
"events": [[label, start_s, end_s], ...]}`` to ``$OOBLECK_PHASE_DIR/<pid>.json``.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("OOBLECK_PHASE_DIR") and "oobleck.worker_main" in " ".join(sys.orig_argv):
    import functools
    import json
    import time
    from typing import Any, Callable

    import oobleck.engine.gradsync as gradsync
    import oobleck.engine.interrupt as interrupt
    import oobleck.engine.p2p as p2p
    import oobleck.engine.stage as stage
    import oobleck.engine.worker as worker

    _phases: dict[str, list[float]] = {}
    _events: list[tuple[str, float, float]] = []
    _stack: list[tuple[str, list[float]]] = []  # (phase, [wall, cpu] of the phases it called)

    def _wrap(owner: Any, name: str, phase: Callable[[], str] | str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = phase if isinstance(phase, str) else phase()
            _stack.append((label, [0.0, 0.0]))
            started = wall = time.perf_counter()
            cpu = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                _events.append((label, started, started + wall))
                _, inner = _stack.pop()
                total = _phases.setdefault(label, [0.0, 0.0])
                total[0] += wall - inner[0]
                total[1] += cpu - inner[1]
                if _stack:
                    _stack[-1][1][0] += wall
                    _stack[-1][1][1] += cpu

        setattr(owner, name, timed)

    _wrap(stage.StageExecutor, "run", "schedule loop")
    _wrap(stage.StageExecutor, "_forward", "forward compute")
    _wrap(stage.StageExecutor, "_backward", "backward compute")
    for _cls, _name in [(p2p.FromPrevious, "take_forward"), (p2p.ToNext, "take_backward")]:
        _wrap(_cls, _name, "p2p receive wait")
    for _cls, _name in [
        (p2p.FromPrevious, "post_forward"), (p2p.ToNext, "post_backward"),
        (p2p.ToNext, "send_forward"), (p2p.FromPrevious, "send_backward"),
    ]:  # fmt: skip
        _wrap(_cls, _name, "p2p post")
    _wrap(p2p._Link, "flush", "p2p send flush")
    _wrap(gradsync.GradSync, "reduce", "grad sync pack/post/unpack")
    _wrap(gradsync._Piece, "post", "grad sync pack/post/unpack")
    _wrap(interrupt, "wait", lambda: "grad all-reduce wait" if _stack and _stack[-1][0].startswith("grad") else "norm all-reduce wait")
    _wrap(worker, "report_ready", "commit wait")
    _wrap(worker.StageWorker, "apply", "optimizer")
    _wrap(worker.StageWorker, "train_step", "step other")

    _train_step = worker.StageWorker.train_step
    _warmup = int(os.environ.get("OOBLECK_PHASE_WARMUP", "1"))

    def _counted_step(self: worker.StageWorker, step: int) -> None:
        _train_step(self, step)
        if step == _warmup - 1:
            _phases.clear()
            _events.clear()
        elif step >= _warmup:
            path = os.path.join(os.environ["OOBLECK_PHASE_DIR"], f"{os.getpid()}.json")
            with open(path, "w") as f:
                json.dump({"rank": self.rank, "steps": step - _warmup + 1, "phases": _phases, "events": _events}, f)

    worker.StageWorker.train_step = _counted_step  # type: ignore[method-assign]
