"""C-STORE: one of the two ways a file leaves the box (`router.transport`), streamed from disk.

The caller (the routing step) keeps the crash-safe record: this module reports every
answered file through `on_result` the moment its answer is known and raises `SendError`
when the destination cannot be reached or keeps breaking associations. Files it never
attempted are not reported, so the caller retries exactly what is missing. One file that
makes the destination abort (or reset, or never answer) costs a new association for the
files after it and one to try it again alone, not the whole destination (`CStoreSender`).

pynetdicom as shipped sends ~50 images/s over loopback. This module uses pynetdicom for
what it does well (negotiating, releasing and aborting associations, TLS, sending the
occasional converted data set) and does the C-STORE exchange of files itself
(`router.dimse`): with the association's reactor parked and its DUL thread kept off the
socket, the sending thread writes each file's bytes framed into PDUs and reads the
response. With TCP_NODELAY and TCP_QUICKACK on the socket, one association then carries
CT images of 0.5 MB over loopback on two cores at 1.0-1.2x dcmtk's storescu's rate
(medians, bench/), about 0.5 ms of CPU per image (1.5-1.8 ms through pynetdicom's path).
Parking the reactor and keeping the DUL thread off the socket touch pynetdicom 3.0
internals (underscore names); the tests exercise them against pynetdicom's SCP, dcmtk's
storescp and Orthanc, and `DIRECT_DATA = False` falls back to pynetdicom's own path.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom._config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pynetdicom import AE, build_context, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket

from router import dimse, tlsconf
from router.model import STORED_STATUSES, DicomFile, Endpoint, SendError, StoreResult, Timeouts

# With this flag, `send_c_store(path)` sends the file's data set bytes as they are on disk
# instead of decoding it with dcmread and encoding it again: 1.6x faster, 40% less CPU, and
# what arrives is byte-identical to the job's file. pynetdicom reads it only from this
# module-level switch (there is no per-association option), so it is set once, at import.
# Its effect on any other `send_c_store(path)` in the process: the peer must have accepted a
# context with exactly the file's transfer syntax (no conversion), which this module ensures.
pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True

log = logging.getLogger(__name__)

# pynetdicom logs every association at INFO. Quiet it unless the application has chosen a
# level for it; this module logs what matters, in the router's words.
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

_THREAD_NAME = "dicom-router-association"
"""Prefix of the names of our associations' pynetdicom threads (see `_ReportedHere`)."""

_REPORTED_HERE = (
    "Association request failed: unable to connect to remote",
    "TCP Initialisation Error: ",
    "Association Rejected",
    "Result: ",
    "Reason: ",
    "No accepted presentation contexts",
    "Association Aborted",
)
"""Beginnings of pynetdicom's ERROR lines about failures this module reports itself."""


_requesting: ContextVar[bool] = ContextVar("dicom_router_requesting", default=False)
"""True in a thread while it waits in `AE.associate` for one of our associations."""


class _ReportedHere(logging.Filter):
    """Drops pynetdicom's ERROR lines about a failed association of ours ("Association
    Rejected", "Result: ...", "Reason: ..."): `SendError` says the same in one sentence
    that names the destination, and the doubled lines only make a log harder to read.
    Records of other associations (pynetdicom used by other code) pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = (record.threadName or "").startswith(_THREAD_NAME) or _requesting.get()
        if not ours:
            return True
        return record.levelno != logging.ERROR or not record.getMessage().startswith(_REPORTED_HERE)


for _logger_name in ("pynetdicom.acse", "pynetdicom.transport"):
    logging.getLogger(_logger_name).addFilter(_ReportedHere())

MAX_CONTEXTS = 128
"""Presentation contexts per association: context IDs are the odd numbers 1..255."""

DUL_LOOP_DELAY = 0.0002
"""pynetdicom's DUL thread sleeps this long when idle (1 ms as shipped): the latency it adds
to every PDU exchange is what limits one association's rate (PERF-NOTES: 254 → 342 img/s)."""

QUICKACK = hasattr(socket, "TCP_QUICKACK")
"""Acknowledge at once on every receive (Linux): a peer that leaves Nagle on (dcmtk without
TCP_NODELAY=1, Orthanc as packaged) otherwise holds each response until our delayed ACK."""

