"""The `route-job` Prefect flow and the command line, against real peers on 127.0.0.1.

One Prefect test server for the session (`prefect_test_harness`); the CLI runs as a
subprocess pointed at the same server through PREFECT_API_URL, as a worker would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.lock import job_lock
from router.record import read_status
from tests.factory import dicom_file, write_job
from tests.fixtures_dcmtk import free_port

pytestmark = pytest.mark.flow

ROUTER_ENV = {
    "DICOM_ROUTER_RETRIES": "1",
    "DICOM_ROUTER_RETRY_DELAY": "0.1",
    "DICOM_ROUTER_CONNECT_TIMEOUT": "2",
    "DICOM_ROUTER_DIMSE_TIMEOUT": "5",
}


@pytest.fixture
def router_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    for key, value in ROUTER_ENV.items():
        monkeypatch.setenv(key, value)
    return {**ROUTER_ENV, "DICOM_ROUTER_LOG_FILE": str(tmp_path / "routing.log")}


def dest(port: int, aet: str, **kw: Any) -> dict[str, Any]:
    return {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": aet, **kw}


def write_config(path: Path, *rules: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"routing": list(rules)}))
    return path


def output_uids(job: Path) -> set[str]:
    return {dicom_file(p).sop_instance_uid for p in (job / "OUTPUT").glob("*.dcm")}


async def _runs_of(flow_run_id: Any) -> tuple[Any, list[Any], list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return run, tasks, artifacts


def test_flow_routes_with_fail_back_as_tasks(
    prefect_api: str, router_env: dict[str, str], tmp_path: Path, scp: Callable[..., Any]
) -> None:
    from flows.route_job import route_job_flow

    backup = scp(ae_title="BACKUP")
    job = tmp_path / "ct-liver-0001"
    write_job(job, n_output=3, n_input=1)
    config = write_config(
        tmp_path / "routing.json",
        {
            "name": "pacs or backup",
            "send": [
                {"success": dest(free_port(), "PACS", **{"break": 1})},
                {"success": dest(backup.port, "BACKUP")},
            ],
        },
    )
    state = route_job_flow(
        job_dir=str(job),
        config=str(config),
        log_file=router_env["DICOM_ROUTER_LOG_FILE"],
        return_state=True,
    )
    assert state.is_completed()
    report = state.result()
    assert report["state"] == "routed"
    assert backup.counts == {u: 1 for u in output_uids(job)}

    run, tasks, artifacts = asyncio.run(_runs_of(state.state_details.flow_run_id))
    assert run.name == "ct-liver-0001"
    names = sorted(t.name for t in tasks)
    assert "load-job" in " ".join(names) and "match-rules" in " ".join(names)
    sends = [t for t in tasks if t.name.startswith("send ")]
    assert len(sends) == 2
    failed_send = next(t for t in sends if "PACS@" in t.name)
    assert failed_send.state.is_failed() and failed_send.run_count == 2  # 1 retry
    table = next(a for a in artifacts if a.type == "table")
    assert table.key == "route-ct-liver-0001"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["outcome"] for r in rows] == ["failed (covered)", "succeeded"]


def test_failed_routing_fails_the_flow_run_and_a_rerun_completes_it(
    prefect_api: str, router_env: dict[str, str], tmp_path: Path, scp: Callable[..., Any]
) -> None:
    from flows.route_job import RoutingFailed, route_job_flow

    server = scp(ae_title="PACS")
    job = tmp_path / "job"
    write_job(job, n_output=3, n_input=0)
    refused = sorted(output_uids(job))[0]
    server.refuse_instances[refused] = 0xC001
    config = write_config(tmp_path / "routing.json", {"send": [{".*": dest(server.port, "PACS")}]})
    log_file = router_env["DICOM_ROUTER_LOG_FILE"]
    state = route_job_flow(
        job_dir=str(job), config=str(config), log_file=log_file, return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RoutingFailed)
    assert "0xC001" in str(error)
    assert server.instances == output_uids(job) - {refused}

    server.refuse_instances.clear()
    state = route_job_flow(
        job_dir=str(job), config=str(config), log_file=log_file, return_state=True
    )
    assert state.is_completed()
    assert server.counts == {u: 1 for u in output_uids(job)}
    assert read_status(job).state == "routed"  # type: ignore[union-attr]


def test_the_send_task_isolates_a_faulty_file_and_stops_retrying_a_refused_one(
    prefect_api: str,
    router_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    scp: Callable[..., Any],
) -> None:
    """The same decisions as the plain path, across Prefect's retries of the send task."""
    from flows.route_job import RoutingFailed, route_job_flow

    monkeypatch.setenv("DICOM_ROUTER_RETRIES", "3")  # it must stop after the first
    server = scp(ae_title="PACS")
    job = tmp_path / "job"
    paths = write_job(job, n_output=6, n_input=0)
    aborts, refused = (dicom_file(p).sop_instance_uid for p in paths[1:3])
    server.abort_instances.add(aborts)  # ends the association each time it comes
    server.refuse_instances[refused] = 0xA700  # refused each time, the others stored
    config = write_config(tmp_path / "routing.json", {"send": [{".*": dest(server.port, "PACS")}]})

    state = route_job_flow(
        job_dir=str(job),
        config=str(config),
        log_file=router_env["DICOM_ROUTER_LOG_FILE"],
        return_state=True,
    )

    assert state.is_failed()
    report = state.result(raise_on_failure=False).report  # type: ignore[union-attr]
    assert isinstance(state.result(raise_on_failure=False), RoutingFailed)
    delivery = report.rules[0].entries[0].delivery
    assert delivery is not None and (delivery.stored, delivery.failed) == (4, 2)
    assert delivery.attempts == 2 and not delivery.transient
    reasons = {f["file"]: f["reason"] for f in delivery.failures}
    assert reasons["OUTPUT/OU000002.dcm"].startswith(
        "the destination aborted the association twice while receiving this file"
    )
    assert "counted as refused, not retried" in reasons["OUTPUT/OU000003.dcm"]
    assert server.counts == {u: 1 for u in output_uids(job) - {aborts, refused}}
    # One task, retried once by Prefect: the aborting file was not sent again.
    _, tasks, _ = asyncio.run(_runs_of(state.state_details.flow_run_id))
    (send,) = [t for t in tasks if t.name.startswith("send ")]
    assert send.run_count == 2
    assert server.associations == 3 + 1  # 1st attempt: 3 (isolation); 2nd: the refused one


