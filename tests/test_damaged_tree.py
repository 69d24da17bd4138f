"""A damaged job tree: every way a job folder can be broken, under one root.

Routed once job by job (`route`) and once as a whole (`dicom-router sweep`), each job ends in
the state SPEC gives it, with its status and its routing-log line; the sweep finishes; and
nothing outside the job folders reaches the destination. The router runs without the
capabilities that let root read and write any file, so file modes bind it as they bind the
service account of a site.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from router.lock import job_lock
from router.record import RECORD, STATUS, read_status
from tests.factory import dicom_file, write_ct, write_encoded_as, write_job
from tests.test_failures_seen import REPO, _without_file_rights
from tests.test_route import dest

pytestmark = [pytest.mark.peers, pytest.mark.flow]

EXPECTED = {
    "ok": "routed",
    "unreadable-file": "failed",
    "torn-record": "routed",
    "output-links-out": "routed",
    "link-loops": "routed",
    "locked": "locked",
    "read-only": "invalid",
    "no-info": "invalid",
    "malformed-status": "routed",
    "dicomdir": "routed",
    "not-utf8-damaged": "failed",
    "truncated": "failed",
    "vr-mismatch": "failed",
    "waiting": "waiting",
}


def build_tree(root: Path, outside: Path) -> dict[str, set[str]]:
    """The jobs of EXPECTED under `root`; returns the UIDs each job should deliver."""
    sent: dict[str, set[str]] = {}

    def job(name: str, **kw: Any) -> Path:
        path = root / name
        files = write_job(path, n_output=2, n_input=1, **kw)
        sent[name] = {dicom_file(f).sop_instance_uid for f in files}
        return path

    job("ok")
    unreadable = job("unreadable-file")
    (unreadable / "OUTPUT" / "OU000001.dcm").chmod(0o000)
    sent["unreadable-file"] -= {dicom_file(unreadable / "OUTPUT" / "OU000001.dcm").sop_instance_uid}
    torn = job("torn-record")
    (torn / RECORD).write_text('{"event": "run"}\n{"event": "sto\n[1]\n{"event": "store", "x')
    write_job(outside, n_output=2, n_input=2, patient_id="SOMEONE-ELSE")
    links = job("output-links-out")
    shutil.rmtree(links / "OUTPUT")
    os.symlink(outside / "OUTPUT", links / "OUTPUT")
    sent["output-links-out"] = {dicom_file(f).sop_instance_uid for f in (links / "INPUT").iterdir()}
    loops = job("link-loops")
    os.symlink("loop", loops / "OUTPUT" / "loop")
    os.symlink(".", loops / "OUTPUT" / "here")
    job("locked")
    read_only = job("read-only")
    read_only.chmod(0o555)
    sent["read-only"] = set()
    no_info = job("no-info")
    (no_info / "info.json").unlink()
    sent["no-info"] = set()
    malformed = job("malformed-status")
    (malformed / STATUS).write_text('{"state": "failed", "runs": "many"}')
    dicomdir = job("dicomdir")
    shutil.copy(get_testdata_file("DICOMDIR"), dicomdir / "INPUT" / "DICOMDIR")
    bad_name = job("not-utf8-damaged")
    (bad_name / "OUTPUT" / os.fsdecode(b"r\xe9sultat.dcm")).write_bytes(b"\0" * 128 + b"DICM")
    truncated = job("truncated")
    cut = write_ct(truncated / "OUTPUT" / "cut.dcm", rows=64, cols=64)
    cut.write_bytes(cut.read_bytes()[:-100])
    mismatch = job("vr-mismatch")
    write_encoded_as(write_ct(mismatch / "OUTPUT" / "implicit-inside.dcm"), implicit_vr=True)
    job("waiting", success=None)
    sent["waiting"] = set()
    sent["locked"] = set()
    return sent


def routing_config(path: Path, port: int) -> Path:
    unresolvable = {**dest(104), "IP": "no,such,host", "break": 1}  # fails at once, no DNS
    path.write_text(
        json.dumps(
            {
                "routing": [
                    {"send": [{".*": unresolvable}, {".*": dest(port)}]},
                    {"RouteDirectory": "INPUT", "send": [{".*": dest(port)}]},
                ]
            }
        )
    )
    return path


_ROUTE_EACH = """
import json, sys
from pathlib import Path
from router.config import load_config
from router.job import JobError, JobFailed, JobInvalid, JobWaiting
from router.lock import JobLocked
from router.route import route_job
from router.settings import Settings
root, config, log = Path(sys.argv[1]), load_config(sys.argv[2]), sys.argv[3]
settings = Settings(log_file=log, retries=0, connect_timeout=2, dimse_timeout=5)
ends = {}
for job in sorted(p for p in root.iterdir() if p.is_dir()):
    try:
        ends[job.name] = route_job(job, config, settings).state
    except (JobError, JobLocked) as exc:
        ends[job.name] = {JobInvalid: "invalid", JobWaiting: "waiting", JobLocked: "locked",
                          JobFailed: "failed"}[type(exc)]
