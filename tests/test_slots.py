"""Destination slots through a Prefect API that is busy, and limits that are missing or edited.

On SQLite the server answers a slot request with 503 ("database is locked") when another
write commits during its transaction; Prefect's client sleeps 2 s and more before each
new try. A send asks for its slot again within tens of milliseconds instead. The API
here is a server of the test's own that answers 503 a given number of times.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.concurrency import (
    ACQUIRE_PATH,
    RELEASE_PATH,
    DestinationLimit,
    LocalGates,
    destination_slot,
    gated,
)


class BusyApi(ThreadingHTTPServer):
    def __init__(self, busy: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.busy = busy  # path -> how many 503s before it answers
        self.calls: list[tuple[float, str, int]] = []
        self.held = 0


class _Handler(BaseHTTPRequestHandler):
    server: BusyApi

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self.path.removeprefix("/api")
        if self.server.busy.get(path, 0) > 0:
            self.server.busy[path] -= 1
            status, answer = 503, {"exception_message": "Service Unavailable"}
        elif path == ACQUIRE_PATH:
            self.server.held += body["slots"]
            limit = {"id": str(uuid.uuid4()), "name": body["names"][0], "limit": 1}
            status, answer = 200, {"limits": [limit], "lease_id": str(uuid.uuid4())}
        elif path == RELEASE_PATH:
            self.server.held -= 1
            status, answer = 200, {}
        else:
            status, answer = 404, {}
        self.server.calls.append((time.monotonic(), path, status))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        # /csrf-token: a server without CSRF protection answers 422, as Prefect's does
        data = b'{"detail": "CSRF protection is disabled."}'
        self.send_response(422 if self.path.startswith("/api/csrf-token") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass


LIMIT = DestinationLimit("dicom-router-127.0.0.1-104", size=1, create_size=1)


@pytest.fixture
def busy_api() -> Iterator[BusyApi]:
    api = BusyApi({ACQUIRE_PATH: 3, RELEASE_PATH: 2})
    thread = threading.Thread(target=api.serve_forever, daemon=True)
    thread.start()
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{api.server_port}/api"}):
            yield api
    finally:
        api.shutdown()
        api.server_close()
        thread.join(timeout=5)


def test_a_busy_server_is_asked_again_within_milliseconds(busy_api: BusyApi) -> None:
    start = time.monotonic()
    with destination_slot(LIMIT, occupy=1):
        assert busy_api.held == 1
    elapsed = time.monotonic() - start

    assert busy_api.held == 0  # released
    assert [(path, status) for _, path, status in busy_api.calls] == [
        *[(ACQUIRE_PATH, 503)] * 3,
        (ACQUIRE_PATH, 200),
        *[(RELEASE_PATH, 503)] * 2,
        (RELEASE_PATH, 200),
    ]
    # five 503s: Prefect's client alone would have slept 2 s or more after each
    assert elapsed < 2.0, elapsed


def test_a_server_busy_for_longer_is_left_to_the_client_s_retries(busy_api: BusyApi) -> None:
    busy_api.busy[ACQUIRE_PATH] = 6  # the five quick tries, then one 503 for the client
    busy_api.busy[RELEASE_PATH] = 0
    start = time.monotonic()
    with destination_slot(LIMIT, occupy=1):
        pass
    statuses = [status for _, path, status in busy_api.calls if path == ACQUIRE_PATH]
    assert statuses == [503] * 6 + [200]
    assert time.monotonic() - start >= 1.0  # the client's own back-off took over


@pytest.mark.flow
def test_a_send_without_its_limit_creates_it_and_holds_a_slot_of_it(prefect_api: str) -> None:
    """No read before a one-slot send: the acquire says the limit is absent, and the send
    creates it with the configured size instead of going unlimited."""
    from prefect import get_client

    name = f"dicom-router-127.0.0.1-{uuid.uuid4().hex[:8]}"
    gates = LocalGates()
    with (
        gated(gates),
        destination_slot(DestinationLimit(name, None, create_size=3)),
        get_client(sync_client=True) as client,
    ):
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots) == (3, 1)  # created, and the slot counted
    assert gates.size(name, 0) == 3  # the gate learned the size from the server's answer
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.flow
def test_a_limit_made_smaller_in_the_ui_narrows_the_gate_from_the_next_answer(
    prefect_api: str,
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    name = f"dicom-router-127.0.0.1-{uuid.uuid4().hex[:8]}"
    gates = LocalGates()
    with gated(gates):
        with destination_slot(DestinationLimit(name, None, create_size=4)):
            pass
        assert gates.size(name, 0) == 4
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1))
        with destination_slot(DestinationLimit(name, None, create_size=4)):
            pass  # the size it had when this send asked
        assert gates.size(name, 0) == 1  # never changed back to the configured 4
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots) == (1, 0)
