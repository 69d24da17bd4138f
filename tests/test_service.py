"""Routing as a service: a real Prefect server on PostgreSQL, real warm workers.

What a site relies on, end to end, with `dicom-router worker` as the README sets it up: a
finished processing run triggers `route-job`; a job announced from Python is routed by
the run the call returns, and an announcement the server cannot take raises; a job
announced by an event (`prefect event emit`) is routed; a worker takes a run the moment
it is scheduled, from the pool's events, not its poll; a failed run retried as the UI does sends only what is missing; a run cancelled as the UI
does stops between C-STOREs with its record true; a run that raises fails alone; a
deployed sweep fans the pending jobs out to the workers; two workers routing 20 jobs from
one folder deliver every instance exactly once, hold the per-job lock and the
per-destination concurrency limit across workers; a worker killed with SIGKILL mid-send
leaves its run Crashed (heartbeats), and a Retry completes it with at most one duplicate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from router.record import RECORD, read_status
from tests.factory import dicom_file, write_job
from tests.fixtures_prefect import (
    REPO_ROOT,
    PrefectServer,
    WorkPool,
    record_timing,
    work_pools,
)

pytestmark = [pytest.mark.flow, pytest.mark.peers]

ROUTE = "route-job/route-job"


class Site:
    """The folders and settings the workers of this module share."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.config = base / "routing.json"
        self.log_file = base / "routing.log"

    def env(self) -> dict[str, str]:
        return {
            "DICOM_ROUTER_CONFIG": str(self.config),
            "DICOM_ROUTER_LOG_FILE": str(self.log_file),
            "DICOM_ROUTER_RETRIES": "1",
            "DICOM_ROUTER_RETRY_DELAY": "0.2",
            "DICOM_ROUTER_CONNECT_TIMEOUT": "3",
            "DICOM_ROUTER_DIMSE_TIMEOUT": "10",
            "DICOM_ROUTER_JOBS_ROOT": str(self.base),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "router",
        }

    def route_to(self, port: int, aet: str, **dest: Any) -> None:
        destination = {
            "IP": "127.0.0.1",
            "PORT": port,
            "AETitleSender": "ROUTER",
            "AETitleTo": aet,
            **dest,
        }
        self.config.write_text(json.dumps({"routing": [{"send": [{".*": destination}]}]}))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def pool(
    prefect_server: PrefectServer, site: Site, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkPool]:
    """Two warm workers on one pool, deployed as production deploys (prefect.yaml)."""
    with work_pools(prefect_server, tmp_path_factory) as make:
        workers = make(2, limit=4, env=site.env(), warm=True)
        prefect_server.cli("deploy", "--name", "route-job", "--pool", workers.name)
        yield workers


def uids(job: Path, folder: str = "OUTPUT") -> set[str]:
    return {dicom_file(p).sop_instance_uid for p in (job / folder).rglob("*.dcm")}


