"""STOW-RS: one of the two ways a file leaves the box (`router.transport`).

Files go in multipart/related requests to `URL/studies`, each of at most
`instances_per_request` instances and `bytes_per_request` bytes (a bigger file goes alone),
in the job's order, each request's body streamed from the files as they are on disk (no
pydicom, no re-encoding, no pixel decoding: `router.dicomweb`) with a Content-Length. The
answer is read instance by instance: an instance counts as stored only when the answer
lists it in its ReferencedSOPSequence; one in FailedSOPSequence is refused with its
FailureReason, which counts as a C-STORE status would (0xA7xx: retried; others: final).

What the HTTP status says (PS3.18 10.5.3):

- 200, 202, 409, and a 400 that lists instances (Orthanc answers 400 when one part of a
  request cannot be read, listing the others as stored): per instance, as above. An
  instance the answer does not list was not stored: after a 200 or 202 it is reported
  without an answer (status None, retried; a resend is a possible duplicate), after a 409
  or 400 as refused (permanent).
- 413: the request was too big; it is split in halves and sent again, and a file that is
  too big alone is refused (permanent).
- 408, 429, 5xx, and a connection that cannot be made: transient (`SendError`). A 429 or
  503 with a short Retry-After is waited for and the request sent again, twice at most.
- A request that breaks off (reset, closed, no answer within the DIMSE time-out): its
  files are reported without an answer and put aside, the next request goes on; at the end
  each file put aside is sent again alone, and one that breaks that request too fails
  alone, for good. Bounded as C-STORE is (`router.send`): two broken requests in a row
  or `MAX_BROKEN` in a run give the destination up, as a transient failure.
- 3xx (redirects are not followed: the allow-list checks where data goes), 401, 403,
  404, 405, 415 and other 4xx: permanent (`SendError`), naming what to check.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import httpx

from router import tlsconf
from router.dicomweb import (
    Answer,
    BadAnswer,
    FileChanged,
    MultipartBody,
    Part,
    parse_answer,
    reason_text,
)
from router.model import (
    STORED_STATUSES,
    DicomFile,
    SendError,
    StoreResult,
    Timeouts,
    TlsOptions,
    WebEndpoint,
)
from router.webauth import Credentials

log = logging.getLogger(__name__)

# httpx logs every request at INFO; this module logs what matters, in the router's words.
for _name in ("httpx", "httpcore"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

MAX_BROKEN = 5
"""Requests of one run that may break off before the run gives the destination up."""

NO_PROGRESS = 2
"""Requests in a row that may break off before the destination is given up."""

MAX_RETRY_AFTER = 30.0
"""Longest Retry-After (429, 503) waited for within an attempt; longer: a transient
failure, retried after the retry delay."""

RETRY_AFTER_WAITS = 2
"""Retry-After waits per request within an attempt."""

_PERMANENT_HINTS = {
    401: "the destination refuses our credentials",
    403: "the destination does not allow us to store",
    404: "there is no STOW-RS service there: check URL (the DICOMweb service root)",
    405: "the destination does not take STOW-RS requests there: check URL",
    406: "the destination answers in neither DICOM JSON nor XML",
    411: "the destination wants a Content-Length (it had one)",
    415: "the destination does not take multipart/related application/dicom",
}


class _Broken(Exception):
    """The request broke off before an answer (reset, closed, time-out)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StowSender:
    """A run of files in STOW-RS requests to one DICOMweb service: a link of `router.transport`."""

    def __init__(
        self,
        endpoint: WebEndpoint,
        timeouts: Timeouts,
        on_result: Callable[[StoreResult], None],
        label: str = "",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.on_result = on_result
        self.label = label
        self.sleep = sleep
        self.url = endpoint.url + "/studies"
        self.max_files = endpoint.instances_per_request or timeouts.instances_per_request
        self.max_bytes = endpoint.bytes_per_request or timeouts.bytes_per_request
        self.requests = 0
        self.broken = 0
        self.broken_in_a_row = 0
        self.aside: list[tuple[DicomFile, str]] = []
        """Files of requests that broke off, with why: sent again alone at the end."""
        self.first_reasons: dict[str, str] = {}
        self.current: str | None = None
        """The id of the request in flight (label + number), for the answers' `association`."""

    # -- the run -------------------------------------------------------------------------------

    def run(self, files: Sequence[DicomFile]) -> None:
        """Store `files`, reporting each answered file (`router.transport` states the contract)."""
        with self._client() as client:
            self.client = client
            self.credentials = Credentials(self.endpoint.auth, client)
            for batch in self._batches(files):
                self._send(batch)
            self._send_aside()

    def _client(self) -> httpx.Client:
        t = self.timeouts
        return httpx.Client(
            timeout=httpx.Timeout(connect=t.connect, read=t.dimse, write=t.network, pool=t.connect),
            verify=self._tls(),
            follow_redirects=False,
            trust_env=False,  # no proxy or .netrc from the environment: data goes to URL
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    def _tls(self) -> ssl.SSLContext | bool:
        if not self.url.lower().startswith("https://"):
            # never used; httpx would otherwise load certifi's bundle (~0.1 s per client)
            return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:  # without `tls`: the system's CAs, verified, as for DICOM TLS
            return tlsconf.client_context(self.endpoint.tls or TlsOptions())
        except (OSError, ValueError) as exc:
            raise SendError(f"TLS set-up for {self.url} failed: {exc}", transient=False) from exc

    def _batches(self, files: Sequence[DicomFile]) -> Iterator[list[Part]]:
        """Consecutive runs of at most `max_files` files and `max_bytes` (one bigger file
        goes alone); a file that cannot be read is reported and left out."""
        batch: list[Part] = []
        size = 0
        for f in files:
            try:
                part = Part(f, f.path.stat().st_size)
            except OSError as exc:
                self.current = None  # between requests
                self.report(f, None, f"cannot send {f.relpath}: {exc.strerror or exc}")
                continue
            if batch and (len(batch) >= self.max_files or size + part.size > self.max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(part)
            size += part.size
        if batch:
            yield batch

    def report(self, f: DicomFile, status: int | None, error: str | None, **kw: Any) -> None:
        self.on_result(StoreResult(f, status, error, association=self.current, **kw))

    # -- one request ---------------------------------------------------------------------------

    def _send(self, parts: list[Part], *, alone: bool = False) -> None:
        """Send `parts` in one request and report each file; split on 413."""
        waits = 0
        renewed = False
        while parts:
            try:
                response = self._post(parts)
            except FileChanged as exc:
                f = exc.file
                self.report(f, None, f"cannot send {f.relpath}: {exc.detail}")
                parts = [p for p in parts if p.file is not f]
                continue  # the others at once, in a new request
            except _Broken as broken:
                self._broken(parts, broken.reason, alone=alone)
                return
            status = response.status_code
            if status == 401 and not renewed and self.credentials.renew():
                renewed = True
                continue
            if status in (429, 503) and waits < RETRY_AFTER_WAITS:
                delay = _retry_after(response)
                if delay is not None and delay <= MAX_RETRY_AFTER:
                    waits += 1
                    log.warning(
                        "%s: HTTP %d, retry after %g s: request sent again then",
                        self.url,
                        status,
                        delay,
                    )
                    self.sleep(delay)
                    continue
            if status == 413 and len(parts) > 1:
                half = len(parts) // 2
                log.warning(
                    "%s: HTTP 413 for %d instances (%d bytes): split in two",
                    self.url,
                    len(parts),
                    sum(p.size for p in parts),
                )
                self._send(parts[:half], alone=alone)
                self._send(parts[half:], alone=alone)
                return
            self._answered(parts, response)
            return

    def _post(self, parts: list[Part]) -> httpx.Response:
        """One request; `_Broken` if it broke off, SendError if it could not be made."""
        body = MultipartBody(parts)
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(body.length),
            "Accept": "application/dicom+json",
            **self.credentials.header(),
        }
        self.requests += 1
        self.current = f"{self.label}{self.requests}"
        started = False

        def stream() -> Iterator[bytes]:
            nonlocal started
            started = True
            yield from body

        try:
            return self.client.post(self.url, content=stream(), headers=headers)
        except httpx.ConnectTimeout as exc:
            raise SendError(
                f"no connection to {self._where()} within {self.timeouts.connect:g} s "
                "(connect time-out)",
                transient=True,
            ) from exc
        except httpx.ConnectError as exc:
            raise self._connect_failure(exc) from exc
        except httpx.TimeoutException as exc:
            raise _Broken(
                f"no STOW-RS answer from {self.url} within {self.timeouts.dimse:g} s "
                "(DIMSE time-out)"
                if isinstance(exc, httpx.ReadTimeout)
                else f"request to {self.url} timed out: {type(exc).__name__}"
            ) from exc
        except (httpx.TransportError, OSError) as exc:
            # TLS 1.3: a server refuses our certificate after the handshake, in an alert
            # that arrives while the request goes out or its answer is awaited.
            tls = tlsconf.failure(self._where(), _root(exc))
            if tls is not None:
                raise SendError(tls, transient=False) from exc
            if not started:
                raise SendError(
                    f"cannot send to {self._where()}: {_why(exc)}", transient=True
                ) from exc
            raise _Broken(f"request to {self.url} broke off: {_why(exc)}") from exc

    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    def _connect_failure(self, exc: httpx.ConnectError) -> SendError:
        where, cause = self._where(), _root(exc)
        tls = tlsconf.failure(where, cause)
        if tls is not None:
            return SendError(tls, transient=False)
        if isinstance(cause, ConnectionRefusedError):
            return SendError(f"connection refused by {where}", transient=True)
        if isinstance(cause, socket.gaierror):
            return SendError(
                f"cannot resolve host {self.endpoint.host!r}: {cause.strerror or cause}",
                transient=True,
            )
        return SendError(f"cannot connect to {where}: {_why(exc)}", transient=True)

    # -- the answer ----------------------------------------------------------------------------

    def _answered(self, parts: list[Part], response: httpx.Response) -> None:
        status = response.status_code
        label = f"HTTP {status} {response.reason_phrase}".strip()
        answer: Answer | None = None
        problem = None
        if status in (200, 202, 400, 409):
            try:
                answer = parse_answer(response.content)
            except BadAnswer as exc:
                problem = str(exc)
        if answer is not None and (status != 400 or answer.lists_any):
            self.broken_in_a_row = 0
            self._per_instance(parts, answer, status, label)
            return
        if status in (200, 202):  # an answer that cannot be read stores nothing we can see
            self.broken_in_a_row = 0
            why = f"{label}, but {problem}: not counted as stored"
            for p in parts:
                self.report(p.file, None, why)
            return
        if status == 413:  # one file alone, too big for the destination
            f = parts[0].file
            self.report(
                f,
                None,
                f"{label}: the destination takes no request of {parts[0].size} bytes "
                "(this file alone)",
                permanent=True,
            )
            return
        text = _body_text(response)
        if 300 <= status < 400:
            where = response.headers.get("location", "elsewhere")
            raise SendError(
                f"{label} from {self.url}: redirected to {where}, which is not followed "
                "(the allow-list checks URL): set URL to the service root it names",
                transient=False,
            )
        if status in (408, 429) or status >= 500:
            after = _retry_after(response)
            when = f" (asks to retry after {after:g} s)" if after is not None else ""
            if status >= 500:  # it may have stored some: a resend is a possible duplicate
                for p in parts:
                    self.report(p.file, None, f"{label} from {self.url}{text}")
            raise SendError(f"{label} from {self.url}{when}{text}", transient=True)
        hint = _PERMANENT_HINTS.get(status, "the destination refuses the request")
        if status == 401:
            hint += f" ({self.credentials.describe})"
        raise SendError(f"{label} from {self.url}: {hint}{text}", transient=False)

    def _per_instance(self, parts: list[Part], answer: Answer, status: int, label: str) -> None:
        for p in parts:
            f = p.file
            uid = f.sop_instance_uid
            if uid in answer.failed:
                reason = answer.failed[uid]
                code = 0xC000 if reason is None else reason
                why = (
                    f"STOW-RS refused it ({label}): FailureReason {reason_text(reason)}"
                    if reason is not None
                    else f"STOW-RS refused it ({label}), giving no FailureReason"
                )
                self.report(f, code, why)
            elif uid in answer.stored:
                warning = answer.stored[uid]
                if warning is not None and warning not in STORED_STATUSES:
                    log.warning("%s: %s stored with WarningReason 0x%04X", self.url, uid, warning)
                code = warning if warning in STORED_STATUSES else 0x0000
                self.report(f, code, None)
            elif status in (200, 202):
                self.report(
                    f,
                    None,
                    f"the destination answered {label} without listing this instance: "
                    "not counted as stored",
                )
            else:
                listed = len(answer.stored) + len(answer.failed)
                self.report(
                    f,
                    None,
                    f"{label}: the destination's answer does not list this instance (it lists "
                    f"{listed} of the {len(parts)} in the request): not stored",
                    permanent=True,
                )

    # -- requests that broke off ---------------------------------------------------------------

    def _broken(self, parts: list[Part], reason: str, *, alone: bool) -> None:
        if alone:
            f = parts[0].file
            first = self.first_reasons.get(f.sop_instance_uid, reason)
            self.report(
                f,
                None,
                "the request broke off twice while sending this file (sent with the others: "
                f"{first}; then alone: {reason})",
                permanent=True,
            )
            return
        self.broken += 1
        self.broken_in_a_row += 1
        for p in parts:
            self.report(p.file, None, reason)
            self.aside.append((p.file, reason))
        if self.broken_in_a_row >= NO_PROGRESS:
            raise SendError(
                f"{reason} ({self.broken_in_a_row} requests in a row broke off)", transient=True
            )
        if self.broken >= MAX_BROKEN:
            raise SendError(
                f"{reason} ({self.broken} requests broke off in one run)", transient=True
            )
        log.warning(
            "%s: %s; its %d file(s) are sent again alone at the end", self.url, reason, len(parts)
        )

    def _send_aside(self) -> None:
        """Send each file of a request that broke off again, alone."""
        aside, self.aside = self.aside, []
        self.first_reasons = {f.sop_instance_uid: why for f, why in aside}
        for f, _ in aside:
            try:
                part = Part(f, f.path.stat().st_size)
            except OSError as exc:
                self.current = None
                self.report(f, None, f"cannot send {f.relpath}: {exc.strerror or exc}")
                continue
            self._send([part], alone=True)


def _root(exc: BaseException) -> BaseException:
    """The innermost cause of `exc` (httpx wraps httpcore, which wraps the OS's error)."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return seen


def _why(exc: BaseException) -> str:
    cause = _root(exc)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _body_text(response: httpx.Response) -> str:
    """A short excerpt of an error answer's text, for the reason (never our request)."""
    try:
        text = response.text.strip()
    except (UnicodeDecodeError, LookupError):
        return ""
    if not text or (text.startswith(("<", "{")) and len(text) > 200):
        return ""
    text = " ".join(text.split())
    return f": the destination says: {text[:200]}"
