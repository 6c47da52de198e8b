"""A worker process: ``python -m oobleck.worker_main --master HOST:PORT --token-file F --node NAME --device D``.

Started by its node's agent. It beats to the agent through ``--heartbeat-fd`` (from its first moment, so
the agent can tell a hung worker from a busy one), asks the master for its place in the plan
(``GetAssignment`` long-polls until the plan exists: each call has a deadline the master answers before,
with "none yet" if need be, so a master that stops answering ends the worker) and runs
:func:`oobleck.engine.elastic.run_elastic`, which asks again each time a generation ends. The job's token
(``--token-file``) authenticates it to the master and signs its values in the master's TCPStore (:mod:`oobleck.engine.signed_store`). Before joining
a process group it pins gloo to the network interface it reaches the master's store through (loopback for a
local job), so that its gloo sockets listen on that address only; a ``GLOO_SOCKET_IFNAME`` already set (the
Ray launcher sets it to the Ray node's interface) wins. Exit codes: 0 when training finished, 2 with one line on
stderr for a refused or unreachable master (or a job that failed meanwhile) or bad input, 1 (with a
traceback) when training raised, :data:`~oobleck.engine.api.STUCK_EXIT_CODE` when it could not leave an
ended generation (under the ``varuna`` policy, whose every new generation restarts the workers anyway, it
restarts instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

import grpc

from oobleck.control import oobleck_pb2 as pb
from oobleck.control.channel import master_stub, open_channel, read_token, wait_ready
from oobleck.control.procs import die_with_parent
from oobleck.control.tls import read_cert
from oobleck.engine.api import INPUT_ERROR_EXIT_CODE, STUCK_EXIT_CODE, Assignment
from oobleck.errors import OobleckError


#: the deadline of one GetAssignment call; the master answers "none yet" ASSIGNMENT_ANSWER_MARGIN_S (3 s)
#: before it, so a call that runs into it means the master stopped answering
ASSIGNMENT_POLL_S = 15.0


class AssignmentClient:
    """Fetches this worker's assignments over one control-plane channel."""

    def __init__(
        self, master: str, token_file: str, node: str, device: int, connect_timeout_s: float, cert_file: str | None = None
    ) -> None:
        self.master = master
        self.node = node
        self.device = device
        cert = read_cert(cert_file) if cert_file else None
        self._channel = open_channel(master, read_token(token_file), cert)
        wait_ready(self._channel, master, connect_timeout_s, tls=cert is not None)
        self._stub = master_stub(self._channel)

    def config(self) -> dict[str, Any]:
        """The job's config (``JobConfig.to_dict()``), at once; OobleckError when the master refuses or is
        unreachable. Asking for it does not count this worker as waiting for work."""
        request = pb.AssignmentRequest(node=self.node, device=self.device, config_only=True)
        try:
            reply = self._stub.GetAssignment(request, timeout=ASSIGNMENT_POLL_S)
        except grpc.RpcError as e:
            raise OobleckError(f"no config from {self.master}: {e.details()}") from None
        return dict(json.loads(reply.config_json))

    def next(self, after_generation: int) -> Assignment:
        """The first generation newer than ``after_generation`` with a stage for this worker (blocks while
        the master answers "none yet": a spare may wait for the whole job, which the master ends in bounded
        time); OobleckError when the master refuses (the job failed, or this node was removed) or stops
        answering (no reply within ASSIGNMENT_POLL_S)."""
        request = pb.AssignmentRequest(node=self.node, device=self.device, after_generation=after_generation)
        while True:
            try:
                reply = self._stub.GetAssignment(request, timeout=ASSIGNMENT_POLL_S)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise OobleckError(
                        f"no assignment from {self.master}: the master did not answer within {ASSIGNMENT_POLL_S:g} s "
                        "(hung or cut off); check the `oobleck run` process and its machine"
                    ) from None
                raise OobleckError(f"no assignment from {self.master}: {e.details()}") from None
            if reply.generation:
                return Assignment.from_json(reply.assignment_json)

    def close(self) -> None:
        self._channel.close()


