"""The cores a local run's control plane keeps busy with its heartbeats while the workers compute.

Every agent holds a gRPC stream to the master open, and on it each side sends a message every
``fault_tolerance.heartbeat_interval_s`` (:mod:`oobleck.control.master`, :mod:`oobleck.control.agent`);
every worker writes a byte to its agent's pipe as often (:mod:`oobleck.worker_main`). In a local run the
master and the agents are processes on the workers' machine, so that CPU comes off the cores the workers
share (:attr:`planner.local_step.StepCosts.busy_cores`).

:func:`heartbeat_cores` measures it on this machine: ``streams`` gRPC streams through a server and
channels on loopback with the control plane's options, each carrying a small request and its reply every
interval, and ``pipes`` pipes with a byte every interval, for ``seconds`` (the streams carry a fresh token, checked
by the control plane's gate, as the agents' do); the CPU of this process (both
ends and gRPC's own threads) per second of wall clock. It is a floor: the master's and the agents' own
Python work per heartbeat is not in it. On this machine it gave about 4% of a core for the tiny GPT run on
4 local nodes, whose master, agents and workers' heartbeat threads took 7.8% (``/proc``, 10 s).
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from oobleck.control.auth import TokenInterceptor
from oobleck.control.channel import SERVER_OPTIONS, open_channel

#: the only address the measurement listens on
_LOOPBACK = "127.0.0.1"
#: a heartbeat's size on the wire, about the control plane's (a node name and a few numbers)
_BEAT = b"h" * 32
#: seconds the streams run before the measured window, so that it holds no connection set-up
_SETTLE_S = 0.2


@dataclass(frozen=True)
class HeartbeatLoad:
    """What :func:`heartbeat_cores` measured."""

    #: CPU seconds per wall second: the cores the heartbeats keep busy
    cores: float
    #: heartbeats answered on the streams during the window (how many were measured)
    beats: int


def heartbeat_cores(streams: int, pipes: int, interval_s: float, seconds: float = 0.5) -> HeartbeatLoad:
    """Measure the heartbeats of ``streams`` agents and ``pipes`` workers every ``interval_s`` (module notes)."""
    if streams < 0 or pipes < 0 or not interval_s > 0 or not seconds > 0:
        raise ValueError(
            f"need streams, pipes >= 0 and interval_s, seconds > 0, got {streams}, {pipes}, {interval_s}, {seconds}"
        )
    answered = [0] * streams
    stop = threading.Event()

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    token = secrets.token_urlsafe(32)  # as the control plane's: every heartbeat carries it and is checked
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=streams + 1),
        interceptors=[TokenInterceptor(token)],
        options=SERVER_OPTIONS,
    )
    handler = {"Beat": grpc.stream_stream_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("oobleck.HeartbeatLoad", handler),))
    port = server.add_insecure_port(f"{_LOOPBACK}:0")
    server.start()

    def agent(index: int) -> None:
        outgoing: queue.Queue[bytes | None] = queue.Queue()
        with open_channel(f"{_LOOPBACK}:{port}", token) as channel:
            replies = channel.stream_stream("/oobleck.HeartbeatLoad/Beat")(iter(outgoing.get, None))
            due = time.monotonic()
            while not stop.is_set():
                outgoing.put(_BEAT)
                next(replies)
                answered[index] += 1
                due += interval_s
                stop.wait(max(0.0, due - time.monotonic()))
            outgoing.put(None)
            for _ in replies:  # the server ends the stream once the requests end
                pass

    def worker(write_fd: int) -> None:
        while not stop.wait(interval_s):
            os.write(write_fd, b"\0")

    def reader(read_fd: int) -> None:
        while os.read(read_fd, 1):
            pass

    fds = [os.pipe() for _ in range(pipes)]
    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(streams)]
    threads += [threading.Thread(target=worker, args=(w,), daemon=True) for _, w in fds]
    readers = [threading.Thread(target=reader, args=(r,), daemon=True) for r, _ in fds]
    try:
        for thread in threads + readers:
            thread.start()
        time.sleep(_SETTLE_S)
        before, cpu_before, started = sum(answered), time.process_time(), time.monotonic()
        time.sleep(seconds)
        cpu, wall, beats = time.process_time() - cpu_before, time.monotonic() - started, sum(answered) - before
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for r, w in fds:
            os.close(w)  # the reader sees the end of the pipe
        for thread in readers:
            thread.join()
        for r, _ in fds:
            os.close(r)
        server.stop(None)
    return HeartbeatLoad(cores=cpu / wall, beats=beats)
