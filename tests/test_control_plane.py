"""The control plane on its own: token gate, malformed requests, ports, membership and stub freshness."""

from __future__ import annotations

import filecmp
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from oobleck.config import JobConfig, config_from_dict
from oobleck.control import oobleck_pb2 as pb
from oobleck.control.channel import master_stub, open_channel
from oobleck.control.master import JobFailed, Master
from oobleck.control.placement import PipelineShape, place
from oobleck.engine.api import STUCK_EXIT_CODE, Assignment
from oobleck.errors import OobleckError

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
pytestmark = pytest.mark.timeout(60)


def job(nodes: int = 2, devices: int = 1, port: int = 0) -> JobConfig:
    return config_from_dict(
        {
            "cluster": {"nodes": nodes, "devices_per_node": devices, "device": "cpu", "master_port": port},
            "fault_tolerance": {"heartbeat_interval_s": 0.05, "heartbeat_timeout_s": 2.0},
        }
    )


def two_stage_planner(names: list[str]) -> list[PipelineShape]:
    """One pipeline over all nodes, one layer per stage (4 microbatches)."""
    return [PipelineShape(layer_ranges=tuple((i, i + 1) for i in range(len(names))), num_microbatches=4)]


@pytest.fixture
def master():
    m = Master(job(), TOKEN, two_stage_planner)
    m.start()
    yield m
    m.stop(grace_s=0)


