"""pytest plugin: throw-away certificates for TLS tests, made once per session, and a TLS
terminator to put in front of a plain peer.

`pki` gives a CA, a server certificate for 127.0.0.1 (IP SAN, serverAuth) and a client
certificate (clientAuth) it signed, and a second CA that signed nothing of the server's.
`TlsTerminator` is what nginx is at a site: HTTPS outside, the peer's plain port inside.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field
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


@dataclass
class TlsTerminator:
    """TLS on 127.0.0.1:`port` in front of a plain TCP service at 127.0.0.1:`backend`.

    With `client_ca`, a client certificate signed by it is required. `handshakes` counts
    the completed ones, `refused` the failed ones. `stop()` closes every connection.
    """

    backend: int
    cert: Path
    key: Path
    client_ca: Path | None = None
    port: int = 0
    handshakes: int = 0
    refused: list[str] = field(default_factory=list)
    _listener: socket.socket | None = field(default=None, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    _sockets: list[socket.socket] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> TlsTerminator:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(str(self.client_ca))
        self._context = context
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept)
        return self

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # stopped
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            tls = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.refused.append(str(exc))
            raw.close()
            return
        with self._lock:
            self.handshakes += 1
        try:
            inner = socket.create_connection(("127.0.0.1", self.backend), timeout=30)
        except OSError:
            tls.close()
            return
        with self._lock:
            self._sockets += [tls, inner]
        self._spawn(self._pump, inner, tls)
        self._pump(tls, inner)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in [s for s in (self._listener,) if s is not None] + sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(timeout=5)