# --- the command line -----------------------------------------------------------------------


def cli(
    *args: str, env: dict[str, str] | None = None, api: str | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {}), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api:
        full["PREFECT_API_URL"] = api
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_cli_route_exit_codes_and_json(
    prefect_api: str, router_env: dict[str, str], tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp(ae_title="PACS")
    job = tmp_path / "job"
    write_job(job, n_output=2, n_input=0)
    good = write_config(tmp_path / "good.json", {"send": [{".*": dest(server.port, "PACS")}]})

    done = cli("route", str(job), "--config", str(good), "--json", env=router_env, api=prefect_api)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "routed"
    assert report["rules"][0]["entries"][0]["delivery"]["stored"] == 2
    assert server.counts == {u: 1 for u in output_uids(job)}

    # again: nothing sent twice
    again = cli("route", str(job), "--config", str(good), "--json", env=router_env, api=prefect_api)
    assert again.returncode == 0
    assert json.loads(again.stdout)["rules"][0]["entries"][0]["delivery"]["already"] == 2
    assert server.counts == {u: 1 for u in output_uids(job)}

    # --force sends again
    forced = cli(
        "route", str(job), "--config", str(good), "--force", env=router_env, api=prefect_api
    )
    assert forced.returncode == 0
    assert server.counts == {u: 2 for u in output_uids(job)}
    assert "routed:" in forced.stdout

    # a failing destination: exit 1
    bad_dest = write_config(tmp_path / "dead.json", {"send": [{".*": dest(free_port(), "PACS")}]})
    failed = cli(
        "route", str(job), "--config", str(bad_dest), "--json", env=router_env, api=prefect_api
    )
    assert failed.returncode == 1, failed.stderr
    assert "connection refused" in json.loads(failed.stdout)["reason"]
    # an expected failure is one line per attempt, no traceback (tracebacks are for bugs)
    assert "Traceback" not in failed.stderr
    assert failed.stderr.count("outcome=retrying") == 1  # DICOM_ROUTER_RETRIES=1


def test_cli_bad_input_and_not_ready(
    prefect_api: str, router_env: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"routing": [{"name": "typo", "AETitelIn": "X", "send": []}]}')
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)

    result = cli("route", str(job), "--config", str(bad), env=router_env)
    assert result.returncode == 2
    assert str(bad) in result.stderr and 'rule 1 "typo": AETitelIn: unknown key' in result.stderr

    good = write_config(tmp_path / "good.json", {"send": [{".*": dest(free_port(), "PACS")}]})
    (job / "proc.json").write_text("{not json")
    result = cli("route", str(job), "--config", str(good), env=router_env, api=prefect_api)
    assert result.returncode == 2
    assert "proc.json: not valid JSON" in result.stderr
    assert read_status(job).state == "invalid"  # type: ignore[union-attr]

    (job / "proc.json").unlink()
    result = cli("route", str(job), "--config", str(good), env=router_env)
    assert result.returncode == 3 and "no proc.json yet" in result.stderr

    (job / "proc.json").write_text('[{"success": "success", "message": ""}]')
    with job_lock(job):
        result = cli("route", str(job), "--config", str(good), env=router_env, api=prefect_api)
    assert result.returncode == 3 and "another routing of this job is running" in result.stderr

    result = cli("route", str(tmp_path / "missing"), "--config", str(good), env=router_env)
    assert result.returncode == 2 and "not a job folder" in result.stderr

    # no file: the rules block on the server, which nobody pushed
    result = cli("route", str(job), env=router_env, api=prefect_api)
    assert result.returncode == 2
    assert "Prefect block dicom-routing-rules/default" in result.stderr
    assert "not found: push rules with `dicom-router config push FILE`" in result.stderr


