"""When `dicom-router route` hands a job to a warm worker, and what it says when it cannot.

The API here is a server of the test's own that answers as Prefect's does (the paths and
fields `flows.handoff` reads), so each case is one answer away: no deployment, another
pool type, no worker online, a CSRF token asked for, a server that is not there.
`tests/test_service.py` routes through a real server and a real worker.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flows import handoff
from flows.worker import WORKER_TYPE
from tests.fixtures_dcmtk import free_port


class FakeApi(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.deployment: dict[str, Any] | None = {"id": "d-1", "work_pool_name": "routing"}
        self.pool_type = WORKER_TYPE
        self.workers: list[dict[str, Any]] = [{"name": "dicom-router@host", "status": "ONLINE"}]
        self.csrf = False
        self.broken = False
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _note(self, body: Any = None) -> str:
        path = self.path.removeprefix("/api/")
        self.server.requests.append((self.command, path, dict(self.headers), body))
        return path

    def do_GET(self) -> None:
        path = self._note()
        api = self.server
        if path == "deployments/name/route-job/route-job":
            if api.deployment is None:
                self._answer(404, {"detail": "Deployment not found"})
            else:
                self._answer(200, api.deployment)
        elif path.startswith("work_pools/"):
            self._answer(200, {"name": path.split("/")[1], "type": api.pool_type})
        elif path.startswith("csrf-token"):
            self._answer(200, {"token": "t0k3n", "expiration": "2099-01-01T00:00:00Z"})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = self._note(body)
        if self.server.csrf and self.headers.get("Prefect-Csrf-Token") != "t0k3n":
            self._answer(403, {"detail": "Invalid CSRF token or client identifier."})
        elif self.server.broken:
            self._answer(500, {"exception_message": "Internal Server Error"})
        elif path.endswith("/workers/filter"):
            wanted = body["workers"]["status"]["any_"]
            self._answer(200, [w for w in self.server.workers if w["status"] in wanted])
        else:
            self._answer(404, {"detail": "Not Found"})


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_routing_worker_online_takes_the_job(api: FakeApi) -> None:
    target = handoff.online_worker(handoff.Api(api.url, {"PREFECT_API_AUTH_STRING": "u:pw"}))
    assert target == handoff.Worker("d-1", "routing", "dicom-router@host")
    assert all(h["Authorization"] == "Basic dTpwdw==" for _, _, h, _ in api.requests)


@pytest.mark.parametrize(
    "change",
    [
        {"deployment": None},  # not deployed: the command runs the flow itself
        {"deployment": {"id": "d-1", "work_pool_name": None}},
        {"pool_type": "process"},  # a process worker would start an interpreter per run
        {"workers": [{"name": "w", "status": "OFFLINE"}]},
        {"workers": []},
    ],
)
def test_without_a_routing_worker_the_flow_runs_in_the_command(
    api: FakeApi, change: dict[str, Any]
) -> None:
    for name, value in change.items():
        setattr(api, name, value)
    assert handoff.online_worker(handoff.Api(api.url, {})) is None


def test_a_server_that_wants_a_csrf_token_gets_one(api: FakeApi) -> None:
    api.csrf = True
    assert handoff.online_worker(handoff.Api(api.url, {})) is not None
    posts = [(p, h.get("Prefect-Csrf-Token")) for m, p, h, _ in api.requests if m == "POST"]
    assert posts == [
        ("work_pools/routing/workers/filter", None),
        ("work_pools/routing/workers/filter", "t0k3n"),
    ]


def test_a_server_that_is_not_there_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(handoff.HandoffError, match="cannot reach the Prefect server at"):
        handoff.online_worker(handoff.Api(url, {}))


def test_an_error_answer_is_reported_with_what_was_asked(api: FakeApi) -> None:
    api.broken = True
    with pytest.raises(handoff.HandoffError, match=r"workers of pool routing: HTTP 500 .*Internal"):
        handoff.online_worker(handoff.Api(api.url, {}))


def test_a_pool_name_is_quoted_in_the_path(api: FakeApi) -> None:
    api.deployment = {"id": "d-1", "work_pool_name": "site a/routing"}
    assert handoff.online_worker(handoff.Api(api.url, {})) is not None
    assert [p for _, p, _, _ in api.requests][1:] == [
        "work_pools/site%20a%2Frouting",
        "work_pools/site%20a%2Frouting/workers/filter",
    ]


def test_the_warm_worker_spares_the_engine_the_rename_only_of_runs_named_at_creation() -> None:
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    from flows.route_job import route_job_flow
    from flows.sweep import sweep_unrouted_flow
    from flows.worker import named_at_creation, without_run_name

    def run(name: str) -> FlowRun:
        return FlowRun(flow_id=uuid4(), name=name, parameters={"job_dir": "/data/jobs/job-7"})

    assert named_at_creation(route_job_flow, run("job-7"))  # the announcer's, the sweep's
    assert not named_at_creation(route_job_flow, run("brave-otter"))  # a trigger's: renamed
    assert not named_at_creation(sweep_unrouted_flow, run("job-7"))  # no run-name function
    unnamed = without_run_name(route_job_flow)
    assert unnamed.flow_run_name is None and route_job_flow.flow_run_name is not None
    assert unnamed.fn is route_job_flow.fn and unnamed.name == route_job_flow.name