DIRECT_DATA = True
"""Do the C-STORE exchange of files on the socket from the sending thread
(`router.dimse`) instead of through pynetdicom's DIMSE and DUL layers."""

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""What a file the peer takes in no proposed context is converted to (the peer picks)."""

_JPEG, _JPEG_LS, _J2K, _HTJ2K, _JXL = (
    "ISO_10918_1",
    "ISO_14495_1",
    "ISO_15444_1",
    "ISO_15444_15",
    "ISO_18181_1",
)
_LOSSY = {
    JPEGBaseline8Bit: _JPEG,
    JPEGExtended12Bit: _JPEG,
    "1.2.840.10008.1.2.4.111": _JXL,  # JPEG XL JPEG Recompression: a lossy JPEG inside
}
"""Syntaxes whose pixel data is always lossy, with the LossyImageCompressionMethod term."""
_MAYBE_LOSSY = {
    JPEGLSNearLossless: _JPEG_LS,
    JPEG2000: _J2K,
    JPEG2000MC: _J2K,
    HTJ2K: _HTJ2K,
    "1.2.840.10008.1.2.4.112": _JXL,  # JPEG XL
}
"""Syntaxes that may be lossy or not: lossy unless the file says LossyImageCompression 00."""

_PARK_SETTLE = 0.003
"""Seconds to re-check that the reactor really sits in its wait (its loop sleeps 1 ms)."""

_DUL_OFF_WAIT = 0.05
"""While the sending thread owns the socket, the DUL thread checks back this often."""

_DUL_STOP_WAIT = 1.0
"""Longest wait for the DUL to register a connection the peer broke (see `_owned_socket`)."""


# -- pynetdicom plumbing, confined to our own associations -----------------------------------


@dataclass
class _Conn:
    """How the TCP (and TLS) connection of one association went; shared by its sockets."""

    network_timeout: float | None
    connected: bool = False
    error: OSError | None = None


class _Tracked:
    """What our TCP and TLS sockets add: why connect() failed, a network time-out that
    pynetdicom cannot clear, and an acknowledgement on every read (TCP_QUICKACK)."""

    conn: _Conn

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)  # type: ignore[misc]  # TLS: TCP, then the handshake
        except OSError as exc:
            self.conn.error = exc
            raise
        self.conn.connected = True

    def settimeout(self, value: float | None) -> None:
        # pynetdicom clears the time-out after connecting, so a peer that stops mid-PDU
        # would block the DUL thread (and our abort of it) forever; keep the network one.
        timeout = self.conn.network_timeout if value is None else value
        super().settimeout(timeout)  # type: ignore[misc]

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        if QUICKACK:
            self.setsockopt(  # type: ignore[attr-defined]
                socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1
            )
        try:
            return super().recv(bufsize, flags)  # type: ignore[misc,no-any-return]
        except ssl.SSLError as exc:
            # With TLS 1.3 a server refuses our certificate only after the handshake, in
            # an alert that arrives here: keep it to say why the association failed.
            self.conn.error = exc
            raise


class _TcpSocket(_Tracked, socket.socket):
    """The association's TCP socket (see `_Tracked`)."""

    def __init__(self, family: int, conn: _Conn) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.conn = conn


class _TlsSocket(_Tracked, ssl.SSLSocket):
    """The TLS socket pynetdicom wraps around a `_TcpSocket` (see `_Tracked`)."""

    @classmethod
    def _create(cls, sock: socket.socket, *args: Any, **kwargs: Any) -> _TlsSocket:
        conn = sock.conn if isinstance(sock, _TcpSocket) else _Conn(sock.gettimeout())
        tls = super()._create(sock, *args, **kwargs)  # type: ignore[misc]
        tls.conn = conn
        return tls


