"""The node agent: ``python -m oobleck.control.agent --master HOST:PORT --token-file F --node NAME --devices G``
(and ``--cert-file C``, the job's certificate, when the control plane runs TLS).

It registers its node with the master, starts one worker process per device
(``python -m oobleck.worker_main``), reports each worker's exit to the master the moment it happens, and keeps a
heartbeat stream open. A worker that exits by itself (a positive code) is reported with the last line it
wrote to its log, which says why (a worker's one-line error). Each worker beats back through a pipe; a
worker silent for the master's ``worker_timeout_s`` (hung, e.g. stopped) is killed with SIGKILL and reported
like any other death. It stops every worker (SIGTERM to the worker's process group, SIGKILL after a grace
period) when the master says so, when the master goes away (its stream breaks, or it stays silent: the
master sends an event at least every heartbeat interval, and a stream silent for the master's
``master_timeout_s`` means a hung or cut-off master), or when the agent itself is asked to stop
(SIGTERM/SIGINT); workers also die with the agent through PR_SET_PDEATHSIG.

Failure injection (``oobleck inject``) reaches the agent as an INJECT event: it kills (SIGKILL) or hangs
(SIGSTOP) one worker, or the whole node (its workers and the agent itself).

Exit codes: 0 when the master reports the job finished, 1 when it failed or the master was lost,
2 (with one line on stderr) when the master cannot be reached or refuses the registration.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import grpc

from oobleck.control import oobleck_pb2 as pb
from oobleck.control.channel import master_stub, open_channel, read_token, wait_ready
from oobleck.control.procs import child_env, die_with_parent, last_line, stop_group
from oobleck.control.tls import read_cert
from oobleck.errors import OobleckError, one_line

#: seconds a worker gets between SIGTERM and SIGKILL
WORKER_GRACE_S = 2.0


class Agent:
    """One node's agent; :meth:`run` returns the process exit code."""

    def __init__(
        self, master: str, token_file: str, node: str, devices: int, log_dir: str | None, cert_file: str | None = None
    ) -> None:
        self.master = master
        self.token_file = token_file
        self.cert_file = cert_file
        self.node = node
        self.devices = devices
        self.log_dir = Path(log_dir) if log_dir else None
        self._stop = threading.Event()
        #: set by a signal handler (see request_stop)
        self._stop_requested: str | None = None
        self._outcome: tuple[int, str] | None = None  # (exit code, reason), first one wins
        self._lock = threading.Lock()
        self._workers: dict[int, subprocess.Popen] = {}
        #: device -> read end of the pipe its worker beats into
        self._beats_from: dict[int, int] = {}
        self._logs: list[IO[bytes]] = []
        #: time.monotonic() of the last event from the master on the Session stream
        self._last_event = time.monotonic()

    def run(self, connect_timeout_s: float) -> int:
        token = read_token(self.token_file)
        cert = read_cert(self.cert_file) if self.cert_file else None
        channel = open_channel(self.master, token, cert)
        try:
            wait_ready(channel, self.master, connect_timeout_s, tls=cert is not None)
            stub = master_stub(channel)
            try:
                reply = stub.Register(
                    pb.RegisterRequest(node=self.node, devices=self.devices, pid=os.getpid()), timeout=connect_timeout_s
                )
            except grpc.RpcError as e:
                raise OobleckError(f"registration refused by {self.master}: {e.details()}") from None
            self._start_workers(reply.heartbeat_interval_s)
            self._last_event = time.monotonic()
            session = threading.Thread(
                target=self._session, args=(stub, reply.heartbeat_interval_s), name="session", daemon=True
            )
            session.start()
            for device, proc in self._workers.items():
                threading.Thread(
                    target=self._watch, args=(stub, device, proc), name=f"watch-{device}", daemon=True
                ).start()
                threading.Thread(
                    target=self._watchdog,
                    args=(device, proc, self._beats_from.pop(device), reply.worker_timeout_s),
                    name=f"watchdog-{device}",
                    daemon=True,
                ).start()
            # a master that sent no reply field (an older one) gets a generous limit
            silence_s = reply.master_timeout_s or 60.0
            while not self._stop.wait(min(0.5, silence_s / 4)):  # a timed wait keeps signal handlers responsive
                if self._stop_requested is not None:
                    self._finish(1, self._stop_requested)
                silent = time.monotonic() - self._last_event
                if silent > silence_s:
                    self._finish(
                        1,
                        f"the master {self.master} sent nothing for {silent:.1f} s (limit {silence_s:g} s): it is hung "
                        "or cut off; stopped the workers. Check the `oobleck run` process and its machine, then "
                        "rerun (run.resume: true continues from the last checkpoint)",
                    )
        finally:
            self._stop_workers()
            channel.close()
        code, reason = self._outcome or (1, "stopped")
        if code:
            print(f"agent {self.node}: {reason}", file=sys.stderr)
        return code

    def request_stop(self, reason: str) -> None:
        """Stop the workers and exit with code 1 (unless an outcome was already recorded). Safe in a signal
        handler: it only records the request, which :meth:`run`'s loop acts on (setting the Event from a
        handler that interrupted ``Event.wait`` in the same thread would deadlock on the Event's lock)."""
        self._stop_requested = reason

    def _finish(self, code: int, reason: str) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = (code, reason)
        self._stop.set()

    def _start_workers(self, heartbeat_interval_s: float) -> None:
        for device in range(self.devices):
            beats_from, beats_to = os.pipe()
            cmd = [
                sys.executable, "-m", "oobleck.worker_main",
                "--master", self.master, "--token-file", self.token_file,
                "--node", self.node, "--device", str(device),
                "--heartbeat-fd", str(beats_to), "--heartbeat-interval", str(heartbeat_interval_s),
            ]  # fmt: skip
            if self.cert_file:
                cmd += ["--cert-file", self.cert_file]
            out: IO[bytes] | None = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{self.node}-{device}.log", "ab")
                self._logs.append(out)
            # own session: the agent can stop the worker with everything it forked
            self._workers[device] = subprocess.Popen(
                cmd,
                env=child_env(),
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                pass_fds=(beats_to,),
            )
            os.close(beats_to)
            self._beats_from[device] = beats_from

    def _watchdog(self, device: int, proc: subprocess.Popen, beats: int, timeout_s: float) -> None:
        """Kill the worker when it has beaten before but then stays silent for ``timeout_s`` (hung). The
        clock starts at the first beat: start-up (imports) may take long on a loaded machine."""
        beating = False
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([beats], [], [], timeout_s if beating else 1.0)
                if ready:
                    if not os.read(beats, 4096):
                        return  # the worker exited: its pipe closed
                    beating = True
                elif beating and proc.poll() is None:
                    print(f"agent {self.node}: worker {device} sent no heartbeat for {timeout_s:g} s: killing it", file=sys.stderr)
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
        finally:
            os.close(beats)

    def _inject(self, event: pb.MasterEvent) -> None:
        """Carry out an INJECT event (see the module notes)."""
        sig = signal.SIGKILL if event.action == "kill" else signal.SIGSTOP
        targets = list(self._workers.values()) if event.device < 0 else [self._workers[event.device]]
        print(f"agent {self.node}: injected {event.action} of {'the node' if event.device < 0 else f'worker {event.device}'}", file=sys.stderr, flush=True)
        for proc in targets:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        if event.device < 0:
            os.kill(os.getpid(), sig)

    def _watch(self, stub: object, device: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self._stop.is_set():
            return  # we stopped it ourselves
        # a worker that exits by itself (code > 0) says why in its last line; a killed one wrote nothing about it
        said = self._last_words(device) if code > 0 else ""
        try:
            stub.ReportWorkerExit(pb.WorkerExit(node=self.node, device=device, exit_code=code, error=said), timeout=10)  # type: ignore[attr-defined]
        except grpc.RpcError as e:
            self._finish(1, f"cannot report the exit of worker {device} to the master: {e.details()}")

    def _last_words(self, device: int) -> str:
        """The last line worker ``device`` wrote to its log, as one line of at most 1000 characters ("" when it
        has no log)."""
        if self.log_dir is None:
            return ""
        return one_line(last_line(self.log_dir / f"{self.node}-{device}.log"))

    def _beats(self, interval_s: float) -> Iterator[pb.Heartbeat]:
        while True:
            running = [d for d, p in self._workers.items() if p.poll() is None]
            yield pb.Heartbeat(node=self.node, running_devices=running)
            if self._stop.wait(interval_s):
                return

    def _session(self, stub: object, interval_s: float) -> None:
        try:
            for event in stub.Session(self._beats(interval_s)):  # type: ignore[attr-defined]
                self._last_event = time.monotonic()
                if event.kind == pb.MasterEvent.SHUTDOWN:
                    self._finish(1 if event.failed else 0, f"stopped by the master: {event.reason}")
                    return
                if event.kind == pb.MasterEvent.INJECT and (-1 <= event.device < self.devices):
                    self._inject(event)
            self._finish(1, "the master closed the session")
        except grpc.RpcError as e:
            self._finish(1, f"lost the master ({e.code().name}: {e.details()})")

    def _stop_workers(self) -> None:
        self._stop.set()
        for proc in self._workers.values():
            stop_group(proc, WORKER_GRACE_S)
        for log in self._logs:
            log.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oobleck-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--master", required=True, help="the master's HOST:PORT")
    parser.add_argument("--token-file", required=True, help="file holding the job's shared secret")
    parser.add_argument("--cert-file", help="the master's certificate (PEM): connect with TLS, trusting it alone")
    parser.add_argument("--node", required=True, help="this node's unique name")
    parser.add_argument("--devices", type=int, required=True, help="devices (workers) on this node")
    parser.add_argument("--log-dir", help="write each worker's output to LOG_DIR/NODE-DEVICE.log")
    parser.add_argument("--connect-timeout", type=float, default=20.0, help="seconds to wait for the master")
    return parser


def main(argv: list[str] | None = None) -> int:
    die_with_parent(signal.SIGTERM)  # SIGTERM, not SIGKILL: the agent must still stop its workers
    args = build_parser().parse_args(argv)
    if args.devices < 1:
        print(f"agent {args.node}: error: --devices: got {args.devices}; must be at least 1", file=sys.stderr)
        return 2
    agent = Agent(args.master, args.token_file, args.node, args.devices, args.log_dir, args.cert_file)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: agent.request_stop(f"stopped by {signal.Signals(signum).name}"))
    try:
        return agent.run(args.connect_timeout)
    except OobleckError as e:
        print(f"agent {args.node}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
