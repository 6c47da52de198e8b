"""Failure injection from the job config (``faults:``), carried out by the targeted workers themselves.

Each worker gets a :class:`FaultHook` as its engine's phase hook (see
:data:`oobleck.engine.worker.PhaseHook`). When a step reaches a fault's phase on a worker the fault targets,
the worker records the time of the kill (the worker's ``record`` callback writes it to the master's store,
where the master reads it for the recovery report's detection time) and then:

* ``kill`` ``worker``: SIGKILL itself;
* ``kill`` ``node``: SIGKILL its agent and itself; the node's other workers die with the agent
  (PR_SET_PDEATHSIG), which is how a machine's death looks to the rest of the job;
* ``hang`` ``worker``: SIGSTOP itself (its agent's watchdog then kills it);
* ``hang`` ``node``: SIGSTOP its agent and itself (the master then misses the agent's heartbeats);
* ``overflow`` (fp16): the hook returns True when the fault's step reaches "sync", and the worker puts an
  inf into its summed gradients of that step (:data:`oobleck.engine.worker.PhaseHook`); ``phase`` and ``target``
  are not used.

A node fault is carried out by the node's worker on device ``worker`` (default 0). Node ``i`` of a fault is
the launcher's node ``i`` (:func:`oobleck.nodes.node_name`). A fault fires at most once per process; after
recovery the step is re-run without its victims, so it does not fire again.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

from oobleck.config import FaultConfig
from oobleck.nodes import node_name


class FaultHook:
    """The phase hook of worker ``device`` on ``node``; ``record(at)`` is called with the moment of a kill or
    stop (seconds since the epoch) just before it happens."""

    def __init__(self, faults: list[FaultConfig], node: str, device: int, record: Callable[[float], None]) -> None:
        self.node = node
        self.device = device
        self._record = record
        self._faults = [f for f in faults if node in {node_name(i) for i in f.nodes} and f.worker == device]

    def __call__(self, step: int, phase: str) -> bool:
        """Carry out the faults due at (``step``, ``phase``); True when an overflow is due (see the module notes)."""
        overflow = False
        for fault in self._faults:
            if fault.kind == "overflow":
                overflow |= fault.step == step and phase == "sync"
            elif fault.step == step and fault.phase == phase:
                self._fire(fault)
        return overflow

    def _fire(self, fault: FaultConfig) -> None:
        sig = signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP
        try:
            self._record(time.time())
        except Exception:  # the report is for timing only; the fault must happen regardless
            pass
        if fault.target == "node":
            os.kill(os.getppid(), sig)
        os.kill(os.getpid(), sig)
