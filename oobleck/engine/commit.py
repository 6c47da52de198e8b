"""The step-commit protocol: a worker applies its optimizer step only after the master commits the step.

Both sides talk through the generation's key-value store (the master hosts the TCPStore; each side views
it under the generation's prefix through a :class:`~oobleck.engine.signed_store.SignedStore`, so every value
below carries a MAC under the job's token and a forged one is ignored), under these keys of step ``s``:

``commit/s/r{rank}``
    written once by each worker when its gradients for step ``s`` are synchronised and clipped: seven
    little-endian float64 values ``(loss_sum, units, grad_norm, redundant_s, checkpoint_s, peak_bytes,
    predicted_bytes)``. ``loss_sum``
    and ``units`` are the summed main loss and the unit count of the microbatches whose loss this rank
    computed (a pipeline's last stage), 0 elsewhere; ``grad_norm`` is the global gradient norm (the same on
    every rank); ``redundant_s`` the seconds this rank spent on the Bamboo-style baseline's redundant work in
    the step and ``checkpoint_s`` on a foreground checkpoint just before it (0 when there was none);
    ``peak_bytes`` the stage's measured peak memory in the step (:mod:`oobleck.engine.memory`) and
    ``predicted_bytes`` the plan's prediction of it (0 without one).
``commit/s/decision``
    written once by the master: ``commit`` or ``abort``.
``timing/r{rank}``
    written once per generation by each worker when it is ready to train (see :func:`~oobleck.engine.store_keys.timing_key`).

One key lives outside the generation prefixes, in the master's store itself:

``ended/gen{g}``
    written by the master when generation ``g`` ends (a node was lost or joined): every worker of ``g``
    watches it and leaves the generation (:mod:`oobleck.engine.elastic`). The master writes the abort
    decision of an in-flight step first, and never commits a step of ``g`` after this key exists.

A worker blocks on the decision key (the store wakes it when the key is written, so the handshake costs a
few store round trips, well under a millisecond on a local store). The master waits for all ranks'
ready keys in slices of ``poll_s`` so that it can abort the step as soon as ``should_abort()`` turns true
(a failure seen before the commit); after the commit every survivor steps, which keeps all replicas of a
layer at the same version.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from oobleck.engine.signed_store import SignedStore
from oobleck.engine.store_keys import decision_key, ready_key

COMMIT = b"commit"
ABORT = b"abort"
_PAYLOAD = struct.Struct("<7d")

#: how long a worker waits for the master's decision before giving up (the master or its store is gone
#: far sooner in practice: a dead store fails the wait at once)
DECISION_TIMEOUT = timedelta(minutes=10)


class StepAborted(RuntimeError):
    """The master aborted the step: the worker must not apply it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"step {step} was aborted by the master")
        self.step = step


def report_ready(
    store: SignedStore,
    step: int,
    rank: int,
    loss_sum: float,
    units: float,
    grad_norm: float,
    redundant_s: float = 0.0,
    checkpoint_s: float = 0.0,
    memory: tuple[int, int] = (0, 0),
    timeout: timedelta = DECISION_TIMEOUT,
) -> bool:
    """Report this rank's gradients of ``step`` ready, then block until the master decides.

    ``memory``: this stage's (measured peak, predicted) bytes. Returns True when the step is committed; raises :class:`StepAborted` when it is aborted. A store
    failure (the master is gone) or no authentic decision within ``timeout`` raises the store's own error.
    A decision without a valid MAC is ignored: the wait goes on for the master's.
    """
    store.set(ready_key(step, rank), _PAYLOAD.pack(loss_sum, units, grad_norm, redundant_s, checkpoint_s, *memory))
    decision = store.wait([decision_key(step)], timeout)
    assert decision is not None  # no stop condition: None is never returned
    if decision[0] == COMMIT:
        return True
    raise StepAborted(step)


