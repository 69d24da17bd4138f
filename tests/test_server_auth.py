"""The Prefect server as the README sets it up: basic authentication, and nothing in the open.

A real `prefect server` with PREFECT_SERVER_API_AUTH_STRING; the warm worker without, with a
wrong, and with the right credentials; a job routed over DICOM TLS through it, after which
every output of the run is searched for the secrets. And a server that answers without
authentication at a non-loopback address (a test host of its own: a network namespace with
10.203.0.1 on its loopback device) is refused by `setup` unless the site says it means it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.record import RECORD, STATUS
from tests.factory import write_job
from tests.fixtures_prefect import REPO_ROOT, PrefectServer, WorkPool, work_pools
from tests.fixtures_tls import Pki

pytestmark = [pytest.mark.flow, pytest.mark.peers]

PASSWORD = "s3cret-Passw0rd-for-the-test"
AUTH = f"admin:{PASSWORD}"


@pytest.fixture(scope="module")
def auth_server(prefect_servers: Callable[..., PrefectServer]) -> PrefectServer:
    return prefect_servers(auth=AUTH)


def status_of(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def worker_cli(server: PrefectServer, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = server.env(tmp / "home", **env)
    for key in [k for k, v in env.items() if v == ""]:
        full.pop(key)
    return subprocess.run(
        [sys.executable, "-m", "router", "worker", "--pool", "nobody-pool"],
        cwd=REPO_ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_server_refuses_calls_without_the_password(
    auth_server: PrefectServer, tmp_path: Path
) -> None:
    # no database URL: SQLite in the server's own PREFECT_HOME
    assert auth_server.database_url.startswith("sqlite+aiosqlite:///")
    assert (auth_server.home / "prefect.db").exists()
    api = auth_server.api_url
    assert status_of(f"{api}/health") == 200  # probes stay open
    assert status_of(f"{api}/admin/version") == 401
    assert status_of(f"{api}/admin/version", "admin:wrong") == 401
    assert status_of(f"{api}/admin/version", AUTH) == 200
    without = worker_cli(auth_server, tmp_path, PREFECT_API_AUTH_STRING="")
    assert without.returncode == 2
    assert "requires authentication: set PREFECT_API_AUTH_STRING" in without.stderr
    wrong = worker_cli(auth_server, tmp_path, PREFECT_API_AUTH_STRING="admin:wrong")
    assert wrong.returncode == 2 and "refused PREFECT_API_AUTH_STRING (401)" in wrong.stderr
    assert PASSWORD not in without.stderr + wrong.stderr


@pytest.fixture
def tls_scp(scp: Callable[..., Any], pki: Pki) -> Any:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return scp(ae_title="PACS", ssl_context=context)


@pytest.fixture
def auth_pool(
    auth_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkPool]]:
    with work_pools(auth_server, tmp_path_factory) as make:
        yield make


def test_a_run_through_an_authenticated_server_leaves_no_secret_in_the_open(
    auth_server: PrefectServer,
    auth_pool: Callable[..., WorkPool],
    tls_scp: Any,
    pki: Pki,
    tmp_path: Path,
) -> None:
    client_key_text = pki.client_key.read_text()
    key_lines = [line for line in client_key_text.splitlines() if "-----" not in line]
    secrets = [PASSWORD, AUTH, *key_lines]
    rules = tmp_path / "rules.json"
    destination = {
        "IP": "127.0.0.1",
        "PORT": tls_scp.port,
        "AETitleSender": "ROUTER",
        "AETitleTo": "PACS",
        "tls": {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)},
    }
    rules.write_text(json.dumps({"routing": [{"send": [{".*": destination}]}]}))
    allowlist = tmp_path / "allowed"
    allowlist.write_text(f"127.0.0.1:{tls_scp.port} PACS\n")
    log = tmp_path / "routing.log"
    env = {
        "DICOM_ROUTER_CONFIG": str(rules),
        "DICOM_ROUTER_LOG_FILE": str(log),
        "DICOM_ROUTER_ALLOWLIST": str(allowlist),
        "DICOM_ROUTER_JOBS_ROOT": str(tmp_path / "jobs"),
    }
    pool = auth_pool(1, env=env, warm=True)
    deployment = pool.deploy("flows/route_job.py:route_job_flow", "auth")
    job = tmp_path / "jobs" / "job"
    write_job(job, n_output=2, n_input=0)
    run = auth_server.run_deployment(deployment, {"job_dir": str(job)})
    done = auth_server.wait_for_flow_runs([run.id], timeout=120, pool=pool)[run.id]
    assert done.state is not None and done.state.is_completed(), done.state
    assert len(tls_scp.instances) == 2

    outputs = {
        "routing log": log.read_text(),
        "record": (job / RECORD).read_text(),
        "status": (job / STATUS).read_text(),
        "worker log": pool.logs(),
        "run logs": "\n".join(  # every record of the run, up to its last
            entry.message for entry in auth_server.logs(run.id, containing="Finished in state")
        ),
        "run parameters": json.dumps(done.parameters),
        "server log": auth_server.log(),
    }
    with auth_server.client() as client:
        artifacts = client.read_artifacts()
    outputs["artifacts"] = "\n".join(f"{a.description}\n{a.data}" for a in artifacts)
    for name, text in outputs.items():
        found = [s for s in secrets if s and s in text]
        assert not found, f"{name} holds a secret"
    assert outputs["run logs"]  # the grep looked at something


_OPEN_SERVER = r"""
set -eu
ip link set lo up
ip addr add 10.203.0.1/32 dev lo
"$PYTHON" -c "$SERVER" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://10.203.0.1:4200/api/health', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
PREFECT_API_URL=http://10.203.0.1:4200/api "$PYTHON" -m router setup --config "$CONFIG" > "$OUT/refused.out" 2> "$OUT/refused.err" || echo $? > "$OUT/refused.code"
cp "$OUT/requests" "$OUT/requests.refused"
PREFECT_API_URL=http://10.203.0.1:4200/api DICOM_ROUTER_ALLOW_OPEN_SERVER=true "$PYTHON" -m router setup --config "$CONFIG" > "$OUT/allowed.out" 2> "$OUT/allowed.err" || echo $? > "$OUT/allowed.code"
"""

_STAND_IN = """
from http.server import BaseHTTPRequestHandler, HTTPServer
class Open(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'"3.9.1"')
    def log_message(self, *args):
        with open(__import__("os").environ["OUT"] + "/requests", "a") as f:
            f.write(self.command + " " + self.path + "\\n")
