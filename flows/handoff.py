"""`dicom-router route` handing the job to the pool's warm routing worker.

With a Prefect server, running the flow in the command itself costs importing Prefect
(~2 CPU-seconds here) and a client's set-up before anything is sent: 4.7 s for a 5-image
job where the routing takes 0.9 s. A warm worker routes the same job in 0.75 s. So when
PREFECT_API_URL is set and a `dicom-router` worker of the `route-job` deployment's pool is
online, the command creates the run from the deployment (as a trigger or the UI's *Run*
does), waits for its final state and prints the report the run left in the job folder
(`routing-report.json`). That run is like any other: in the UI with its tasks and logs,
retried with *Retry*, cancelled by Ctrl-C here or from the UI.

Only the Prefect REST API, with the standard library; no `import prefect`, whose cost this
avoids. Settings are read from the environment as Prefect reads them (PREFECT_API_URL,
PREFECT_API_AUTH_STRING or PREFECT_API_KEY, PREFECT_API_SSL_CERT_FILE,
PREFECT_API_TLS_INSECURE_SKIP_VERIFY); a Prefect profile's settings are not, and without
the environment variable the command runs the flow itself, as without a worker.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.record import read_report

DEPLOYMENT = "route-job/route-job"
WORKER_TYPE = "dicom-router"  # flows.worker.WORKER_TYPE, without importing Prefect
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
POLL_SECONDS = (0.05,) * 4 + (0.1,) * 8 + (0.2,) * 50 + (0.5,) * 100 + (2.0,)
"""Waits between two reads of the run's state (each costs the server ~10 ms of CPU): the
end of a run is seen within 0.1 s in its first second, 0.2 s up to 11 s, 0.5 s up to a
minute, 2 s after that."""
TIMEOUT = 30.0


class HandoffError(Exception):
    """The server could not take the run (not the routing failing: that is the run's state)."""


@dataclass(frozen=True)
class Worker:
    """Where a run would go: the deployment and the online worker that takes its runs."""

    deployment_id: str
    pool: str
    worker: str


@dataclass(frozen=True)
class Ended:
    """The run's final state, and the report it left in the job folder (if it is its own)."""

    flow_run_id: str
    name: str
    state_type: str
    state_name: str
    message: str
    report: dict[str, Any] | None
    interrupted: bool = False
    """A signal asked for the run's cancellation while the command waited."""


def api_url(env: Mapping[str, str] = os.environ) -> str | None:
    return (env.get("PREFECT_API_URL") or "").rstrip("/") or None


class Api:
    """The few REST calls this needs, with the headers and TLS settings Prefect's own client
    would use. The standard library's HTTP client: httpx costs ~0.3 s to import and set up,
    a third of the command's start."""

    def __init__(self, url: str, env: Mapping[str, str] = os.environ) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth := env.get("PREFECT_API_AUTH_STRING"):
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        elif key := env.get("PREFECT_API_KEY"):
            self.headers["Authorization"] = f"Bearer {key}"
        self.context: ssl.SSLContext | None = None
        if url.startswith("https:"):
            if env.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() in ("1", "true", "yes"):
                self.context = ssl._create_unverified_context()
            else:
                cafile = env.get("PREFECT_API_SSL_CERT_FILE") or env.get("SSL_CERT_FILE")
                self.context = ssl.create_default_context(cafile=cafile or None)

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}/{path}", data=data, method=method, headers=self.headers
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self.context) as r:
                return Response(r.status, r.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HandoffError(f"cannot reach the Prefect server at {self.url}: {reason}") from exc

    def get(self, path: str) -> Response:
        return self.call("GET", path)

    def post(self, path: str, body: Mapping[str, Any]) -> Response:
        """POST, with the CSRF token a server that asks for one wants (as Prefect's client)."""
        response = self.call("POST", path, body)
        if response.status == 403 and "CSRF" in response.text:
            client_id = str(uuid.uuid4())
            token = self.get(f"csrf-token?client={client_id}")
            token.check("fetching a CSRF token")
            self.headers["Prefect-Csrf-Token"] = token.json()["token"]
            self.headers["Prefect-Csrf-Client"] = client_id
            response = self.call("POST", path, body)
        return response


@dataclass(frozen=True)
class Response:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def check(self, doing: str) -> None:
        if self.status >= 400:
            detail = self.text[:300].strip()
            raise HandoffError(f"Prefect server: {doing}: HTTP {self.status} {detail}")


def online_worker(http: Api) -> Worker | None:
    """The route-job deployment's pool, if it is a dicom-router pool with a worker online.

    None means "run the flow here": no deployment, another pool type (a process worker
    would start an interpreter per run, slower than this command), or no worker online.
    """
    response = http.get(f"deployments/name/{DEPLOYMENT}")
    if response.status == 404:
        return None
    response.check("reading the route-job deployment")
    deployment = response.json()
    pool = deployment.get("work_pool_name")
    if not pool:
        return None
    quoted = urllib.parse.quote(pool, safe="")
    response = http.get(f"work_pools/{quoted}")
    response.check(f"reading work pool {pool}")
    if response.json().get("type") != WORKER_TYPE:
        return None
    response = http.post(
        f"work_pools/{quoted}/workers/filter",
        {"workers": {"status": {"any_": ["ONLINE"]}}, "limit": 1},
    )
    response.check(f"reading the workers of pool {pool}")
    workers = response.json()
    if not workers:
        return None
    return Worker(deployment["id"], pool, workers[0].get("name", "?"))


def run_on_worker(
    http: Api,
    target: Worker,
    job_dir: Path,
    parameters: Mapping[str, Any],
    *,
    on_created: Callable[[str, str], None] = lambda run_id, name: None,
) -> Ended:
    """Create the run from the deployment, wait for its final state, read its report.

    SIGINT or SIGTERM while waiting asks the server to cancel the run (the worker stops it
    between two C-STOREs, its record true) and waits for that end.
    """
    body = {
        "name": job_dir.name,
        "parameters": {"job_dir": str(job_dir), **parameters},
        "state": {"type": "SCHEDULED", "message": "created by dicom-router route"},
    }
    response = http.post(f"deployments/{target.deployment_id}/create_flow_run", body)
    response.check("creating the flow run")
    run = response.json()
    run_id, name = run["id"], run.get("name") or job_dir.name
    on_created(run_id, name)
    with _signals() as asked:
        state = _wait(http, run_id, asked)
    report = read_report(job_dir)
    if report is not None and run_id not in str(report.get("origin", "")):
        report = None  # an earlier run's: this one ended before writing its report
    return Ended(
        flow_run_id=run_id,
        name=name,
        state_type=state.get("type", ""),
        state_name=state.get("name", ""),
        message=state.get("message") or "",
        report=report,
        interrupted=bool(asked),
    )


def _wait(http: Api, run_id: str, asked: list[int]) -> dict[str, Any]:
    """Read the run's state until it is final; after a signal, ask for its cancellation
    once (the worker stops it between two C-STOREs, its record true) and wait for that."""
    waits = iter(POLL_SECONDS)
    cancelling = False
    while True:
        if asked and not cancelling:
            state = {"type": "CANCELLING", "message": "cancelled by dicom-router route (signal)"}
            response = http.post(f"flow_runs/{run_id}/set_state", {"state": state, "force": True})
            response.check(f"cancelling flow run {run_id}")
            cancelling = True
        response = http.get(f"flow_runs/{run_id}")
        response.check(f"reading flow run {run_id}")
        state = response.json().get("state") or {}
        if state.get("type") in FINAL:
            return state
        time.sleep(next(waits, POLL_SECONDS[-1]))


@contextmanager
def _signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM noted (the first) or stopping the wait (the second)."""
    asked: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if asked:  # the run goes on being cancelled without us
            raise KeyboardInterrupt
        asked.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
