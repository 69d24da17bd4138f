"""Alerts when routing fails: Prefect automations POST to a receiver of the test's own.

A real `prefect server` on PostgreSQL evaluates the automations that `dicom-router setup
--alert-webhook` creates; a route-job run failing at a dead destination reaches a local
HTTP receiver as one JSON message; a destination that keeps failing yields one message per
interval, not one per job; a sweep that gives a job up says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from router.record import Status, write_status
from tests.factory import write_job
from tests.fixtures_dcmtk import HOST, free_port
from tests.fixtures_prefect import REPO_ROOT, PrefectServer

pytestmark = [pytest.mark.flow, pytest.mark.peers]


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that keeps every POST it gets."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.posts.append(
                        {"path": self.path, "type": self.headers.get("Content-Type"), "raw": body}
                    )
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.posts) < count and time.monotonic() < deadline:
                self.arrived.wait(max(0.0, deadline - time.monotonic()))
            return [json.loads(p["raw"]) for p in self.posts]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_failures_reach_the_webhook_once_per_destination_per_interval(
    prefect_server: PrefectServer,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.route_job import in_process, route_job_flow
    from flows.sweep import sweep_unrouted_flow

    monkeypatch.setenv("DICOM_ROUTER_RETRIES", "0")
    dead, other = free_port(), free_port()
    rules = tmp_path / "rules.json"

    def route_to(port: int) -> None:
        destination = {"IP": HOST, "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": "PACS"}
        rules.write_text(
            json.dumps({"routing": [{"name": "results", "send": [{".*": destination}]}]})
        )

    route_to(dead)
    setup = subprocess.run(
        [
            sys.executable,
            "-m",
            "router",
            "setup",
            "--config",
            str(rules),
            "--alert-webhook",
            receiver.url,
            "--alert-interval",
            "600",
            "--pool",
            "alerts-pool",
        ],
        cwd=REPO_ROOT,
        env=prefect_server.env(DICOM_ROUTER_LOG_FILE=str(tmp_path / "r.log")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert setup.returncode == 0, setup.stderr
    assert "automation 'dicom-router: alert: delivery': created" in setup.stdout

    log = str(tmp_path / "routing.log")
    jobs = [tmp_path / "jobs" / f"job{i}" for i in range(3)]
    for job in jobs:
        write_job(job, n_output=1, n_input=0)
    with prefect_server.settings(), in_process():
        failed_at = time.monotonic()
        state = route_job_flow(
            job_dir=str(jobs[0]), config=str(rules), log_file=log, return_state=True
        )
        assert state.is_failed()
        [alert] = receiver.wait_for(1, 30)
        took = time.monotonic() - failed_at
        # the same destination failing again within the interval: no second message
        for job in jobs[1:]:
            assert route_job_flow(
                job_dir=str(job), config=str(rules), log_file=log, return_state=True
            ).is_failed()
        # another destination: a message of its own
        route_to(other)
        write_job(tmp_path / "jobs" / "job-other", n_output=1, n_input=0)
        route_job_flow(
            job_dir=str(tmp_path / "jobs" / "job-other"),
            config=str(rules),
            log_file=log,
            return_state=True,
        )
    assert took < 30
    assert alert["alert"] == "routing to a destination failed"
    assert alert["job_dir"] == str(jobs[0])
    assert alert["rule"] == "1 results"
    assert alert["destination"] == f"PACS@{HOST}:{dead} (as ROUTER)"
    assert f"connection refused by {HOST}:{dead}" in alert["reason"]
    assert alert["flow_run_id"] == str(state.state_details.flow_run_id)
    posts = receiver.wait_for(2, 30)
    time.sleep(3)  # let any late duplicate arrive
    posts = receiver.wait_for(99, 0)
    assert [p["destination"] for p in posts] == [
        f"PACS@{HOST}:{dead} (as ROUTER)",
        f"PACS@{HOST}:{other} (as ROUTER)",
    ]
    assert all(p["type"] == "application/json" for p in receiver.posts)

    # a sweep that gives a job up
    root = tmp_path / "sweep-root"
    hopeless = root / "hopeless"
    write_job(hopeless, n_output=1, n_input=0)
    write_status(
        hopeless, Status("failed", 5, 5, "2026-01-01T00:00:00+00:00", "connection refused")
    )
    with prefect_server.settings(), in_process():
        sweep_unrouted_flow(root=str(root), config=str(rules), log_file=log)
    posts = receiver.wait_for(3, 30)
    assert posts[-1]["alert"] == "a sweep gave a job up"
    assert posts[-1]["job_dir"] == str(hopeless) and posts[-1]["reason"] == "connection refused"
    # and the sweep published the site's overview under its stable key
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect_server.client() as client:
        [overview] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["site-overview"]))
        )
    assert "1 given up" in (overview.description or "")
