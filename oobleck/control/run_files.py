"""``RUN/control.json``: how ``oobleck inject RUN`` finds a running job.

The launcher writes it when the job's master starts (:func:`write_control_file`); ``oobleck inject`` reads it
back, and trusts it only after the ownership checks of :func:`read_control_file`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from oobleck.errors import OobleckError

CONTROL_FILE = "control.json"


def write_control_file(run_dir: Path, address: str, token_file: Path, cert_file: Path | None = None) -> Path:
    """``RUN/control.json``: where ``oobleck inject RUN`` finds the running job's master, token and (TLS on)
    certificate (the files themselves stay in a directory only this user can read)."""
    path = run_dir / CONTROL_FILE
    info = {"master": address, "token_file": str(token_file)}
    if cert_file is not None:
        info["cert_file"] = str(cert_file)
    path.unlink(missing_ok=True)
    # never group/world-writable whatever the umask: `oobleck inject` refuses a control file others can write
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as out:
        out.write(json.dumps(info))
    return path


def read_control_file(run_dir: Path) -> tuple[str, str, str | None]:
    """The master's address, token file and certificate file (None: plaintext) from ``RUN_DIR/control.json``,
    after checking that nobody else could have written them: whoever controls the control file chooses where
    inject sends the token, and whoever controls the certificate file chooses whom the client trusts."""
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
