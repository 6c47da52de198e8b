"""Leaving a collective that shutting the sockets down did not release (oobleck.engine.interrupt), for real:
two processes, one gloo world and one sub-group; and a collective that completes just after a wait slice
ran out, with a stand-in work handle.

Rank 0 posts a sub-group all-reduce that rank 1 (alive) joins late in the first case and never in the
second. Nothing shuts the sockets down, which stands in for the rare operation the generation watch's
release misses: only :func:`interrupt.wait` stands between rank 0 and gloo's 60 s timeout.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from rank_processes import exit_codes, rank_processes

pytestmark = pytest.mark.timeout(300)

#: gloo's own timeout: a wait or a group teardown that depends on it takes this long
GLOO_TIMEOUT = timedelta(seconds=60)
START_TIMEOUT = timedelta(seconds=180)
#: how long rank 1 keeps rank 0 waiting (several wait slices)
LATE_S = 0.3


class _FinishesAfterTheSlice:
    """A work handle whose first timed wait runs out just before the operation completes (with ``error``,
    or successfully when None), as a loaded machine can order them."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.completed = False

    def wait(self, timeout: timedelta | None = None) -> bool:
        if not self.completed:
            self.completed = True  # finishes right after the slice ran out
            raise RuntimeError("Operation timed out!")
        if self.error is not None:
            raise self.error
        return True

    def is_completed(self) -> bool:
        return self.completed


@pytest.mark.parametrize("error", [None, RuntimeError("Connection closed by peer")])
def test_a_collective_that_completes_just_after_a_slice_is_its_own_outcome(error: Exception | None) -> None:
    """Not the slice's timeout: the completed operation's result (return) or its own error."""
    from oobleck.engine import interrupt

    interrupt.watch(threading.Event())
    try:
        if error is None:
            interrupt.wait(_FinishesAfterTheSlice(None), None)  # type: ignore[arg-type]
        else:
            with pytest.raises(RuntimeError, match="closed by peer"):
                interrupt.wait(_FinishesAfterTheSlice(error), None)  # type: ignore[arg-type]
    finally:
        interrupt.watch(None)


def _rank_main(rank: int, store_port: int) -> None:
    import torch._dynamo  # noqa: F401  (before the first group: docs/design.md, "Releasing a blocked worker")
    import torch.distributed.nn  # noqa: F401

    import torch
    import torch.distributed as dist

    from oobleck.engine import interrupt

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=START_TIMEOUT)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0", store), rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    sub = dist.new_group([0, 1], timeout=GLOO_TIMEOUT)
    ended = threading.Event()
    interrupt.watch(ended)
    report: dict[str, object] = {}

    # 1. a collective that completes after several slices: the result is the sum, nothing is abandoned
    value = torch.tensor([rank + 1.0])
    if rank == 1:
        time.sleep(LATE_S)
    started = time.perf_counter()
    interrupt.wait(dist.all_reduce(value, group=sub, async_op=True), sub)
    report.update(late_sum=value.item(), late_wait_s=time.perf_counter() - started)

    # 2. a collective rank 1 never joins, still running when the generation ends
    if rank == 0:
        threading.Timer(LATE_S, ended.set).start()
        started = time.perf_counter()
        try:
            interrupt.wait(dist.all_reduce(torch.ones(4), group=sub, async_op=True), sub)
            report["error"] = None
        except interrupt.GenerationEnded as e:
            report["error"] = str(e)
        report.update(left_after_s=time.perf_counter() - started, abandoned=interrupt.abandoned())
        store.set("left", "1")
    else:
        store.wait(["left"])
    del sub  # as the engine does: the worker drops its groups when it leaves
    started = time.perf_counter()
    dist.destroy_process_group()
    report["destroy_s"] = time.perf_counter() - started

    # the next generation's world works (the abandoned operation's group lives on, on its own)
    dist.distributed_c10d._world.group_count = 0
    interrupt.watch(threading.Event())
    dist.init_process_group("gloo", store=dist.PrefixStore("gen1", store), rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    value = torch.tensor([rank + 1.0])
    interrupt.wait(dist.all_reduce(value, async_op=True), None)
    report["next_sum"] = value.item()
    dist.destroy_process_group()
    store.set(f"result/{rank}", json.dumps(report))
    store.wait(["finish"])


@pytest.mark.slow  # two worker processes and gloo groups: ~5 s (30 s on a loaded machine)
def test_a_collective_left_running_is_abandoned_when_the_generation_ends() -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=START_TIMEOUT)
    with rank_processes(_rank_main, 2, store.port) as ranks:
        results = {rank: json.loads(store.get(f"result/{rank}")) for rank in (0, 1)}
        store.set("finish", "1")
        assert exit_codes(ranks) == [0, 0]

    print(f"\ninterrupt timings: {json.dumps(results, sort_keys=True)}")
    left = results[0]
    assert results[0]["late_sum"] == results[1]["late_sum"] == 3.0
    assert results[0]["late_wait_s"] >= LATE_S * 0.5  # it did wait across slices
    assert left["error"] is not None and "abandoned" in left["error"]
    assert LATE_S <= left["left_after_s"] < LATE_S + 5  # seconds at most, not gloo's 60 s timeout
    assert left["abandoned"] == 1
    assert left["destroy_s"] < 10  # the stuck group is kept, so its teardown does not wait for the timeout
    assert results[0]["next_sum"] == results[1]["next_sum"] == 3.0


def test_an_operation_is_posted_before_the_end_or_refused() -> None:
    """:func:`interrupt.end` waits for a post under way (its sockets are shut down only after), and every post
    after the end is refused."""
    from oobleck.engine import interrupt

    ended, entered, release = threading.Event(), threading.Event(), threading.Event()

    def operation() -> str:
        entered.set()
        release.wait(30)
        return "posted"

    interrupt.watch(ended)
    try:
        posted: list[str] = []
        poster = threading.Thread(target=lambda: posted.append(interrupt.post(operation)))
        poster.start()
        entered.wait(30)
        ender = threading.Thread(target=interrupt.end, args=(ended,))
        ender.start()
        ender.join(0.2)
        assert ender.is_alive() and not ended.is_set()  # held off while the operation is being posted
        release.set()
        poster.join(30)
        ender.join(30)
        assert posted == ["posted"] and ended.is_set()
        with pytest.raises(interrupt.GenerationEnded):
            interrupt.post(operation)
    finally:
        interrupt.watch(None)