def route_runs_for(server: PrefectServer, job: Path, timeout: float, pool: WorkPool) -> Any:
    """Wait for a `route-job` run of `job` (created by a trigger) to end; return it."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.client() as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["route-job"]))
            )
        mine = [r for r in runs if r.parameters.get("job_dir") == str(job)]
        if mine and all(r.state and r.state.is_final() for r in mine):
            return mine
        time.sleep(0.5)
    raise TimeoutError(f"no finished route-job run for {job} within {timeout} s\n{pool.logs()}")


def test_a_finished_processing_run_triggers_routing(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, storescp: Callable[..., Any]
) -> None:
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    process = pool.deploy("flows/process_example.py:process_job", "process-job")
    job = site.base / "jobs" / "triggered-0001"
    write_job(job, success=None, n_output=0, n_input=3)

    run = prefect_server.run_deployment(process, {"job_dir": str(job)})
    done = prefect_server.wait_for_flow_runs([run.id], timeout=120, pool=pool)[run.id]
    assert done.state.is_completed()
    [routed] = route_runs_for(prefect_server, job, 180, pool)
    assert routed.state.is_completed(), routed.state.message
    assert routed.name == "triggered-0001"
    assert pacs.received() == {uid: 1 for uid in uids(job)}
    assert uids(job) == uids(job, "INPUT")  # the example computation copies its input


ANNOUNCE = """\
import json, sys
from flows.notify import job_processed
run = job_processed(*sys.argv[1:])
print(json.dumps({"id": str(run.id), "name": run.name}))
"""


def announce(server: PrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    """`job_processed(*args)` in a process of its own, as processing code calls it."""
    return subprocess.run(
        [sys.executable, "-c", ANNOUNCE, *args],
        cwd=REPO_ROOT,
        env=server.env(),
        timeout=60,
        capture_output=True,
        text=True,
    )


def test_a_job_announced_from_python_is_routed_by_the_run_it_returns(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, storescp: Callable[..., Any]
) -> None:
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "announced-0001"
    write_job(job, n_output=2, n_input=0)
    done = announce(prefect_server, str(job))
    assert done.returncode == 0, done.stderr
    announced = json.loads(done.stdout.strip().splitlines()[-1])
    [routed] = route_runs_for(prefect_server, job, 180, pool)
    assert str(routed.id) == announced["id"]  # the run it returned is the one that routed
    assert announced["name"] == "announced-0001"  # named at creation: the engine need not
    assert routed.state.is_completed(), routed.state.message
    assert routed.name == "announced-0001"
    assert pacs.received() == {uid: 1 for uid in uids(job)}


def test_an_announcement_the_server_cannot_take_raises_and_creates_nothing(
    prefect_server: PrefectServer, pool: WorkPool, site: Site
) -> None:
    job = site.base / "jobs" / "unannounced-0001"
    write_job(job, n_output=1, n_input=0)
    done = announce(prefect_server, str(job), "route-job/no-such-deployment")
    assert done.returncode == 1
    assert (
        "AnnounceError: deployment 'route-job/no-such-deployment' not found on "
        f"{prefect_server.api_url}" in done.stderr
    ), done.stderr
    (job / "proc.json").unlink()
    done = announce(prefect_server, str(job))
    assert done.returncode == 1
    assert f"FileNotFoundError: {job}: write proc.json before announcing the job" in done.stderr
    with prefect_server.client() as client:
        runs = client.read_flow_runs()
    assert not [r for r in runs if r.parameters.get("job_dir") == str(job)]


def test_a_run_with_a_bad_parameter_ends_invalid_naming_it_and_sends_nothing(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, storescp: Callable[..., Any]
) -> None:
    """The deployment leaves the parameters' check to the run (prefect.yaml): a `force`
    that is not a boolean must not pass as true."""
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "bad-parameter-0001"
    write_job(job, n_output=2, n_input=0)
    run = prefect_server.run_deployment(ROUTE, {"job_dir": str(job), "force": "maybe"})
    done = prefect_server.wait_for_flow_runs([run.id], timeout=60, pool=pool)[run.id]
    assert done.state.is_failed() and done.state.name == "Invalid", done.state
    assert done.state.message == (
        "invalid parameters: force: Input should be a valid boolean, unable to interpret "
        "input (got 'maybe')"
    )
    assert not (job / RECORD).exists()
    assert pacs.received() == {}


def test_a_job_announced_by_event_is_routed(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, storescp: Callable[..., Any]
) -> None:
    """What a shell script does: the deployment's trigger turns the event into the run."""
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "announced-by-event-0001"
    write_job(job, n_output=2, n_input=0)
    prefect_server.cli(
        "event",
        "emit",
        "dicom.job.processed",
        "--resource-id",
        f"dicom.job.{job}",
        "--payload",
        json.dumps({"job_dir": str(job)}),
    )
    [routed] = route_runs_for(prefect_server, job, 180, pool)
    assert routed.state.is_completed(), routed.state.message
    assert pacs.received() == {uid: 1 for uid in uids(job)}


