"""Inject failures into a running job, or add nodes to it: ``oobleck inject RUN_DIR --kill node2``.

The job is found through ``RUN_DIR/control.json``, which ``oobleck run`` writes when its master starts (its
address, token file and, with TLS on, the certificate file to trust; see :mod:`oobleck.control.run_files`)
and removes when the job ends: on a finished run, inject says that no job is running there.
``--kill`` and ``--hang`` act on whole nodes (the agent and its workers: SIGKILL, or SIGSTOP so that the
master sees missed heartbeats), or on one worker with ``--worker D`` (a hung worker is killed by its agent's
watchdog). ``--add`` starts new nodes that join at the next step boundary (the local launcher starts them
on this machine). Several nodes in one call are hit at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from oobleck.bounds import MAX_DEVICES_PER_NODE, MIN_INTERVAL_S, float_flag, int_flag
from oobleck.errors import OobleckError

HELP = "kill, hang or add nodes of a running job"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the running job's run directory")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--kill", nargs="+", metavar="NODE", help="SIGKILL these nodes (or one worker of each)")
    action.add_argument("--hang", nargs="+", metavar="NODE", help="SIGSTOP these nodes (or one worker of each)")
    action.add_argument("--add", nargs="+", metavar="NODE", help="start these new nodes")
    parser.add_argument("--worker", type=int_flag(0, MAX_DEVICES_PER_NODE - 1), metavar="D", help="act on the worker of device D only")
    parser.add_argument("--timeout", type=float_flag(MIN_INTERVAL_S, 3600.0), default=10.0, metavar="S", help="seconds to wait for the master (default 10)")


def run(args: argparse.Namespace) -> int:
    from oobleck.control import oobleck_pb2 as pb
    from oobleck.control.channel import master_stub, open_channel, read_token, wait_ready
    from oobleck.control.run_files import CONTROL_FILE, no_job, read_control_file
    from oobleck.control.tls import read_cert

    run_dir = Path(args.run_dir)
    master, token_file, cert_file = read_control_file(run_dir)
    action, nodes = next((name, getattr(args, name)) for name in ("kill", "hang", "add") if getattr(args, name))
    if args.worker is not None and action == "add":
        raise OobleckError("--worker: applies to --kill and --hang only")
    try:
        token, cert = read_token(token_file), read_cert(cert_file) if cert_file else None
    except OobleckError:  # checked a moment ago: the job ended meanwhile and took its secrets along
        raise no_job(run_dir, f"cannot read the job's token or certificate file ({token_file})") from None
    channel = open_channel(master, token, cert)
    try:
        try:
            wait_ready(channel, master, args.timeout, tls=cert is not None)
        except OobleckError:
            raise no_job(
                run_dir,
                f"nothing answers at {master}, the master {CONTROL_FILE} names, within {args.timeout:g} s (was its "
                "`oobleck run` killed?); if the job is still starting, raise --timeout",
            ) from None
        request = pb.InjectRequest(nodes=nodes, action=action, device=-1 if args.worker is None else args.worker)
        try:
            reply = master_stub(channel).Inject(request, timeout=args.timeout)
        except grpc.RpcError as e:
            raise OobleckError(f"the master refused: {e.details()}") from None
    finally:
        channel.close()
    target = "nodes" if args.worker is None else f"worker {args.worker} of"
    print(f"{action}: {target} {', '.join(reply.nodes)}")
    return 0