def test_cli_validate(tmp_path: Path) -> None:
    good = write_config(
        tmp_path / "good.json",
        {"name": "a", "send": [{"success": dest(104, "PACS", **{"break": 1})}]},
        {"name": "b", "status": 0, "send": [{".*": dest(104, "COPY")}]},
    )
    result = cli("validate", str(good))
    assert result.returncode == 0
    assert "valid, 2 rule(s), 1 active" in result.stdout
    assert "'success' → PACS@127.0.0.1:104 as ROUTER, break: 1" in result.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"routing": [{"name": "x", "send": [{"(": {"IP": "h", "PORT": 0,'
        ' "AETitleSender": "A", "AETitleTo": "B"}}]}, {"send": 3}]}'
    )
    result = cli("validate", str(bad))
    assert result.returncode == 2
    assert "4 problem(s)" in result.stderr or "problem(s)" in result.stderr
    assert 'rule 1 "x": send[0]["("] (key): invalid regular expression' in result.stderr
    assert 'rule 1 "x": send[0]["("].PORT' in result.stderr
    assert 'rule 2 "rule 2": send' in result.stderr


def test_cli_explain(tmp_path: Path) -> None:
    job = tmp_path / "job"
    write_job(job, n_output=2, n_input=1, success="failed")
    config = write_config(
        tmp_path / "routing.json",
        {"name": "off", "enabled": "F", "send": [{".*": dest(104, "X")}]},
        {
            "name": "results",
            "send": [
                {
                    "success": dest(104, "PACS"),
                    "fail.*": dest(105, "QA", which=[{"Modality": "MR"}]),
                },
                {".*": dest(106, "ARCHIVE")},
            ],
        },
    )
    result = cli("explain", str(job), "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'rule 1 "off": does not apply: disabled (enabled "F")' in out
    assert "entry 1 'success' → PACS@127.0.0.1:104 (as ROUTER): pattern does not match" in out
    assert "entry 2 'fail.*' → QA@127.0.0.1:105 (as ROUTER): no file selected" in out
    assert "(0008,0060) Modality 'CT' does not match 'MR'" in out
    assert "entry 3 '.*' → ARCHIVE@127.0.0.1:106 (as ROUTER): 2 file(s), 0 already there" in out


def test_cli_echo(scp: Callable[..., Any]) -> None:
    server = scp(ae_title="PACS")
    result = cli("echo", "127.0.0.1", str(server.port), "PACS")
    assert result.returncode == 0 and "success" in result.stdout
    result = cli("echo", "127.0.0.1", str(free_port()), "PACS")
    assert result.returncode == 1 and "connection refused" in result.stderr


def test_cli_route_killed_leaves_no_process_behind(
    router_env: dict[str, str], tmp_path: Path, scp: Callable[..., Any]
) -> None:
    """Without PREFECT_API_URL the command starts an API server; SIGKILL takes it along."""
    import signal
    import time

    server = scp(ae_title="PACS", delay=0.5)
    job = tmp_path / "job"
    write_job(job, n_output=20, n_input=0)
    config = write_config(tmp_path / "r.json", {"send": [{".*": dest(server.port, "PACS")}]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {**router_env, "PREFECT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "route", str(job), "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 150
        while not server.instances:  # mid-send: the API server is up
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        children = _descendants(proc.pid)
        assert children, "the command started no API server"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
                todo.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
