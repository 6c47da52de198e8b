"""Releasing a rank blocked in gloo on a live but silent peer, for real: three processes, one gloo group.

Rank 1 blocks in ``recv`` from rank 2, which is alive and never sends. On the test's notice (through the
store), rank 1's control thread shuts down the group's sockets; the recv must raise within a second, and
ranks 0 and 1 must then form a new two-rank group under a new store prefix and all-reduce correctly.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import pytest

from rank_processes import exit_codes, rank_processes

from oobleck.engine.release import (
    SocketSnapshot,
    gloo_sockets,
    release_blocked_collectives,
    socket_inodes,
    tcp_connections,
)

pytestmark = pytest.mark.timeout(300)

TIMEOUT = timedelta(seconds=60)
#: the ranks start from a fork server that has imported torch once; on a loaded machine that takes a while
START_TIMEOUT = timedelta(seconds=180)
#: how long the test leaves rank 1 blocked before the notice: without a release, recv must still be waiting
BLOCKED_WINDOW_S = 0.2


def _rank_main(rank: int, store_port: int) -> None:
    # both must be imported before the first group exists, or gloo sockets leak (docs/design.md, "Releasing a
    # blocked worker"); the fork server preloads them, so these imports only make that requirement visible here
    import torch._dynamo  # noqa: F401
    import torch.distributed.nn  # noqa: F401

    import torch
    import torch.distributed as dist

    def client() -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=TIMEOUT)

    store = client()
    control_store = client()  # the control thread's own connection: a TCPStore client serialises its calls
    before = SocketSnapshot.take({store_port})
    dist.init_process_group("gloo", store=dist.PrefixStore("gen0", store), rank=rank, world_size=3, timeout=TIMEOUT)
    group = SocketSnapshot.take({store_port}).since(before)
    # here the store is this process's only other TCP peer, so the plain listing must find the same sockets
    report: dict[str, object] = {
        "group_sockets": len(group.sockets),
        "listing_matches": gloo_sockets({store_port}) == group.fds,
    }

    if rank == 2:  # alive, silent: never sends what rank 1 waits for
        store.wait(["finish"], START_TIMEOUT)
        dist.destroy_process_group()
        return

    if rank == 1:
        notice: dict[str, float] = {}
        in_recv = threading.Event()

        def control() -> None:
            control_store.wait(["release"])
            notice["at"] = time.perf_counter()
            notice["still_blocked"] = float(in_recv.is_set())
            notice["released"] = group.release()

        thread = threading.Thread(target=control)
        thread.start()
        store.set("blocking/1", "1")
        in_recv.set()
        started = time.perf_counter()
        try:
            dist.recv(torch.zeros(4), src=2)
            report["error"] = None
        except RuntimeError as e:
            report["error"] = str(e).splitlines()[0]
        raised = time.perf_counter()
        in_recv.clear()
        thread.join()
        report.update(
            blocked_s=raised - started,
            release_latency_s=raised - notice["at"],
            still_blocked_at_notice=bool(notice["still_blocked"]),
            released=notice["released"],
        )
    else:
        store.wait(["release"])

    t0 = time.perf_counter()
    dist.destroy_process_group()
    t1 = time.perf_counter()
    dist.init_process_group("gloo", store=dist.PrefixStore("gen1", store), rank=rank, world_size=2, timeout=TIMEOUT)
    t2 = time.perf_counter()
    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value)
    t3 = time.perf_counter()
    dist.destroy_process_group()
    report.update(destroy_s=t1 - t0, init_s=t2 - t1, all_reduce_s=t3 - t2, all_reduce=value.item())
    store.set(f"result/{rank}", json.dumps(report))


@pytest.mark.slow  # worker processes and gloo groups: ~5 s (35 s on a loaded machine)
def test_blocked_recv_is_released_and_survivors_regroup() -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    with rank_processes(_rank_main, 3, store.port) as ranks:
        store.wait(["blocking/1"], START_TIMEOUT)
        time.sleep(BLOCKED_WINDOW_S)  # deliberately idle: rank 1 must stay blocked with no release
        assert not store.check(["result/1"]) and ranks[1].is_alive()
        store.set("release", "1")
        results = {rank: json.loads(store.get(f"result/{rank}")) for rank in (0, 1)}
        store.set("finish", "1")
        assert exit_codes(ranks) == [0, 0, 0]

    blocked = results[1]
    print(f"\nrelease timings: {json.dumps(results, sort_keys=True)}")
    assert blocked["error"] is not None, "recv returned instead of raising"
    assert blocked["still_blocked_at_notice"] and blocked["blocked_s"] >= BLOCKED_WINDOW_S
    assert blocked["release_latency_s"] < 1.0
    # one gloo pair per peer at least, all of them shut down
    assert blocked["group_sockets"] >= 2 and blocked["released"] == blocked["group_sockets"]
    assert results[0]["listing_matches"] and results[1]["listing_matches"]
    assert results[0]["all_reduce"] == results[1]["all_reduce"] == 3.0


def test_socket_discovery_and_shutdown_in_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        before = SocketSnapshot.take()
        held = socket_inodes()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        with client, accepted:
            new = SocketSnapshot.take().since(before)
            assert sorted(new.fds) == sorted([client.fileno(), accepted.fileno()])  # the listener is not there
            assert SocketSnapshot.take(skip_inodes=held) == new  # skipping what was held then: the same sockets
            assert server.fileno() not in gloo_sockets(set())
            assert client.fileno() not in gloo_sockets({port}) and accepted.fileno() not in gloo_sockets({port})
            by_fd = {s.fd: s for s in tcp_connections()}
            assert by_fd[client.fileno()].remote_port == port == by_fd[accepted.fileno()].local_port
            with socket.socket() as idle:  # not connected: listed without a peer, whatever is excluded
                assert [s.remote_port for s in tcp_connections({port}) if s.fd == idle.fileno()] == [0]

            assert release_blocked_collectives([client.fileno()]) == 1
            assert accepted.recv(1) == b""  # the peer sees the shutdown as end of stream
            assert client.fileno() >= 0  # the descriptor itself stays open for its owner to close

            # a snapshot entry whose descriptor now holds another socket is left alone
            stale = SocketSnapshot(tuple(s for s in new.sockets if s.fd == accepted.fileno()))
            accepted_inode = stale.sockets[0].inode
            replacement = socket.socket()
            os.dup2(replacement.fileno(), accepted.fileno())
            replacement.close()
            assert os.fstat(accepted.fileno()).st_ino != accepted_inode
            assert stale.release() == 0
    assert release_blocked_collectives([]) == 0


def test_non_socket_descriptors_are_skipped() -> None:
    read_end, write_end = os.pipe()
    try:
        assert release_blocked_collectives([read_end, write_end, 10_000]) == 0
    finally:
        os.close(read_end)
        os.close(write_end)



@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_generation_watch_releases_a_store_wait_begun_after_the_end(backend: str) -> None:
    """The race CI once hit: a worker connects to the store (to join the next rendezvous) just after its
    generation ended. The watch keeps sweeping until closed, so that wait fails at once instead of after
    the collective timeout; after close, new sockets are left alone. Under NCCL the watch aborts the
    communicators first (none here) and sweeps all the same: store waits are freed whatever the backend."""
    from oobleck.engine.elastic import GenerationWatch

    host = torch_tcpstore(is_master=True, port=0)
    base = torch_tcpstore(is_master=False, port=host.port)
    watch = GenerationWatch(base, 1, store_key(), backend=backend)
    end_generation(host, 1)
    assert watch.ended.wait(30)
    late = torch_tcpstore(is_master=False, port=host.port)  # opened after the first sweep
    started = time.monotonic()
    with pytest.raises(Exception):
        late.wait(["never"], timedelta(seconds=60))
    assert time.monotonic() - started < 10
    watch.close()
    after = torch_tcpstore(is_master=False, port=host.port)
    after.set("k", "v")
    time.sleep(0.1)  # two sweep intervals: a sweep would have shut this connection down by now
    assert after.get("k") == b"v"


#: the token of these tests' "job": the master signs ``ended/genN`` with its store key, the watch verifies it
TOKEN = "release-test-token"


def store_key() -> bytes:
    from oobleck.engine.signed_store import store_key

    return store_key(TOKEN)


def end_generation(host, generation: int) -> None:  # noqa: ANN001 (torch imported lazily)
    """What the master does: write the signed ``ended/gen{generation}``."""
    from oobleck.engine.signed_store import SignedStore
    from oobleck.engine.store_keys import ended_key

    SignedStore(host, store_key()).set(ended_key(generation), "1")


def torch_tcpstore(is_master: bool, port: int):  # noqa: ANN201 (torch imported lazily, as in the ranks)
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=is_master, timeout=timedelta(seconds=60))


def test_generation_watch_hands_a_stuck_worker_to_on_stuck() -> None:
    """A call the sweep cannot release (here a store wait on a connection opened before the watch, so not
    the generation's) keeps the worker inside the ended generation: after ``stuck_after_s`` the watch
    calls ``on_stuck`` once, with an account naming the generation, and not before."""
    from oobleck.engine.elastic import GenerationWatch

    host = torch_tcpstore(is_master=True, port=0)
    base = torch_tcpstore(is_master=False, port=host.port)
    older = torch_tcpstore(is_master=False, port=host.port)  # not the generation's: never shut down
    reasons: list[str] = []

    def on_stuck(why: str) -> None:
        reasons.append(why)
        host.set("freed", "1")  # what a restart or exit does for the stuck thread here: end its wait

    watch = GenerationWatch(base, 7, store_key(), on_stuck=on_stuck, stuck_after_s=1.0)
    end_generation(host, 7)
    assert watch.ended.wait(30)
    ended = time.monotonic()
    older.wait(["freed"], timedelta(seconds=60))  # blocks until on_stuck: the sweep does not touch it
    waited = time.monotonic() - ended
    watch.close()
    assert 1.0 <= waited < 20, waited
    assert len(reasons) == 1 and reasons[0].startswith("stuck in generation 7 1 s after its end"), reasons


def test_generation_watch_left_in_time_is_never_called_stuck() -> None:
    from oobleck.engine.elastic import GenerationWatch

    host = torch_tcpstore(is_master=True, port=0)
    base = torch_tcpstore(is_master=False, port=host.port)
    reasons: list[str] = []
    watch = GenerationWatch(base, 3, store_key(), on_stuck=reasons.append, stuck_after_s=0.3)
    end_generation(host, 3)
    assert watch.ended.wait(30)
    watch.close()
    time.sleep(0.6)  # twice the stuck limit: a watch still running would have called on_stuck by now
    assert reasons == []
