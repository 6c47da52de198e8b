"""The job's TCPStore against a party that can reach it without the token, end to end: forged values do not
steer a running job, and every listening socket of the job is on the master's configured address."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from launcher.job import LOG_DIR
from oobleck.engine.commit import ABORT, COMMIT
from oobleck.engine.store_keys import decision_key, ended_key, ready_key, timing_key
from oobleck.metrics import read_metrics
from tests.run_helpers import (
    ReferenceRun, assert_matches_reference, gpt_job, kill_tagged, start_run, tagged, tiny_gpt, write_config,
)  # fmt: skip

pytestmark = [pytest.mark.timeout(360), pytest.mark.slow]  # every test runs a real job

MASTER_HOST = "127.0.0.1"


def _listening(proc: psutil.Process) -> list[psutil._common.pconn]:
    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:  # ended meanwhile
        return []


def _bound_to(ip: str) -> str:
    """The IPv4 address of an IPv4-mapped IPv6 one (gRPC binds ``127.0.0.1`` through a dual-stack socket at
    ``::ffff:127.0.0.1``, which only takes connections to 127.0.0.1); any other address as it is."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def wait_for_store_port(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 120) -> int:
    """The job's store port: the ``oobleck run`` process listens on the master's gRPC port (``RUN/control.json``)
    and the store's."""
    deadline = time.monotonic() + timeout_s
    control = run_dir / "control.json"
    while time.monotonic() < deadline and proc.poll() is None:
        if control.exists():
            try:
                grpc_port = int(json.loads(control.read_text())["master"].rsplit(":", 1)[1])
            except (ValueError, KeyError):
                grpc_port = None  # being written
            ports = {c.laddr.port for c in _listening(psutil.Process(proc.pid))} - {grpc_port}
            if grpc_port is not None and len(ports) == 1:
                return ports.pop()
        time.sleep(0.02)
    raise AssertionError(f"no store port within {timeout_s} s (exit code {proc.poll()})")


def finish(proc: subprocess.Popen, tag: str, timeout_s: float) -> str:
    """The run's stderr once it ended (killed with everything it started after ``timeout_s``); asserts exit 0."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the run did not finish within {timeout_s} s:\n{err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    assert not tagged(tag), "processes outlived the run"
    return err


def test_forged_store_values_do_not_steer_a_running_job(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    """A plain TCPStore client without the token writes, before the workers do: generation ends for this and
    later generations, ABORT/COMMIT decisions and garbled ready reports and timings for the coming steps of
    both generations, and garbage fault keys (rewritten throughout, so the master meets one when it reads
    the killed node's). The job (with one node kill, so a second generation runs) finishes with the
    reference losses, parameters and optimizer moments."""
    steps = 5
    faults = [{"step": 2, "phase": "forward", "kind": "kill", "target": "node", "nodes": [1]}]
    raw = gpt_job(profile_dir, nodes=4, steps=steps, f=1, faults=faults)
    run_dir = tmp_path / "run"
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    stop = threading.Event()
    try:
        port = wait_for_store_port(proc, run_dir)
        attacker = dist.TCPStore(MASTER_HOST, port, is_master=False)
        garbage = b"\xff\x00garbage\x00" * 3
        for gen in (1, 2, 3):
            attacker.set(ended_key(gen), b"1")
            view = dist.PrefixStore(f"gen{gen}/", attacker)
            for step in range(steps):
                view.set(decision_key(step), ABORT if step % 2 == 0 else COMMIT)
                view.set(ready_key(step, 0), garbage)
            view.set(timing_key(0), garbage)
        for node in range(4):
            attacker.set(f"faults/node{node}", garbage)

        def keep_forging_fault_keys() -> None:
            while not stop.wait(0.02):
                try:
                    attacker.set("faults/node1", b"not a time")
                except Exception:  # the store is gone: the job ended
                    return

        forger = threading.Thread(target=keep_forging_fault_keys, daemon=True)
        forger.start()
        err = finish(proc, tag, timeout_s=240)
    finally:
        stop.set()
        if proc.poll() is None:
            kill_tagged(tag)
            proc.kill()
            proc.communicate()
    assert "without a valid MAC" in err, err[-3000:]  # the master met forged values, and said so
    # and so did the workers: the forged end of their generation, and forged decisions
    worker_logs = "".join(p.read_text(errors="replace") for p in (run_dir / LOG_DIR).glob("*.log"))
    assert "store key ended/gen1: ignoring a value without a valid MAC" in worker_logs
    assert "/commit/0/decision: ignoring a value without a valid MAC" in worker_logs
    assert_matches_reference(run_dir, raw, reference_run(raw))
    found = read_metrics(run_dir, "recoveries.jsonl")
    assert [r["lost"] for r in found] == [["node1"]], err[-3000:]


def test_every_listening_socket_of_a_job_is_on_the_master_address(tmp_path: Path, profile_dir: Path) -> None:
    """The master's gRPC server and store and every worker's gloo listener: bound to ``cluster.master_host``
    (loopback), never to a wildcard address."""
    raw = tiny_gpt(profile_dir, nodes=2, steps=30)
    raw["cluster"]["master_host"] = MASTER_HOST
    run_dir = tmp_path / "run"
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "no step committed"
            time.sleep(0.05)
        # step 0 is committed: every worker has joined its process groups and the job is still training
        found = {p.pid: (p.name(), _listening(p)) for p in _job_processes(proc)}
        assert proc.poll() is None, "the run ended before its sockets were listed; give it more steps"
    finally:
        kill_tagged(tag)
        proc.kill()
        proc.communicate()
    listening = [(pid, name, c.laddr) for pid, (name, conns) in found.items() for c in conns]
    assert len({pid for pid, _, _ in listening}) >= 3, listening  # the master and at least two workers (gloo)
    assert all(_bound_to(addr.ip) == MASTER_HOST for _, _, addr in listening), listening
