"""Authenticated values in the job's TCPStore: every value the master or a worker acts on carries a MAC.

The TCPStore has no access control: anyone who can reach its port can set any key. So every value of the
job's own protocol (a generation's end ``ended/genN``, the step commit's ready reports and decisions, the
workers' timing reports, the fault-injection kill times; see :mod:`oobleck.engine.commit`) is written as
``TAG || HMAC-SHA256(K, DOMAIN || len(name) || name || payload) || payload``, where ``name`` is the *full*
key name in the store (a generation's prefix included), so an authentic value cannot be replayed under
another key, step or generation. ``K`` is derived from the job's control-plane token
(:func:`store_key`), which the master and every worker already hold; the token itself never goes into
the store.

A reader accepts only authentic values: a forged, garbled or replayed value is ignored with one log line
(per distinct value) and never parsed. :meth:`SignedStore.wait` goes on waiting for the authentic value
(its writer overwrites the key later), polling at a bounded rate while the bad value is there, and
gives up only at the caller's timeout.

Not covered: the keys torch.distributed itself writes under a generation's prefix for gloo's rendezvous
(torch internals we cannot sign). Those are protected only by the store listening on the master's
configured address (loopback for local jobs). A party that can reach the store can still delete or
overwrite keys (denial of service); the MAC guarantees integrity, not availability.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
import time
from datetime import timedelta
from typing import Callable, Sequence

from torch.distributed import DistStoreError, PrefixStore, Store

log = logging.getLogger(__name__)

#: the first bytes of every signed value (a format version)
TAG = b"OMAC1"
MAC_BYTES = hashlib.sha256().digest_size
#: bound into every MAC, so that a MAC made under the same key for another purpose never verifies here
DOMAIN = b"oobleck/store-value/v1\x00"
#: what the store's MAC key is derived from the token with (HMAC-SHA256(token, this))
_KEY_LABEL = b"oobleck/store-mac-key/v1"
#: while a key holds a value that is not authentic, :meth:`SignedStore.wait` re-reads it this often,
#: backing off from the first to the second figure (seconds)
POLL_MIN_S = 0.01
POLL_MAX_S = 0.2
#: how many distinct bad values one SignedStore remembers having logged (memory bound under attack)
_LOGGED_MAX = 1024


def store_key(token: str) -> bytes:
    """The store's 32-byte MAC key for the job whose control-plane token is ``token``; ValueError if empty."""
    if not token:
        raise ValueError("the job token is empty; cannot derive the store's MAC key")
    return hmac.new(token.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, name: str, payload: bytes) -> bytes:
    encoded = name.encode()
    message = DOMAIN + struct.pack("<I", len(encoded)) + encoded + payload
    return hmac.new(key, message, hashlib.sha256).digest()


def sign(key: bytes, name: str, payload: bytes) -> bytes:
    """The stored form of ``payload`` under the full key name ``name``."""
    return TAG + _mac(key, name, payload) + payload


def verify(key: bytes, name: str, blob: bytes) -> bytes | None:
    """The payload of ``blob`` if it is an authentic value of key ``name`` (constant-time MAC check),
    else None (forged, garbled, truncated, or signed for another key)."""
    head = len(TAG) + MAC_BYTES
    if len(blob) < head or not hmac.compare_digest(blob[: len(TAG)], TAG):
        return None
    payload = blob[head:]
    if not hmac.compare_digest(blob[len(TAG) : head], _mac(key, name, payload)):
        return None
    return payload


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class SignedStore:
    """A view of ``base`` under ``prefix`` (``PrefixStore(prefix, base)``; none when empty) whose values are
    signed on write and verified on read with ``key`` (see the module notes).

    Names passed to the methods are relative to ``prefix``; the MAC covers the full name torch's
    PrefixStore gives the key in the store (``PREFIX/NAME``). :attr:`raw` is the prefixed store itself, for
    torch.distributed's own use (process-group rendezvous)."""

    def __init__(self, base: Store, key: bytes, prefix: str = "") -> None:
        if len(key) < 16:
            raise ValueError("the store's MAC key must be at least 16 bytes (see store_key)")
        self.base = base
        self.prefix = prefix
        self.raw: Store = PrefixStore(prefix, base) if prefix else base
        self._key = key
        self._logged: set[tuple[str, bytes]] = set()

    def full_name(self, name: str) -> str:
        """The key's name in the store itself (as torch's PrefixStore forms it)."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def clone(self) -> "SignedStore":
        """The same view over a second connection to the store."""
        return SignedStore(self.base.clone(), self._key, self.prefix)

    def set(self, name: str, value: bytes | str) -> None:
        self.raw.set(name, sign(self._key, self.full_name(name), _as_bytes(value)))

    def multi_set(self, names: Sequence[str], values: Sequence[bytes | str]) -> None:
        signed = [sign(self._key, self.full_name(n), _as_bytes(v)) for n, v in zip(names, values, strict=True)]
        self.raw.multi_set(list(names), signed)

    def delete_key(self, name: str) -> None:
        self.raw.delete_key(name)

    def get(self, name: str) -> bytes | None:
        """The authentic value of ``name``, or None when it has none (absent, or not authentic); never
        blocks for a missing key."""
        if not self.raw.check([name]):
            return None
        return self._accept(name, self.raw.get(name))

    def wait(
        self, names: Sequence[str], timeout: timedelta, stop: Callable[[], bool] | None = None
    ) -> list[bytes] | None:
        """Block until every key of ``names`` holds an authentic value and return the payloads in order.

        A key that holds a bad value is read again (every :data:`POLL_MIN_S`, backing off to
        :data:`POLL_MAX_S`) until its writer overwrites it. Returns None when ``stop()`` turns true (it is
        checked between those reads, i.e. only while some value is not authentic). Raises the store's own
        error if the store fails, and :class:`torch.distributed.DistStoreError` if ``timeout`` passes first."""
        deadline = time.monotonic() + timeout.total_seconds()
        found: dict[str, bytes] = {}
        pending = list(names)
        delay = POLL_MIN_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistStoreError(f"no authentic value of {pending} within {timeout}")
            self.raw.wait(pending, timedelta(seconds=left))
            for name, blob in zip(pending, self.raw.multi_get(pending)):
                payload = self._accept(name, blob)
                if payload is not None:
                    found[name] = payload
            pending = [n for n in pending if n not in found]
            if not pending:
                return [found[n] for n in names]
            if stop is not None and stop():
                return None
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(2 * delay, POLL_MAX_S)

    def _accept(self, name: str, blob: bytes) -> bytes | None:
        full = self.full_name(name)
        payload = verify(self._key, full, blob)
        if payload is None:
            seen = (full, hashlib.sha256(blob).digest())
            if seen not in self._logged:
                if len(self._logged) >= _LOGGED_MAX:
                    self._logged.clear()
                self._logged.add(seen)
                log.warning("store key %s: ignoring a value without a valid MAC (%d bytes)", full, len(blob))
        return payload
