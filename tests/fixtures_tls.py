"""pytest plugin: throw-away certificates for DICOM TLS tests, made once per session.

`pki` gives a CA, a server certificate for 127.0.0.1 (IP SAN, serverAuth) and a client
certificate (clientAuth) it signed, and a second CA that signed nothing of the server's.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    """A CA that signed nothing of the server's: trusting it alone must fail."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Throw-away CAs, a server certificate for 127.0.0.1 (IP SAN) and a client one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(cn: str, issuer: tuple[Any, Any] | None, *extensions: Any) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer[0].subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, False)
        return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key

    def save(stem: str, cert: Any, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    ca = issue("dicom-router test CA", None)
    other = issue("some other CA", None)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    server = issue("127.0.0.1", ca, san, server_usage)
    client = issue("ROUTER", ca, client_usage)
    return Pki(
        save("ca", *ca)[0],
        save("other-ca", *other)[0],
        *save("server", *server),
        *save("client", *client),
    )
