"""At most N associations to one destination over all jobs: Prefect global concurrency limits.

One limit per destination host and port (`dicom-router-<host>-<port>`), since that is what
a PACS feels, whatever AE title is called. The size is the destination's
`max_associations`, or the `max_associations` setting. Slots are acquired strictly: the
server answers which limits it counted, and a send whose limit is absent creates it with
the configured size (never changing an existing one, so a size edited in the UI stands)
and asks again, so routing never runs unlimited because a limit is absent. A send of
several associations reads the limit's size first, since asking for more slots than the
limit has is refused. `dicom-router setup` creates them all up front and sets their
sizes.

Slots are taken with a lease, as Prefect's `concurrency()` does, so that the server frees
the slots of a process that died (after the lease's duration, 60 s, the shortest the API
accepts, plus up to 15 s until its repossessor runs). Not with `concurrency()` itself: the
sync variant's renewal thread opens a client of its own at once and is joined for up to
2 s on exit (`prefect/concurrency/_leases.py`, `maintain_concurrency_lease`), which made a
0.1 s send a 2 s task. Here acquiring and releasing are one API call each on the run's
client; the renewal thread only wakes (and opens a client) when a send lasts longer than
a third of the lease, and is never joined.

On SQLite (the one-box default) the server answers these calls with 503 "database is
locked" whenever another write commits during its read-then-write transaction, which the
task's own state events make likely; Prefect's client then sleeps 2 s before trying
again, on every send. These calls try again after tens of milliseconds first.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import task_run

from flows import cancel
from router.model import Endpoint

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

PREFIX = "dicom-router-"
LEASE_SECONDS = 60.0
"""A slot's lease: the server frees the slots of a dead holder this long after its last
renewal (60 s is the API's minimum)."""
MAX_WAIT_SECONDS = 2.0
"""Longest sleep between two tries at a full limit, whatever the server's Retry-After."""
QUICK_RETRY_SECONDS = (0.02, 0.05, 0.1, 0.2, 0.4)
"""Waits between tries at a call the server answered 503 (busy), before the client's own
retries (2 s and more) take over."""
ACQUIRE_PATH = "/v2/concurrency_limits/increment-with-lease"
RELEASE_PATH = "/v2/concurrency_limits/decrement-with-lease"

log = logging.getLogger(__name__)


class SlotUnavailable(Exception):
    """The destination's limit does not exist (or the server refused the request)."""


def limit_name(endpoint: Endpoint) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9.-]+", "-", f"{endpoint.host}-{endpoint.port}")


def ensure_destination_limit(endpoint: Endpoint, size: int) -> tuple[str, int]:
    """The limit's name and size, after creating it with `size` if it does not exist yet.

    The size is the limit's own, which an edit in the UI may have made smaller than
    `size`: a send that asked for more slots than that would fail.
    """
    name = limit_name(endpoint)
    with get_client(sync_client=True) as client:
        try:
            return name, client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            _create(client, name, size)
        return name, client.read_global_concurrency_limit_by_name(name).limit


@dataclass(frozen=True)
class DestinationLimit:
    """The limit a send holds slots of."""

    name: str
    size: int | None
    """The limit's own size, when this run read it (a send of several associations)."""
    create_size: int
    """The configured size: a missing limit is created with it; the local gate's size
    until the server has told this process the limit's own."""


def destination_limit(endpoint: Endpoint, size: int) -> DestinationLimit:
    """The destination's limit, not read: one slot fits any limit, so a one-association
    send (every small job) does not read it, and the acquire itself says whether it
    exists (a read is ~8 ms of server CPU per send)."""
    return DestinationLimit(limit_name(endpoint), None, size)


def read_destination_limit(endpoint: Endpoint, size: int) -> DestinationLimit:
    """The destination's limit with its own size, for a send of several associations:
    asking for more slots than the limit has is refused."""
    name, own = ensure_destination_limit(endpoint, size)
    return DestinationLimit(name, own, size)


def set_destination_limit(endpoint: Endpoint, size: int) -> str:
    """Create or resize the limit (the set-up command)."""
    name = limit_name(endpoint)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, size)
    return name


class LocalGates:
    """Per limit, the slots this process's runs hold or are about to ask the server for.

    The server's limit is the truth across hosts; but runs of one warm worker that all
    wait for a full limit would each ask the server again and again (a 423 costs the
    server a database update), and a burst of jobs to one destination spent most of the
    server's time answering them. Asking through the gate first, no more of this
    process's sends than the limit's size ask the server at once.
    """

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._free = threading.Condition()

    def size(self, name: str, default: int) -> int:
        """The limit's size as the server last answered this process, else `default`."""
        return self._sizes.get(name, default)

    def learn(self, name: str, size: int) -> None:
        self._sizes[name] = size

    @contextmanager
    def hold(self, name: str, size: int, occupy: int) -> Iterator[None]:
        with self._free:
            while self._used.get(name, 0) + occupy > size:
                self._free.wait(0.5)
                cancel.check()
            self._used[name] = self._used.get(name, 0) + occupy
        try:
            yield
        finally:
            with self._free:
                self._used[name] -= occupy
                self._free.notify_all()


_gates: contextvars.ContextVar[LocalGates | None] = contextvars.ContextVar(
    "dicom_router_gates", default=None
)


@contextmanager
def gated(gates: LocalGates) -> Iterator[None]:
    """Sends in the enclosed code (and in threads that copy its context) pass `gates`."""
    token = _gates.set(gates)
    try:
        yield
    finally:
        _gates.reset(token)


