"""Free a worker blocked inside a gloo operation on a live peer that has not yet noticed a failure.

Gloo never gives up on a peer that is alive but silent, and ``abort()``, ``shutdown()``, ``set_timeout()`` or
``destroy_process_group()`` called from another thread do not release an operation already blocked
(docs/design.md, "Releasing a blocked worker"). What does: ``shutdown(SHUT_RDWR)`` on the group's TCP
sockets, after which the blocked call raises RuntimeError within a millisecond and the caller can destroy
the group and join the next generation's.

Which sockets are the group's? Take a :class:`SocketSnapshot` just before ``init_process_group`` (and any
``new_group`` calls) and one just after; :meth:`SocketSnapshot.since` gives the difference. Listening sockets
and connections to the store (name its port in ``exclude_ports``) are never included, so other threads that
connect to the store meanwhile do not pollute it; a thread opening some other TCP connection during that
window would, which is why the snapshots should bracket the group creation tightly. Linux only (/proc).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Collection, Iterable

_TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket open in this process: its descriptor, kernel inode and both ports (0 if unconnected)."""

    fd: int
    inode: int
    local_port: int
    remote_port: int


def tcp_connections(exclude_ports: Collection[int] = (), skip_inodes: Collection[int] = ()) -> list[TcpSocket]:
    """This process's non-listening TCP sockets (IPv4 and IPv6), sorted by fd, leaving out any whose local or
    remote port is in ``exclude_ports`` (the store's port catches both its clients and, in the host, the
    connections it accepted) and any whose inode is in ``skip_inodes`` (never looked at).

    Each socket descriptor is asked itself (on a duplicate: ``getsockname``, ``getpeername``). The kernel's
    ``/proc/self/net/tcp`` tables list every TCP socket of the network namespace, and reading them took
    about 40 ms on a loaded 2-core machine: the generation watch paid that before every join and on every
    sweep after a generation's end, on the recovery's path. A socket whose connect is still under way has
    no peer to ask (nor has one shut down and closed by its peer); only then are the tables read, for its
    remote port."""
    excluded = set(exclude_ports)
    skipped = set(skip_inodes)
    found = []
    for fd, inode in sorted(_socket_fds().items()):
        ports = None if inode in skipped else _ports(fd, inode)
        if ports is not None:
            found.append(TcpSocket(fd, inode, *ports))
    connecting = {s.inode for s in found if s.remote_port == 0}
    if connecting and excluded:
        remote = _remote_ports(connecting)
        found = [TcpSocket(s.fd, s.inode, s.local_port, remote.get(s.inode, 0)) if s.inode in connecting else s for s in found]
    return [s for s in found if not {s.local_port, s.remote_port} & excluded]


def _ports(fd: int, inode: int) -> tuple[int, int] | None:
    """(local, remote) port of the TCP socket behind ``fd`` if it is still socket ``inode`` and not listening;
    the remote port is 0 while it is not connected. None for anything else."""
    try:
        dup = os.dup(fd)
    except OSError:  # closed since the listing
        return None
    try:
        if os.fstat(dup).st_ino != inode:
            raise OSError("the descriptor was reused")
        sock = socket.socket(fileno=dup)  # owns dup from here on
    except OSError:
        os.close(dup)
        return None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        local = sock.getsockname()[1]
        try:
            return local, sock.getpeername()[1]
        except OSError:  # not connected (yet)
            return local, 0


def _remote_ports(inodes: set[int]) -> dict[int, int]:
    """inode -> remote port, from the kernel's TCP tables, for the sockets ``inodes`` (connects under way)."""
    found = {}
    for table in _TCP_TABLES:
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:  # a kernel without IPv6 has no tcp6 table
            continue
        for row in rows:
            fields = row.split()
            if int(fields[9]) in inodes:
                found[int(fields[9])] = int(fields[2].rsplit(":", 1)[1], 16)
    return found


def gloo_sockets(exclude_ports: set[int]) -> list[int]:
    """Descriptors of this process's connected TCP sockets except those on ``exclude_ports`` (see
    :func:`tcp_connections`). In a worker whose only other TCP peer is the store, these are the gloo pairs;
    where other libraries hold connections too, use :class:`SocketSnapshot` to single out the group's."""
    return [s.fd for s in tcp_connections(exclude_ports)]


def release_blocked_collectives(fds: Iterable[int]) -> int:
    """``shutdown(SHUT_RDWR)`` each socket in ``fds``, from any thread, leaving the descriptors open (their
    owner closes them when it destroys the group). Returns how many were shut down; descriptors that are
    closed, not sockets, or not connected are skipped."""
    return sum(_shutdown(fd, None) for fd in fds)


@dataclass(frozen=True)
class SocketSnapshot:
    """The TCP sockets open at one moment (see :func:`tcp_connections`)."""

    sockets: tuple[TcpSocket, ...]

    @classmethod
    def take(cls, exclude_ports: Collection[int] = (), skip_inodes: Collection[int] = ()) -> SocketSnapshot:
        """Record this process's non-listening TCP sockets now, except those on ``exclude_ports`` and those
        in ``skip_inodes`` (e.g. :func:`socket_inodes` of an earlier moment)."""
        return cls(tuple(tcp_connections(exclude_ports, skip_inodes)))

    def since(self, earlier: SocketSnapshot) -> SocketSnapshot:
        """The sockets in this snapshot that ``earlier`` did not have (compared by inode, since descriptor
        numbers are reused)."""
        old = {s.inode for s in earlier.sockets}
        return SocketSnapshot(tuple(s for s in self.sockets if s.inode not in old))

    @property
    def fds(self) -> list[int]:
        """The descriptors, in order."""
        return [s.fd for s in self.sockets]

    def release(self) -> int:
        """Shut down every socket of this snapshot that is still open. A descriptor that has since been
        closed and reused for another socket is left alone (its inode no longer matches). Returns the count."""
        return sum(_shutdown(s.fd, s.inode) for s in self.sockets)


def socket_inodes() -> frozenset[int]:
    """The inodes of every socket this process holds now, of any kind: cheap (no port is looked up), for a
    later :meth:`SocketSnapshot.take` to skip."""
    return frozenset(_socket_fds().values())


def _socket_fds() -> dict[int, int]:
    """fd -> socket inode for every socket descriptor of this process."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since the listing (listdir's own descriptor is one)
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[len("socket:[") : -1])
    return found


def _shutdown(fd: int, inode: int | None) -> bool:
    """Shut down the socket behind ``fd`` (if ``inode`` is given, only if it is still that socket). Works on
    a duplicate descriptor: shutdown acts on the socket, and closing the duplicate leaves ``fd`` to its owner."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        if inode is not None and os.fstat(dup).st_ino != inode:
            os.close(dup)
            return False
        sock = socket.socket(fileno=dup)  # owns dup from here on
    except OSError:  # not a socket
        os.close(dup)
        return False
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected
            return False
    return True
