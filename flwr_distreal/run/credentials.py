"""Certificates, keys and the ``flwr`` CLI's connection config of a local deployment.

What :class:`~flwr_distreal.run.deploy.LocalDeployment` needs to run Flower's deployment runtime
with TLS and SuperNode authentication: a throw-away CA and a server certificate for the
SuperLink (:func:`make_tls_certificates`), an EC key pair per SuperNode in the OpenSSH format
Flower reads (:func:`make_node_key_pair`), and ``$FLWR_HOME/config.toml`` naming the SuperLink
connection (:func:`write_connection_config`). The ``cryptography`` package is imported only when
a certificate or key is made. The public import path stays :mod:`flwr_distreal.run.deploy`,
which re-exports these names.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "make_node_key_pair", "make_tls_certificates", "write_connection_config"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA and a server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_tls_certificates(
    folder: str | os.PathLike,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    valid_days: int = 2,
) -> TlsFiles:
    """A throw-away CA (``ca.crt``) and a server certificate (``server.pem``, key ``server.key``)
    for ``hosts`` (IP addresses and DNS names in the subjectAltName), written to ``folder``.

    EC P-256 keys; the CA's private key is never written. For tests and local runs only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    start, end = now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-distreal throw-away CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return files


def make_node_key_pair(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair as Flower wants it: EC P-384 (a NIST curve), the
    private key in OpenSSH format (``--auth-supernode-private-key``), the public key as an
    OpenSSH line (``flwr supernode register``). Like ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME``.

    Returns
    -------
    (private key path, public key path)
        ``folder/NAME`` and ``folder/NAME.pub``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" {name}\n".encode())
    return private, public


def write_connection_config(
    flwr_home: str | os.PathLike,
    name: str,
    address: str,
    root_certificates: str | os.PathLike | None = None,
) -> Path:
    """Write ``flwr_home/config.toml`` with one SuperLink connection ``name`` (also the default).

    ``root_certificates``: the CA that signed the SuperLink's certificate (TLS); without it the
    connection is ``insecure = true``.
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]", f"address = {json.dumps(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
