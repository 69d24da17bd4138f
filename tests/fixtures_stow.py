"""pytest plugin: a STOW-RS service of the tests' own, on 127.0.0.1, that misbehaves on request.

Orthanc's DICOMweb plugin is the real peer; this one does what Orthanc will not do when
asked: refuse chosen instances in FailedSOPSequence, answer a scripted status (503 then
200, 401, 429 with Retry-After), refuse bodies above a size with 413, store an instance
and leave it out of its answer, break the connection on a chosen instance, check HTTP
basic, bearer and OAuth2 client-credentials authentication (with tokens that expire).

It counts what it stored per SOPInstanceUID (every receipt, so duplicates show) and keeps
every request's framing: a chunked request is answered 200 with nothing stored, as Orthanc
did (dicomweb-client issue #42), so a test that stores anything proves it had a length.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydicom import dcmread

HOST = "127.0.0.1"
ROOT = "/dicom-web"


@dataclass
class StowRequest:
    """One request as the service saw it."""

    path: str
    content_length: int | None
    chunked: bool
    uids: list[str]
    """SOPInstanceUIDs of its parts, in order ('' for a part that is not DICOM)."""
    authorization: str | None
    status: int = 0
    """What it was answered (0: the connection was broken off)."""


@dataclass
class StowServer:
    """The service and what it is told to do; set the behaviour fields before sending."""

    refuse: dict[str, int] = field(default_factory=dict)
    """SOPInstanceUID -> FailureReason: listed in FailedSOPSequence, not stored."""
    warn: dict[str, int] = field(default_factory=dict)
    """SOPInstanceUID -> WarningReason: stored, listed with it."""
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    """Answers for the next requests, in order (status, headers), nothing stored."""
    always: int | None = None
    """Answer every STOW request with this status, nothing stored."""
    omit_once: set[str] = field(default_factory=set)
    """Stored, but left out of the answer the first time each is received."""
    max_body: int | None = None
    """Bodies longer than this are answered 413, nothing stored."""
    break_on: set[str] = field(default_factory=set)
    """A request holding one of these is not answered: the connection is closed."""
    answer_xml: bool = False
    delay: float = 0.0
    """Seconds before each STOW answer."""
    user: tuple[str, str] | None = None
    bearer: str | None = None
    oauth2: tuple[str, str, float] | None = None
    """(client id, client secret, token lifetime in seconds): tokens from POST /token."""

    counts: Counter[str] = field(default_factory=Counter)
    requests: list[StowRequest] = field(default_factory=list)
    token_requests: int = 0
    expired_tokens_seen: int = 0
    port: int = 0
    _tokens: dict[str, float] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The service root: what a destination's URL is."""
        return f"http://{HOST}:{self.port}{ROOT}"

    @property
    def stow_requests(self) -> list[StowRequest]:
        return [r for r in self.requests if r.path.endswith("/studies")]

    def start(self) -> StowServer:
        server = self

        class Handler(_Handler):
            stow = server

        self._httpd = _Quiet((HOST, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- what the handler asks -------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self.user is not None:
            pair = base64.b64encode(":".join(self.user).encode()).decode()
            return header == f"Basic {pair}"
        if self.bearer is not None:
            return header == f"Bearer {self.bearer}"
        if self.oauth2 is not None:
            token = (header or "").removeprefix("Bearer ")
            with self._lock:
                expires = self._tokens.get(token)
                if expires is not None and expires < time.monotonic():
                    self.expired_tokens_seen += 1
                    return False
            return expires is not None
        return True

    def issue_token(self, header: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        assert self.oauth2 is not None
        client_id, secret, lifetime = self.oauth2
        with self._lock:
            self.token_requests += 1
        pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        if header != f"Basic {pair}" or b"grant_type=client_credentials" not in body:
            return 401, {"error": "invalid_client", "error_description": "who are you?"}
        token = secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = time.monotonic() + lifetime
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection broken off on purpose (break_on) is no error here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stow: StowServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests assert on `requests`

    def _body(self) -> tuple[bytes, int | None, bool]:
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data), None, True
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length), length, False

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        stow = self.stow
        body, length, chunked = self._body()
        auth = self.headers.get("Authorization")
        if self.path == "/token" and stow.oauth2 is not None:
            status, answer = stow.issue_token(auth, body)
            stow.requests.append(StowRequest(self.path, length, chunked, [], None, status))
            self._answer(status, json.dumps(answer).encode(), {"Content-Type": "application/json"})
            return
        parts = _parts(body, self.headers.get("Content-Type") or "")
        uids = [uid for uid, _ in parts]
        request = StowRequest(self.path, length, chunked, uids, auth)
        stow.requests.append(request)
        if self.path != f"{ROOT}/studies":
            request.status = 404
            self._answer(404, b"no such resource")
            return
        if not stow.authorized(auth):
            request.status = 401
            self._answer(401, b"", {"WWW-Authenticate": 'Basic realm="stow"'})
            return
        if stow.delay:
            time.sleep(stow.delay)
        if stow.always is not None:
            request.status = stow.always
            self._answer(stow.always, b"go away")
            return
        if stow.script:
            status, headers = stow.script.pop(0)
            if status != 200:
                request.status = status
                self._answer(status, b"not now", headers)
                return
        if stow.max_body is not None and (length or len(body)) > stow.max_body:
            request.status = 413
            self._answer(413, b"too big")
            return
        if stow.break_on & set(uids):
            self.close_connection = True
            self.connection.shutdown(2)  # no answer: the client sees the connection end
            return
        if chunked:  # what Orthanc did with a chunked body: 200, nothing stored
            request.status = 200
            self._answer(200, _dataset({}, xml=stow.answer_xml))
            return
        stored, failed = [], []
        for uid, sop_class in parts:
            if not uid:
                continue  # not DICOM: left out, as Orthanc does
            if uid in stow.refuse:
                failed.append((uid, sop_class, stow.refuse[uid]))
                continue
            with stow._lock:
                stow.counts[uid] += 1
                first = uid not in stow._seen
                stow._seen.add(uid)
            if uid in stow.omit_once and first:
                continue
            stored.append((uid, sop_class, stow.warn.get(uid)))
        status = 200 if not failed else 202 if stored else 409
        request.status = status
        answer = _dataset(
            {
                "00081199": [
                    {"00081150": ("UI", c), "00081155": ("UI", u)}
                    | ({"00081196": ("US", w)} if w is not None else {})
                    for u, c, w in stored
                ],
                "00081198": [
                    {"00081150": ("UI", c), "00081155": ("UI", u), "00081197": ("US", r)}
                    for u, c, r in failed
                ],
            },
            xml=stow.answer_xml,
        )
        self._answer(status, answer, {"Content-Type": "application/dicom+json"})


def _parts(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """(SOPInstanceUID, SOPClassUID) of each part ('' for one that is not DICOM)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return []
    delimiter = b"--" + match.group(1).encode()
    found = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        payload = payload.removesuffix(b"\r\n")
        try:
            ds = dcmread(io.BytesIO(payload), stop_before_pixels=True)
            found.append((str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
        except Exception:
            found.append(("", ""))
    return found


def _dataset(sequences: dict[str, list[dict[str, tuple[str, Any]]]], *, xml: bool) -> bytes:
    if not xml:
        data = {
            tag: {
                "vr": "SQ",
                "Value": [
                    {t: {"vr": vr, "Value": [v]} for t, (vr, v) in item.items()} for item in items
                ],
            }
            for tag, items in sequences.items()
        }
        return json.dumps(data).encode()
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<NativeDicomModel>"]
    for tag, items in sequences.items():
        lines.append(f'<DicomAttribute tag="{tag}" vr="SQ">')
        for n, item in enumerate(items, start=1):
            lines.append(f'<Item number="{n}">')
            for t, (vr, v) in item.items():
                lines.append(
                    f'<DicomAttribute tag="{t}" vr="{vr}"><Value number="1">{v}</Value>'
                    "</DicomAttribute>"
                )
            lines.append("</Item>")
        lines.append("</DicomAttribute>")
    lines.append("</NativeDicomModel>")
    return "\n".join(lines).encode()


@pytest.fixture
def stow_server() -> Iterator[Callable[..., StowServer]]:
    """Start STOW-RS services of the tests' own: `stow_server(refuse={uid: 0xC000}, ...)`."""
    started: list[StowServer] = []

    def start(**behaviour: Any) -> StowServer:
        server = StowServer(**behaviour).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
