"""TLS helpers for development nodes: a self-signed certificate and a client context.

``write_self_signed`` makes an EC P-256 key and a self-signed server certificate whose
SubjectAlternativeName lists every given host (DNS names and IP addresses), ready for a node
serving TLS 1.3 (``python -m mux cert`` calls it). ``client_ssl_context`` builds a client
context that trusts exactly that certificate, for tests and for clients of a dev node. It
does not force TLS 1.3 itself: the node refuses anything older.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["client_ssl_context", "write_self_signed"]


def _san_entry(host: str) -> x509.GeneralName:
    """An IPAddress entry for an IP literal, a DNSName entry for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def write_self_signed(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    *,
    hosts: list[str],
    days: int = 365,
) -> dict[str, object]:
    """Write a self-signed certificate (PEM) and its unencrypted PKCS#8 key (PEM, mode 0600).

    The certificate is valid from one minute ago for ``days`` days, for every name and IP
    address in ``hosts`` (the first is also the CN). Returns ``certfile``, ``keyfile``,
    ``hosts``, ``not_after`` (ISO 8601) and ``sha256_fingerprint`` (hex).
    """
    hosts = [h.strip() for h in hosts if h and h.strip()]
    if not hosts:
        raise ValueError("write_self_signed needs at least one host")
    if days < 1:
        raise ValueError("days must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        entry = _san_entry(host)
        if entry not in sans:
            sans.append(entry)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Python 3.13+ verifies with X509_STRICT, which wants an AKI even on self-signed leaves.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    key_path, cert_path = Path(keyfile), Path(certfile)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        # An existing file keeps its mode through O_CREAT: tighten it explicitly.
        os.fchmod(fh.fileno(), 0o600)
        fh.write(key_pem)
    cert_path.write_bytes(cert_pem)

    return {
        "certfile": str(cert_path),
        "keyfile": str(key_path),
        "hosts": hosts,
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }


def client_ssl_context(cafile: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client context that trusts the certificate(s) in ``cafile`` (hostname checked).

    The minimum version is left at the default so callers can lower the maximum (the node
    itself accepts TLS 1.3 only).
    """
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(cafile))
