"""How a local run's workers share this machine's cores (how many workers, how many intra-op threads each),
and other processes computing the model while the profiler times its layers, so that a local run whose
workers outnumber the cores is profiled the way its workers compute.

With more workers than cores, the operating system switches the cores between the workers' processes,
and each switch costs the next pass cache misses. A GPT block's pass measured on this machine's two cores
took 5.1 ms of CPU with two processes and 5.9-6.3 ms with four; a generic matrix kernel showed almost none
of that, so the cost depends on the model and is measured with the model's own layers. The profiler then
times each pass with the CPU clock of its own thread while :func:`computing_neighbours` keeps the other
processes busy (:mod:`oobleck.profiler`); :mod:`planner.local_step` shares the cores among the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import torch

from models.base import MicroBatch
from oobleck.config import JobConfig, config_from_dict
from oobleck.devices import resolve_device
from oobleck.model_building import build_batches, build_model

#: seconds the neighbours may take to start (import torch, build the model) before profiling gives up
START_TIMEOUT_S = 300.0
#: what a neighbour prints once its model is built
_READY = "ready"


def local_workers(config: JobConfig) -> int:
    """How many worker processes a local run of ``config`` starts on this machine: one per device."""
    return config.cluster.nodes * config.cluster.devices_per_node


def local_cores() -> int:
    """The cores this process (and every local worker it starts) may run on."""
    return len(os.sched_getaffinity(0))


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``workers`` workers sharing ``cores`` cores (default
    :func:`local_cores`): the cores divided among the workers, at least 1."""
    return max(1, (cores or local_cores()) // workers)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def neighbours_for(workers: int, cores: int) -> int:
    """How many other processes compute while the profiler times a local run of ``workers`` workers on
    ``cores`` cores: none when every worker has a core of its own; else as many as make the profiler and
    them ``workers`` processes, at most twice the cores in all (more share the cores no differently)."""
    if workers <= cores:
        return 0
    return min(workers, 2 * cores) - 1


def job_threads(config: JobConfig) -> int:
    """The intra-op threads each local worker of ``config`` runs (:func:`threads_per_worker`), with which its
    profile and its step costs are measured, so a layer takes the time a worker alone computes it in."""
    return threads_per_worker(local_workers(config))


def job_neighbours(config: JobConfig) -> int:
    """The processes that compute beside the profiler and the step-cost measurement for ``config``: a local
    run's workers beyond the cores (:func:`neighbours_for`) when they run on this machine's CPU, else none."""
    if resolve_device(config.cluster.device).type != "cpu":
        return 0
    return neighbours_for(local_workers(config), local_cores())


def _compute(config: JobConfig, stop: threading.Event) -> None:
    """A neighbour: forward and backward the whole model on one microbatch, over and over, until ``stop``."""
    # the profiler imports this module, so its backward pass (seeds of ones, aux losses included) is
    # imported here, in the neighbour's own process, where it is used
    from oobleck.profiler import backward_with_ones

    spec = build_model(config.model, config.training.seed)
    sample = build_batches(config, spec).samples(0, 0, config.training.microbatch)
    mb = MicroBatch(dict(sample.data))
    layers = [spec.build_layer(i) for i in range(spec.num_layers)]
    print(_READY, flush=True)
    while not stop.is_set():
        run_mb = mb.fresh()
        carry = None
        for layer in layers:
            carry = layer(carry, run_mb)
        assert carry is not None
        backward_with_ones(carry, run_mb)
        for layer in layers:
            layer.zero_grad(set_to_none=True)


def _await_ready(process: subprocess.Popen[str], deadline: float) -> None:
    assert process.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the processes computing beside the profiler did not start in {START_TIMEOUT_S:.0f} s")
        readable, _, _ = select.select([process.stdout], [], [], min(left, 1.0))
        if readable:
            line = process.stdout.readline()
            if line.strip() == _READY:
                return
            if not line:  # it exited: its error went to stderr, which is the profiler's
                raise RuntimeError(f"a process computing the model beside the profiler exited ({process.wait()})")


@contextlib.contextmanager
def computing_neighbours(config: JobConfig, count: int, threads: int, quiet: bool = False) -> Iterator[None]:
    """Run the body while ``count`` processes (started here, each with ``threads`` intra-op threads) compute
    ``config``'s model on the CPU; every one has built its model before the body starts, and all are stopped
    (their stdin closed) and reaped when it ends, however it ends. Raises ``RuntimeError`` when one of them
    exits first or they take more than :data:`START_TIMEOUT_S` to start; the line saying why goes to this
    process's stderr, unless ``quiet``."""
    processes: list[subprocess.Popen[str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "oobleck.shared_cores"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
                    text=True, env=env,
                )  # fmt: skip
            )
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(json.dumps(config.to_dict()) + "\n")
            process.stdin.flush()
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in processes:
            _await_ready(process, deadline)
        yield
    finally:
        for process in processes:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.close()  # the neighbour stops at the end of its pass
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


def main() -> int:
    """A neighbour's process: the job config as one JSON line on stdin, then compute until stdin closes.
    Exits 1 with one line on stderr when it cannot build the model or its data."""
    try:
        config = config_from_dict(json.loads(sys.stdin.readline()))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        stop = threading.Event()

        def watch_stdin() -> None:
            sys.stdin.read()  # returns at end of file: the profiler is done
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
        _compute(config, stop)
    except Exception as e:  # the profiler reports the exit; this says why
        print(f"oobleck.shared_cores: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
