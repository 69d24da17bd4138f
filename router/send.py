"""Send DICOM files to one destination with C-STORE, streamed from disk.

The caller (the routing step) keeps the crash-safe record: this module reports every
answered file through `on_result` the moment its answer is known and raises `SendError`
when an association cannot be made or breaks. Files it never attempted are not reported, so
the caller retries exactly what is missing.

pynetdicom as shipped sends ~50 images/s over loopback; the settings here (TCP_NODELAY,
TCP_QUICKACK, a short DUL loop delay, the file's bytes streamed as they are, the requestor
reactor kept parked between our own requests) bring it to several hundred (PERF-NOTES.md).
Several of them touch pynetdicom 3.0 internals; each is confined to the associations this
module creates.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pynetdicom._config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
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

MAX_CONTEXTS = 128
"""Presentation contexts per association: context IDs are the odd numbers 1..255."""

DUL_LOOP_DELAY = 0.0002
"""pynetdicom's DUL thread sleeps this long when idle (1 ms as shipped): the latency it adds
to every PDU exchange is what limits one association's rate (PERF-NOTES: 254 → 342 img/s)."""

QUICKACK = hasattr(socket, "TCP_QUICKACK")
"""Acknowledge at once on every receive (Linux): a peer that leaves Nagle on (dcmtk without
TCP_NODELAY=1, Orthanc as packaged) otherwise holds each response until our delayed ACK."""

_PARK_SETTLE = 0.003
"""Seconds to re-check that the reactor really sits in its wait (its loop sleeps 1 ms)."""


# -- pynetdicom plumbing, confined to our own associations -----------------------------------


class _TcpSocket(socket.socket):
    """TCP socket that remembers why connect() failed and keeps reads bounded and fast."""

    def __init__(self, family: int, network_timeout: float | None) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.connect_error: OSError | None = None
        self.connected = False
        self.network_timeout = network_timeout

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise
        self.connected = True

    def settimeout(self, value: float | None) -> None:
        # pynetdicom clears the time-out after connecting, so a peer that stops mid-PDU
        # would block the DUL thread (and our abort of it) forever; keep the network one.
        super().settimeout(self.network_timeout if value is None else value)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if QUICKACK:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return super().recv(bufsize, flags)


class _AssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper around a `_TcpSocket` with TCP_NODELAY set.

    Also collects the ACSE primitives received, so a failed negotiation can be described.
    """

    tcp: _TcpSocket
    acse_received: list[Any]

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        # Same as pynetdicom's, with Nagle off: it otherwise stalls each PDU by up to 40 ms.
        self.acse_received = []
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _TcpSocket(family, self.assoc.network_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        self.tcp = sock
        return sock


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
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's per-PDU and per-message debug loggers run for every one of the
            # ~32 PDUs of a 0.5 MB image even when nothing is logged.
            for event, handler in _DEBUG_HANDLERS:
                assoc.unbind(event, handler)
        sock = _AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


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


def _name(uid: str) -> str:
    return UID(uid).name


def _status_text(status: int, rsp: Dataset) -> str:
    category = code_to_category(status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, (category, ""))[1]
    if category == "Failure":
        text = f"C-STORE refused with status 0x{status:04X} (Failure: {meaning or 'unknown'})"
    else:
        label = f"{category}: {meaning}" if meaning else category
        text = f"C-STORE answered with status 0x{status:04X} ({label}), not a stored status"
    comment = rsp.get("ErrorComment")
    return f"{text}; peer says: {comment}" if comment else text


def _connect_failure(endpoint: Endpoint, exc: OSError | None, timeouts: Timeouts) -> str:
    where = f"{endpoint.host}:{endpoint.port}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by {where}"
    if isinstance(exc, TimeoutError):
        return f"no TCP connection to {where} within {timeouts.connect:g} s (connect time-out)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {endpoint.host!r}: {exc.strerror or exc}"
    if exc is not None:
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}"


def _reason(text: str) -> str:
    """pynetdicom's "Called AE title not recognised" as it reads mid-sentence."""
    return text[:1].lower() + text[1:]


