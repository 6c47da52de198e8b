"""Real rank processes for the release, interrupt and gradient-sync tests: started from a fork server that
imported torch once (instead of once per rank: seconds of CPU each), and always reaped."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
from multiprocessing.process import BaseProcess
from datetime import timedelta
from typing import Callable, Iterator


@contextlib.contextmanager
def rank_processes(target: Callable[[int, int], None], count: int, store_port: int) -> Iterator[list[BaseProcess]]:
    """``count`` processes running ``target(rank, store_port)``. On leaving, every one still alive is killed
    and the fork server stops (it would otherwise idle, holding torch, until pytest exits)."""
    context = multiprocessing.get_context("forkserver")
    # both must be imported before the first group exists (docs/design.md, "Releasing a blocked worker")
    context.set_forkserver_preload(["torch._dynamo", "torch.distributed.nn"])
    ranks = [context.Process(target=target, args=(rank, store_port), daemon=True) for rank in range(count)]
    try:
        for p in ranks:
            p.start()
        yield ranks
    finally:
        for p in ranks:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join()
        multiprocessing.forkserver._forkserver._stop()  # CPython has no public stop


def exit_codes(ranks: list[BaseProcess], timeout_s: float = 30) -> list[int | None]:
    """Each process's exit code after waiting up to ``timeout_s`` for it."""
    for p in ranks:
        p.join(timeout=timeout_s)
    return [p.exitcode for p in ranks]


def rank_results(target: Callable[[int, int], None], count: int, timeout: timedelta) -> dict[int, dict]:
    """Run ``count`` processes of ``target(rank, store_port)`` around a TCPStore hosted here and return each
    rank's JSON result, which ``target`` sets at ``result/<rank>`` before it waits for ``finish``; every
    process must then exit with code 0."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    with rank_processes(target, count, store.port) as ranks:
        results = {rank: json.loads(store.get(f"result/{rank}")) for rank in range(count)}
        store.set("finish", "1")
        assert exit_codes(ranks) == [0] * count
    return results
