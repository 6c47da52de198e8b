"""Leaving a collective that shutting the sockets down did not release (oobleck.engine.interrupt), for real:
two processes, one gloo world and one sub-group; and a collective that completes just after a wait slice
ran out, with a stand-in work handle.

Rank 0 posts a sub-group all-reduce that rank 1 (alive) joins late in the first case and never in the
second. Nothing shuts the sockets down, which stands in for the rare operation the generation watch's
release misses: only :func:`interrupt.wait` stands between rank 0 and gloo's 60 s timeout.
"""

from __future__ import annotations

import json
import re
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
    _leave_and_join_the_next_generation(rank, store, report)
    dist.destroy_process_group()
    store.set(f"result/{rank}", json.dumps(report))
    store.wait(["finish"])


def _leave_and_join_the_next_generation(rank: int, store: object, report: dict[str, object]) -> None:
    """Destroy this generation's world (timed in ``report["destroy_s"]``), then all-reduce rank + 1 in the next
    one's (``report["next_sum"]``): it works although the abandoned operation's group lives on, on its own."""
    import torch
    import torch.distributed as dist

    from oobleck.engine import interrupt

    started = time.perf_counter()
    dist.destroy_process_group()
    report["destroy_s"] = time.perf_counter() - started
    dist.distributed_c10d._world.group_count = 0
    interrupt.watch(threading.Event())
    dist.init_process_group("gloo", store=dist.PrefixStore("gen1", store), rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    value = torch.tensor([rank + 1.0])
    interrupt.wait(dist.all_reduce(value, async_op=True), None)
    report["next_sum"] = value.item()


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


#: floats of the transfer: far more than loopback's socket buffers hold, so the send is left partly written
#: and the receive partly read
BIG = 16 << 20


def _p2p_rank_main(rank: int, store_port: int) -> None:
    """Gloo's two unreleased transfers, for real: rank 1 posts a receive of ``BIG`` floats from rank 0 and is
    stopped (SIGSTOP) by rank 0, which then sends them: the socket buffers fill, and the send is left partly
    written. Rank 0 ends its generation as the watch does (refuse posts, shut its sockets down): gloo does
    not tell the partly written send. Rank 1 is resumed and ends its generation too: it reads what the
    buffers held, then the end of the stream (gloo closes the pair) and gloo does not tell the partly read
    receive either. Each
    must leave within a wait slice or so of its end (gloo's own timeout is 60 s), then both build the next
    generation's group and all-reduce in it."""
    import os
    import signal

    import torch
    import torch.distributed as dist

    from oobleck.engine import interrupt, p2p_stream
    from oobleck.engine.release import gloo_sockets, release_blocked_collectives

    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=START_TIMEOUT)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0", store), rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    ended = threading.Event()
    interrupt.watch(ended)
    report: dict[str, object] = {}
    ended_at: list[float] = []

    def end_generation() -> None:  # what oobleck.engine.elastic.GenerationWatch does at the master's end
        interrupt.end(ended)
        ended_at.append(time.perf_counter())
        report["released"] = release_blocked_collectives(gloo_sockets({store_port}))

    try:
        if rank == 1:
            receives = p2p_stream.Receives([interrupt.post(dist.irecv, torch.empty(BIG), 0)], None)
            store.set("posted", str(os.getpid()))
            threading.Thread(target=lambda: (store.wait(["resumed"]), end_generation()), daemon=True).start()
            receives.wait()
        else:
            peer = int(store.get("posted"))
            os.kill(peer, signal.SIGSTOP)
            time.sleep(LATE_S)  # rank 1's receive notice has arrived long since: the send goes out at once
            sent = interrupt.post(dist.isend, torch.ones(BIG), 1)
            threading.Timer(LATE_S, end_generation).start()
            try:
                p2p_stream.wait_all_sent([sent], None)
            finally:
                os.kill(peer, signal.SIGCONT)
                store.set("resumed", "1")
        report["error"] = None
    except interrupt.GenerationEnded as e:
        report["error"] = str(e)
    report.update(left_after_s=time.perf_counter() - ended_at[0], abandoned=interrupt.abandoned_asides())
    _leave_and_join_the_next_generation(rank, store, report)
    time.sleep(1.0)
    report["still_blocked"] = interrupt.abandoned_asides()  # not slow: stuck (until gloo's timeout)
    store.set(f"result/{rank}", json.dumps(report))
    store.wait(["finish"])
    os._exit(0)  # the abandoned transfer's thread is still blocked in gloo: do not wait for it at exit