@dataclass(frozen=True)
class StepReport:
    """What the master learns of a step once every rank is ready.

    ``loss`` is the mean main loss of the step: the summed losses of the last stages divided by ``units``,
    the step's global unit count (samples or tokens); ``grad_norm`` is the global gradient norm before
    clipping; ``wait_s`` is how long :meth:`CommitCoordinator.wait_step` waited; ``redundant_s`` and
    ``checkpoint_s`` are the largest of the ranks' figures; ``peak_bytes`` and ``predicted_bytes`` hold
    each rank's measured and predicted peak memory, in rank order.
    """

    step: int
    loss: float
    units: float
    grad_norm: float
    loss_sum: float
    wait_s: float
    redundant_s: float = 0.0
    checkpoint_s: float = 0.0
    peak_bytes: tuple[int, ...] = ()
    predicted_bytes: tuple[int, ...] = ()


class CommitCoordinator:
    """The master side of the protocol for one generation (``store`` carries the generation's prefix).

    Waiting for the ready keys happens on a second connection (a clone of ``store``) in a helper thread, so
    the caller is woken by the store the moment the last rank reports, while still checking
    ``should_abort()`` every ``poll_s`` seconds (polling the store with short timeouts instead would add up
    to ``poll_s`` of latency to every step, or flood the log with the store's timeout warnings).
    """

    def __init__(self, store: SignedStore, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.store = store
        self.world_size = world_size
        self._waiter_store = store.clone()

    def wait_step(self, step: int, should_abort: Callable[[], bool], poll_s: float = 0.05) -> StepReport | None:
        """Wait until every rank has reported ``step`` ready and return the step's report. If
        ``should_abort()`` is true first (it is checked at once and then every ``poll_s`` seconds), publish
        the abort decision and return None. Does not commit: call :meth:`commit` for that."""
        keys = [ready_key(step, r) for r in range(self.world_size)]
        started = time.perf_counter()
        all_ready = threading.Event()
        aborted = threading.Event()
        failure: list[BaseException] = []
        payloads: list[bytes] = []

        def wait_all() -> None:
            try:
                payloads.extend(self._waiter_store.wait(keys, DECISION_TIMEOUT, stop=aborted.is_set) or ())
            except BaseException as e:  # handed to the caller's thread below
                failure.append(e)
            all_ready.set()

        waiter = threading.Thread(target=wait_all, name=f"commit-wait-{step}", daemon=True)
        waiter.start()
        while not all_ready.is_set():
            if should_abort():
                self.abort(step)
                aborted.set()
                # release the waiter: the ready keys it still lacks (absent, or not authentic) are written
                # here (a late rank's own report only overwrites one, and the decision is already abort)
                missing = [k for k in keys if self.store.get(k) is None]
                if missing:
                    self.store.multi_set(missing, [_PAYLOAD.pack(0.0, 0.0, math.nan, 0.0, 0.0, 0.0, 0.0)] * len(missing))
                waiter.join()
                return None
            all_ready.wait(poll_s)
        waiter.join()
        if failure:
            raise failure[0]
        reports = [_PAYLOAD.unpack(raw) for raw in payloads]
        loss_sum = sum(p[0] for p in reports)
        units = sum(p[1] for p in reports)
        return StepReport(
            step=step,
            loss=loss_sum / units if units else math.nan,
            units=units,
            grad_norm=reports[0][2],
            loss_sum=loss_sum,
            wait_s=time.perf_counter() - started,
            redundant_s=max(p[3] for p in reports),
            checkpoint_s=max(p[4] for p in reports),
            peak_bytes=tuple(int(p[5]) for p in reports),
            predicted_bytes=tuple(int(p[6]) for p in reports),
        )

    def commit(self, step: int) -> None:
        """Tell every worker to apply ``step``, then drop the keys of the step before (off the workers'
        critical path: they are already released)."""
        self.store.set(decision_key(step), COMMIT)
        self._forget(step - 1)

    def abort(self, step: int) -> None:
        """Tell every worker waiting on ``step`` to drop it (raises :class:`StepAborted` in them)."""
        self.store.set(decision_key(step), ABORT)

    def _forget(self, step: int) -> None:
        """Delete the keys of an earlier step; safe once every rank has reported the step after it, since a
        rank reports step s only after it has read the decision of step s - 1."""
        if step < 0:
            return
        for rank in range(self.world_size):
            self.store.delete_key(ready_key(step, rank))
        self.store.delete_key(decision_key(step))
