"""A small local certificate authority for the key-delivery demo (docs/network.md):
a CA, one server certificate and one client certificate per SAE, made with
`cryptography`. Private keys are written 0600. Not for production: a real network
uses its operator's PKI."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from host.distil.durable import write_atomic

VALID_DAYS = 365


def _write(path: Path, data: bytes, mode: int) -> None:
    # a fresh temporary (O_EXCL|O_NOFOLLOW, created with `mode`; a file or symlink planted
    # under its name is removed, never written through), fsync, rename, directory fsync
    write_atomic(path, data, mode)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _save(directory: Path, stem: str, key, cert: x509.Certificate) -> None:
    _write(
        directory / f"{stem}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_ca(directory: str | Path, common_name: str = "qkdsat demo CA") -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _save(directory, "ca", key, cert)


def issue(directory: str | Path, common_name: str, server: bool = False, ca_stem="ca") -> None:
    """A certificate for `common_name` (an SAE ID, or the KME's host name with server=True)
    signed by DIR/ca_stem.{pem,key}; written as DIR/common_name.{pem,key}."""
    directory = Path(directory)
    ca_key = serialization.load_pem_private_key((directory / f"{ca_stem}.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / f"{ca_stem}.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName(common_name)]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(common_name)))
        except ValueError:
            pass
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    _save(directory, common_name, key, builder.sign(ca_key, hashes.SHA256()))