def test_a_warm_worker_takes_a_run_the_moment_it_is_scheduled(
    prefect_server: PrefectServer,
    work_pool: Callable[..., WorkPool],
    site: Site,
    storescp: Callable[..., Any],
) -> None:
    """Pickup is the pool's events, not the poll: with the worker's own poll an hour
    apart, runs created as the UI's Run does, and a UI Retry, start within seconds."""
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    env = {**site.env(), "PREFECT_WORKER_QUERY_SECONDS": "3600"}
    evented = work_pool(1, env=env, warm=True)
    name = evented.deploy("flows/route_job.py:route_job_flow", "route-job-evented")
    expected: set[str] = set()
    pickups: list[float] = []
    for i in range(3):
        job = site.base / "jobs" / f"evented-{i:04d}"
        write_job(job, n_output=2, n_input=0)
        expected |= uids(job)
        run = prefect_server.run_deployment(name, {"job_dir": str(job)})
        done = prefect_server.wait_for_flow_runs([run.id], timeout=30, pool=evented)[run.id]
        assert done.state.is_completed(), done.state.message
        pickups.append(prefect_server.timeline(run.id)["Pending"])
    assert pacs.received() == {uid: 1 for uid in expected}
    assert max(pickups) < 5.0, pickups

    result = prefect_server.retry_flow_run(run.id)
    assert result.status.value == "ACCEPT", result

    def retried() -> bool:
        with prefect_server.client() as client:
            states = sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
        names = [s.name for s in states]
        return names.count("Running") == 2 and names[-1] == "Completed"

    wait_until(retried, 30, "the retried run Completed")
    assert pacs.received() == {uid: 1 for uid in expected}  # already there: not sent again


def test_an_event_naming_a_folder_outside_the_jobs_root_is_refused(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, storescp: Callable[..., Any]
) -> None:
    pacs = storescp("PACS")
    site.route_to(pacs.port, "PACS")
    outside = site.base.parent / f"{site.base.name}-outside" / "scans"
    write_job(outside, n_output=2, n_input=0)
    asked = site.base / "jobs" / ".." / ".." / outside.parent.name / "scans"  # .. out of it
    code = (
        "import sys; from prefect.events import emit_event; "
        "emit_event(event='dicom.job.processed', resource={'prefect.resource.id': 'x'}, "
        "payload={'job_dir': sys.argv[1]})"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(asked)],
        cwd=REPO_ROOT,
        env=prefect_server.env(),
        check=True,
        timeout=60,
    )
    [run] = route_runs_for(prefect_server, asked, 180, pool)
    assert run.state.is_failed() and run.state.name == "Refused", run.state
    assert "not under the jobs root" in (run.state.message or "")
    assert pacs.received() == {}
    assert sorted(p.name for p in outside.iterdir()) == [
        "INPUT",
        "OUTPUT",
        "info.json",
        "proc.json",
    ]
    log = site.log_file.read_text()
    assert f"job={asked} outcome=refused" in log and f"({run.id})" in log


