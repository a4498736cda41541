"""A throwaway PKI for the TLS tests, made with the ``cryptography`` package (the ``dev`` extra).

No system tool is needed (this replaced the openssl CLI): EC P-256 keys, certificates valid for a
day from an hour ago (clock skew), a CA with ``basicConstraints CA:TRUE``, a server certificate
for ``127.0.0.1`` and ``localhost`` (serverAuth) and a client certificate (clientAuth), both
signed by that CA, and an unrelated CA (the "wrong CA"). Used by tests/test_security.py and
tests/integration/security_tools.py (both directories are on ``sys.path``: pytest's rootdir
conftest lives in tests/).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "Pki", "issue", "key_pem", "make_ca", "make_pki", "new_key"]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, unencrypted or (with ``password``) encrypted."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def make_ca(common_name: str) -> Issued:
    """A self-signed CA certificate (may sign certificates, no intermediates)."""
    key = new_key()
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, *, server: bool = False, client: bool = False) -> Issued:
    """A leaf certificate signed by ``ca``: with ``server``, for 127.0.0.1 and localhost
    (subjectAltName) and serverAuth; with ``client``, clientAuth; neither, no key usage limits."""
    key = new_key()
    builder = _builder(common_name, ca.cert.subject, key).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate it signed (127.0.0.1 and localhost), a client
    certificate it signed, and an unrelated CA with its own key (the "wrong CA")."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_key: Path


def make_pki(directory: Path) -> Pki:
    """Generate the PEM files of :class:`Pki` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = make_ca("metricsd test CA"), make_ca("some other CA")
    server = issue(ca, "localhost", server=True)
    client = issue(ca, "metricsd", client=True)
    files = {
        "ca.pem": ca.cert_pem,
        "ca.key": ca.key_pem,
        "other-ca.pem": other.cert_pem,
        "other-ca.key": other.key_pem,
        "server.pem": server.cert_pem,
        "server.key": server.key_pem,
        "client.pem": client.cert_pem,
        "client.key": client.key_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
        other_key=directory / "other-ca.key",
    )
