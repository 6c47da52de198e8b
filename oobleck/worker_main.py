"""A worker process: ``python -m oobleck.worker_main --master HOST:PORT --token-file F --node NAME --device D``.

Started by its node's agent. It asks the master for its place in the plan (``GetAssignment`` blocks
until the plan exists), then runs :func:`oobleck.engine.worker.run_worker`. Exit codes: 0 when training
finished, 2 with one line on stderr for a refused or unreachable master, 1 (with a traceback) when
training raised.
"""

from __future__ import annotations

import argparse
import signal
import sys

import grpc

from oobleck.control import oobleck_pb2 as pb
from oobleck.control.channel import master_stub, open_channel, read_token, wait_ready
from oobleck.control.procs import die_with_parent
from oobleck.engine.api import Assignment
from oobleck.errors import OobleckError


def fetch_assignment(master: str, token_file: str, node: str, device: int, connect_timeout_s: float) -> Assignment:
    """This worker's assignment for the first generation; OobleckError if the master is unreachable or
    refuses (e.g. because the job already failed)."""
    channel = open_channel(master, read_token(token_file))
    try:
        wait_ready(channel, master, connect_timeout_s)
        try:
            reply = master_stub(channel).GetAssignment(pb.AssignmentRequest(node=node, device=device, after_generation=0))
        except grpc.RpcError as e:
            raise OobleckError(f"no assignment from {master}: {e.details()}") from None
    finally:
        channel.close()
    return Assignment.from_json(reply.assignment_json)


def main(argv: list[str] | None = None) -> int:
    die_with_parent(signal.SIGKILL)  # a worker without its agent must not keep training
    parser = argparse.ArgumentParser(prog="oobleck-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--device", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    try:
        assignment = fetch_assignment(args.master, args.token_file, args.node, args.device, args.connect_timeout)
    except OobleckError as e:
        print(f"worker {args.node}/{args.device}: error: {e}", file=sys.stderr)
        return 2
    from oobleck.engine.worker import run_worker  # torch and the engine load only once there is work

    run_worker(assignment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
