"""Files and folders that survive a crash at any moment, shared by every writer of a run directory.

* :func:`atomic_write` writes through a temporary sibling unique per host, process, thread and call
  (``.NAME.HOST.PID.TID.RANDOM.tmp``), fsyncs it and renames it into place, so a file that exists is whole;
* :func:`remove_folder` renames a folder out of its namespace (:data:`TRASH_PREFIX`) before deleting it;
* :func:`remove_stale_in` removes the temporaries of writers that died;
* :func:`file_digest` is the (size, SHA-256) of a file, cached per process while the file is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

#: ``.NAME.HOST.PID.TID.RANDOM.tmp`` (this version) or ``.NAME.PID.tmp`` (format-1 writers)
_TMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.\d+\.[0-9a-f]+|(?P<oldpid>\d+))\.tmp$")
#: a folder being deleted: renamed out of its namespace (e.g. ``step_*``) first
TRASH_PREFIX = ".deleting-"
_CHUNK = 1 << 20
#: this host's name as temporaries carry it
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def fsync_dir(folder: Path) -> None:
    """fsync ``folder`` itself, which makes a rename or removal inside it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any, *, create_parent: bool = True) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync it and rename it into place.

    The temporary name is unique per host, process, thread and call, so concurrent writers of the same
    ``path`` never touch each other's file: the last rename wins and every rename succeeds. Without
    ``create_parent`` a missing folder (e.g. removed meanwhile) raises FileNotFoundError."""
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


#: path -> ((dev, inode, size, mtime_ns, ctime_ns), sha256) of files hashed in this process
_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}
_DIGESTS_MAX = 4096
#: a digest is cached only when the file's last change is this much older than the start of its hashing, so
#: that a change within one file-system timestamp tick after the hashing still shows in (mtime, ctime)
#: (git's "racily clean" rule); a checkpoint just written is therefore hashed again when verified
_RACY_NS = 2_000_000_000


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size, SHA-256 hex digest) of ``path``, read in 1 MiB chunks. Cached per process by (device, inode,
    size, mtime, ctime) for files whose last change is clearly older than the hashing (see ``_RACY_NS``);
    any later write or replacement changes that key and the file is hashed again."""
    key = str(Path(path).absolute())
    started = time.time_ns()
    with open(path, "rb") as f:
        before = _stat_key(os.fstat(f.fileno()))
        cached = _DIGESTS.get(key)
        if cached is not None and cached[0] == before:
            return before[2], cached[1]
        digest = hashlib.sha256()
        size = 0
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        after = _stat_key(os.fstat(f.fileno()))
    hexdigest = digest.hexdigest()
    if after == before and size == before[2] and before[4] < started - _RACY_NS:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[key] = (before, hexdigest)
    return size, hexdigest


def remove_folder(folder: Path) -> bool:
    """Remove a folder crash-safely: rename it to a :data:`TRASH_PREFIX` name (one atomic step, after which it
    is out of its namespace, e.g. never counts as a checkpoint), then delete it. False if it was already gone."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}.{secrets.token_hex(4)}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return False
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)  # a leftover is removed by oobleck.checkpoint.remove_stale_temporaries
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_in(folder: Path, older_than: float | None) -> list[Path]:
    """Remove the temporaries of dead writers in ``folder``: those of this host whose process no longer runs,
    and with ``older_than`` (a time.time()) every temporary last modified before it. Returns what was removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TMP.match(name)
        if not m:
            continue
        file = folder / name
        try:
            mtime = file.stat().st_mtime
        except FileNotFoundError:
            continue
        dead = m.group("host") == HOST and not _pid_alive(int(m.group("pid")))
        if dead or (older_than is not None and mtime < older_than):
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed
