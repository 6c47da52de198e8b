"""The store's MAC (oobleck.engine.signed_store): only values signed under the job token for the very key
they sit in are accepted; forged, garbled and replayed ones are ignored, and a waiter goes on waiting for
the authentic value. Also the workers' gloo interface pin (oobleck.worker_main.pin_gloo)."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from oobleck.engine.commit import ABORT, COMMIT, CommitCoordinator, report_ready
from oobleck.engine.signed_store import TAG, SignedStore, sign, store_key, verify
from oobleck.engine.store_keys import decision_key, ended_key, ready_key

KEY = store_key("a-job-token")
OTHER = store_key("another-job-token")


def test_authentic_values_verify_and_carry_their_payload() -> None:
    blob = sign(KEY, "gen1//commit/3/decision", COMMIT)
    assert blob.startswith(TAG) and blob.endswith(COMMIT)
    assert verify(KEY, "gen1//commit/3/decision", blob) == COMMIT
    assert verify(KEY, "x", sign(KEY, "x", b"")) == b""  # an empty payload too


def test_forged_garbled_and_replayed_values_are_rejected() -> None:
    name = "gen2//commit/5/decision"
    blob = sign(KEY, name, COMMIT)
    assert verify(KEY, name, COMMIT) is None  # a plain value, no MAC
    assert verify(KEY, name, sign(OTHER, name, COMMIT)) is None  # signed with another job's token
    assert verify(KEY, name, blob[:-1] + b"X") is None  # payload changed
    assert verify(KEY, name, blob[:10]) is None  # truncated
    assert verify(KEY, name, b"") is None
    assert verify(KEY, name, b"\xff\x00" * 40) is None  # garbage bytes
    flipped = bytearray(blob)
    flipped[len(TAG) + 3] ^= 1
    assert verify(KEY, name, bytes(flipped)) is None  # MAC changed
    # replayed under another key, step or generation
    assert verify(KEY, "gen2//commit/6/decision", blob) is None
    assert verify(KEY, "gen3//commit/5/decision", blob) is None
    assert verify(KEY, ended_key(2), sign(KEY, ended_key(1), b"1")) is None


def test_key_derivation_is_deterministic_and_refuses_an_empty_token() -> None:
    assert store_key("t") == store_key("t") and len(store_key("t")) == 32
    assert store_key("t") != store_key("u") and store_key("t") != b"t"
    with pytest.raises(ValueError):
        store_key("")


@pytest.fixture
def server() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _attacker(server: dist.TCPStore, prefix: str = "") -> dist.Store:
    """A plain client without the token."""
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    return dist.PrefixStore(prefix, client) if prefix else client


def test_signed_store_ignores_forged_values_with_one_log_line(server, caplog) -> None:
    store = SignedStore(server, KEY, "gen1/")
    attacker = _attacker(server, "gen1/")
    assert store.get("k") is None  # absent: None at once
    attacker.set("k", b"forged")
    with caplog.at_level(logging.WARNING, logger="oobleck.engine.signed_store"):
        assert store.get("k") is None and store.get("k") is None
    assert len([r for r in caplog.records if "without a valid MAC" in r.getMessage()]) == 1
    # a value signed for this key but in another generation, copied over: rejected
    SignedStore(server, KEY, "gen0/").set("k", b"v")
    attacker.set("k", dist.PrefixStore("gen0/", server).get("k"))
    assert store.get("k") is None
    store.set("k", b"v")
    assert store.get("k") == b"v"
    assert server.get("gen1//k") == sign(KEY, "gen1//k", b"v")  # the MAC covers the full key name


def test_wait_outlasts_a_forged_value_until_the_authentic_one_arrives(server) -> None:
    store = SignedStore(server, KEY, "gen1/")
    _attacker(server, "gen1/").set(decision_key(0), ABORT)  # before the master decides
    reads = 0
    raw_get = store.raw.multi_get

    def counting(keys):  # counts the re-reads: a forged value must not make the waiter spin
        nonlocal reads
        reads += 1
        return raw_get(keys)

    store.raw = type("Counting", (), {"wait": store.raw.wait, "multi_get": staticmethod(counting)})()
    writer = threading.Timer(0.5, lambda: SignedStore(server, KEY, "gen1/").set(decision_key(0), COMMIT))
    writer.start()
    started = time.monotonic()
    assert store.wait([decision_key(0)], timedelta(seconds=20)) == [COMMIT]
    writer.join()
    assert 0.4 < time.monotonic() - started < 5
    assert reads < 30, f"{reads} reads in 0.5 s"


def test_wait_gives_up_at_its_timeout_and_stops_on_request(server) -> None:
    store = SignedStore(server, KEY)
    _attacker(server).set(ended_key(1), b"1")
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        store.wait([ended_key(1)], timedelta(seconds=0.5))
    assert 0.4 < time.monotonic() - started < 3  # neither early nor much later
    assert store.wait([ended_key(1)], timedelta(seconds=30), stop=lambda: True) is None


def test_step_commit_survives_forged_reports_and_decisions(server) -> None:
    """A forged decision does not release a worker, and a garbled ready report does not crash the master."""
    coordinator = CommitCoordinator(SignedStore(server, KEY, "gen4/"), world_size=2)
    attacker = _attacker(server, "gen4/")
    attacker.set(decision_key(0), ABORT)
    attacker.set(ready_key(0, 1), b"\x00garbage")
    outcome: dict[int, object] = {}

    def work(rank: int) -> None:
        client = SignedStore(dist.TCPStore("127.0.0.1", server.port, is_master=False), KEY, "gen4/")
        outcome[rank] = report_ready(client, 0, rank, 1.0, 1.0, 0.5, timeout=timedelta(seconds=30))

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    report = coordinator.wait_step(0, should_abort=lambda: False)
    assert report is not None and report.units == 2.0 and outcome == {}
    coordinator.commit(0)
    for t in threads:
        t.join(30)
    assert outcome == {0: True, 1: True}


def test_generation_watch_ignores_a_forged_end(server) -> None:
    """A forged ``ended/gen1`` present before the watch starts does not end the generation (no socket is
    shut down); the master's signed end then does."""
    from oobleck.engine.elastic import GenerationWatch

    _attacker(server).set(ended_key(1), b"1")
    base = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    watch = GenerationWatch(base, 1, KEY)
    try:
        assert not watch.ended.wait(0.5)
        base.set("still", "usable")  # a generation's connection, not shut down
        SignedStore(server, KEY).set(ended_key(1), b"1")
        assert watch.ended.wait(30)
    finally:
        watch.close()


def test_pin_gloo_picks_the_interface_toward_the_store(monkeypatch) -> None:
    from oobleck.worker_main import interface_of, pin_gloo

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    loopback = interface_of("127.0.0.1")
    assert loopback is not None
    assert pin_gloo("127.0.0.1", 29500) == loopback

    assert os.environ["GLOO_SOCKET_IFNAME"] == loopback
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "chosen0")
    assert pin_gloo("127.0.0.1", 29500) == "chosen0"  # the user's (or Ray launcher's) choice wins
