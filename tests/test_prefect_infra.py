"""The Prefect service fixtures work: a real server on PostgreSQL, real process workers.

What later service tests rely on: deployments from the working tree run on workers,
several runs overlap without "database is locked", a failed run can be retried as the
UI does, the real `route-job` flow delivers to a DICOM peer from a worker, and stopping
a worker leaves no process behind. Timings go to the terminal summary.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.record import read_status
from tests.factory import dicom_file, write_job
from tests.fixtures_dcmtk import StoreSCP
from tests.fixtures_prefect import (
    REPO_ROOT,
    SERVER_VENV,
    Postgres,
    PrefectServer,
    WorkPool,
    marked_processes,
    record_timing,
    server_runtime,
    work_pools,
)

pytestmark = pytest.mark.flow

FLOWS = "tests/flows_for_tests.py"
ROUTER_ENV = {
    "DICOM_ROUTER_RETRIES": "1",
    "DICOM_ROUTER_RETRY_DELAY": "0.1",
    "DICOM_ROUTER_CONNECT_TIMEOUT": "2",
    "DICOM_ROUTER_DIMSE_TIMEOUT": "5",
}


@pytest.fixture(scope="module")
def pool(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkPool]:
    """Two workers of at most 2 runs each, shared by the module (a worker costs ~5-10 s)."""
    with work_pools(prefect_server, tmp_path_factory) as make:
        yield make(2, limit=2, env=ROUTER_ENV)


def _record_overheads(server: PrefectServer, ids: list[Any], label: str) -> dict[str, float]:
    timelines = [server.timeline(i) for i in ids]
    medians = {
        "worker pickup (created → Pending)": statistics.median(t["Pending"] for t in timelines),
        "flow process start (Pending → Running)": statistics.median(
            t["Running"] - t["Pending"] for t in timelines
        ),
        "flow body and exit (Running → Completed)": statistics.median(
            t["Completed"] - t["Running"] for t in timelines
        ),
        "total (created → Completed)": statistics.median(t["Completed"] for t in timelines),
    }
    for what, seconds in medians.items():
        record_timing(f"{label}: median {what}", seconds)
    return medians


def test_four_runs_on_two_workers(prefect_server: PrefectServer, pool: WorkPool) -> None:
    name = pool.deploy(f"{FLOWS}:add_flow", "add")
    start = time.monotonic()
    ids = [prefect_server.run_deployment(name, {"a": i, "b": 10}).id for i in range(4)]
    runs = prefect_server.wait_for_flow_runs(ids, timeout=150, pool=pool)
    record_timing("4 runs on 2 workers, created to all final", time.monotonic() - start)

    assert [runs[i].state.name for i in ids] == ["Completed"] * 4, pool.logs()
    # --limit 2 per worker: four overlapping runs need both workers. Both may try to take
    # the same run; the server lets one through and aborts the other's submission.
    ran = {
        w.name: sum(
            f"Flow run '{runs[i].name}' submitted to infrastructure" in w.log() for i in ids
        )
        for w in pool.workers
    }
    assert sum(ran.values()) == 4 and min(ran.values()) >= 1, ran
    tasks = prefect_server.task_runs(ids[0], at_least=2)
    assert len(tasks) == 2 and all(t.state.is_completed() for t in tasks)
    _record_overheads(prefect_server, ids, "4 overlapping runs")


def test_retry_like_the_ui(prefect_server: PrefectServer, pool: WorkPool, tmp_path: Path) -> None:
    name = pool.deploy(f"{FLOWS}:fail_until_marker", "fail-until-marker")
    marker = tmp_path / "marker"
    run = prefect_server.run_deployment(name, {"marker": str(marker)})
    state = prefect_server.wait_for_flow_runs([run.id], timeout=60, pool=pool)[run.id].state
    assert state.is_failed()
    assert "marker is missing" in str(state.message)
    logs = prefect_server.logs(run.id, containing="marker is missing")
    assert any("marker is missing" in log.message for log in logs)

    marker.touch()
    start = time.monotonic()
    result = prefect_server.retry_flow_run(run.id)
    assert result.status.value == "ACCEPT", result
    after = prefect_server.wait_for_flow_runs([run.id], timeout=60, pool=pool)[run.id]
    record_timing("retry (set_state to all final)", time.monotonic() - start)
    assert after.state.is_completed()
    assert after.run_count == 2
    names = [s.name for s in _states(prefect_server, run.id)]
    assert names.count("Running") == 2 and "AwaitingRetry" in names


def _states(server: PrefectServer, flow_run_id: Any) -> list[Any]:
    with server.client() as client:
        return sorted(client.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)


@pytest.mark.peers
def test_route_job_flow_on_a_worker(
    prefect_server: PrefectServer,
    pool: WorkPool,
    storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    scp = storescp("STORESCP")
    job = tmp_path / "ct-0001"
    write_job(job, n_output=3, n_input=1)
    config = tmp_path / "routing.json"
    destination = {
        "IP": "127.0.0.1",
        "PORT": scp.port,
        "AETitleSender": "ROUTER",
        "AETitleTo": "STORESCP",
    }
    config.write_text(json.dumps({"routing": [{"send": [{".*": destination}]}]}))
    log_file = tmp_path / "routing.log"

    # As production deploys it: `prefect deploy` with the repo's prefect.yaml.
    start = time.monotonic()
    prefect_server.cli("deploy", "--name", "route-job", "--pool", pool.name)
    record_timing("prefect deploy --name route-job (CLI)", time.monotonic() - start)
    name = "route-job/route-job"
    with prefect_server.client() as client:
        deployment = client.read_deployment_by_name(name)
    assert deployment.work_pool_name == pool.name
    assert deployment.entrypoint == "flows/route_job.py:route_job_flow"
    params = {"job_dir": str(job), "config": str(config), "log_file": str(log_file)}
    run = prefect_server.run_deployment(name, params)
    final = prefect_server.wait_for_flow_runs([run.id], timeout=90, pool=pool)[run.id]

    assert final.state.is_completed(), [log.message for log in prefect_server.logs(run.id)]
    assert final.name == "ct-0001"
    outputs = {dicom_file(p).sop_instance_uid for p in (job / "OUTPUT").glob("*.dcm")}
    assert scp.received() == {uid: 1 for uid in outputs}
    assert read_status(job).state == "routed"  # type: ignore[union-attr]
    assert log_file.exists()
    tasks = prefect_server.task_runs(run.id, at_least=4)  # load, match, select, send
    assert any(t.name.startswith("send ") and t.state.is_completed() for t in tasks)
    _record_overheads(prefect_server, [run.id], "route-job run")


def test_stopping_a_worker_kills_its_flow_runs(
    prefect_server: PrefectServer, work_pool: Callable[..., WorkPool], tmp_path: Path
) -> None:
    """Flow runs live in sessions of their own; stop() must still leave nothing behind."""
    pool = work_pool(1)
    name = pool.deploy(f"{FLOWS}:sleep_flow", "sleep")
    started = tmp_path / "started"
    prefect_server.run_deployment(name, {"seconds": 300, "started": str(started)})
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, pool.logs()
        time.sleep(0.2)
    flow_pid = int(started.read_text())
    worker = pool.workers[0]
    assert flow_pid in marked_processes(worker.service.marker)

    start = time.monotonic()
    worker.stop()
    record_timing("worker stop with a run in progress", time.monotonic() - start)
    assert not worker.running
    assert marked_processes(worker.service.marker) == {}
    assert not running(flow_pid)


def running(pid: int) -> bool:
    """Is `pid` a live process? A zombie (dead, its parent has not reaped it yet) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def test_postgres_cluster(postgres: Postgres) -> None:
    """Loopback only, password over TCP, and fresh databases for a clean Prefect on demand."""
    import asyncio

    import asyncpg

    assert postgres.psql("SHOW listen_addresses").strip() == "127.0.0.1"
    url = postgres.create_database("infra_extra")
    assert url.endswith(f"@127.0.0.1:{postgres.port}/infra_extra")

    async def who() -> str:
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            return await conn.fetchval("SELECT current_user || '@' || current_database()")
        finally:
            await conn.close()

    assert asyncio.run(who()) == "prefect@infra_extra"
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(
            asyncpg.connect(url.replace(postgres.password, "wrong").replace("+asyncpg", ""))
        )


