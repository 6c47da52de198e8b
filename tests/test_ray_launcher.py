"""The Ray launcher end to end, on real Ray clusters started on this machine (on loopback).

A module-wide ``ray.cluster_utils.Cluster`` of 5 Ray nodes (one CPU each) stands in for a multi-machine
cluster: ``oobleck run`` connects to it (``cluster.ray_address``), a Ray node is removed mid-run
(``Cluster.remove_node``: its raylet and every process on it die) and later a new one is added
(``Cluster.add_node``), and the run must reproduce ``train_local`` in float64 and report both membership
changes. Every Ray process the tests start carries an environment tag, so that a test can check that
shutting the cluster down leaves none of them; the launcher's own throwaway cluster (no address) is
checked the same way through the run's tag. The tests share the cluster but not its state: each one gets
it back with 5 alive nodes (a fresh cluster after the shutdown test), so they pass in any order.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from oobleck.metrics import RECOVERIES_FILE
from tests.run_helpers import (
    TAG_ENV, ReferenceRun, assert_matches_reference, gpt_job, kill_tagged, start_run, stuck_nodes, tagged, tiny_gpt,
    write_config,
)  # fmt: skip

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # every test runs a real job

#: keep Ray on 127.0.0.1 (Ray reads this at import, and its processes inherit it), without token auth or
#: usage reports
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
RAY_NODES = 5


class RayCluster:
    def __init__(self, cluster: Any, tag: str) -> None:
        self.cluster = cluster
        self.tag = tag

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self) -> Any:
        return self.cluster.add_node(**NODE_ARGS)

    def is_shut_down(self) -> bool:
        return self.cluster.head_node is None

    def restore_nodes(self) -> None:
        """Back to ``RAY_NODES`` nodes (the head and ``RAY_NODES - 1`` workers): remove the workers a test added
        beyond them, add one for each it removed, and wait until Ray's GCS counts exactly these alive (a
        removed node may linger there, and the launcher counts the GCS's alive nodes)."""
        extra = len(self.cluster.worker_nodes) - (RAY_NODES - 1)
        for node in list(self.cluster.worker_nodes)[: max(extra, 0)]:
            self.cluster.remove_node(node)
        for _ in range(-extra):
            self.add_node()
        self.cluster.wait_for_nodes(timeout=60)

    def processes(self) -> list[psutil.Process]:
        """Live processes started under this cluster (Ray's and, through the actors, agents and workers)."""
        return [p for p in tagged(self.tag) if p.pid != os.getpid()]

    def job_processes(self) -> list[psutil.Process]:
        """Agent actors, agents and workers still alive on the cluster."""
        found = []
        for proc in self.processes():
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "oobleck" in cmdline or "_AgentActor" in cmdline:
                found.append(proc)
        return found


#: Ray gives a starting node a fixed 30 s to register with the GCS; a loaded CI machine once missed it while
#: starting the head ("The current node timed out during startup"), so a cluster start is tried this often
CLUSTER_START_TRIES = 3


def start_cluster() -> tuple[Any, str]:
    """A Ray cluster of ``RAY_NODES`` nodes whose processes carry a fresh tag (returned with it)."""
    from ray.cluster_utils import Cluster

    tag = uuid.uuid4().hex
    os.environ[TAG_ENV] = tag  # every Ray process of the cluster inherits it
    cluster = Cluster()
    try:
        cluster.add_node(**NODE_ARGS, include_dashboard=False)  # the first node is the head
        for _ in range(RAY_NODES - 1):
            cluster.add_node(**NODE_ARGS)
    except BaseException:
        # a node that failed to start is not in the cluster's lists: end every process of this start by its tag
        cluster.shutdown()
        kill_tagged(tag)
        raise
    return cluster, tag


def start_cluster_retrying() -> tuple[Any, str]:
    """:func:`start_cluster`, tried again (from nothing) when Ray reports a node start timed out."""
    for attempt in range(1, CLUSTER_START_TRIES):
        try:
            return start_cluster()
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            print(f"Ray cluster start {attempt} of {CLUSTER_START_TRIES} timed out ({e}); trying again")
    return start_cluster()


