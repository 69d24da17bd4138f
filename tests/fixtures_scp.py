"""Pytest plugin: an in-process pynetdicom Storage SCP whose behaviour each test controls.

The `scp` fixture is a factory: `server = scp(ae_title="STORESCP")` starts a Storage SCP on
127.0.0.1 and a free port; every server it started is shut down at teardown. Behaviour
can be changed between sends by setting the attributes below; C-STORE requests are numbered
from 1 over the server's lifetime (all associations), so "the 3rd C-STORE" stays meaningful
across retries.

What arrived is recorded: `arrivals` (one `Arrival` per stored instance, in order),
`counts` (stores per SOPInstanceUID), `requests` (C-STORE requests seen, refused ones too),
`associations` (association requests, rejected ones too).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from router.model import STORED_STATUSES, Endpoint

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic) used by `reject_next`.
REJECT_TRANSIENT = (0x02, 0x03, 0x01)  # rejected transient: temporary congestion
REJECT_PERMANENT = (0x01, 0x01, 0x03)  # rejected permanent: calling AE title not recognised


@dataclass(frozen=True)
class Arrival:
    """One instance stored by the SCP."""

    sop_instance_uid: str
    calling_aet: str
    called_aet: str
    transfer_syntax: str


@dataclass(eq=False)
class StorageSCP:
    """A Storage SCP on 127.0.0.1 whose answers are set by the test.

    Behaviour (all settable while running):

    - `refuse_instances`: SOPInstanceUID -> status to answer instead of success.
    - `refuse_at`: C-STORE request number -> status.
    - `abort_at`: request numbers at which the SCP aborts the association instead of
      answering (`abort_after(n)` = abort on request n + 1, after n answered stores);
      `abort_instances`: the same for these SOPInstanceUIDs, every time they come.
    - `reset_at` / `reset_instances`: as `abort_at` / `abort_instances`, but the SCP
      resets the TCP connection (close with SO_LINGER 0: an RST, no A-ABORT).
    - `stall_at` / `stall_instances`: request numbers / SOPInstanceUIDs for which the SCP
      keeps the instance but does not answer for `stall_seconds` (released early at
      teardown): a lost or late response.
    - `raw_answer_at`: request number -> bytes the SCP writes on the connection instead of
      its answer (a malformed or unexpected response), before it holds the request as
      `stall_at` does.
    - `delay`: seconds to wait before answering every C-STORE.
    - `reject_next(k, transient=...)`: reject the next k association requests.
    """

    ae_title: str = "STORESCP"
    transfer_syntaxes: Sequence[str] = tuple(ALL_TRANSFER_SYNTAXES)
    require_called_aet: bool = True
    max_pdu: int = 16382
    keep_data: bool = False
    """Keep each received dataset's bytes in `data` (by SOPInstanceUID)."""
    ssl_context: ssl.SSLContext | None = None
    """Serve DICOM over TLS with this server context."""

    refuse_instances: dict[str, int] = field(default_factory=dict)
    refuse_at: dict[int, int] = field(default_factory=dict)
    abort_at: set[int] = field(default_factory=set)
    abort_instances: set[str] = field(default_factory=set)
    reset_at: set[int] = field(default_factory=set)
    reset_instances: set[str] = field(default_factory=set)
    stall_at: set[int] = field(default_factory=set)
    stall_instances: set[str] = field(default_factory=set)
    stall_seconds: float = 30.0
    raw_answer_at: dict[int, bytes] = field(default_factory=dict)
    delay: float = 0.0

    arrivals: list[Arrival] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    data: dict[str, bytes] = field(default_factory=dict)
    requests: int = 0
    associations: int = 0
    rejected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    """Most C-STOREs being handled at once (parallel associations)."""
    open_now: int = 0
    """Associations established and not yet released or aborted."""
    max_open: int = 0
    """The most associations that were open at one time."""
    releases: int = 0
    """Associations that ended in a release (the others were aborted: `aborts`)."""
    aborts: int = 0

    port: int = 0
    host: str = "127.0.0.1"
    _reject_left: int = 0
    _reject_rsd: tuple[int, int, int] = REJECT_TRANSIENT
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)
    _ae: AE | None = None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> StorageSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = self.max_pdu
        ae.require_called_aet = self.require_called_aet
        ae.network_timeout = 30
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(self.transfer_syntaxes))
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = ae.start_server(
            (self.host, 0), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        assert server is not None
        self.port = server.server_address[1]
        self._ae = ae
        return self

    def stop(self) -> None:
        """Release stalled handlers, abort live associations, close the port."""
        self._released.set()
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def endpoint(self, calling_aet: str = "ROUTER", called_aet: str | None = None) -> Endpoint:
        return Endpoint(self.host, self.port, called_aet or self.ae_title, calling_aet)

    def abort_after(self, stores: int) -> None:
        """Abort the association on the C-STORE request after `stores` more requests."""
        self.abort_at.add(self.requests + stores + 1)

    def reject_next(self, times: int = 1, *, transient: bool = True) -> None:
        """Reject the next `times` association requests, then accept again."""
        with self._lock:
            self._reject_left = times
            self._reject_rsd = REJECT_TRANSIENT if transient else REJECT_PERMANENT

    # -- what arrived ----------------------------------------------------------------------

    @property
    def instances(self) -> set[str]:
        """SOPInstanceUIDs stored at least once."""
        return set(self.counts)

    def reset_records(self) -> None:
        with self._lock:
            self.arrivals.clear()
            self.counts.clear()
            self.data.clear()

    # -- handlers --------------------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            if self._reject_left <= 0:
                return
            self._reject_left -= 1
            self.rejected += 1
            rsd = self._reject_rsd
        # As pynetdicom does for its own rejections: kill() waits until the A-ASSOCIATE-RJ
        # has gone out, before the server closes the connection.
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            self.open_now -= 1
            self.releases += 1

    def _on_aborted(self, event: evt.Event) -> None:
        with self._lock:
            self.open_now -= 1
            self.aborts += 1

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.requests += 1
            number = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._answer(event, number)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, event: evt.Event, number: int) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if self.delay:
            time.sleep(self.delay)
        if number in self.abort_at or uid in self.abort_instances:
            log.info("test SCP: aborting on C-STORE #%d (%s)", number, uid)
            event.assoc.abort()
            return 0xC000
        if number in self.reset_at or uid in self.reset_instances:
            log.info("test SCP: resetting the connection on C-STORE #%d (%s)", number, uid)
            sock = event.assoc.dul.socket.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return 0xC000
        if number in self.raw_answer_at:
            log.info("test SCP: raw answer to C-STORE #%d (%s)", number, uid)
            event.assoc.dul.socket.socket.sendall(self.raw_answer_at[number])
            self._released.wait(self.stall_seconds)
            return 0x0000
        status = self.refuse_at.get(number, self.refuse_instances.get(uid, 0x0000))
        if status in STORED_STATUSES:
            self._record(event, uid)
        if number in self.stall_at or uid in self.stall_instances:
            log.info("test SCP: stalling on C-STORE #%d (%s)", number, uid)
            self._released.wait(self.stall_seconds)
        return status

    def _record(self, event: evt.Event, uid: str) -> None:
        assoc = event.assoc
        arrival = Arrival(
            sop_instance_uid=uid,
            calling_aet=assoc.requestor.ae_title,
            called_aet=assoc.requestor.primitive.called_ae_title,
            transfer_syntax=str(event.context.transfer_syntax),
        )
        with self._lock:
            self.arrivals.append(arrival)
            self.counts[uid] += 1
            if self.keep_data:
                self.data[uid] = event.request.DataSet.getvalue()


def our_threads(timeout: float = 3.0) -> list[threading.Thread]:
    """pynetdicom threads of associations we requested that are still alive (after a grace)."""

    def alive() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if (isinstance(t, Association) and t.is_requestor)
            or (isinstance(t, DULServiceProvider) and t.assoc.is_requestor)
        ]

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive()


@pytest.fixture
def scp() -> Iterator[Callable[..., StorageSCP]]:
    """Factory: `scp(**StorageSCP fields) -> StorageSCP`, started; stopped at teardown."""
    started: list[StorageSCP] = []

    def start(**kw: Any) -> StorageSCP:
        server = StorageSCP(**kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
