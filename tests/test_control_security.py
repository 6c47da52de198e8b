"""The control plane against clients it must not trust: the request size limit, TLS and its switch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from oobleck.config import config_from_dict
from oobleck.control import oobleck_pb2 as pb
from oobleck.control import tls
from oobleck.control.channel import MAX_REQUEST_BYTES, master_stub, open_channel
from oobleck.control.master import Master
from oobleck.errors import ConfigError
from tests.run_helpers import ROOT, start_run, tagged, tiny_gpt, write_config
from tests.test_control_plane import TOKEN, code_of, job, two_stage_planner

pytestmark = pytest.mark.timeout(120)

#: a master in a process of its own (so that its memory can be measured): prints its address, serves until
#: its stdin closes
MASTER_SCRIPT = """
import sys
from oobleck.control.master import Master
from tests.test_control_plane import TOKEN, job, two_stage_planner
m = Master(job(), TOKEN, two_stage_planner)
print(m.start(), flush=True)
sys.stdin.read()
m.stop(grace_s=0)
"""


@pytest.fixture
def master_process() -> Iterator[tuple[subprocess.Popen, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MASTER_SCRIPT], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = proc.stdout.readline().strip()
        assert address, "the master process printed no address"
        yield proc, address
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_oversized_unauthenticated_request_is_refused_without_buffering_it(master_process) -> None:
    """gRPC's receive limit applies before the token check: the master's must fit its (small) requests."""
    proc, address = master_process
    size = 64 * 1024 * 1024
    assert size > MAX_REQUEST_BYTES
    # an attacker's client: no token, no send limit of ours
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    with channel:
        raw = channel.unary_unary("/oobleck.control.Master/Register")
        # warm up the connection and the server's handler threads before measuring
        assert code_of(lambda: raw(b"", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        before = _reset_peak_rss(proc.pid)
        payload = b"\x0a" + b"\xff" * (size - 1)
        for _ in range(2):
            assert code_of(lambda: raw(payload, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        grown = _peak_rss(proc.pid) - before
    # a master that buffered one request would peak at least `size` higher; allocator noise stays far below
    assert grown < size // 4, f"the master's peak memory grew by {grown / 2**20:.1f} MiB"
    # a small request still gets through to the token check
    channel = grpc.insecure_channel(address)
    with channel:
        stub = master_stub(channel)
        request = pb.RegisterRequest(node="node0", devices=1, pid=1)
        assert code_of(lambda: stub.Register(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> int:
    """Reset the process's peak resident memory to its current one (Linux: ``5`` into clear_refs) and return
    it; the peak then measures what happened since, not the process's start-up."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _peak_rss(pid)


@pytest.fixture
def tls_master() -> Iterator[Master]:
    raw = {"cluster": {"nodes": 2, "devices_per_node": 1, "device": "cpu", "tls": "on"}}
    m = Master(config_from_dict(raw), TOKEN, two_stage_planner)
    m.start()
    yield m
    m.stop(grace_s=0)


def test_a_tls_master_admits_only_clients_that_trust_its_certificate(tls_master: Master) -> None:
    assert tls_master.cert_pem is not None and b"BEGIN CERTIFICATE" in tls_master.cert_pem
    register = pb.RegisterRequest(node="node0", devices=1, pid=1)
    other = tls.make_material("127.0.0.1").cert_pem  # another job's certificate
    for cert in (None, other):  # plaintext, then TLS pinning the wrong certificate
        channel = open_channel(tls_master.address, TOKEN, cert)
        with channel:
            assert code_of(lambda: master_stub(channel).Register(register, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    channel = open_channel(tls_master.address, TOKEN, tls_master.cert_pem)
    with channel:
        assert master_stub(channel).Register(register, timeout=5).nodes_expected == 2
    channel = open_channel(tls_master.address, "wrong", tls_master.cert_pem)
    with channel:  # TLS does not replace the token
        assert code_of(lambda: master_stub(channel).Register(register, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED


def test_tls_is_on_off_loopback_and_the_switch_is_validated() -> None:
    assert not tls.wanted("auto", "127.0.0.1") and not tls.wanted("auto", "::1") and not tls.wanted("auto", "localhost")
    assert tls.wanted("auto", "10.0.0.5") and tls.wanted("auto", "0.0.0.0") and tls.wanted("auto", "node3.example")
    assert tls.wanted("on", "127.0.0.1") and not tls.wanted("off", "10.0.0.5")
    assert Master(job(), TOKEN, two_stage_planner).config.cluster.tls == "auto"
    # YAML 1.1 reads a bare on/off as a boolean
    assert config_from_dict({"cluster": {"tls": True}}).cluster.tls == "on"
    assert config_from_dict({"cluster": {"tls": False}}).cluster.tls == "off"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"cluster": {"tls": "yes please"}})
    assert str(info.value).startswith("cluster.tls: got 'yes please'; allowed: auto, on, off")
    assert "\n" not in str(info.value)


def test_a_loopback_master_stays_plaintext_by_default() -> None:
    m = Master(job(), TOKEN, two_stage_planner)
    m.start()
    try:
        assert m.cert_pem is None
        channel = open_channel(m.address, TOKEN)
        with channel:
            assert master_stub(channel).Register(pb.RegisterRequest(node="node0", devices=1, pid=1), timeout=5)
    finally:
        m.stop(grace_s=0)


@pytest.mark.slow  # a real job
def test_a_local_job_with_tls_forced_on_runs_and_inject_reaches_it(tmp_path: Path, profile_dir: Path) -> None:
    """``cluster.tls: on`` on loopback: agents and workers connect with the job's certificate, ``oobleck
    inject`` finds it through control.json, and the run finishes."""
    raw = tiny_gpt(profile_dir, nodes=2, steps=40)
    raw["cluster"]["tls"] = "on"
    run_dir = tmp_path / "run"
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    try:
        control = run_dir / "control.json"
        deadline = time.monotonic() + 120
        while not control.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # nothing announces the file; poll
        info = json.loads(control.read_text())
        cert_file = Path(info["cert_file"])
        assert cert_file.parent == Path(info["token_file"]).parent
        assert b"BEGIN CERTIFICATE" in cert_file.read_bytes() and b"PRIVATE KEY" not in cert_file.read_bytes()
        assert oct(cert_file.parent.stat().st_mode & 0o777) == "0o700"
        # the master answers inject over TLS (and refuses a node it does not have)
        inject = subprocess.run(
            [sys.executable, "-m", "oobleck.cli", "inject", str(run_dir), "--kill", "node9"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert inject.returncode != 0 and "are not alive nodes of this job" in inject.stderr, inject.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "(TLS)" in err, err[-3000:]
    assert not tagged(tag), "processes outlived the run"
    logs = " ".join(p.read_text() for p in (run_dir / "logs").glob("agent-*.log"))
    assert "PRIVATE KEY" not in logs
    assert not cert_file.exists(), "the job's secret directory outlived the run"