def test_the_server_runs_as_install_server_sets_it_up(prefect_server: PrefectServer) -> None:
    """The session's server runs on the virtualenv deployments/install-server.sh made: the
    router's Prefect release, on the Python the script takes (3.13 or newer where the host
    has one: Prefect's datetimes are then the standard library's, not pendulum's), uvicorn
    on uvloop and httptools."""
    import prefect

    found = server_runtime(prefect_server.service.process.pid)
    assert found.prefect == prefect.__version__, f"server {found}, router {prefect.__version__}"
    script = REPO_ROOT / "deployments" / "install-server.sh"
    taken = subprocess.run(
        [str(script), "--which-python"],
        env={**os.environ, "ROUTER_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    version = "import platform; print(platform.python_version())"
    wanted = subprocess.run([taken, "-c", version], capture_output=True, text=True, check=True)
    assert found.python == wanted.stdout.strip(), (
        f"install-server.sh takes {taken}, the server runs {found}: run scripts/test, or "
        "deployments/install-server.sh .server-venv"
    )
    assert found.uvloop, f"uvicorn runs on asyncio's own loop, not uvloop: {found}"
    assert found.httptools, f"uvicorn parses HTTP with h11, not httptools: {found}"


def test_install_server_names_what_is_missing_and_leaves_a_current_venv_alone(
    tmp_path: Path,
) -> None:
    """Without the router's Prefect the script says what to do and makes nothing; run again
    over the virtualenv scripts/test made, it finds it current and installs nothing."""
    script = str(REPO_ROOT / "deployments" / "install-server.sh")
    venv = tmp_path / "server-venv"
    missing = subprocess.run(
        [script, str(venv)],
        env={**os.environ, "ROUTER_PYTHON": str(tmp_path / "no-python")},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert "has no Prefect: install the router first" in missing.stderr
    assert "PREFECT_VERSION=X.Y.Z" in missing.stderr
    assert not venv.exists()

    assert SERVER_VENV.exists(), "run scripts/test, or deployments/install-server.sh .server-venv"
    before = (SERVER_VENV / "pyvenv.cfg").stat().st_mtime_ns
    again = subprocess.run(
        [script, str(SERVER_VENV)],
        env={**os.environ, "ROUTER_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.strip().endswith("(current)"), again.stdout + again.stderr
    assert (SERVER_VENV / "pyvenv.cfg").stat().st_mtime_ns == before