class _AssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper around a `_TcpSocket` with TCP_NODELAY set.

    Also collects the ACSE primitives received, so a failed negotiation can be described,
    and keeps pynetdicom's DUL thread off the connection while the sending thread owns it.
    """

    tcp: _TcpSocket
    conn: _Conn
    acse_received: list[Any]
    free: threading.Event
    """Clear while the sending thread does the C-STORE exchange itself (`_owned_socket`)."""
    handover: threading.Lock
    """Held by the DUL thread while it looks for data, and by the sending thread while it
    takes the connection: the DUL thread must not see `free` set, lose the processor, and
    then find (and read) the answer to the C-STORE the sending thread sent meanwhile."""

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        # Same as pynetdicom's, with Nagle off: it otherwise stalls each PDU by up to 40 ms.
        self.acse_received = []
        self.free = threading.Event()
        self.free.set()
        self.handover = threading.Lock()
        self.conn = _Conn(self.assoc.network_timeout)
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _TcpSocket(family, self.conn)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        self.tcp = sock
        return sock

    @property
    def ready(self) -> bool:
        """Whether data waits for the DUL thread; never while the sending thread owns it.

        The DUL thread asks this every loop turn. While owned, it is held here (up to
        `_DUL_OFF_WAIT` a turn) instead of spinning, and told there is nothing to read.
        """
        with self.handover:
            if self.free.is_set():
                return bool(super().ready)
        self.free.wait(_DUL_OFF_WAIT)
        return False


class _Checkpoint(threading.Event):
    """Replaces an association's reactor checkpoint so the reactor can stay parked.

    A requestor's reactor thread wakes up between two `send_c_store()` calls, and may take
    the next C-STORE response off the DIMSE queue before `send_c_store()` does: the response
    is lost, the DIMSE time-out expires and the association is aborted (pynetdicom #435,
    #351; 13 in 96,700 sends here). `send_c_store()` also spins up to 1 ms per file for the
    reactor to pause again. While `parked`, `set()` is ignored unless pynetdicom is aborting
    or killing the association, so the reactor waits from our first request to our last.
    `started` tells whether `send_c_store()` got as far as sending (it clears the checkpoint
    right before the first PDU).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc
        self.parked = False
        self.started = False
        super().set()

    def set(self) -> None:
        if not self.parked or self._assoc._sent_abort or self._assoc._kill:
            super().set()

    def clear(self) -> None:
        self.started = True
        super().clear()


_DEBUG_HANDLERS = (
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
)


class _AE(AE):
    """Application entity whose associations get the socket and reactor tuning above."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY
        assoc._reactor_checkpoint = _Checkpoint(assoc)
        assoc.name = f"{_THREAD_NAME}-{assoc.name}"
        assoc.dul.name = f"{_THREAD_NAME}-dul-{assoc.dul.name}"
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's per-PDU and per-message debug loggers run for every one of the
            # ~32 PDUs of a 0.5 MB image even when nothing is logged.
            for event, handler in _DEBUG_HANDLERS:
                assoc.unbind(event, handler)
        sock = _AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _tls_args(endpoint: Endpoint) -> tuple[ssl.SSLContext, str] | None:
    """The client TLS context for `endpoint.tls`; SendError (permanent) if it can't be made."""
    options = endpoint.tls
    if options is None:
        return None
    try:
        context = tlsconf.client_context(options)
    except (OSError, ValueError) as exc:
        raise SendError(f"TLS set-up for {endpoint.key} failed: {exc}", transient=False) from exc
    context.sslsocket_class = _TlsSocket
    return context, endpoint.host


def _make_ae(endpoint: Endpoint, timeouts: Timeouts) -> _AE:
    ae = _AE(ae_title=endpoint.calling_aet)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = timeouts.max_pdu
    return ae


def _link(assoc: Association) -> _AssociationSocket:
    return assoc.dul.socket  # type: ignore[return-value]


def _on_acse_recv(event: evt.Event) -> None:
    _link(event.assoc).acse_received.append(event.primitive)


@contextmanager
def _parked_reactor(assoc: Association) -> Iterator[_Checkpoint]:
    """Park the association's reactor for the duration (see `_Checkpoint`)."""
    checkpoint: _Checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    for _ in range(2):  # twice: it may have just left its wait when we first looked
        deadline = time.monotonic() + 1.0
        while not assoc._is_paused and assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0001)
        time.sleep(_PARK_SETTLE)
    checkpoint.parked = True
    try:
        yield checkpoint
    finally:
        checkpoint.parked = False
        checkpoint.set()


@contextmanager
def _owned_socket(assoc: Association, timeouts: Timeouts) -> Iterator[dimse.StoreChannel]:
    """The association's connection, for the sending thread alone (reactor parked).

    pynetdicom's DUL thread stays off the socket meanwhile (`_AssociationSocket.ready`) and
    sees none of the PDUs, so on the way out its network idle timer is restarted, and a
    connection the peer aborted or closed is reported to its state machine as closed
    (Evt17, as its own socket code does), which brings it back to idle.
    """
    link = _link(assoc)
    channel = dimse.StoreChannel(link.socket, assoc.acceptor.maximum_length, timeouts.dimse)
    with link.handover:  # the DUL thread is not between seeing it free and looking at it
        link.free.clear()  # nothing is due from the peer now: we have asked for nothing yet
    try:
        yield channel
    finally:
        assoc.dul._idle_timer.restart()
        if channel.lost:
            assoc.dul.event_queue.put("Evt17")
        link.free.set()
        deadline = time.monotonic() + _DUL_STOP_WAIT
        while channel.lost and assoc.dul.state_machine.current_state != "Sta1":
            if time.monotonic() > deadline or not assoc.dul.is_alive():
                break
            time.sleep(0.001)


def _close(assoc: Association, *, release: bool, timeouts: Timeouts) -> None:
    """Release (or abort) and make sure pynetdicom's threads end."""
    if assoc.is_established and not assoc.acse.is_aborted():
        if release:
            assoc.release()
        else:
            assoc.abort()
    if assoc.is_established or assoc.dul.is_alive():
        assoc.abort()
    if assoc.dul.is_alive() or assoc.is_alive():
        assoc.kill()
    for thread in (assoc, assoc.dul):
        if thread.is_alive():
            thread.join(timeout=max(1.0, timeouts.acse or 0))


# -- describing what happened ----------------------------------------------------------------


def _secs(value: float | None) -> str:
    return "ever" if value is None else f"{value:g} s"


def _name(uid: str) -> str:
    return UID(uid).name


def _mark_lossy(ds: Dataset, syntax: str, stated: str | None) -> None:
    """Keep a decoded lossy image marked lossy: LossyImageCompression 01 and its method.

    `stated` is what the file said before decoding. A syntax that may be lossless counts
    as lossy unless the file says 00.
    """
    method = _LOSSY.get(syntax) or (_MAYBE_LOSSY.get(syntax) if stated != "00" else None)
    if method is None:
        return
    ds.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = method


