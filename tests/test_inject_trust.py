"""``oobleck inject`` sends the job's token to the address in RUN/control.json, so it trusts that file
only when nobody but the current user can have written it or the token file it names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.job import job_token
from oobleck import cli
from oobleck.control.run_files import write_control_file

OTHER_UID = 4242


def _job(tmp_path: Path) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    token = secret / "token"
    token.write_text("s3cret")
    token.chmod(0o600)
    control = write_control_file(run, "127.0.0.1:9", token)  # nothing listens on port 9
    return run, control, token


def _inject(run: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = cli.main(["inject", str(run), "--kill", "node0", "--timeout", "0.2"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_private_job_gets_as_far_as_the_master(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _, _ = _job(tmp_path)
    code, err = _inject(run, capsys)
    # past every check of the files: only the master is not there
    assert code == 2 and len(err) == 1 and "no job is running" in err[0] and "nothing answers at 127.0.0.1:9" in err[0], err


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda run, control, token: control.chmod(0o666), "the control file"),
        (lambda run, control, token: control.chmod(0o620), "writable by others"),
        (lambda run, control, token: os.chown(control, OTHER_UID, -1), "belongs to uid 4242"),
        (lambda run, control, token: token.chmod(0o644), "must be 0600 or stricter"),
        (lambda run, control, token: token.chmod(0o640), "must be 0600 or stricter"),
        (lambda run, control, token: os.chown(token, OTHER_UID, -1), "the token file"),
        (lambda run, control, token: run.chmod(0o777), "the run directory"),
        (lambda run, control, token: token.parent.chmod(0o777), "the token file's folder"),
        (
            lambda run, control, token: control.write_text(json.dumps({"master": "evil:1", "token_file": "/etc/passwd"})),
            "the token file /etc/passwd belongs to uid 0" if os.getuid() != 0 else "the token file /etc/passwd has mode",
        ),
        (lambda run, control, token: control.write_text(json.dumps({"master": "evil:1", "token_file": "token"})), "not an absolute path"),
    ],
    ids=[
        "control world-writable", "control group-writable", "control not ours", "token world-readable", "token group-readable",
        "token not ours", "run dir world-writable", "token dir world-writable", "token file elsewhere", "relative token",
    ],
)
def test_untrusted_control_or_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, tamper, expected: str) -> None:
    run, control, token = _job(tmp_path)
    tamper(run, control, token)
    code, err = _inject(run, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("oobleck inject: error: RUN_DIR: ") and expected in err[0], err


def test_control_symlink_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, control, _ = _job(tmp_path)
    target = tmp_path / "elsewhere.json"
    control.rename(target)
    control.symlink_to(target)
    code, err = _inject(run, capsys)
    assert code == 2 and "is not a regular file" in err[0], err


def test_the_launcher_writes_files_inject_trusts(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a group-writable umask must not make the files group-writable
    try:
        with job_token() as (_, token_file):
            assert token_file.stat().st_mode & 0o777 == 0o600
            control = write_control_file(tmp_path, "127.0.0.1:9", token_file)
            assert control.stat().st_mode & 0o022 == 0
    finally:
        os.umask(old)