@pytest.mark.slow  # two worker processes and gloo groups: ~5 s (30 s on a loaded machine)
def test_a_partly_done_transfer_that_the_shutdown_misses_is_abandoned_when_the_generation_ends() -> None:
    """A send left partly written and a receive left partly read are not released by the generation's
    socket shutdown (seen in CI: a survivor's send, until the 30 s stuck-worker backstop counted its node as
    lost); both are given up within about a wait slice of the end."""
    from rank_processes import rank_results

    results = rank_results(_p2p_rank_main, 2, START_TIMEOUT)
    print(f"\np2p interrupt timings: {json.dumps(results, sort_keys=True)}")
    # rank 0's shutdown did not release its send; rank 1 had nothing left to shut down (gloo had closed the
    # pair on the end of the stream) and its receive still waited
    assert results[0]["released"] >= 1, results
    for rank in (0, 1):
        left = results[rank]
        assert left["error"] is not None and "abandoned" in left["error"], left
        assert left["still_blocked"] == 1, left
        assert left["left_after_s"] < 5, left  # not gloo's 60 s timeout
        assert left["abandoned"] == 1, left
        assert left["destroy_s"] < 10, left
        assert left["next_sum"] == 3.0, left


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


#: how long a survivor may take from the generation's end to leaving a build that waits on a dead member
#: (the grace plus a few wait slices; without the abandon it waits out gloo's timeout)
LEFT_BUILD_WITHIN_S = 5.0


#: how long the peers build with the dead member's address posted before the generation ends
BUILDING_S = 0.5
#: the dead member's listening port in gloo's address record (a sockaddr_in: family 2, port, 127.0.0.1),
#: which the test moves to the highest port: gloo compares the pair's addresses, and the lower side waits
#: for the higher one to connect, so every survivor then waits on the dead member's connection, on no
#: socket (with a lower port, a survivor would connect to it instead, be refused within a second, and
#: fail its build by itself, taking its peers' builds down with it)
DEAD_PORT = re.compile(rb"(\x02\x00)..(\x7f\x00\x00\x01)", re.DOTALL)
#: where the rank to be killed leaves its gloo address (and the key it belongs under) for the test to post
DEAD_ADDRESS_KEY, DEAD_ADDRESS_VALUE = "dead_address_key", "dead_address_value"