def _abort_text(primitive: Any, endpoint: Endpoint, during: str) -> str | None:
    if isinstance(primitive, A_ABORT):
        who = "the peer" if primitive.abort_source == 0 else "the peer's DICOM provider"
        return f"association aborted by {who} ({endpoint.key}) {during}"
    if isinstance(primitive, A_P_ABORT):
        return f"connection to {endpoint.key} lost {during} (A-P-ABORT)"
    return None


# -- sending ---------------------------------------------------------------------------------


class _NoContext(Exception):
    """The peer accepted the association but none of the proposed contexts."""


class _MessageBroken(Exception):
    """A local error (file unreadable) interrupted a C-STORE after it began on the wire."""


class _Sender:
    """One `send_files` call: its destination, settings and result callback."""

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        on_result: Callable[[StoreResult], None],
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.on_result = on_result
        self.ae = _make_ae(endpoint, timeouts)

    def associate(self, contexts: Sequence[tuple[str, str]]) -> Association:
        """Open an association proposing `contexts`; SendError or _NoContext if it fails."""
        ep = self.endpoint
        assoc = self.ae.associate(
            ep.host,
            ep.port,
            [build_context(sop, [ts]) for sop, ts in contexts],
            ae_title=ep.called_aet,
            max_pdu=self.timeouts.max_pdu,
            evt_handlers=[(evt.EVT_ACSE_RECV, _on_acse_recv)],
        )
        if assoc.is_established:
            log.debug("associated with %s, %d contexts", ep, len(contexts))
            return assoc
        try:
            raise self._association_failure(assoc)
        finally:
            _close(assoc, release=False, timeouts=self.timeouts)

    def _association_failure(self, assoc: Association) -> Exception:
        ep, link = self.endpoint, _link(assoc)
        if not link.tcp.connected:
            reason = _connect_failure(ep, link.tcp.connect_error, self.timeouts)
            return SendError(reason, transient=True)
        if not link.acse_received:
            acse = self.timeouts.acse
            return SendError(
                f"no association response from {ep.key} within {acse:g} s (ACSE time-out)",
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
        pairs = list(dict.fromkeys((f.sop_class_uid, f.transfer_syntax_uid) for f in files))
        group_of = {pair: i // MAX_CONTEXTS for i, pair in enumerate(pairs)}
        members: list[list[DicomFile]] = [[] for _ in range(0, len(pairs), MAX_CONTEXTS)]
        for f in files:
            members[group_of[(f.sop_class_uid, f.transfer_syntax_uid)]].append(f)
        refused_groups: list[list[tuple[str, str]]] = []
        for g, group_files in enumerate(members):
            contexts = pairs[g * MAX_CONTEXTS : (g + 1) * MAX_CONTEXTS]
            if not self.send_group(contexts, group_files):
                refused_groups.append(contexts)
        if refused_groups:
            proposed = [pair for group in refused_groups for pair in group]
            classes = sorted({_name(sop) for sop, _ in proposed})
            raise SendError(
                f"{self.endpoint.key} accepted none of the {len(proposed)} presentation "
                f"contexts proposed ({', '.join(classes)})",
                transient=False,
            )

    def send_group(self, contexts: Sequence[tuple[str, str]], files: list[DicomFile]) -> bool:
        """Send `files` over one association (more only after a local file error).

        Returns False when the peer accepted none of `contexts` (each file is reported).
        """
        pending = files
        while pending:
            try:
                assoc = self.associate(contexts)
            except _NoContext:
                for f in pending:
                    self._no_context(f)
                return False
            pending = self.send_on(assoc, pending)
        return True

    def _no_context(self, f: DicomFile) -> None:
        error = (
            f"no accepted presentation context for {_name(f.sop_class_uid)} "
            f"in {_name(f.transfer_syntax_uid)}"
        )
        self.on_result(StoreResult(f, None, error))

    def send_on(self, assoc: Association, files: list[DicomFile]) -> list[DicomFile]:
        """Send `files` in order; return those left when a local error broke the message."""
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        msg_ids = itertools.cycle(range(1, 0x10000))
        done = 0
        clean = False
        try:
            with _parked_reactor(assoc) as checkpoint:
                for f in files:
                    done += 1
                    if (f.sop_class_uid, f.transfer_syntax_uid) not in accepted:
                        self._no_context(f)
                        continue
                    self._check_alive(assoc)
                    self.store(assoc, checkpoint, f, next(msg_ids))
            clean = True
            log.info("sent %d file(s) to %s", len(files), self.endpoint)
            return []
        except _MessageBroken:
            return files[done:]
        finally:
            _close(assoc, release=clean, timeouts=self.timeouts)

    def _check_alive(self, assoc: Association) -> None:
        """Between two requests: did the peer abort or drop the connection meanwhile?"""
        primitive = assoc.dul.peek_next_pdu()
        text = _abort_text(primitive, self.endpoint, "between C-STORE requests")
        if text is None and not assoc.dul.is_alive():
            text = f"connection to {self.endpoint.key} closed between C-STORE requests"
        if text:
            raise SendError(text, transient=True)

    def store(self, assoc: Association, checkpoint: _Checkpoint, f: DicomFile, msg_id: int) -> None:
        checkpoint.started = False
        begun = time.monotonic()
        try:
            rsp = assoc.send_c_store(f.path, msg_id=msg_id)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            # The file, not the peer: unreadable, not Part 10, or its meta disagrees with
            # what the job scan found. Report it and go on with the others.
            self.on_result(StoreResult(f, None, f"cannot send {f.relpath}: {exc}"))
            if checkpoint.started:
                raise _MessageBroken from exc
            return
        if "Status" not in rsp:
            reason = self._no_response(assoc, time.monotonic() - begun, "C-STORE")
            self.on_result(StoreResult(f, None, reason))
            raise SendError(reason, transient=True)
        status = int(rsp.Status)
        if status in STORED_STATUSES:
            self.on_result(StoreResult(f, status))
        else:
            self.on_result(StoreResult(f, status, _status_text(status, rsp)))

    def _no_response(self, assoc: Association, waited: float, op: str) -> str:
        ep, dimse = self.endpoint, self.timeouts.dimse
        text = _abort_text(assoc.dul.peek_next_pdu(), ep, f"while waiting for the {op} response")
        if text:
            return text
        if dimse is not None and waited >= dimse * 0.95:
            return f"no {op} response within {dimse:g} s (DIMSE time-out); association aborted"
        return f"no valid {op} response from {ep.key}; association aborted"


def send_files(
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    timeouts: Timeouts,
    on_result: Callable[[StoreResult], None],
) -> None:
    """Store `files` at `endpoint`, reporting each answered file through `on_result`.

    One presentation context per (SOP class, transfer syntax) pair, so the peer accepts the
    file's own syntax or nothing and the file can be streamed unchanged; one association per
    128 pairs, files in their given order. A refusal status is reported and sending goes
    on. A file the peer has no context for, or that cannot be read, is reported with status
    None and sending goes on (permanent for that file). An association that cannot be made
    or breaks raises `SendError` after reporting the file in flight (status None); files
    not attempted are not reported. If the peer accepted none of the contexts, every file is
    reported and a permanent `SendError` is raised at the end.
    """
    if files:
        _Sender(endpoint, timeouts, on_result).run(files)


def echo(endpoint: Endpoint, timeouts: Timeouts) -> int:
    """C-ECHO `endpoint` and return the status; SendError if there is no answer."""
    sender = _Sender(endpoint, timeouts, lambda result: None)
    try:
        assoc = sender.associate([(Verification, "1.2.840.10008.1.2")])
    except _NoContext:
        raise SendError(
            f"{endpoint.key} does not accept the Verification service (C-ECHO)", transient=False
        ) from None
    clean = False
    try:
        begun = time.monotonic()
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            reason = sender._no_response(assoc, time.monotonic() - begun, "C-ECHO")
            raise SendError(reason, transient=True)
        clean = True
        return int(rsp.Status)
    finally:
        _close(assoc, release=clean, timeouts=timeouts)