def stub_for(m: Master, token: str | None):
    channel = open_channel(m.address, token)
    return channel, master_stub(channel)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_calls_without_or_with_a_wrong_token_are_refused(master: Master) -> None:
    register = pb.RegisterRequest(node="node0", devices=1, pid=1)
    for token in (None, "wrong", TOKEN + "x"):
        channel, stub = stub_for(master, token)
        with channel:
            assert code_of(lambda: stub.Register(register, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            request = pb.AssignmentRequest(node="node0", device=0)
            assert code_of(lambda: stub.GetAssignment(request, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    channel, stub = stub_for(master, TOKEN)
    with channel:  # the refused calls registered nothing: the name is still free
        assert stub.Register(register, timeout=5).nodes_expected == 2


def test_malformed_and_inconsistent_requests_are_rejected_and_the_master_keeps_serving(master: Master) -> None:
    channel, stub = stub_for(master, TOKEN)
    with channel:
        raw = channel.unary_unary("/oobleck.control.Master/Register")  # bytes in, bytes out
        # field 1 (node, length-delimited) whose length varint never ends
        assert code_of(lambda: raw(b"\x0a\xff\xff\xff\xff", timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
        bad = [
            lambda: stub.Register(pb.RegisterRequest(node="", devices=1), timeout=5),
            lambda: stub.Register(pb.RegisterRequest(node="a b/../c", devices=1), timeout=5),
            lambda: stub.Register(pb.RegisterRequest(node="node0", devices=3), timeout=5),
            lambda: stub.GetAssignment(pb.AssignmentRequest(node="ghost", device=0), timeout=5),
            lambda: stub.ReportWorkerExit(pb.WorkerExit(node="ghost", device=0, exit_code=1), timeout=5),
        ]
        for call in bad:
            assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5).nodes_expected == 2
        after_register = [
            lambda: stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5),  # duplicate
            lambda: stub.GetAssignment(pb.AssignmentRequest(node="node0", device=1), timeout=5),
            lambda: stub.GetAssignment(pb.AssignmentRequest(node="node0", device=-1), timeout=5),
            lambda: stub.GetAssignment(pb.AssignmentRequest(node="node0", device=0, after_generation=7), timeout=5),
            lambda: stub.ReportWorkerExit(pb.WorkerExit(node="node0", device=9, exit_code=0), timeout=5),
        ]
        for call in after_register:
            assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
        try:
            detail = stub.GetAssignment(pb.AssignmentRequest(node="node0", device=5), timeout=5)
        except grpc.RpcError as e:
            detail = e.details()
        assert "device: got 5; must be in [0, 0]" in detail
        # still serving: the second node registers normally
        assert stub.Register(pb.RegisterRequest(node="node1", devices=1), timeout=5).nodes_expected == 2


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = Master(job(port=port), TOKEN, two_stage_planner)
        with pytest.raises(OobleckError, match=rf"cluster.master_port: cannot bind 127.0.0.1:{port} .*0 for any free port"):
            m.start()
        m.stop(grace_s=0)


def test_agent_exits_2_with_one_line_when_the_master_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cmd = [
        sys.executable, "-m", "oobleck.control.agent", "--master", f"127.0.0.1:{port}",
        "--token-file", str(token), "--node", "node0", "--devices", "1", "--connect-timeout", "1",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"agent node0: error: master 127.0.0.1:{port} unreachable after 1 s; check --master and that the job is running"]


def test_assignments_follow_the_placement_rule(master: Master) -> None:
    channel, stub = stub_for(master, TOKEN)
    with channel:
        for node in ("node1", "node0"):  # registration order does not matter: names sort naturally
            stub.Register(pb.RegisterRequest(node=node, devices=1), timeout=5)
        replies = {n: stub.GetAssignment(pb.AssignmentRequest(node=n, device=0), timeout=10) for n in ("node0", "node1")}
    assignments = {n: Assignment.from_json(r.assignment_json) for n, r in replies.items()}
    assert {n: a.rank for n, a in assignments.items()} == {"node0": 0, "node1": 1}
    for a in assignments.values():
        assert (a.generation, a.world_size, a.backend, a.device, a.store_prefix) == (1, 2, "gloo", "cpu", "gen1/")
        assert a.pipelines[0].layer_ranges == ((0, 1), (1, 2))
        assert a.config["cluster"]["nodes"] == 2


def test_a_closed_agent_stream_fails_the_job_naming_the_node(master: Master) -> None:
    channel, stub = stub_for(master, TOKEN)
    stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5)
    stop = threading.Event()

    def beats():
        yield pb.Heartbeat(node="node0")
        stop.wait()

    stream = stub.Session(beats())
    assert next(stream).kind == pb.MasterEvent.SESSION_OPEN
    stream.cancel()  # the agent's side of the stream goes away, as when the agent dies
    channel.close()
    stop.set()
    with pytest.raises(JobFailed, match="node node0 lost: its (agent closed the control stream|control stream broke)"):
        master.wait(timeout_s=10)


def test_missed_heartbeats_fail_the_job() -> None:
    config = job()
    config.fault_tolerance.heartbeat_timeout_s = 0.3
    m = Master(config, TOKEN, two_stage_planner)
    m.start()
    try:
        channel, stub = stub_for(m, TOKEN)
        with channel:
            stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5)  # and never a heartbeat
            with pytest.raises(JobFailed, match=r"node node0 lost: no heartbeat for 0\.\d+ s"):
                m.wait(timeout_s=10)
    finally:
        m.stop(grace_s=0)


@pytest.mark.parametrize(
    "code, reason",
    [(-9, "was killed by SIGKILL"), (STUCK_EXIT_CODE, f"exited with code {STUCK_EXIT_CODE} (stuck in an ended generation)")],
)
def test_a_worker_exit_fails_the_job_and_shuts_agents_down(master: Master, code: int, reason: str) -> None:
    """Before the first commit any worker loss fails the job (re-planning would repeat a broken setup), a
    stuck worker's (which later counts as its node's loss) included."""
    channel, stub = stub_for(master, TOKEN)
    with channel:
        stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5)
        stop = threading.Event()

        def beats():
            while not stop.wait(0.05):
                yield pb.Heartbeat(node="node0", running_devices=[0])

        events = stub.Session(beats())
        assert next(events).kind == pb.MasterEvent.SESSION_OPEN
        stub.ReportWorkerExit(pb.WorkerExit(node="node0", device=0, exit_code=code), timeout=5)
        event = next(events)
        stop.set()
        assert event.kind == pb.MasterEvent.SHUTDOWN and event.failed
        assert event.reason == f"worker node0/0 {reason}"
        with pytest.raises(JobFailed, match=re.escape(f"worker node0/0 {reason}")):
            master.wait(timeout_s=5)


@pytest.mark.parametrize(
    "code, said, reason, input_error",
    [
        (2, "worker node0/0: error: data.path: got 'x'; fix it", "worker node0/0: data.path: got 'x'; fix it", True),
        (1, "IndexError: list index\x1b[1m out of range\n", "worker node0/0 exited with code 1: IndexError: list index out of range", False),
        (1, "", "worker node0/0 exited with code 1", False),
    ],
    ids=["input error", "traceback", "silent"],
)
def test_a_worker_error_exit_carries_its_last_line(master: Master, code: int, said: str, reason: str, input_error: bool) -> None:
    """The agent reports the worker's last line: the job fails with it (one line, control characters
    dropped), and a worker's input error (exit code 2) is the user's error, worded as the worker's own line."""
    channel, stub = stub_for(master, TOKEN)
    with channel:
        stub.Register(pb.RegisterRequest(node="node0", devices=1), timeout=5)
        stub.ReportWorkerExit(pb.WorkerExit(node="node0", device=0, exit_code=code, error=said), timeout=5)
        with pytest.raises(JobFailed) as failed:
            master.wait(timeout_s=5)
    assert str(failed.value) == reason and failed.value.input_error is input_error


def test_placement_puts_consecutive_stages_on_a_nodes_devices() -> None:
    shapes = [
        PipelineShape(layer_ranges=((0, 2), (2, 4), (4, 5), (5, 6)), num_microbatches=3),
        PipelineShape(layer_ranges=((0, 3), (3, 6)), num_microbatches=5),
    ]
    placement = place(shapes, ["a", "b", "c"], devices_per_node=2)
    assert placement.ranks == {("a", 0): 0, ("a", 1): 1, ("b", 0): 2, ("b", 1): 3, ("c", 0): 4, ("c", 1): 5}
    assert [p.ranks for p in placement.pipelines] == [(0, 1, 2, 3), (4, 5)]
    assert [(p.microbatch_start, p.num_microbatches) for p in placement.pipelines] == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="uses 2 of 3 nodes"):
        place(shapes[:1], ["a", "b", "c"], devices_per_node=2)
    with pytest.raises(ValueError, match="has 3 stages"):
        place([PipelineShape(((0, 1), (1, 2), (2, 3)), 1)], ["a", "b"], devices_per_node=2)


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    proto = "oobleck/control/oobleck.proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=60)
    for name in ("oobleck_pb2.py", "oobleck_pb2_grpc.py"):
        fresh, committed = tmp_path / "oobleck/control" / name, ROOT / "oobleck/control" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{committed} is stale; regenerate it (make proto)"