print(json.dumps(ends))
"""


def run_without_rights(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **env},
        preexec_fn=_without_file_rights,
        check=False,
    )


def test_every_job_of_a_damaged_tree_ends_in_its_state(
    prefect_api: str, tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    outside = tmp_path / "elsewhere"
    config = routing_config(tmp_path / "routing.json", server.port)
    log = tmp_path / "routing.log"

    # route, job by job
    root = tmp_path / "by-route" / "jobs"
    sent = build_tree(root, outside)
    with job_lock(root / "locked"):
        done = run_without_rights(
            [sys.executable, "-c", _ROUTE_EACH, str(root), str(config), str(log)], {}
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == EXPECTED
    check_tree(root, sent, server, log)
    outside_uids = {dicom_file(f).sop_instance_uid for f in outside.rglob("*.dcm")}
    assert not set(server.counts) & outside_uids

    # the same tree, swept: the sweep finishes and says what became of each job
    server.reset_records()
    root = tmp_path / "by-sweep" / "jobs"
    sent = build_tree(root, tmp_path / "elsewhere-2")
    env = {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DICOM_ROUTER_LOG_FILE": str(log),
        "DICOM_ROUTER_RETRIES": "0",
        "DICOM_ROUTER_CONNECT_TIMEOUT": "2",
    }
    with job_lock(root / "locked"):
        swept = run_without_rights(
            [
                *(sys.executable, "-m", "router", "sweep", str(root)),
                *("--config", str(config), "--json", "--max-parallel", "1"),
            ],
            env,
        )
    assert swept.returncode == 1, swept.stderr  # some jobs failed: the sweep says so
    report = json.loads(swept.stdout)
    tried = {Path(j["job"]).name: j["outcome"] for j in report["jobs"]}
    assert tried == {
        name: state
        for name, state in EXPECTED.items()
        if name not in ("read-only", "waiting")  # listed, not tried
    }
    reasons = {Path(j["job"]).name: j["reason"] for j in report["jobs"]}
    # the file whose name is not UTF-8 is named, escaped, in the run's state and report
    assert "OUTPUT/r\\udce9sultat.dcm: damaged DICOM file" in reasons["not-utf8-damaged"]
    assert [Path(j["job"]).name for j in report["invalid"]] == ["read-only"]
    assert [Path(j).name for j in report["waiting"]] == ["waiting"]
    check_tree(root, sent, server, log, untried=("read-only", "waiting"))
    assert not set(server.counts) & {
        dicom_file(f).sop_instance_uid for f in (tmp_path / "elsewhere-2").rglob("*.dcm")
    }


def check_tree(
    root: Path, sent: dict[str, set[str]], server: Any, log: Path, untried: tuple[str, ...] = ()
) -> None:
    """What arrived, and each job's status and routing-log line (`untried`: none)."""
    expected_uids = set().union(*sent.values())
    assert server.counts == {uid: 1 for uid in expected_uids}
    text = log.read_text(encoding="utf-8")
    for name, state in EXPECTED.items():
        job = root / name
        status = read_status(job)
        if name in untried:
            assert status is None and f"job={job} " not in text, name
            continue
        if name == "read-only":
            assert status is None  # it cannot be written: the log and the sweep say so
        elif name == "locked":
            assert status is None  # the run holding the lock writes it
        else:
            assert status is not None and status.state == state, (name, status)
        assert f"job={job} outcome={state}" in text or (
            state in ("routed", "failed") and f"job={job} success=" in text
        ), name