HTTPServer(("10.203.0.1", 4200), Open).serve_forever()
"""
"""Answers every GET 200, as an API without authentication does: enough for the probe, which
is all `setup` may send before it refuses."""


def test_setup_refuses_an_open_server_at_a_non_loopback_address(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare(1) and ip(8) for a network namespace of its own")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"routing": []}))
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", _OPEN_SERVER],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PYTHON": sys.executable,
            "SERVER": _STAND_IN,
            "CONFIG": str(rules),
            "OUT": str(tmp_path),
            "PYTHONPATH": str(REPO_ROOT),
            "PREFECT_HOME": str(tmp_path / "home"),
        },
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "refused.code").read_text().strip() == "2"
    refused = (tmp_path / "refused.err").read_text()
    assert (
        "refused: the Prefect server at http://10.203.0.1:4200/api answers API calls without"
        in (refused)
    )
    assert "DICOM_ROUTER_ALLOW_OPEN_SERVER=true" in refused
    # before refusing, it asked nothing but the probes
    asked = (tmp_path / "requests.refused").read_text().splitlines()
    probes = [line for line in asked if line != "GET /api/health"]  # the script's own wait
    assert probes and set(probes) == {"GET /api/admin/version"}
    # with the setting, it goes on (and fails later only because the stand-in is no Prefect)
    allowed = (tmp_path / "allowed.err").read_text()
    assert "answers without authentication (DICOM_ROUTER_ALLOW_OPEN_SERVER is set" in allowed