class SharedCluster:
    """The module's Ray cluster, started on first use (a start takes tens of seconds on this machine, so the
    tests share one) and handed to each test as :meth:`ready` leaves it."""

    def __init__(self) -> None:
        self.current: RayCluster | None = None

    def ready(self) -> RayCluster:
        """A cluster of ``RAY_NODES`` alive nodes whatever an earlier test did to it: the current one with its
        node count restored, or a new one where the current one was shut down."""
        if self.current is None or self.current.is_shut_down():
            self.current = RayCluster(*start_cluster_retrying())
        else:
            self.current.restore_nodes()
        return self.current

    def shutdown(self) -> None:
        if self.current is not None:
            self.current.cluster.shutdown()  # a no-op on a cluster already shut down


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[SharedCluster]:
    saved = {key: os.environ.get(key) for key in [*RAY_ENV, TAG_ENV]}
    os.environ.update(RAY_ENV)
    shared = SharedCluster()
    try:
        yield shared
    finally:
        shared.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def ray_cluster(shared_cluster: SharedCluster) -> RayCluster:
    """The module's cluster with ``RAY_NODES`` alive nodes, whatever the tests before this one removed, added
    or shut down: no test depends on the order they run in."""
    return shared_cluster.ready()


def wait_for(what: str, check: Any, timeout_s: float, proc: Any = None, fail: bool = True) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` (and the run's stderr when
    the run ``proc`` ended meanwhile), or return None on a timeout when not ``fail``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}: {err[-3000:]}")
        time.sleep(0.05)  # no event announces these; poll
    if fail:
        pytest.fail(f"timed out waiting for {what}")
    return None


def rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """Complete JSON lines of a file the run is still writing."""
    try:
        lines = (run_dir / name).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line being written
    return out


def describe(procs: list[psutil.Process]) -> str:
    """pid, state and command line of each process, for failure messages."""
    lines = []
    for proc in procs:
        try:
            lines.append(f"{proc.pid} {proc.status()} ppid={proc.ppid()} {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
    return "; ".join(lines)


def workers_of(cluster: RayCluster) -> list[psutil.Process]:
    return [p for p in cluster.job_processes() if "oobleck.worker_main" in " ".join(p.cmdline())]


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def connected_to(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.raddr and c.raddr.port == port for c in proc.net_connections(kind="tcp"))
    except psutil.Error:
        return False


def test_removed_ray_node_is_recovered_and_added_ray_node_joins(
    ray_cluster: RayCluster, tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    """5 Ray nodes, f=1, n0=2: pipelines of 2+3 nodes. A worker Ray node is removed after step 2, the job
    recovers on 4 (2+2), a new Ray node is added and joins (2+3); losses and final state equal train_local.

    The workers are held (SIGSTOP) from just before the removal until the new node's worker has connected
    to the master, so that the join happens while the job still runs however slow this machine is; they
    resume (SIGCONT) into the ordinary recovery of the removed node, then the join."""
    # held workers send no heartbeats (the agents' watchdogs wait 120 s); a loaded machine may delay an
    # agent's heartbeats by seconds: a removed node is noticed through its actor's death and its broken stream
    raw = gpt_job(
        profile_dir, nodes=RAY_NODES, steps=10, f=1, faults=[], worker_timeout_s=120.0, heartbeat_timeout_s=10.0
    )
    raw["cluster"].update({"launcher": "ray", "ray_address": ray_cluster.address})
    run_dir = tmp_path / "run"
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), run_dir)
    held: list[psutil.Process] = []
    try:
        wait_for("step 2", lambda: len(rows(run_dir, "metrics.jsonl")) >= 2, 180, proc)
        held = workers_of(ray_cluster)
        signal_all(held, signal.SIGSTOP)
        names = json.loads((run_dir / "ray_nodes.json").read_text())
        assert sorted(names) == [f"node{i}" for i in range(RAY_NODES)]
        by_id = {node.node_id: node for node in ray_cluster.cluster.worker_nodes}
        victim = next(name for name, info in sorted(names.items()) if info["ray_node_id"] in by_id)
        assert all(info["ip"] == "127.0.0.1" for info in names.values())
        ray_cluster.cluster.remove_node(by_id[names[victim]["ray_node_id"]])
        added = ray_cluster.add_node()
        master_port = int(json.loads((run_dir / "control.json").read_text())["master"].rsplit(":", 1)[1])

        def joiner_waiting() -> bool:
            joiners = [p for p in workers_of(ray_cluster) if "node5" in p.cmdline()]
            return bool(joiners) and all(connected_to(p, master_port) for p in joiners)

        wait_for("the new node's worker", joiner_waiting, 120, proc)
        time.sleep(1.5)  # its GetAssignment follows the connection at once (seconds on a loaded machine)
        signal_all(held, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        signal_all(held, signal.SIGCONT)  # never leave a process stopped, whatever failed
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert not tagged(tag), "processes of the driver outlived the run"
    assert json.loads((run_dir / "ray_nodes.json").read_text())["node5"]["ray_node_id"] == added.node_id
    assert_matches_reference(run_dir, raw, reference_run(raw))
    found = rows(run_dir, RECOVERIES_FILE)
    # every worker was stopped mid-step, so a transfer may be left partly done when its pair closes: it is
    # abandoned at the generation's end (docs/design.md#releasing-a-blocked-worker), and no survivor is
    # counted lost for it
    assert not stuck_nodes(found), err[-3000:]
    assert [(r["lost"], r["joined"]) for r in found] == [([victim], []), ([], ["node5"])], err[-3000:]
    assert found[1]["nodes_alive"] == RAY_NODES
    assert found[0]["mode"] == "memory" and found[0]["steps_lost"] == 0 and found[0]["pipelines"] == 2
    if not wait_for("", lambda: not ray_cluster.job_processes(), 60, fail=False):
        pytest.fail(f"the job's actors, agents or workers outlived it: {describe(ray_cluster.job_processes())}")


def test_too_few_ray_nodes_is_a_one_line_error(ray_cluster: RayCluster, tmp_path: Path, profile_dir: Path) -> None:
    raw = gpt_job(profile_dir, nodes=RAY_NODES + 1, steps=2, f=1, faults=[])
    raw["cluster"].update({"launcher": "ray", "ray_address": ray_cluster.address})
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), tmp_path / "run")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"oobleck run: error: cluster.nodes: the job needs {RAY_NODES + 1} nodes but the Ray cluster"), err
    assert f"has {RAY_NODES} alive nodes" in last
    assert not tagged(tag)
    assert not ray_cluster.job_processes(), describe(ray_cluster.job_processes())


def test_ray_cluster_shutdown_leaves_no_ray_process(ray_cluster: RayCluster) -> None:
    assert ray_cluster.processes(), "the tag does not reach the cluster's processes"
    ray_cluster.cluster.shutdown()
    if not wait_for("", lambda: not ray_cluster.processes(), 60, fail=False):
        pytest.fail(f"processes outlived the Ray cluster: {describe(ray_cluster.processes())}")


def test_unreachable_ray_address_is_a_one_line_error(tmp_path: Path, profile_dir: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = tiny_gpt(profile_dir, nodes=2, steps=2)
    raw["cluster"].update({"launcher": "ray", "ray_address": f"127.0.0.1:{port}"})
    proc, tag = start_run(write_config(tmp_path / "job.yaml", raw), tmp_path / "run")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith(
        f"oobleck run: error: cluster.ray_address: cannot reach the Ray cluster at 127.0.0.1:{port}"
    ), err
    assert not tagged(tag)


def test_same_config_runs_with_local_and_ray_launchers(
    tmp_path: Path, profile_dir: Path, reference_run: ReferenceRun
) -> None:
    """One config file, run with ``--launcher ray`` (no address: the launcher starts and stops a Ray
    cluster of its own) and ``--launcher local``; both reproduce train_local, and no process survives
    either run (Ray's own included: they inherit the run's tag). The config forces TLS on (it would be off on
    loopback): both launchers hand the master's certificate to their agents, which must use it."""
    raw = tiny_gpt(profile_dir, nodes=2, steps=4, f=1)
    raw["cluster"]["tls"] = "on"
    config = write_config(tmp_path / "job.yaml", raw)
    reference = reference_run(raw).losses
    for launcher in ("ray", "local"):
        run_dir = tmp_path / launcher
        proc, tag = start_run(config, run_dir, "--launcher", launcher)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert "(TLS)" in err, err[-3000:]
        assert not tagged(tag), f"processes outlived the {launcher} run"
        losses = [row["loss"] for row in rows(run_dir, "metrics.jsonl")]
        assert len(losses) == len(reference)
        for got, want in zip(losses, reference):
            assert math.isclose(got, want, rel_tol=1e-9), (launcher, got, want)
    assert (tmp_path / "ray" / "ray_nodes.json").exists() and not (tmp_path / "local" / "ray_nodes.json").exists()