@contextmanager
def destination_slot(limit: DestinationLimit | None, occupy: int = 1) -> Iterator[None]:
    """Hold `occupy` slots of `limit` while sending; a limit the server does not have is
    created with the configured size, never skipped.

    Waits while the limit is full, sleeping what the server suggests (its Retry-After
    grows with the slots' average occupancy), at most MAX_WAIT_SECONDS at a time; in a
    warm worker, its own runs queue at a local gate first (`LocalGates`), as wide as the
    limit's size as the server last answered.
    """
    if limit is None:
        yield
        return
    gates = _gates.get()
    gate = limit.size or (gates.size(limit.name, limit.create_size) if gates else 0)
    with (
        gates.hold(limit.name, gate, occupy) if gates is not None and gate else _nothing(),
        get_client(sync_client=True) as client,  # the run's own client, inside a run
    ):
        lease, size = _acquire(client, limit, occupy)
        if gates is not None:
            gates.learn(limit.name, size)
        try:
            with _renewing(lease):
                yield
        finally:
            try:
                _quickly(client, RELEASE_PATH, {"lease_id": str(lease)})
            except httpx.HTTPError as exc:  # the server frees it when the lease runs out
                log.warning("concurrency limit %s: slots not released (%s)", limit.name, exc)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _holder() -> ConcurrencyLeaseHolder | None:
    run_id = task_run.id
    return ConcurrencyLeaseHolder(type="task_run", id=UUID(run_id)) if run_id else None


def _acquire(client: SyncPrefectClient, limit: DestinationLimit, occupy: int) -> tuple[UUID, int]:
    """The lease of `occupy` slots, and the limit's size as the server answered."""
    name = limit.name
    # the body of the client's increment_concurrency_slots_with_lease
    body: dict[str, object] = {
        "names": [name],
        "slots": occupy,
        "mode": "concurrency",
        "lease_duration": LEASE_SECONDS,
    }
    if (holder := _holder()) is not None:
        body["holder"] = holder.model_dump(mode="json")
    created = False
    while True:
        try:
            response = _quickly(client, ACQUIRE_PATH, body)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise SlotUnavailable(
                    f"concurrency limit {name}: the server refused {occupy} slot(s): "
                    f"{exc.response.status_code} {exc.response.text[:200]}"
                ) from exc
            wait = float(exc.response.headers.get("Retry-After", MAX_WAIT_SECONDS))
            time.sleep(min(max(wait, 0.05), MAX_WAIT_SECONDS))
            cancel.check()
            continue
        answer = response.json()
        counted = [x for x in answer.get("limits") or () if x.get("name") == name]
        if counted:
            return UUID(answer["lease_id"]), int(counted[0]["limit"])
        if answer.get("lease_id"):  # a lease on no limit holds nothing: give it back
            try:
                _quickly(client, RELEASE_PATH, {"lease_id": str(answer["lease_id"])})
            except httpx.HTTPError as exc:  # the server drops it when it runs out
                log.warning("concurrency limit %s: empty lease not released (%s)", name, exc)
        if created:
            raise SlotUnavailable(
                f"concurrency limit {name} does not exist: routing never sends without its "
                "destination's limit (`dicom-router setup` creates them)"
            )
        _create(client, name, limit.create_size)
        created = True


def _create(client: SyncPrefectClient, name: str, size: int) -> None:
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
    except ObjectAlreadyExists:  # another run created it meanwhile: that one will do
        return
    log.info("concurrency limit %s: created with %d slot(s)", name, size)


def _quickly(client: SyncPrefectClient, path: str, body: dict[str, object]) -> httpx.Response:
    """POST `body` to `path`, tried again within tens of milliseconds while the server is
    busy (503); then, or on a 403 (a CSRF token to fetch), through the client's own
    retries. Other errors raise as the client would (HTTPStatusError).

    The first tries go past the client's retry loop (`httpx.Client.send`), which sleeps
    2 s and more after a 503.
    """
    http = getattr(client, "_client", None)
    if isinstance(http, httpx.Client):
        for wait in QUICK_RETRY_SECONDS:
            try:
                response = httpx.Client.send(http, http.build_request("POST", path, json=body))
            except httpx.TransportError:
                break
            if response.status_code == 403:
                break
            if response.status_code != 503:
                response.raise_for_status()
                return response
            time.sleep(wait)
    return client.request("POST", path, json=body)  # type: ignore[arg-type]


@contextmanager
def _renewing(lease: UUID) -> Iterator[None]:
    """Renew the lease every third of its duration from a daemon thread; never joined.

    A send shorter than that never renews (and the thread never opens a client).
    """
    stop = threading.Event()
    context = contextvars.copy_context()  # the run's settings (its API), not the process's
    thread = threading.Thread(
        target=context.run,
        args=(_renew_until, lease, stop),
        name="dicom-router-lease",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _renew_until(lease: UUID, stop: threading.Event) -> None:
    client: SyncPrefectClient | None = None
    try:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                if client is None:
                    client = get_client(sync_client=True).__enter__()
                client.renew_concurrency_lease(lease_id=lease, lease_duration=LEASE_SECONDS)
            except Exception as exc:  # the send goes on; say that the limit may be exceeded
                if not stop.is_set():
                    log.error(
                        "concurrency lease %s not renewed (%s): the destination may get "
                        "more associations than its limit allows",
                        lease,
                        exc,
                    )
    finally:
        if client is not None:
            client.__exit__(None, None, None)
