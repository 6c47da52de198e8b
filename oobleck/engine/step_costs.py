"""Measure, on this machine, what a local run's step costs beyond the layer profile: the planner's
:class:`planner.local_step.StepCosts` (its model is in :mod:`planner.local_step`).

Cores. A local run's workers are processes on this machine: ``workers`` of them share the C cores this
process may run on (``os.sched_getaffinity``), and each runs T = :func:`oobleck.shared_cores.threads_per_worker`
intra-op threads (the launcher sets ``OMP_NUM_THREADS`` to it). The profile measures the layers with the
same T (``oobleck.profiler``), so ``StepCosts`` carries C and T and the planner divides the job's work
among the cores: with 4 workers of 1 thread on 2 cores, each gets half a core while all compute.

Overheads, each timed here with T threads (about a second in all; :func:`job_step_costs` times them while
other processes compute the model, as the profile is timed, when a local run's workers outnumber the
cores). Two threads of this process, joined by a gloo process group over loopback TCP as two workers are,
exchange a boundary carry back and forth, each send and receive posted and waited for as a worker's are on
CPU (:mod:`oobleck.engine.p2p_stream`: waited for on a thread of its own). ``message_s`` is the CPU time of
the whole process (both ranks, their waiting threads and gloo's) per message and side, the median of a
few repetitions as the profile's passes are: the model charges it as work on the sharing cores, and a
wait's idle time is not work. The other figures are wall times, the fastest of a few repetitions (other
processes' load only adds time). The same pair times an all-reduce of one number (``allreduce_s``) and of
``grad_bytes`` (``allreduce_byte_s`` is the difference per byte); a set-then-wait round trip through a
TCPStore, as a worker's commit goes through the master's store, gives ``commit_s``; AdamW steps a flat
float32 tensor of ``grad_bytes`` (``optimizer_byte_s``).

On CUDA (unverified: a local CUDA run needs several GPUs) each worker has a device of its own, so C is
infinite; the overheads are still those of gloo, the store and AdamW on this host's CPU.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from oobleck.config import JobConfig
from oobleck.devices import resolve_device
from oobleck.engine import p2p_stream
from oobleck.shared_cores import (
    computing_neighbours,
    job_neighbours,
    job_threads,
    local_cores,
    local_workers,
    threads_per_worker,
    torch_threads,
)
from oobleck.store_server import start_store
from planner.profile import ModelProfile
from planner.local_step import StepCosts

#: repetitions whose fastest each figure is (after one warm-up)
_REPEATS = 9
#: round trips of a carry per timed repetition (one takes well under a millisecond)
_PING_PONGS = 10
#: the most bytes the all-reduce and AdamW timings move: enough for a per-byte figure, bounded in time
_MAX_TIMED_BYTES = 64 << 20
_TIMEOUT = timedelta(seconds=60)
#: the only address the measurement listens on (its gloo pair and its store)
_LOOPBACK = "127.0.0.1"


def _pick_of_timings(
    run: Callable[[], object],
    clock: Callable[[], float] = time.perf_counter,
    pick: Callable[[list[float]], float] = min,
) -> float:
    """``pick`` (default: the fastest) of :data:`_REPEATS` timings of ``run`` by ``clock``, after one warm-up."""
    run()
    times = []
    for _ in range(_REPEATS):
        start = clock()
        run()
        times.append(clock() - start)
    return pick(times)


def _on_pair(timings: Callable[[int, dist.ProcessGroup], dict[str, float]]) -> dict[str, float]:
    """Rank 0's ``timings(rank, group)`` of a two-rank gloo group whose ranks are threads of this process
    (both run ``timings``)."""
    store = dist.HashStore()
    out: dict[str, float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=_LOOPBACK)]  # listen there only
            options._timeout = _TIMEOUT
            measured = timings(r, dist.ProcessGroupGloo(dist.PrefixStore("pair", store), r, 2, options))
            if r == 0:
                out.update(measured)
        except BaseException as e:  # reported by the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _message_s(carry_bytes: int) -> float:
    """``message_s`` (module notes): a carry of ``carry_bytes`` sent back and forth between the pair."""

    def timings(r: int, group: dist.ProcessGroup) -> dict[str, float]:
        x = torch.zeros(max(1, carry_bytes // 4))
        peer = 1 - r

        # posted and waited for through p2p_stream as a worker's transfers are, on this pair's group
        def send() -> None:
            p2p_stream.wait_all_sent([p2p_stream.post(lambda t, to: group.send([t], to, 0), x, peer, None)], None)

        def receive() -> None:
            work = p2p_stream.post(lambda t, source: group.recv([t], source, 0), x, peer, None)
            p2p_stream.Receives([work], None).wait()

        def ping_pongs() -> None:
            for _ in range(_PING_PONGS):
                if r == 0:
                    send()
                    receive()
                else:
                    receive()
                    send()

        # both ranks' CPU: each of the 2 * _PING_PONGS messages costs its sender and its receiver; the
        # median, as the profile's passes: beside computing processes a message's CPU varies with what they
        # leave in the caches, and a step pays the typical message, not the luckiest
        return {"message_s": _pick_of_timings(ping_pongs, time.process_time, statistics.median) / (4 * _PING_PONGS)}

    return _on_pair(timings)["message_s"]


def _allreduce_timings(grad_bytes: int) -> tuple[float, float]:
    """``allreduce_s`` and ``allreduce_byte_s`` (module notes) of the pair."""
    grads = max(1, min(grad_bytes, _MAX_TIMED_BYTES) // 4)

    def timings(r: int, group: dist.ProcessGroup) -> dict[str, float]:
        one, many = torch.zeros(1), torch.zeros(grads)
        return {
            "one": _pick_of_timings(lambda: group.allreduce([one]).wait()),
            "many": _pick_of_timings(lambda: group.allreduce([many]).wait()),
        }

    t = _on_pair(timings)
    return t["one"], max(0.0, t["many"] - t["one"]) / (grads * 4)


def _commit_s() -> float:
    """A worker's set of its ready key and wait for the decision key, answered by another thread (the
    master) that waits for the ready key and sets the decision: one round trip through a TCPStore."""
    server = start_store(_LOOPBACK)
    worker = dist.TCPStore(_LOOPBACK, server.port, is_master=False, timeout=_TIMEOUT)
    rounds = _REPEATS + 1

    def master() -> None:
        for i in range(rounds):
            server.wait([f"ready/{i}"])
            server.set(f"decision/{i}", b"commit")

    answering = threading.Thread(target=master, daemon=True)
    answering.start()
    counter = iter(range(rounds))

    def commit() -> None:
        i = next(counter)
        worker.set(f"ready/{i}", b"1")
        worker.wait([f"decision/{i}"])

    seconds = _pick_of_timings(commit)
    answering.join()
    return seconds


def _optimizer_byte_s(grad_bytes: int) -> float:
    numel = max(1, min(grad_bytes, _MAX_TIMED_BYTES) // 4)
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.ones(numel)
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    return _pick_of_timings(optimizer.step) / (numel * 4)


def measure_step_costs(
    workers: int,
    device: torch.device,
    carry_bytes: int,
    grad_bytes: int,
    beside: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> StepCosts:
    """The :class:`~planner.local_step.StepCosts` of a local run of ``workers`` workers on ``device``, whose
    stage boundaries carry ``carry_bytes`` per microbatch and whose stages hold up to ``grad_bytes`` of
    gradients (see the module notes). ``message_s`` is timed inside ``beside()``; the wall times outside
    it, since the model shares the cores among the workers itself."""
    cores = local_cores()
    threads = threads_per_worker(workers, cores)
    with torch_threads(threads):
        with beside():
            message = _message_s(carry_bytes)
        allreduce, allreduce_byte = _allreduce_timings(grad_bytes)
        optimizer = _optimizer_byte_s(grad_bytes)
        commit = _commit_s()
    return StepCosts(
        cores=cores if device.type == "cpu" else math.inf,
        threads=threads,
        message_s=message,
        allreduce_s=allreduce,
        allreduce_byte_s=allreduce_byte,
        commit_s=commit,
        optimizer_byte_s=optimizer,
    )


def job_step_costs(config: JobConfig, profile: ModelProfile) -> StepCosts:
    """:func:`measure_step_costs` for a local run of ``config`` planned from ``profile``: its largest carry
    crosses the boundaries, and the all-reduce and AdamW timings move the whole model's gradients (capped).
    When the run's workers outnumber the cores, other processes compute the model meanwhile, as the profile
    is measured (:func:`oobleck.shared_cores.computing_neighbours`): a message then costs its worker the
    cache misses and wake-ups of a core switching between processes, about twice its CPU alone here."""
    return measure_step_costs(
        local_workers(config),
        resolve_device(config.cluster.device),
        max(layer.output_bytes for layer in profile.layers),
        sum(layer.grad_bytes for layer in profile.layers),
        lambda: _beside_or_alone(config, job_neighbours(config), job_threads(config)),
    )


@contextlib.contextmanager
def _beside_or_alone(config: JobConfig, neighbours: int, threads: int) -> Iterator[None]:
    """The body with ``neighbours`` processes computing ``config``'s model, or alone when they cannot start:
    a model or data they fail on (a bad byte deep in a data file, say) fails the run's workers too, with the
    line that says why, so the plan must not fail first on a prediction."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(computing_neighbours(config, neighbours, threads, quiet=True))
        except RuntimeError:
            pass  # they are reaped already; the message is then timed alone
        yield
