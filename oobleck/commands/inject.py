"""Inject failures into a running job, or add nodes to it: ``oobleck inject RUN_DIR --kill node2``.

The job is found through ``RUN_DIR/control.json``, which ``oobleck run`` writes when its master starts (its
address, token file and, with TLS on, the certificate file to trust).
``--kill`` and ``--hang`` act on whole nodes (the agent and its workers: SIGKILL, or SIGSTOP so that the
master sees missed heartbeats), or on one worker with ``--worker D`` (a hung worker is killed by its agent's
watchdog). ``--add`` starts new nodes that join at the next step boundary (the local launcher starts them
on this machine). Several nodes in one call are hit at once.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
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
    parser.add_argument("--timeout", type=float_flag(MIN_INTERVAL_S, 3600.0), default=10.0, help="seconds to wait for the master")


def run(args: argparse.Namespace) -> int:
    from oobleck.control import oobleck_pb2 as pb
    from oobleck.control.channel import master_stub, open_channel, read_token, wait_ready
    from oobleck.control.tls import read_cert

    master, token_file, cert_file = _find_job(Path(args.run_dir))
    action, nodes = next((name, getattr(args, name)) for name in ("kill", "hang", "add") if getattr(args, name))
    if args.worker is not None and action == "add":
        raise OobleckError("--worker: applies to --kill and --hang only")
    cert = read_cert(cert_file) if cert_file else None
    channel = open_channel(master, read_token(token_file), cert)
    try:
        wait_ready(channel, master, args.timeout, tls=cert is not None)
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


def _find_job(run_dir: Path) -> tuple[str, str, str | None]:
    """The master's address, token file and certificate file (None: plaintext) from ``RUN_DIR/control.json``,
    after checking that nobody else could have written them: whoever controls the control file chooses where
    inject sends the token, and whoever controls the certificate file chooses whom the client trusts."""
    from launcher.job import CONTROL_FILE

    path = run_dir / CONTROL_FILE
    _check_private(run_dir, "RUN_DIR", "the run directory", folder=True)
    _check_private(path, "RUN_DIR", "the control file")
    try:
        info = json.loads(path.read_text())
        master, token_file = str(info["master"]), str(info["token_file"])
        cert = info.get("cert_file")
        cert_file = None if cert is None else str(cert)
    except FileNotFoundError:
        raise OobleckError(f"RUN_DIR: no {path}; pass the run directory of a job `oobleck run` is running") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise OobleckError(f"RUN_DIR: {path} is unreadable ({e}); is this a run directory of oobleck run?") from None
    token = Path(token_file)
    if not token.is_absolute():
        raise OobleckError(f"RUN_DIR: {path} names the token file {token_file!r}, not an absolute path; restart the job")
    _check_private(token.parent, "RUN_DIR", "the token file's folder", folder=True)
    _check_private(token, "RUN_DIR", "the token file", secret=True)
    if cert_file is not None:
        _check_private(Path(cert_file), "RUN_DIR", "the certificate file")
    return master, token_file, cert_file


def _check_private(path: Path, flag: str, what: str, folder: bool = False, secret: bool = False) -> None:
    """Refuse ``path`` unless it is this user's and nobody else can write it (``secret``: nor read it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if folder or what == "the token file":
            raise OobleckError(f"{flag}: {what} {path} does not exist; is the job still running?") from None
        return  # the control file: reported when read
    except OSError as e:
        raise OobleckError(f"{flag}: cannot inspect {what} {path} ({e.strerror})") from None
    kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    if not kind:
        raise OobleckError(f"{flag}: {what} {path} is not a {'directory' if folder else 'regular file'}; refusing it")
    if st.st_uid != os.getuid():
        raise OobleckError(f"{flag}: {what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing it")
    mode = stat.S_IMODE(st.st_mode)
    if secret and mode & 0o077:
        raise OobleckError(f"{flag}: {what} {path} has mode {mode:04o}; it must be 0600 or stricter (chmod 600 it)")
    if mode & 0o022:
        raise OobleckError(f"{flag}: {what} {path} has mode {mode:04o}, writable by others; chmod go-w it")