def beat(fd: int, interval_s: float) -> None:
    """Write one byte to ``fd`` every ``interval_s`` seconds, from a daemon thread, until the pipe breaks."""

    def loop() -> None:
        stop = threading.Event()
        while True:
            try:
                os.write(fd, b".")
            except OSError:
                return
            stop.wait(interval_s)

    threading.Thread(target=loop, name="heartbeat", daemon=True).start()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def local_address_toward(host: str, port: int) -> str | None:
    """This machine's address on the route to ``host:port`` (a UDP connect sends nothing), or None."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(addr)
            return str(probe.getsockname()[0]).split("%")[0]
    except OSError:
        return None


def interface_of(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this machine, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addresses):
            return name
    return None


def pin_gloo(store_host: str, store_port: int) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME`` (unless set) to the interface this worker reaches the master's store through,
    so that gloo's listening sockets are bound to that interface's address rather than to whatever the
    hostname resolves to; returns the interface in force (None: gloo's default)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    local = local_address_toward(store_host, store_port)
    nic = interface_of(local) if local is not None else None
    if nic is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = nic
    return nic


def main(argv: list[str] | None = None) -> int:
    die_with_parent(signal.SIGKILL)  # a worker without its agent must not keep training
    parser = argparse.ArgumentParser(prog="oobleck-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--cert-file", help="the master's certificate (PEM): connect with TLS")
    parser.add_argument("--node", required=True)
    parser.add_argument("--device", type=int, required=True)
    parser.add_argument("--connect-timeout", type=float, default=20.0)
    parser.add_argument("--heartbeat-fd", type=int, help="pipe to the agent: one byte per heartbeat")
    parser.add_argument("--heartbeat-interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.node}/{args.device} %(name)s: %(message)s")
    if args.heartbeat_fd is not None:
        beat(args.heartbeat_fd, args.heartbeat_interval)
    # load torch and the engine before asking for work: a worker that asks is ready to join at once (a node
    # joining a running job would otherwise hold up everyone's rendezvous while it imports)
    import torch.distributed as dist

    from oobleck.engine.elastic import RestartRequested, prepare, run_elastic
    from oobleck.engine.signed_store import SignedStore, store_key
    from oobleck.engine.store_keys import fault_key
    from oobleck.faults import FaultHook

    try:
        client = AssignmentClient(
            args.master, args.token_file, args.node, args.device, args.connect_timeout, args.cert_file
        )
        # the model too is built before asking for work, for the same reason
        prepared = prepare(client.config())
        first = client.next(0)
        key = store_key(read_token(args.token_file))
    except OobleckError as e:
        print(f"worker {args.node}/{args.device}: error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    pin_gloo(first.store_host, first.store_port)

    def record(at: float) -> None:
        store = SignedStore(dist.TCPStore(first.store_host, first.store_port, is_master=False), key)
        store.set(fault_key(args.node), repr(at))

    config = prepared.config
    hook = FaultHook(config.faults, args.node, args.device, record)
    own_argv = sys.argv[1:] if argv is None else argv

    def on_stuck(why: str) -> NoReturn:
        if config.fault_tolerance.policy == "varuna":
            restart(own_argv, args.heartbeat_fd, why)
        who = f"worker {args.node}/{args.device}"
        print(f"{who}: {why}; exiting so that the master treats this node as lost", file=sys.stderr, flush=True)
        os._exit(STUCK_EXIT_CODE)

    try:
        run_elastic(
            first, prepared, client.next, on_phase=hook, exclude_ports={_port(args.master)}, on_stuck=on_stuck, store_key=key
        )
    except OobleckError as e:
        print(f"worker {args.node}/{args.device}: error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
    except RestartRequested as e:
        client.close()
        restart(own_argv, args.heartbeat_fd, str(e))
    finally:
        client.close()
    return 0


def restart(argv: list[str], keep_fd: int | None, why: str) -> NoReturn:
    """Replace this process by a fresh worker with the same arguments (the same pid, so the agent keeps
    watching it). Every descriptor but the standard streams and the heartbeat pipe is marked close-on-exec
    first, as if the process had been started anew (closing them here would pull them from under the
    threads still running until the exec: gRPC aborts on that)."""
    logging.getLogger(__name__).info("restarting the worker process: %s", why)
    sys.stdout.flush()
    sys.stderr.flush()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep_fd:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # closed meanwhile (the listing's own descriptor is one)
                pass
    os.execv(sys.executable, [sys.executable, "-m", "oobleck.worker_main", *argv])


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` without tearing the interpreter down. Threads of the engine (the
    generation watch, store clients, gloo) sit in C++ calls with the GIL released; one that returns while
    the interpreter finalizes is ended by ``pthread_exit`` inside a C++ destructor, which aborts the whole
    process (SIGABRT), and the master would take a worker that finished for a lost one. Flushes the logs
    and the standard streams first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """:func:`main`, then :func:`exit_now` with its exit code (1, with the traceback, if it raised)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors and --help
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)


if __name__ == "__main__":
    run_and_exit()