def test_a_retry_from_the_ui_sends_only_what_is_missing(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS")
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "retried-0001"
    write_job(job, n_output=4, n_input=0)
    refused = sorted(uids(job))[2]
    pacs.refuse_instances[refused] = 0xC000

    run = prefect_server.run_deployment(ROUTE, {"job_dir": str(job)})
    first = prefect_server.wait_for_flow_runs([run.id], timeout=120, pool=pool)[run.id]
    assert first.state.is_failed()
    assert "0xC000" in str(first.state.message)
    assert pacs.instances == uids(job) - {refused}

    pacs.refuse_instances.clear()
    result = prefect_server.retry_flow_run(run.id)
    assert result.status.value == "ACCEPT", result
    again = prefect_server.wait_for_flow_runs([run.id], timeout=120, pool=pool)[run.id]
    assert again.state.is_completed(), again.state.message
    assert again.run_count == 2
    assert pacs.counts == {uid: 1 for uid in uids(job)}
    lines = [json.loads(x) for x in (job / RECORD).read_text().splitlines()]
    statuses = [e["status"] for e in lines if e.get("sop") == refused]
    assert statuses == [0xC000, 0x0000]
    assert read_status(job).state == "routed"  # type: ignore[union-attr]


def test_two_workers_route_twenty_jobs_exactly_once(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS", delay=0.02)
    site.route_to(pacs.port, "PACS", max_associations=2)
    root = site.base / "shared"
    jobs = [root / f"job{i:02d}" for i in range(20)]
    for job in jobs:
        write_job(job, n_output=3, n_input=0)
    # five jobs get a second run at the same time: the per-job lock must hold across workers
    parameters = [{"job_dir": str(j)} for j in jobs] + [{"job_dir": str(j)} for j in jobs[:5]]
    ids: list[UUID] = [prefect_server.run_deployment(ROUTE, p).id for p in parameters]
    runs = prefect_server.wait_for_flow_runs(ids, timeout=420, pool=pool)

    expected = set().union(*(uids(j) for j in jobs))
    assert len(expected) == 60
    assert pacs.counts == {uid: 1 for uid in expected}
    assert pacs.max_open <= 2  # the destination's limit held across both workers
    for run in runs.values():
        ok = run.state.is_completed()
        locked = run.state.is_failed() and "another routing of this job" in str(run.state.message)
        assert ok or locked, (run.name, run.state.message)
    assert all(read_status(j).state == "routed" for j in jobs)  # type: ignore[union-attr]
    log = pool.logs()
    assert all(w.name in log for w in pool.workers)


def test_setup_gives_a_pool_of_an_earlier_version_the_current_job_template(
    prefect_server: PrefectServer,
) -> None:
    """Pools made while the pool had a job template (the server checked every run's job
    variables against it) lose it when setup runs again."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.base import BaseWorker

    from flows.service import ensure_work_pool
    from flows.worker import WORKER_TYPE, RouterWorker

    earlier = BaseWorker.get_default_base_job_template.__func__(RouterWorker)  # type: ignore[attr-defined]
    assert earlier["variables"]["properties"]
    with prefect_server.client() as client:
        client.create_work_pool(
            WorkPoolCreate(name="earlier-pool", type=WORKER_TYPE, base_job_template=earlier)
        )
    with prefect_server.settings():
        assert ensure_work_pool("earlier-pool").endswith("its job template updated")
        assert ensure_work_pool("earlier-pool") == "work pool earlier-pool: exists"
    with prefect_server.client() as client:
        pool = client.read_work_pool("earlier-pool")
    assert pool.base_job_template == {}


def test_setup_and_a_deployed_sweep(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS")
    site.route_to(pacs.port, "PACS", max_associations=3)
    env = {**prefect_server.env(), **site.env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    setup = subprocess.run(
        [sys.executable, "-m", "router", "setup", "--pool", pool.name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert setup.returncode == 0, setup.stderr
    limit = f"dicom-router-127.0.0.1-{pacs.port}"
    assert f"concurrency limit {limit}: 3" in setup.stdout
    with prefect_server.client() as client:
        assert client.read_global_concurrency_limit_by_name(limit).limit == 3

    root = site.base / "sweep"
    pending = [root / f"p{i}" for i in range(3)]
    for job in pending:
        write_job(job, n_output=2, n_input=0)
    write_job(root / "waiting", success=None, n_output=1, n_input=0)
    prefect_server.cli(
        "deploy",
        "--name",
        "sweep-unrouted",
        "--pool",
        pool.name,
        env={"DICOM_ROUTER_JOBS_ROOT": str(root)},
    )
    run = prefect_server.run_deployment("sweep-unrouted/sweep-unrouted")
    done = prefect_server.wait_for_flow_runs([run.id], timeout=300, pool=pool)[run.id]
    assert done.state.is_completed(), done.state.message
    assert pacs.counts == {uid: 1 for uid in set().union(*(uids(j) for j in pending))}
    assert read_status(root / "waiting") is None


def recorded(job: Path, *, stored: bool = True) -> list[str]:
    """SOPInstanceUIDs of the record's store lines (stored ones, or all), in order."""
    lines = [json.loads(x) for x in (job / RECORD).read_text().splitlines() if x.strip()]
    return [e["sop"] for e in lines if e.get("event") == "store" and (e["stored"] or not stored)]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_a_run_cancelled_from_the_ui_stops_between_c_stores(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    from prefect.states import Cancelling

    pacs = scp(ae_title="PACS", delay=0.05)
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "cancelled-0001"
    write_job(job, n_output=60, n_input=0, rows=16, cols=16)
    run = prefect_server.run_deployment(ROUTE, {"job_dir": str(job)})
    wait_until(lambda: len(pacs.instances) >= 3, 60, "instance stored")

    with prefect_server.client() as client:  # what the UI's Cancel does
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    done = prefect_server.wait_for_flow_runs([run.id], timeout=60, pool=pool)[run.id]
    assert done.state.is_cancelled(), (done.state.name, done.state.message)
    arrived = dict(pacs.counts)
    time.sleep(0.5)
    assert pacs.counts == arrived  # nothing sent after the run stopped
    assert 3 <= len(arrived) < 60
    assert sorted(recorded(job)) == sorted(arrived)  # the record is true: no more, no less

    result = prefect_server.retry_flow_run(run.id)  # and a Retry sends the rest, once
    assert result.status.value == "ACCEPT", result
    again = prefect_server.wait_for_flow_runs([run.id], timeout=120, pool=pool)[run.id]
    assert again.state.is_completed(), again.state.message
    assert pacs.counts == {uid: 1 for uid in uids(job)}


def test_a_run_that_raises_fails_alone(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS", delay=0.02)
    site.route_to(pacs.port, "PACS")
    good, bad = site.base / "jobs" / "alone-good", site.base / "jobs" / "alone-bad"
    write_job(good, n_output=30, n_input=0, rows=16, cols=16)
    write_job(bad, n_output=2, n_input=0)
    (bad / "proc.json").write_text("{not json")  # the flow raises out of its run
    runs = [
        prefect_server.run_deployment(ROUTE, {"job_dir": str(good)}),
        prefect_server.run_deployment(ROUTE, {"job_dir": str(bad)}),
    ]
    final = prefect_server.wait_for_flow_runs([r.id for r in runs], timeout=120, pool=pool)
    assert final[runs[0].id].state.is_completed(), final[runs[0].id].state.message
    assert final[runs[1].id].state.is_failed()
    assert "proc.json: not valid JSON" in str(final[runs[1].id].state.message)
    assert pacs.counts == {uid: 1 for uid in uids(good)}
    assert all(w.running for w in pool.workers)


def route_command(
    server: PrefectServer, site: Site, job: Path, *flags: str, importtime: bool = False
) -> subprocess.CompletedProcess[str]:
    """`dicom-router route JOB --json` as a user on a routing host runs it."""
    python = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    return subprocess.run(
        [*python, "-m", "router", "route", str(job), "--json", *flags],
        cwd=REPO_ROOT,
        env={**server.env(), **site.env()},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_command_line_hands_the_job_to_a_warm_worker(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS")
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "handed-0001"
    write_job(job, n_output=3, n_input=0)

    done = route_command(prefect_server, site, job, importtime=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["state"] == "routed", report
    assert pacs.counts == {uid: 1 for uid in uids(job)}
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "router.cli" in imported  # what is searched is there
    assert not {m for m in imported if m == "prefect" or m.startswith("prefect.")}
    # the run is the deployment's, made by one of the pool's workers, like a trigger's
    run_id = UUID(report["origin"].rsplit("(", 1)[1].rstrip(")"))
    run = prefect_server.flow_runs([run_id])[run_id]
    assert run.name == "handed-0001" and run.deployment_id is not None
    assert run.state is not None and run.state.is_completed()
    assert run.labels.get("prefect.worker.name") in {w.name for w in pool.workers}

    done = route_command(prefect_server, site, job)  # again: nothing is missing
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout)
    assert again["origin"] != report["origin"]
    [entry] = again["rules"][0]["entries"]
    assert entry["delivery"]["already"] == 3 and entry["delivery"]["stored"] == 0
    assert pacs.counts == {uid: 1 for uid in uids(job)}


def test_the_command_line_on_a_worker_keeps_its_exit_codes(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    pacs = scp(ae_title="PACS")
    site.route_to(pacs.port, "PACS")
    waiting = site.base / "jobs" / "handed-waiting"
    write_job(waiting, success=None, n_output=1, n_input=0)
    done = route_command(prefect_server, site, waiting)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "not ready" in done.stderr and "proc.json" in done.stderr

    refused = site.base / "jobs" / "handed-refused"
    files = write_job(refused, n_output=3, n_input=0)
    pacs.refuse_instances[dicom_file(files[-1]).sop_instance_uid] = 0xC000
    done = route_command(prefect_server, site, refused)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["state"] == "failed" and "0xC000" in report["reason"]
    assert len(pacs.counts) == 2

    outside = site.base.parent / f"{site.base.name}-outside"
    write_job(outside, n_output=1, n_input=0)
    done = route_command(prefect_server, site, outside)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "jobs root" in done.stderr, done.stderr


def test_ctrl_c_on_the_command_line_cancels_the_worker_s_run(
    prefect_server: PrefectServer, pool: WorkPool, site: Site, scp: Callable[..., Any]
) -> None:
    import signal

    pacs = scp(ae_title="PACS", delay=0.05)
    site.route_to(pacs.port, "PACS")
    job = site.base / "jobs" / "handed-interrupted"
    write_job(job, n_output=60, n_input=0, rows=16, cols=16)
    command = subprocess.Popen(
        [sys.executable, "-m", "router", "route", str(job), "--json"],
        cwd=REPO_ROOT,
        env={**prefect_server.env(), **site.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(pacs.instances) >= 3, 60, "instance stored")
        command.send_signal(signal.SIGINT)
        out, errors = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 130, errors
    assert out == ""  # no report: the run was stopped
    assert "interrupted" in errors and "Cancelled" in errors, errors
    arrived = dict(pacs.counts)
    time.sleep(0.5)
    assert pacs.counts == arrived and 3 <= len(arrived) < 60  # stopped between C-STOREs
    assert sorted(recorded(job)) == sorted(arrived)  # and the record is true


def test_a_killed_worker_s_run_crashes_and_a_retry_completes_it(
    prefect_server: PrefectServer,
    work_pool: Callable[..., WorkPool],
    site: Site,
    scp: Callable[..., Any],
) -> None:
    """kill -9 mid-send: heartbeats stop, the crash automation marks the run Crashed."""
    import os
    import signal

    from flows.service import ensure_crash_automation

    pacs = scp(ae_title="PACS", delay=0.05)
    site.route_to(pacs.port, "PACS")
    crashing = work_pool(1, limit=2, env=site.env(), warm=True, heartbeat=2)
    with prefect_server.settings():
        ensure_crash_automation(crashing.name, 10)
    name = crashing.deploy("flows/route_job.py:route_job_flow", "route-job-crash")
    job = site.base / "jobs" / "killed-0001"
    write_job(job, n_output=60, n_input=0, rows=16, cols=16)
    run = prefect_server.run_deployment(name, {"job_dir": str(job)})
    wait_until(lambda: len(pacs.instances) >= 5, 60, "instance stored")

    os.killpg(crashing.workers[0].service.process.pid, signal.SIGKILL)
    start = time.monotonic()
    wait_until(
        lambda: (
            (r := prefect_server.flow_runs([run.id])[run.id]).state is not None
            and r.state.is_crashed()
        ),
        60,
        "Crashed state",
    )
    record_timing("kill -9 of a warm worker to its run Crashed", time.monotonic() - start)
    assert len(pacs.instances) < 60

    crashing.start_workers(1, limit=2, env=site.env())  # systemd's Restart=on-failure
    result = prefect_server.retry_flow_run(run.id)
    assert result.status.value == "ACCEPT", result
    again = prefect_server.wait_for_flow_runs([run.id], timeout=120, pool=crashing)[run.id]
    assert again.state.is_completed(), again.state.message
    assert set(pacs.counts) == uids(job)  # nothing lost
    assert sum(n - 1 for n in pacs.counts.values()) <= 1  # at most the instance in flight


def test_the_worker_serves_prometheus_metrics(
    prefect_server: PrefectServer,
    site: Site,
    tmp_path_factory: pytest.TempPathFactory,
    storescp: Callable[..., Any],
) -> None:
    """Exact counter values after routing one job that is stored and one that fails."""
    import urllib.request

    from tests.fixtures_dcmtk import free_port

    pacs = storescp("PACS")
    dead, port = free_port(), free_port()
    base = site.base / "metrics"  # under the jobs root
    base.mkdir()
    good, bad = base / "good.json", base / "bad.json"
    for path, target in ((good, pacs.port), (bad, dead)):
        dest = {"IP": "127.0.0.1", "PORT": target, "AETitleSender": "ROUTER", "AETitleTo": "PACS"}
        path.write_text(json.dumps({"routing": [{"send": [{".*": dest}]}]}))
    env = {**site.env(), "DICOM_ROUTER_RETRIES": "1", "DICOM_ROUTER_RETRY_DELAY": "0.1"}
    with work_pools(prefect_server, tmp_path_factory) as make:
        pool = make(1, env=env, warm=True, args=["--metrics-port", str(port)])
        deployment = pool.deploy("flows/route_job.py:route_job_flow", "metrics")
        ok, ko = base / "ok", base / "ko"
        write_job(ok, n_output=3, n_input=0)
        write_job(ko, n_output=2, n_input=0)
        runs = [
            prefect_server.run_deployment(deployment, {"job_dir": str(job), "config": str(cfg)})
            for job, cfg in ((ok, good), (ko, bad))
        ]
        prefect_server.wait_for_flow_runs([r.id for r in runs], timeout=120, pool=pool)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dicom_router_")
    }
    stored_at, failed_at = f"PACS@127.0.0.1:{pacs.port}", f"PACS@127.0.0.1:{dead}"
    size = sum(p.stat().st_size for p in (ok / "OUTPUT").iterdir())
    assert values[f'dicom_router_instances_stored_total{{destination="{stored_at}"}}'] == 3
    assert values[f'dicom_router_instances_not_stored_total{{destination="{failed_at}"}}'] == 2
    assert values[f'dicom_router_sent_bytes_total{{destination="{stored_at}"}}'] == size
    assert values[f'dicom_router_send_retries_total{{destination="{failed_at}"}}'] == 1
    assert values[f'dicom_router_send_retries_total{{destination="{stored_at}"}}'] == 0
    assert values['dicom_router_jobs_total{outcome="routed"}'] == 1
    assert values['dicom_router_jobs_total{outcome="failed"}'] == 1
    failed_entries = f'dicom_router_deliveries_total{{destination="{failed_at}",outcome="failed"}}'
    assert values[failed_entries] == 1
    assert str(base) not in text  # labels are destinations and outcomes, never job paths