def _status_text(status: int, comment: str | None) -> str:
    category = code_to_category(status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (category, ""))[1]
    if category == "Failure":
        text = f"C-STORE refused with status 0x{status:04X} (Failure: {meaning or 'unknown'})"
    else:
        label = f"{category}: {meaning}" if meaning else category
        text = f"C-STORE answered with status 0x{status:04X} ({label}), not a stored status"
    return f"{text}; peer says: {comment}" if comment else text


def _connect_failure(
    endpoint: Endpoint, exc: OSError | None, timeouts: Timeouts
) -> tuple[str, bool]:
    """Why the TCP connection or the TLS handshake failed, and whether to retry."""
    where = f"{endpoint.host}:{endpoint.port}"
    tls = tlsconf.failure(where, exc)
    if tls is not None:
        return tls, False
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}", True
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by {where}", True
    if isinstance(exc, TimeoutError):
        connect = _secs(timeouts.connect)
        return f"no TCP connection to {where} within {connect} (connect time-out)", True
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {endpoint.host!r}: {exc.strerror or exc}", True
    if exc is not None:
        return f"cannot connect to {where}: {exc.strerror or exc}", True
    return f"cannot connect to {where}", True


def _reason(text: str) -> str:
    """pynetdicom's "Called AE title not recognised" as it reads mid-sentence."""
    return text[:1].lower() + text[1:]


def _aborted_by(source: int, endpoint: Endpoint, during: str) -> str:
    who = "the peer" if source == 0 else "the peer's DICOM provider"
    return f"association aborted by {who} ({endpoint.key}) {during}"


def _dimse_timed_out(op: str, timeouts: Timeouts) -> str:
    return f"no {op} response within {_secs(timeouts.dimse)} (DIMSE time-out); association aborted"


def _abort_text(primitive: Any, endpoint: Endpoint, during: str) -> str | None:
    if isinstance(primitive, A_ABORT):
        return _aborted_by(primitive.abort_source, endpoint, during)
    if isinstance(primitive, A_P_ABORT):
        return f"connection to {endpoint.key} lost {during} (A-P-ABORT)"
    return None


# -- sending ---------------------------------------------------------------------------------


class _NoContext(Exception):
    """The peer accepted the association but none of the proposed contexts."""


class _MessageBroken(Exception):
    """A local error (file unreadable) interrupted a C-STORE after it began on the wire."""


_KINDS = {
    "aborted": "the destination aborted the association twice while receiving this file",
    "lost": "the connection to the destination was lost twice while sending this file",
    "timeout": "the destination did not answer this file twice within the DIMSE time-out",
    "protocol": "the destination answered this file twice with something other than its "
    "C-STORE response",
}
"""How a file that ended its association twice in the same way failed, in words."""


