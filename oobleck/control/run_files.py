"""``RUN/control.json``: how ``oobleck inject RUN`` finds a running job.

The launcher writes it when the job's master starts (:func:`write_control_file`) and removes it when the job
ends (:func:`remove_control_file`); ``oobleck inject`` reads it back, and trusts it only after the ownership
checks of :func:`read_control_file`. A control file without its job (a run that was killed, or one of an
older version) names a token file that is gone, or a master that does not answer: :func:`no_job` words that.
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


def remove_control_file(run_dir: Path) -> None:
    """Remove ``RUN/control.json`` (the job ended: there is nothing left to inject into)."""
    (run_dir / CONTROL_FILE).unlink(missing_ok=True)


def no_job(run_dir: Path, why: str) -> OobleckError:
    """The error for a ``RUN_DIR`` in which no job runs, saying ``why`` that is known."""
    return OobleckError(f"RUN_DIR: no job is running in {run_dir}: {why}; pass the run directory of a running `oobleck run`")


def read_control_file(run_dir: Path) -> tuple[str, str, str | None]:
    """The master's address, token file and certificate file (None: plaintext) from ``RUN_DIR/control.json``,
    after checking that nobody else could have written them: whoever controls the control file chooses where
    inject sends the token, and whoever controls the certificate file chooses whom the client trusts. A
    missing control, token or certificate file is a :func:`no_job` error (the job ended)."""
    path = run_dir / CONTROL_FILE
    ended = no_job(run_dir, f"there is no {CONTROL_FILE} (written while a job runs, removed when it ends)")
    _check_private(
        run_dir, "RUN_DIR", "the run directory", folder=True,
        missing=OobleckError(f"RUN_DIR: {run_dir} does not exist; pass the run directory of a running `oobleck run`"),
    )  # fmt: skip
    _check_private(path, "RUN_DIR", "the control file", missing=ended)
    try:
        info = json.loads(path.read_text())
        master, token_file = str(info["master"]), str(info["token_file"])
        cert = info.get("cert_file")
        cert_file = None if cert is None else str(cert)
    except FileNotFoundError:
        raise ended from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise OobleckError(f"RUN_DIR: {path} is unreadable ({e}); is this a run directory of oobleck run?") from None
    token = Path(token_file)
    if not token.is_absolute():
        raise OobleckError(f"RUN_DIR: {path} names the token file {token_file!r}, not an absolute path; restart the job")

    def gone(what: str, file: Path) -> OobleckError:
        return no_job(run_dir, f"{what} {file} that {CONTROL_FILE} names is gone (removed when the job ended)")

    _check_private(token.parent, "RUN_DIR", "the token file's folder", folder=True, missing=gone("the token folder", token.parent))
    _check_private(token, "RUN_DIR", "the token file", secret=True, missing=gone("the token file", token))
    if cert_file is not None:
        _check_private(Path(cert_file), "RUN_DIR", "the certificate file", missing=gone("the certificate file", Path(cert_file)))
    return master, token_file, cert_file


def _check_private(
    path: Path, flag: str, what: str, *, missing: OobleckError, folder: bool = False, secret: bool = False
) -> None:
    """Refuse ``path`` unless it is this user's and nobody else can write it (``secret``: nor read it); raise
    ``missing`` when it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise missing from None
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