def _build_rank_main(rank: int, store_port: int) -> None:
    """Rank 2 hands its address for generation 1's group to the test and is killed at once, before
    connecting to anyone; ranks 0 and 1 build that group under a generation watch (the test posts the dead
    member's address), then build generation 2's without it."""
    import os
    import signal

    import torch
    import torch.distributed as dist

    from oobleck.engine import interrupt
    from oobleck.engine.elastic import GenerationWatch
    from test_release import store_key

    base = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=START_TIMEOUT)
    generation = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=GLOO_TIMEOUT)
    gen1 = dist.PrefixStore("gen1", generation)
    if rank == 2:

        class _DiesAfterItsAddress(dist.Store):  # the rest of the Store calls are not used before the kill
            def set(self, key: str, value: bytes) -> None:
                if not key.endswith(f"/{rank}"):
                    gen1.set(key, value)
                    return
                # gloo's address of this rank: the test posts it once this process is dead, so that no peer
                # can have connected to it while it was still alive (an initiator then counts the pair as
                # connected, and builds a group with a dead member)
                gen1.set(DEAD_ADDRESS_VALUE, value)
                base.set(DEAD_ADDRESS_KEY, key)
                os.kill(os.getpid(), signal.SIGKILL)

            def get(self, key: str) -> bytes:
                return gen1.get(key)

            def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
                gen1.wait(keys, timeout or GLOO_TIMEOUT)

        base.wait(["go"])
        dist.init_process_group("gloo", store=_DiesAfterItsAddress(), rank=rank, world_size=3, timeout=GLOO_TIMEOUT)
        return
    watch = GenerationWatch(base, 1, store_key(), exclude_ports=(store_port,), stuck_after_s=0)
    interrupt.watch(watch.ended)
    report: dict[str, object] = {}
    base.wait(["go"])
    try:
        interrupt.build(dist.init_process_group, "gloo", store=gen1, rank=rank, world_size=3, timeout=GLOO_TIMEOUT)
        report["built"] = True
    except Exception as e:  # GenerationEnded, or gloo's own error if the sweep reached the build first
        report["error"] = type(e).__name__
    report["left_after_end_s"] = time.time() - float(base.get("ended_at"))
    watch.close()
    interrupt.watch(None)
    report["abandoned_builds"] = interrupt.abandoned_builds()
    dist.distributed_c10d._world.group_count = 0  # as oobleck.engine.elastic does between generations
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=GLOO_TIMEOUT)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen2", store), rank=rank, world_size=2, timeout=GLOO_TIMEOUT)
    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value)
    report["all_reduce"] = value.item()
    base.set(f"result/{rank}", json.dumps(report))
    base.wait(["finish"])
    os._exit(0)  # an abandoned build's thread is still blocked in gloo: do not wait for it at exit


@pytest.mark.slow  # three worker processes and gloo groups: ~5 s (30 s on a loaded machine)
def test_a_group_build_waiting_on_a_member_killed_mid_rendezvous_is_abandoned_at_the_end() -> None:
    """A member killed after it posted its address, before connecting: its peers wait inside gloo's
    constructor on no socket (seen: until the 30 s stuck-worker backstop). After the generation's end both
    abandon the build within seconds, and build the next generation's group without it."""
    import torch.distributed as dist

    from test_release import end_generation

    host = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=START_TIMEOUT)
    with rank_processes(_build_rank_main, 3, host.port) as ranks:
        host.set("go", "1")
        ranks[2].join(timeout=START_TIMEOUT.total_seconds())
        assert ranks[2].exitcode == -9, "rank 2 was to be killed right after handing over its address"
        gen1 = dist.PrefixStore("gen1", host)
        address, moved = DEAD_PORT.subn(lambda m: m[1] + b"\xff\xff" + m[2], gen1.get(DEAD_ADDRESS_VALUE))
        assert moved == 1, f"no single IPv4 address in gloo's address record: {address!r}"
        gen1.set(host.get(DEAD_ADDRESS_KEY).decode(), address)  # peers now wait for it
        time.sleep(BUILDING_S)  # the peers are connecting, or waiting for the dead member to connect
        host.set("ended_at", str(time.time()))
        end_generation(host, 1)
        results = {rank: json.loads(host.get(f"result/{rank}")) for rank in (0, 1)}
        host.set("finish", "1")
        assert exit_codes(ranks[:2]) == [0, 0]
    print(f"\nbuild abandon: {json.dumps(results, sort_keys=True)}")
    for report in results.values():
        assert "built" not in report, "a group with a dead member cannot have been built"
        assert report["left_after_end_s"] < LEFT_BUILD_WITHIN_S, report
        assert report["all_reduce"] == 3.0
    assert all(r["error"] == "GenerationEnded" and r["abandoned_builds"] == 1 for r in results.values()), results


def test_a_group_build_is_not_started_once_the_generation_has_ended() -> None:
    """A member that starts its build late must not connect to the builds its peers abandoned: those would
    then complete, and install a stale group behind the next generation's back."""
    from oobleck.engine import interrupt

    calls: list[str] = []
    ended = threading.Event()
    ended.set()
    interrupt.watch(ended)
    try:
        with pytest.raises(interrupt.GenerationEnded):
            interrupt.build(calls.append, "started")
    finally:
        interrupt.watch(None)
    assert calls == []