class _Broken(Exception):
    """The association ended abnormally: aborted, reset, no answer in time, a wrong answer.

    `file` was in flight (not yet reported), or None when it ended between two files.
    `send_on` adds what the caller needs to go on: the files after the one in flight,
    those to be converted, and whether the peer answered anything on this association.
    """

    def __init__(self, reason: str, kind: str, file: DicomFile | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.file = file
        self.rest: list[DicomFile] = []
        self.refused: list[DicomFile] = []
        self.answered = 0


class _TooManyBroken(Exception):
    """`MAX_BROKEN` associations of one run ended abnormally: give the destination up."""


@dataclass(frozen=True)
class _Aside:
    """A file in flight when its association ended, to be tried again alone at the end."""

    file: DicomFile
    first: _Broken
    converting: bool


MAX_BROKEN = 5
"""Associations of one run of files that may end abnormally with a file in flight before
the run gives the destination up (after trying the files put aside alone): each costs a
new association, and a stalled one the DIMSE time-out."""

NO_PROGRESS = 2
"""When this many associations in a row ended before the peer answered any file on them,
the next one starts with the run's last file instead of the next: a run of bad files goes
on, and a destination that aborts on everything (or fell over) is given up when that one
fails too: fast (3 associations), and as a transient failure, its files left for a retry."""


class CStoreSender:
    """A run of files over associations to one destination: a link of `router.transport`.

    An association that ends abnormally with a file in flight does not end the run: that
    file is put aside (reported as unanswered), the files after it go on at once over a
    new association, and once the others are done each file put aside is sent again
    alone. One that ends that association too fails alone, for good (`permanent`); the
    peer may hold it, which the record knows from the first report. `NO_PROGRESS` and
    `MAX_BROKEN` bound the new associations, so a destination that is the problem still
    fails fast and as a transient failure (`SendError`).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        on_result: Callable[[StoreResult], None],
        label: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.on_result = on_result
        self.ae = _make_ae(endpoint, timeouts)
        self.tls_args = _tls_args(endpoint)
        self.label = label
        self.made = 0
        """Associations established so far (their ids: label + number)."""
        self.current: str | None = None
        self.broken = 0
        """Associations of the main sequence that ended abnormally."""
        self.idle_in_a_row = 0
        self.aside: list[_Aside] = []

    def report(self, f: DicomFile, status: int | None, error: str | None, **kw: Any) -> None:
        self.on_result(StoreResult(f, status, error, association=self.current, **kw))

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]]) -> Association:
        """Open an association proposing `contexts` (SOP class, transfer syntaxes).

        SendError or _NoContext if it fails.
        """
        ep = self.endpoint
        self.current = None  # until this one is made
        token = _requesting.set(True)
        try:
            assoc = self.ae.associate(
                ep.host,
                ep.port,
                [build_context(sop, list(syntaxes)) for sop, syntaxes in contexts],
                ae_title=ep.called_aet,
                max_pdu=self.timeouts.max_pdu,
                tls_args=self.tls_args,
                evt_handlers=[(evt.EVT_ACSE_RECV, _on_acse_recv)],
            )
        except OSError as exc:
            # Before any connection: the host name does not resolve (socket.gaierror), or
            # no socket could be made. Transient: DNS outages end, typos are seen in the log.
            reason, transient = _connect_failure(ep, exc, self.timeouts)
            raise SendError(reason, transient=transient) from exc
        except UnicodeError as exc:  # a label of over 63 characters: no name at all
            raise SendError(f"invalid host name {ep.host!r}: {exc}", transient=False) from exc
        finally:
            _requesting.reset(token)
        if assoc.is_established:
            self.made += 1
            self.current = f"{self.label}{self.made}"
            log.debug("associated with %s, %d contexts", ep, len(contexts))
            return assoc
        try:
            raise self._association_failure(assoc)
        finally:
            _close(assoc, release=False, timeouts=self.timeouts)

    def _association_failure(self, assoc: Association) -> Exception:
        ep, link = self.endpoint, _link(assoc)
        if not link.conn.connected or isinstance(link.conn.error, ssl.SSLError):
            reason, transient = _connect_failure(ep, link.conn.error, self.timeouts)
            return SendError(reason, transient=transient)
        if not link.acse_received:
            acse = self.timeouts.acse
            return SendError(
                f"no association response from {ep.key} within {_secs(acse)} (ACSE time-out)",
                transient=True,
            )
        rsp = link.acse_received[-1]
        if isinstance(rsp, A_ASSOCIATE) and rsp.result == 0x00:
            return _NoContext()
        if isinstance(rsp, A_ASSOCIATE) and rsp.result in (0x01, 0x02):
            kind = "permanent" if rsp.result == 0x01 else "transient"
            return SendError(
                f"association rejected ({kind}) by {ep.key}: {_reason(rsp.reason_str)}",
                transient=rsp.result == 0x02,
            )
        text = _abort_text(rsp, ep, "during association negotiation")
        return SendError(text or f"association with {ep.key} failed", transient=True)

    def run(self, files: Sequence[DicomFile]) -> None:
        """Store `files`, reporting each answered file through `on_result` (`router.transport`).

        One presentation context per (SOP class, transfer syntax) pair, so the peer accepts the
        file's own syntax or nothing and the file can be streamed unchanged; one association per
        128 pairs, files in their given order. A refusal status is reported and sending goes
        on. A file the peer has no context for is converted over a second association when
        `endpoint.convert` (decoded, in an uncompressed syntax); one that still can't go, or
        that cannot be read, is reported with status None and sending goes on (permanent for
        that file). An association that ends abnormally (abort, reset, DIMSE time-out, a
        wrong answer) reports the file in flight as unanswered (status None) and the files
        after it go on over a new association; the file is sent again alone at the end and,
        if that association ends too, reported again as failed for good (`permanent`). An
        association that cannot be made, more than `NO_PROGRESS` associations in a row that
        end before any answer, or `MAX_BROKEN` that end abnormally raise `SendError`
        (transient); files not attempted are not reported. If the peer accepted none of the
        contexts, every file is reported and a permanent `SendError` is raised at the end.
        """
        pairs = list(dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in files))
        group_of = {pair: i // MAX_CONTEXTS for i, pair in enumerate(pairs)}
        members: list[list[DicomFile]] = [[] for _ in range(0, len(pairs), MAX_CONTEXTS)]
        for f in files:
            members[group_of[(f.sop_class_uid, f.transfer_syntax_uid)]].append(f)
        refused_groups: list[list[tuple[str, str]]] = []
        try:
            for g, group_files in enumerate(members):
                contexts = pairs[g * MAX_CONTEXTS : (g + 1) * MAX_CONTEXTS]
                if not self.send_group(contexts, group_files):
                    refused_groups.append(contexts)
        except _TooManyBroken as exc:
            self.send_aside()
            raise SendError(str(exc), transient=True) from None
        self.send_aside()
        if refused_groups:
            proposed = [pair for group in refused_groups for pair in group]
            classes = sorted({_name(sop) for sop, _ in proposed})
            raise SendError(
                f"{self.endpoint.key} accepted none of the {len(proposed)} presentation "
                f"contexts proposed ({', '.join(classes)})",
                transient=False,
            )

    def send_group(self, pairs: Sequence[tuple[str, str]], files: list[DicomFile]) -> bool:
        """Send `files` over one association (more after a local file error, or after the
        association ended abnormally: see the class).

        What the peer takes in none of the proposed contexts is converted when the
        destination allows it, else reported. Returns False when the peer accepted none of
        the contexts (every file then reported, or converted).
        """
        contexts = [(sop, [ts]) for sop, ts in pairs]
        pending, unaccepted, accepted_any = files, [], True
        while pending:
            try:
                assoc = self.associate(contexts)
            except _NoContext:
                unaccepted += pending
                accepted_any = False
                break
            try:
                pending, refused = self.send_on(assoc, pending)
            except _Broken as broken:
                pending, refused = self.went_wrong(broken, converting=False), broken.refused
            unaccepted += refused
        if unaccepted and self.endpoint.convert:
            return self.send_converted(unaccepted) or accepted_any
        for f in unaccepted:
            self._no_context(f)
        return accepted_any

    def send_converted(self, files: list[DicomFile]) -> bool:
        """Send `files` decoded, in an uncompressed syntax the peer takes; False if none."""
        classes = list(dict.fromkeys(f.sop_class_uid for f in files))
        pending = files
        while pending:
            try:
                assoc = self.associate([(c, _UNCOMPRESSED) for c in classes])
            except _NoContext:
                for f in pending:
                    self._no_context(f, converting=True)
                return False
            try:
                pending, _ = self.send_on(assoc, pending, converting=True)
            except _Broken as broken:
                pending = self.went_wrong(broken, converting=True)
        return True

    def went_wrong(self, broken: _Broken, *, converting: bool) -> list[DicomFile]:
        """An association of the main sequence ended abnormally: report the file in flight
        as unanswered and put it aside; return the files to go on with, or give up."""
        self.broken += 1
        self.idle_in_a_row = 0 if broken.answered else self.idle_in_a_row + 1
        f = broken.file
        if f is not None:
            self.report(f, None, broken.reason)
            self.aside.append(_Aside(f, broken, converting))
        if self.idle_in_a_row > NO_PROGRESS or (
            self.idle_in_a_row == NO_PROGRESS and not broken.rest
        ):
            raise SendError(
                f"{broken.reason} ({self.idle_in_a_row} associations in a row ended "
                "before any file on them was answered)",
                transient=True,
            )
        if self.idle_in_a_row == NO_PROGRESS:
            # Two files in a row, or a destination that takes nothing any more? The last
            # file goes first, likely not of the same run: answered, the run goes on.
            log.warning(
                "%s: %d associations in a row ended before any answer; trying %s next",
                self.endpoint.key,
                self.idle_in_a_row,
                broken.rest[-1].relpath,
            )
            broken.rest = [broken.rest[-1], *broken.rest[:-1]]
        if self.broken >= MAX_BROKEN:
            raise _TooManyBroken(
                f"{broken.reason} ({self.broken} associations ended abnormally in one run)"
            )
        where = f"while sending {f.relpath}" if f is not None else "between two files"
        log.warning(
            "%s: association ended %s (%s); %d file(s) after it go on over a new one%s",
            self.endpoint.key,
            where,
            broken.reason,
            len(broken.rest),
            f", {f.relpath} is sent again alone at the end" if f is not None else "",
        )
        return broken.rest

    def send_aside(self) -> None:
        """Send each file put aside again, alone; one that ends that association too fails
        for good, with both reasons."""
        aside, self.aside = self.aside, []
        for item in aside:
            f = item.file
            syntaxes = _UNCOMPRESSED if item.converting else [f.transfer_syntax_uid]
            try:
                assoc = self.associate([(f.sop_class_uid, syntaxes)])
            except _NoContext:
                self._no_context(f, converting=item.converting)
                continue
            try:
                left, refused = self.send_on(assoc, [f], converting=item.converting)
            except _Broken as again:
                if again.file is None:  # ended before it went: the destination's doing
                    raise SendError(again.reason, transient=True) from None
                self.report(f, None, _twice(item.first, again), permanent=True)
                log.warning("%s: %s: %s", self.endpoint.key, f.relpath, _twice(item.first, again))
                continue
            for lost in (*left, *refused):  # its context is no longer there, or unreadable
                self._no_context(lost, converting=item.converting)

    def _no_context(self, f: DicomFile, *, converting: bool = False) -> None:
        error = (
            f"no accepted presentation context for {_name(f.sop_class_uid)} "
            f"in {_name(f.transfer_syntax_uid)}"
        )
        if converting:
            error += ", nor in an uncompressed transfer syntax"
        self.report(f, None, error, permanent=True)

    def send_on(
        self, assoc: Association, files: list[DicomFile], *, converting: bool = False
    ) -> tuple[list[DicomFile], list[DicomFile]]:
        """Send `files` in order over `assoc`, and close it.

        Returns the files left when a local error broke a message (to go on with over a
        new association) and those the peer has no context for, if they are to be
        converted (otherwise they are reported here). Raises `_Broken` if the association
        ended abnormally, with what is left to send.
        """
        accepted: dict[Any, Any]  # what a file needs -> what sending it takes
        if converting:  # SOP class -> the uncompressed syntax the peer chose for it
            accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        else:  # (SOP class, syntax) -> the presentation context ID
            accepted = {
                (cx.abstract_syntax, cx.transfer_syntax[0]): cx.context_id
                for cx in assoc.accepted_contexts
            }
        msg_ids = itertools.cycle(range(1, 0x10000))
        refused: list[DicomFile] = []
        done = answered = 0
        clean = False
        try:
            with (
                _parked_reactor(assoc) as checkpoint,
                _owned_socket(assoc, self.timeouts)
                if DIRECT_DATA and not converting
                else nullcontext() as channel,
            ):
                for f in files:
                    done += 1
                    key = (
                        f.sop_class_uid if converting else (f.sop_class_uid, f.transfer_syntax_uid)
                    )
                    if key not in accepted:
                        if self.endpoint.convert and not converting:
                            refused.append(f)
                        else:
                            self._no_context(f, converting=converting)
                        continue
                    if channel is not None:
                        answered += self.stream(channel, f, accepted[key], next(msg_ids))
                        continue
                    self._check_alive(assoc)
                    payload = self._converted(f) if converting else f.path
                    if payload is not None:
                        to = accepted[key] if converting else None
                        answered += self.store(assoc, checkpoint, f, payload, next(msg_ids), to)
            clean = True
            log.info("association with %s done: %d file(s)", self.endpoint, len(files))
            return [], refused
        except _MessageBroken:
            return files[done:], refused
        except _Broken as broken:
            broken.rest = files[done:] if broken.file is not None else files[done - 1 :]
            broken.refused, broken.answered = refused, answered
            raise
        finally:
            _close(assoc, release=clean, timeouts=self.timeouts)

    def stream(
        self, channel: dimse.StoreChannel, f: DicomFile, context_id: int, msg_id: int
    ) -> bool:
        """C-STORE one file from disk over the owned connection (`router.dimse`), and report.

        The command carries the UIDs the job scan read from the data set; the file's meta
        must still give the transfer syntax the scan found (the context is chosen by it).
        True if the peer answered; `_Broken` if the association cannot go on.
        """
        try:
            channel.check_idle()
        except dimse.WireError as exc:
            raise self._wire_broken(exc, None) from exc
        try:
            with open(f.path, "rb", buffering=0) as fh:
                meta = dimse.read_file_meta(fh)
                if meta.transfer_syntax_uid != f.transfer_syntax_uid:
                    raise ValueError(
                        f"its transfer syntax is now {_name(meta.transfer_syntax_uid)}, "
                        f"not {_name(f.transfer_syntax_uid)} as when the job was scanned"
                    )
                command = dimse.c_store_command(f.sop_class_uid, f.sop_instance_uid, msg_id)
                rsp = channel.store(fh, meta.offset, command, context_id, msg_id)
        except (OSError, ValueError, dimse.FileProblem) as exc:
            # The file, not the peer: unreadable, not Part 10, or changed since the scan.
            # Report it and go on with the others (over a new association if the message
            # was cut short).
            detail = exc.detail if isinstance(exc, dimse.FileProblem) else str(exc)
            self.report(f, None, f"cannot send {f.relpath}: {detail}")
            if isinstance(exc, dimse.FileProblem) and exc.begun:
                raise _MessageBroken from exc
            return False
        except dimse.WireError as exc:
            raise self._wire_broken(exc, f) from exc
        status, comment = rsp.status, rsp.error_comment
        error = None if status in STORED_STATUSES else _status_text(status, comment)
        self.report(f, rsp.status, error)
        return True

    def _wire_broken(self, exc: dimse.WireError, f: DicomFile | None) -> _Broken:
        """Why the owned connection cannot go on, in the words of `_abort_text`."""
        key, during = self.endpoint.key, exc.during
        if isinstance(exc, dimse.PeerAborted):
            return _Broken(_aborted_by(exc.source, self.endpoint, during), "aborted", f)
        if isinstance(exc, dimse.ConnectionLost):
            return _Broken(f"connection to {key} lost {during}: {exc.detail}", "lost", f)
        if isinstance(exc, dimse.NoResponse):
            return _Broken(_dimse_timed_out("C-STORE", self.timeouts), "timeout", f)
        reason = f"no valid C-STORE response from {key}: {exc.detail}; association aborted"
        return _Broken(reason, "protocol", f)

    def _converted(self, f: DicomFile) -> Dataset | None:
        """`f` decoded and uncompressed, or None (reported) if that is not possible.

        Decoding adds no loss; pixels that were lossy-compressed stay marked as such
        (LossyImageCompression 01, PS3.3 C.7.6.1.1.5), as the standard requires of any
        copy. Nothing is ever encoded in a lossy syntax.
        """
        try:
            ds = dcmread(f.path)
            syntax = ds.file_meta.TransferSyntaxUID
            if syntax.is_compressed:
                # Same instance, pixels decoded: lossless from what the file holds.
                lossy = ds.get("LossyImageCompression")
                ds.decompress(generate_instance_uid=False)
                _mark_lossy(ds, syntax, lossy)
            elif syntax.is_deflated:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # inflated on reading
            elif not syntax.is_little_endian:
                raise ValueError("big endian files are not converted")
        except Exception as exc:  # decoders raise many kinds; it is this file's failure
            error = f"cannot convert {f.relpath} from {_name(f.transfer_syntax_uid)}: {exc}"
            self.report(f, None, error, permanent=True)
            return None
        log.info("converted %s from %s for %s", f.relpath, _name(syntax), self.endpoint.key)
        return ds

    def _check_alive(self, assoc: Association) -> None:
        """Between two requests: did the peer abort or drop the connection meanwhile?"""
        primitive = assoc.dul.peek_next_pdu()
        text = _abort_text(primitive, self.endpoint, "between C-STORE requests")
        if text is None and not assoc.dul.is_alive():
            text = f"connection to {self.endpoint.key} closed between C-STORE requests"
        if text:
            raise _Broken(text, "aborted" if isinstance(primitive, A_ABORT) else "lost", None)

    def store(
        self,
        assoc: Association,
        checkpoint: _Checkpoint,
        f: DicomFile,
        payload: Path | Dataset,
        msg_id: int,
        converted_to: str | None = None,
    ) -> bool:
        """C-STORE one file (`payload`: its path, or the converted data set) and report.

        True if the peer answered; `_Broken` if the association cannot go on.
        """
        checkpoint.started = False
        begun = time.monotonic()
        try:
            rsp = assoc.send_c_store(payload, msg_id=msg_id)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            # The file, not the peer: unreadable, not Part 10, or its meta disagrees with
            # what the job scan found. Report it and go on with the others. A converted
            # data set that cannot be encoded will not be on a retry either.
            converted = isinstance(payload, Dataset)
            self.report(f, None, f"cannot send {f.relpath}: {exc}", permanent=converted)
            if checkpoint.started:
                raise _MessageBroken from exc
            return False
        if "Status" not in rsp:
            reason, kind = self._no_response(assoc, time.monotonic() - begun, "C-STORE")
            raise _Broken(reason, kind, f)
        status = int(rsp.Status)
        comment = rsp.get("ErrorComment")
        error = None if status in STORED_STATUSES else _status_text(status, comment)
        converted_from = f.transfer_syntax_uid if converted_to else None
        self.report(f, status, error, converted_from=converted_from, converted_to=converted_to)
        return True

    def _no_response(self, assoc: Association, waited: float, op: str) -> tuple[str, str]:
        """Why no response came, and which kind of ending of the association that is."""
        ep, dimse = self.endpoint, self.timeouts.dimse
        primitive = assoc.dul.peek_next_pdu()
        text = _abort_text(primitive, ep, f"while waiting for the {op} response")
        if text:
            return text, "aborted" if isinstance(primitive, A_ABORT) else "lost"
        if dimse is not None and waited >= dimse * 0.95:
            return _dimse_timed_out(op, self.timeouts), "timeout"
        return f"no valid {op} response from {ep.key}; association aborted", "protocol"


def _twice(first: _Broken, again: _Broken) -> str:
    """Why a file that ended two associations (with the others, then alone) failed."""
    if first.kind == again.kind:
        return f"{_KINDS[again.kind]} (sent with the others, then alone: {again.reason})"
    return (
        f"this file ended the association twice: {first.reason}; sent again alone: {again.reason}"
    )


def echo(endpoint: Endpoint, timeouts: Timeouts) -> int:
    """C-ECHO `endpoint` and return the status; SendError if there is no answer."""
    sender = CStoreSender(endpoint, timeouts, lambda result: None)
    try:
        assoc = sender.associate([(Verification, [ImplicitVRLittleEndian])])
    except _NoContext:
        raise SendError(
            f"{endpoint.key} does not accept the Verification service (C-ECHO)", transient=False
        ) from None
    clean = False
    try:
        begun = time.monotonic()
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            reason, _ = sender._no_response(assoc, time.monotonic() - begun, "C-ECHO")
            raise SendError(reason, transient=True)
        clean = True
        return int(rsp.Status)
    finally:
        _close(assoc, release=clean, timeouts=timeouts)
