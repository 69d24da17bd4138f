"""Sweeps: which jobs are due, backoff and giving up, and the sweep flow against a real SCP."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from router.config import parse_config
from router.record import Status, read_status, write_status
from router.route import route_job
from router.settings import Settings
from router.sweep import Backoff, find_jobs, mark_given_up, plan_sweep
from tests.factory import dicom_file, write_job
from tests.fixtures_dcmtk import free_port

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def status(state: str, failures: int = 0, minutes_ago: float = 0, **kw: Any) -> Status:
    stamp = (NOW - timedelta(minutes=minutes_ago)).isoformat()
    return Status(state, runs=max(1, failures), consecutive_failures=failures, updated=stamp, **kw)  # type: ignore[arg-type]


def job_with(root: Path, name: str, st: Status | None = None, **kw: Any) -> Path:
    job = root / name
    write_job(job, n_output=0, n_input=0, **kw)
    if st is not None:
        write_status(job, st)
    return job


def test_plan_sorts_jobs_by_what_a_sweep_does(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    backoff = Backoff(delay=300, factor=2, max_failures=3)
    never = job_with(root / "site-a", "never")
    routed = job_with(root / "site-a", "routed", status("routed"))
    waiting = job_with(root / "site-b", "waiting", success=None)
    invalid = job_with(root, "invalid", status("invalid", reason="proc.json: not valid JSON"))
    fixed = job_with(root, "fixed", status("invalid", reason="proc.json: not valid JSON"))
    # proc.json rewritten after the status: the fix makes the job due again
    later = (root / "fixed" / "routing-status.json").stat().st_mtime + 5
    os.utime(fixed / "proc.json", (later, later))
    just_failed = job_with(root, "just-failed", status("failed", 1, minutes_ago=1))
    due_again = job_with(root, "due-again", status("failed", 1, minutes_ago=6))
    second_wait = job_with(root, "second-wait", status("failed", 2, minutes_ago=6))  # 10 min
    given_up = job_with(root, "given-up", status("failed", 3, minutes_ago=600, reason="refused"))
    (root / ".hidden").mkdir()
    write_job(root / ".hidden" / "ignored", n_output=0, n_input=0)

    plan = plan_sweep(root, backoff, NOW)
    assert sorted(plan.due) == sorted([never, fixed, due_again])
    assert plan.routed == 1 and routed not in plan.due
    assert plan.waiting == [waiting]
    assert plan.invalid == [(invalid, "proc.json: not valid JSON")]
    assert sorted(j for j, _ in plan.backing_off) == sorted([just_failed, second_wait])
    assert dict(plan.backing_off)[second_wait] == NOW - timedelta(minutes=6) + timedelta(minutes=10)
    assert plan.given_up == [(given_up, "refused")]


def test_backoff_grows_and_given_up_is_recorded(tmp_path: Path) -> None:
    backoff = Backoff(delay=60, factor=3, max_failures=4)
    delays = [(backoff.next_try(status("failed", n)) - NOW).total_seconds() for n in (1, 2, 3)]
    assert delays == [60, 180, 540]
    job = job_with(tmp_path, "job", status("failed", 4, reason="refused"))
    assert mark_given_up(job, backoff).given_up is True  # type: ignore[union-attr]
    assert read_status(job).given_up is True  # type: ignore[union-attr]
    other = job_with(tmp_path, "other", status("failed", 2))
    assert mark_given_up(other, backoff).given_up is False  # type: ignore[union-attr]


def test_find_jobs_does_not_descend_into_job_folders(tmp_path: Path) -> None:
    job = job_with(tmp_path, "job")
    write_job(job / "OUTPUT" / "nested-job-like", n_output=0, n_input=0)
    assert [j for j, _ in find_jobs(tmp_path)] == [job]


# --- the flow -------------------------------------------------------------------------------


def dest(port: int, **kw: Any) -> dict[str, Any]:
    return {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": "PACS", **kw}


@pytest.mark.flow
def test_sweep_routes_only_pending_jobs_each_instance_once(
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    scp: Callable[..., Any],
) -> None:
    from flows.route_job import in_process
    from flows.sweep import SweepFailed, sweep_unrouted_flow

    monkeypatch.setenv("DICOM_ROUTER_RETRIES", "0")
    server = scp(ae_title="PACS", delay=0.05)
    root = tmp_path / "jobs"
    files: dict[str, set[str]] = {}
    for i in range(6):
        paths = write_job(root / f"job{i}", n_output=3, n_input=0)
        files[f"job{i}"] = {dicom_file(p).sop_instance_uid for p in paths}
    write_job(root / "waiting", success=None, n_output=2, n_input=0)
    config = tmp_path / "routing.json"
    config.write_text(
        json.dumps({"routing": [{"send": [{".*": dest(server.port, max_associations=1)}]}]})
    )
    log_file = tmp_path / "routing.log"

    # one job was routed before the sweep
    route_job(
        root / "job0", parse_config(json.loads(config.read_text())), Settings(log_file=log_file)
    )
    server.reset_records()
    server.max_open = 0

    with in_process():
        report = sweep_unrouted_flow(
            root=str(root), config=str(config), max_parallel=4, log_file=str(log_file)
        )
    assert report["counts"] == {"already routed": 1, "routed": 5}
    expected = set().union(*(files[f"job{i}"] for i in range(1, 6)))
    assert server.counts == {uid: 1 for uid in expected}
    assert server.max_open == 1  # max_associations: 1, with 4 jobs routed at once
    assert report["waiting"] == [str(root / "waiting")]

    with in_process():
        again = sweep_unrouted_flow(root=str(root), config=str(config), log_file=str(log_file))
    assert again["counts"] == {"already routed": 6}
    assert server.counts == {uid: 1 for uid in expected}

    # a failing job: the sweep fails, and the next sweep leaves it alone during backoff
    broken = root / "broken"
    write_job(broken, n_output=1, n_input=0)
    bad = tmp_path / "dead.json"
    bad.write_text(json.dumps({"routing": [{"send": [{".*": dest(free_port())}]}]}))
    with in_process(), pytest.raises(SweepFailed, match="broken: failed: .*connection refused"):
        sweep_unrouted_flow(root=str(root), config=str(bad), log_file=str(log_file))
    assert read_status(broken).consecutive_failures == 1  # type: ignore[union-attr]
    with in_process():
        later = sweep_unrouted_flow(root=str(root), config=str(bad), log_file=str(log_file))
    assert later["counts"] == {"already routed": 6}
    assert [b["job"] for b in later["backing_off"]] == [str(broken)]


@pytest.mark.flow
def test_sweep_cli_exit_codes(prefect_api: str, tmp_path: Path, scp: Callable[..., Any]) -> None:
    from tests.test_flow import cli

    server = scp(ae_title="PACS")
    root = tmp_path / "jobs"
    write_job(root / "a", n_output=2, n_input=0)
    config = tmp_path / "routing.json"
    config.write_text(json.dumps({"routing": [{"send": [{".*": dest(server.port)}]}]}))
    env = {"DICOM_ROUTER_LOG_FILE": str(tmp_path / "r.log"), "DICOM_ROUTER_RETRIES": "0"}
    ok = cli("sweep", str(root), "--config", str(config), "--json", env=env, api=prefect_api)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["counts"] == {"already routed": 0, "routed": 1}
    assert len(server.counts) == 2

    write_job(root / "b", n_output=1, n_input=0)
    (root / "b" / "proc.json").write_text("[")
    bad = cli("sweep", str(root), "--config", str(config), env=env, api=prefect_api)
    assert bad.returncode == 1
    assert "invalid: " in bad.stdout and "proc.json: not valid JSON" in bad.stdout
    assert "Traceback" not in bad.stderr  # an expected failure: the report says it
    missing = cli("sweep", str(tmp_path / "nope"), "--config", str(config), env=env)
    assert missing.returncode == 2 and "no such folder" in missing.stderr


@pytest.mark.flow
def test_rules_block_push_pull_and_invalid_edit(
    prefect_api: str, tmp_path: Path, scp: Callable[..., Any]
) -> None:
    from flows.config_source import RoutingRules
    from tests.test_flow import cli

    server = scp(ae_title="PACS")
    env = {
        "DICOM_ROUTER_LOG_FILE": str(tmp_path / "r.log"),
        "DICOM_ROUTER_CONFIG_BLOCK": "sweep-test",
    }
    config = tmp_path / "routing.json"
    rules = json.dumps({"routing": [{"name": "to pacs", "send": [{".*": dest(server.port)}]}]})
    config.write_text("// comments are fine in a file\n" + rules)
    pushed = cli("config", "push", str(config), env=env, api=prefect_api)
    assert pushed.returncode == 0, pushed.stderr
    assert "stored 1 rule(s) as dicom-routing-rules/sweep-test" in pushed.stdout
    pulled = cli("config", "pull", env=env, api=prefect_api)
    assert json.loads(pulled.stdout)["routing"][0]["name"] == "to pacs"

    job = tmp_path / "job"
    write_job(job, n_output=2, n_input=0)
    routed = cli("route", str(job), "--json", env=env, api=prefect_api)
    assert routed.returncode == 0, routed.stderr
    assert len(server.counts) == 2

    # an edit in the UI that does not validate: routing refuses and sends nothing
    block = RoutingRules.load("sweep-test")
    broken = replace_rules(block.rules, PORT="not a port")
    RoutingRules(rules=broken).save("sweep-test", overwrite=True)
    job2 = tmp_path / "job2"
    write_job(job2, n_output=2, n_input=0)
    refused = cli("route", str(job2), env=env, api=prefect_api)
    assert refused.returncode == 2
    assert (
        "Prefect block dicom-routing-rules/sweep-test: invalid routing configuration"
        in refused.stderr
    )
    assert 'rule 1 "to pacs": send[0][".*"].PORT: expected a port number' in refused.stderr
    assert len(server.counts) == 2
    assert not (job2 / "routing-record.jsonl").exists()

    # a file given explicitly still wins
    env_file = {**env, "DICOM_ROUTER_CONFIG": str(config)}
    assert cli("route", str(job2), env=env_file, api=prefect_api).returncode == 0
    assert len(server.counts) == 4


def replace_rules(rules: dict[str, Any], **dest_fields: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(rules))
    doc["routing"][0]["send"][0][".*"].update(dest_fields)
    return doc


def test_sweep_plan_reads_only_the_status_of_routed_jobs(tmp_path: Path) -> None:
    """Routed jobs cost one listing and one small read (timing: bench/sweep_time.py)."""
    root = tmp_path / "jobs"
    for i in range(300):
        job = root / f"job{i:04d}"
        job.mkdir(parents=True)
        (job / "info.json").write_text("{}")
        (job / "proc.json").write_text("[]")
        write_status(job, replace(status("routed"), updated=NOW.isoformat()))
        (job / "routing-record.jsonl").write_text("not read by a sweep\n")
    plan = plan_sweep(root, Backoff())
    assert plan.routed == 300 and plan.due == []
