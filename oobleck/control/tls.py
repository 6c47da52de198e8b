"""TLS for the control plane: a per-job key and self-signed certificate, made by the master.

The master makes a fresh ECDSA P-256 key and a self-signed certificate for its address when it starts
(:func:`make_material`); the key never leaves the master's memory. The launcher writes the certificate
(public) next to the job's token file, in the same mode-0700 directory, and every agent, worker and
``oobleck inject`` pins it as the only trusted root: a server without this job's key cannot complete the
handshake, and the bearer token travels encrypted.

TLS is on (``cluster.tls: auto``, the default) whenever the master binds an address other than loopback;
``on`` and ``off`` force it either way.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from oobleck.errors import OobleckError

#: the name every client checks the master's certificate against (``grpc.ssl_target_name_override``): the
#: certificate carries it next to the master's address, so verification does not depend on which of the
#: master's names or addresses a client dials (a wildcard bind, several interfaces). Pinning the job's own
#: certificate as the only root is what authenticates the master; the name only has to match.
SERVER_NAME = "oobleck-master"
#: a job's certificate is valid this long (from an hour before it was made, for clock skew): new
#: connections to a job that runs longer fail the handshake
VALIDITY = datetime.timedelta(days=30)
CERT_FILE = "master.crt"


@dataclass(frozen=True)
class TlsMaterial:
    """The master's key and certificate, PEM-encoded."""

    key_pem: bytes
    cert_pem: bytes


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name the master binds) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wanted(mode: str, host: str) -> bool:
    """Whether the control plane runs TLS under ``cluster.tls`` = ``mode`` with the master on ``host``."""
    if mode == "auto":
        return not is_loopback(host)
    return mode == "on"


def make_material(host: str) -> TlsMaterial:
    """A fresh ECDSA P-256 key and a self-signed certificate whose subject alternative names are ``host``
    (an IP address or DNS name; for a wildcard bind this machine's name and loopback too) and
    :data:`SERVER_NAME`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
    hosts = [host.strip("[]")]
    if hosts[0] in ("", "0.0.0.0", "::"):
        hosts += [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    for h in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # its own root: clients pin exactly this certificate, which signs nothing else
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TlsMaterial(key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))


def read_cert(path: str | Path) -> bytes:
    """The PEM certificate in ``path``; OobleckError if it is unreadable or not a PEM certificate."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise OobleckError(f"--cert-file {path}: cannot read ({e.strerror}); pass the job's master certificate") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise OobleckError(f"--cert-file {path}: not a PEM certificate; pass the job's master certificate")
    return pem


def write_cert(directory: Path, cert_pem: bytes) -> Path:
    """Write ``cert_pem`` to ``directory/master.crt`` (created new, mode 0600) and return its path."""
    import os

    path = directory / CERT_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert_pem)
    return path
