"""Every failure is seen: no job silently skipped, crashed or stuck (SPEC section 1).

One test per way a damaged job folder or a broken environment used to end wrongly, each
routed against a real SCP on 127.0.0.1, and a damaged tree that holds them all, routed by
`route` and by `sweep`. Cases that need a user who may not read or write a file run the
router in a subprocess as `nobody` (the tests run as root in CI, and root reads anything);
the full disk is a small tmpfs in a mount namespace of its own.
"""

from __future__ import annotations

import ctypes
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

from router.config import parse_config
from router.explain import explain
from router.job import JobInvalid, JobWaiting, load_job
from router.lock import JobLocked, job_lock
from router.record import RECORD, STATUS, Record, read_status
from router.route import route_job
from router.settings import Settings
from router.sweep import NOT_WRITABLE, Backoff, plan_sweep
from tests.factory import dicom_file, write_job
from tests.test_route import dest, record_lines, rules, settings, uids

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parents[1]


def output_uids(job: Path) -> set[str]:
    return {dicom_file(p).sop_instance_uid for p in sorted((job / "OUTPUT").rglob("*.dcm"))}


# --- running the router as a user without rights -----------------------------------------

_RUNNER = """
import json, sys
from router.config import parse_config
from router.route import route_job
from router.settings import Settings
from router.job import JobError
from router.lock import JobLocked
config, job, log = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
settings = Settings(log_file=log, retries=0, connect_timeout=2, dimse_timeout=5)
try:
    report = route_job(job, parse_config(config), settings)
    print(json.dumps({"state": report.state, "report": report.to_dict()}))
except (JobError, JobLocked) as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
"""


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _without_file_rights() -> None:
    """preexec_fn: as root, give up the capabilities that bypass file permissions, so
    that mode bits bind root too (the router then sees what an unprivileged account sees)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_without_file_rights(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=_without_file_rights,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def route_without_file_rights(config: dict[str, Any], job: Path, log: Path) -> dict[str, Any]:
    """`route_job` in a subprocess to which file permissions apply (see above)."""
    return dict(
        json.loads(run_without_file_rights(_RUNNER, json.dumps(config), str(job), str(log)))
    )


# --- 1. a host name that does not resolve -------------------------------------------------


def test_an_unresolvable_host_fails_back_to_the_alternative(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    # glibc refuses this name itself: a resolution error, with no DNS query on the network
    unresolvable = {**dest(104), "IP": "no,such,host", "break": 1}
    cfg = rules({"send": [{"success": unresolvable}, {"success": {**dest(server.port)}}]})
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    first, second = report.rules[0].entries
    assert first.state == "failed" and first.covered
    assert "cannot resolve host 'no,such,host'" in (first.reason or "")
    assert first.delivery is not None and first.delivery.attempts == 3  # transient: retried
    assert second.state == "succeeded"
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    assert read_status(job).state == "routed"  # type: ignore[union-attr]


# --- 2. a result file that cannot be read ---------------------------------------------------


def test_an_unreadable_result_file_fails_the_job_and_the_others_go(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    secret = job / "OUTPUT" / "OU000002.dcm"
    secret.chmod(0o000)  # as a computation that writes its results with umask 077
    log = tmp_path / "routing.log"
    config = {"routing": [{"send": [{".*": dest(server.port)}]}]}
    outcome = route_without_file_rights(config, job, log)

    assert outcome["state"] == "failed"
    entry = outcome["report"]["rules"][0]["entries"][0]
    assert entry["state"] == "failed" and entry["selected"] == 3
    delivery = entry["delivery"]
    assert (delivery["stored"], delivery["failed"]) == (2, 1)
    assert delivery["failures"] == [
        {
            "file": "OUTPUT/OU000002.dcm",
            "status": None,
            "reason": "cannot read: Permission denied",
        }
    ]
    assert "OUTPUT/OU000002.dcm: cannot read: Permission denied" in outcome["report"]["reason"]
    readable = uids([f for f in files if f != secret], "OUTPUT")
    assert server.counts == {u: 1 for u in readable}
    status = read_status(job)
    assert status is not None and status.state == "failed" and status.consecutive_failures == 1
    assert "outcome=failed" in log.read_text() and "Permission denied" in log.read_text()
    not_sent = [e for e in record_lines(job) if e["event"] == "not_sent"]
    assert [(e["file"], e["error"]) for e in not_sent] == [
        ("OUTPUT/OU000002.dcm", "cannot read: Permission denied")
    ]

    # readable again: the job is routed, and only the missing file is sent
    secret.chmod(0o644)
    again = route_without_file_rights(config, job, log)
    assert again["state"] == "routed"
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}


# --- 3. the record: torn lines anywhere, lines of other shapes ------------------------------


def test_a_damaged_record_is_read_around_and_routing_goes_on(
    tmp_path: Path, scp: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    first, *rest = sorted(uids(files, "OUTPUT"))
    cfg = rules({"send": [{".*": dest(server.port)}]})
    key = dest(server.port)["AETitleTo"] + f"@127.0.0.1:{server.port}"
    good = {"event": "store", "dest": key, "sop": first, "run": "r0", "stored": True}
    lines = [
        json.dumps({**good, "status": 0, "from_a_newer_router": {"x": 1}}),
        '{"event": "store", "dest": "A@h:1", "sop"',  # torn, in the middle
        "[1, 2, 3]",  # JSON, not an object
        '"a string"',
        json.dumps({"event": "store", "dest": key, "stored": True}),  # no sop, no status
        json.dumps({"event": "store", "dest": key, "sop": rest[0], "stored": "yes"}),
        json.dumps({"event": "a-future-event", "anything": True}),
        '{"event": "store", "torn at the end',  # and no newline
    ]
    (job / RECORD).write_text("\n".join(lines))

    with caplog.at_level("WARNING", logger="router.record"):
        record = Record(job)
    assert record.stored_at(key) == {first}
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("torn or not JSON" in w for w in warnings) == 2
    assert sum("not a JSON object" in w for w in warnings) == 2
    assert sum("without dest, sop, stored or status" in w for w in warnings) == 2

    views, _ = explain(load_job(job), cfg, settings(tmp_path))
    assert views[0].entries[0].already == 1

    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {u: 1 for u in rest}  # the one recorded is not sent again
    # the torn tail was ended before appending: every line this run wrote stands alone
    text = (job / RECORD).read_text().splitlines()
    assert text[len(lines) - 1] == lines[-1]
    run_lines = [json.loads(line) for line in text[len(lines) :]]
    assert run_lines[0]["event"] == "run" and run_lines[-1]["event"] == "end"
    forced = route_job(job, cfg, settings(tmp_path), force=True)
    assert forced.state == "routed"
    assert server.counts == {first: 1, **{u: 2 for u in rest}}


# --- 4 and 5. links: INPUT/OUTPUT out of the job, loops -------------------------------------


def test_an_output_folder_linked_out_of_the_job_is_not_followed(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    other = tmp_path / "other-patient"
    other_files = write_job(other, n_output=2, n_input=2, patient_id="OTHER")
    job = tmp_path / "job"
    write_job(job, n_output=0, n_input=0, success="failed")
    for folder in ("INPUT", "OUTPUT"):
        shutil.rmtree(job / folder)
        os.symlink(other / folder, job / folder)
    cfg = rules(
        {"error_report": 1, "send": [{".*": dest(server.port)}]},
        {"RouteDirectory": "INPUT", "send": [{".*": dest(server.port)}]},
    )
    report = route_job(job, cfg, settings(tmp_path))
    assert not server.instances & uids(other_files, "OUTPUT")
    assert not server.instances & uids(other_files, "INPUT")
    # the error report went, without the other patient's name or ID
    [sent] = list(server.instances)
    assert report.skipped_files["OUTPUT"] == [
        {
            "file": "OUTPUT",
            "reason": "OUTPUT is a symbolic link that leads outside the job folder "
            f"(to {other / 'OUTPUT'}): not followed",
        }
    ]
    assert report.rules[1].entries[0].state == "skipped"
    assert "leads outside the job folder" in (report.rules[1].entries[0].reason or "")
    assert (job / ".routing" / "error-report.dcm").is_file()
    from pydicom import dcmread

    sr = dcmread(job / ".routing" / "error-report.dcm")
    assert sr.SOPInstanceUID == sent and sr.PatientID == ""


def test_symbolic_link_loops_are_skipped_with_their_reason(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    out = job / "OUTPUT"
    os.symlink("self", out / "self")  # a link to itself
    os.symlink("b", out / "a")
    os.symlink("a", out / "b")  # two links to each other
    os.symlink(".", out / "here")  # a folder loop: walked once
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    reasons = {s["file"]: s["reason"] for s in report.skipped_files["OUTPUT"]}
    assert reasons == {
        "OUTPUT/a": "symbolic link loop",
        "OUTPUT/b": "symbolic link loop",
        "OUTPUT/self": "symbolic link loop",
    }


# --- 6. the sweep tells locked and waiting runs from failed ones ---------------------------


@pytest.mark.flow
def test_route_job_runs_name_how_they_ended_and_the_sweep_reads_it(
    prefect_api: str, tmp_path: Path, scp: Callable[..., Any]
) -> None:
    from flows.route_job import in_process, route_job_flow
    from flows.sweep import classify, sweep_unrouted_flow

    server = scp()
    root = tmp_path / "jobs"
    locked = root / "locked"
    write_job(locked, n_output=1, n_input=0)
    invalid = root / "invalid"
    write_job(invalid, n_output=1, n_input=0)
    (invalid / "info.json").write_text("{")
    waiting = root / "waiting"
    write_job(waiting, n_output=1, n_input=0, success=None)
    config = tmp_path / "routing.json"
    config.write_text(json.dumps({"routing": [{"send": [{".*": dest(server.port)}]}]}))
    params = {"config": str(config), "log_file": str(tmp_path / "routing.log")}

    with in_process():
        states = {}
        with job_lock(locked):
            states["locked"] = route_job_flow(job_dir=str(locked), **params, return_state=True)
        states["invalid"] = route_job_flow(job_dir=str(invalid), **params, return_state=True)
        states["waiting"] = route_job_flow(job_dir=str(waiting), **params, return_state=True)
    assert (states["locked"].type.value, states["locked"].name) == ("CANCELLED", "Locked")
    assert (states["waiting"].type.value, states["waiting"].name) == ("CANCELLED", "Waiting")
    assert (states["invalid"].type.value, states["invalid"].name) == ("FAILED", "Invalid")
    assert [classify(states[k])[0] for k in ("locked", "waiting", "invalid")] == [
        "locked",
        "waiting",
        "invalid",
    ]
    assert isinstance(states["locked"].result(raise_on_failure=False), JobLocked)

    # a sweep that meets a job being routed right now does not fail for it
    (invalid / "info.json").write_text(json.dumps({"AETitleCalled": "A", "AETitleCaller": "B"}))
    with in_process(), job_lock(locked):
        report = sweep_unrouted_flow(root=str(root), **params)
    outcomes = {Path(j["job"]).name: j["outcome"] for j in report["jobs"]}
    assert outcomes == {"locked": "locked", "invalid": "routed"}
    assert report["waiting"] == [str(waiting)]


# --- 7. a job folder this process cannot write ----------------------------------------------


@pytest.mark.parametrize("state", ["new", "lock and record exist"])
def test_a_read_only_job_folder_is_refused_before_anything_is_sent(
    state: str, tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "jobs" / "job"
    write_job(job, n_output=2, n_input=0)
    log = tmp_path / "routing.log"
    cfg = {"routing": [{"send": [{".*": dest(server.port)}]}]}
    if state == "lock and record exist":  # writable; the folder is not, so no status
        route_job(job, parse_config(cfg), Settings(log_file=log))
        server.reset_records()
        (job / STATUS).unlink()
    job.chmod(0o555)
    try:
        outcome = route_without_file_rights(cfg, job, log)
        plan = json.loads(run_without_file_rights(_PLAN, str(job.parent)))
    finally:
        job.chmod(0o755)
    assert outcome["raised"] == "JobInvalid"
    assert "the job folder is not writable (Permission denied)" in outcome["message"]
    assert server.counts == {}
    text = log.read_text()
    assert "outcome=invalid" in text and "status-not-written" in text
    # the sweep lists it as invalid, and tries nothing
    assert plan == {"due": [], "invalid": [[str(job), NOT_WRITABLE]]}


_PLAN = """
import json, sys
from pathlib import Path
from router.sweep import NOT_WRITABLE, Backoff, plan_sweep
plan = plan_sweep(Path(sys.argv[1]), Backoff())
print(json.dumps({"due": [str(j) for j in plan.due],
                  "invalid": [[str(j), r] for j, r in plan.invalid]}))
"""


# --- 8. a job folder without info.json ------------------------------------------------------


def test_a_job_without_info_json_is_found_and_recorded_invalid(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    root = tmp_path / "jobs"
    job = root / "no-info"
    write_job(job, n_output=1, n_input=0)
    (job / "info.json").unlink()
    plan = plan_sweep(root, Backoff())
    assert plan.due == [job]
    with pytest.raises(JobInvalid, match="info.json: missing"):
        route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    status = read_status(job)
    assert status is not None and status.state == "invalid" and "info.json" in (status.reason or "")
    assert [j for j, _ in plan_sweep(root, Backoff()).invalid] == [job]
    assert server.counts == {}


# --- 10. one malformed routing-status.json ------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '{"state": "failed", "runs": 1, "consecutive_failures": "x", "updated": "2026-01-01"}',
        '{"state": "failed", "runs": 1, "consecutive_failures": 1, "updated": "yesterday"}',
        '{"state": "failed", "runs": 1, "consecutive_failures": 1, "updated": 5}',
        '{"state": "teleported", "runs": 1, "consecutive_failures": 0, "updated": "2026-01-01"}',
        "{not json",
        '{"state": "routed"}',
    ],
)
def test_a_malformed_status_never_stops_the_sweep(tmp_path: Path, content: str) -> None:
    root = tmp_path / "jobs"
    broken = root / "a-broken"
    write_job(broken, n_output=0, n_input=0)
    (broken / STATUS).write_text(content)
    fine = root / "b-fine"
    write_job(fine, n_output=0, n_input=0)
    plan = plan_sweep(root, Backoff())
    assert plan.due == [broken, fine]  # unreadable: as never routed, which is safe


def test_a_status_from_a_newer_router_is_read(tmp_path: Path) -> None:
    job = tmp_path / "job"
    write_job(job, n_output=0, n_input=0)
    (job / STATUS).write_text(
        json.dumps(
            {
                "state": "routed",
                "runs": 2,
                "consecutive_failures": 0,
                "updated": "2026-01-01T00:00:00+00:00",
                "new_field": [1],
            }
        )
    )
    assert read_status(job).runs == 2  # type: ignore[union-attr]


# --- 11. a DICOMDIR ----------------------------------------------------------------------


def test_a_dicomdir_is_skipped_not_sent(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=0, n_input=2)
    shutil.copy(get_testdata_file("DICOMDIR"), job / "INPUT" / "DICOMDIR")
    cfg = rules({"RouteDirectory": "INPUT", "send": [{".*": dest(server.port)}]})
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {u: 1 for u in uids(files, "INPUT")}
    assert report.skipped_files["INPUT"] == [
        {"file": "INPUT/DICOMDIR", "reason": "a DICOMDIR (media directory), not an instance"}
    ]


# --- 12. counts of a second entry to one destination; names that are not UTF-8 ------------


def test_a_second_entry_to_the_same_destination_counts_each_instance_once(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=3, n_input=0)
    cfg = rules({"send": [{".*": dest(server.port)}]}, {"send": [{".*": dest(server.port)}]})
    report = route_job(job, cfg, settings(tmp_path))
    one, two = (rule.entries[0].delivery for rule in report.rules)
    assert one is not None and two is not None
    assert (one.stored, one.already) == (3, 0)
    assert (two.stored, two.already) == (0, 3)
    assert sum(server.counts.values()) == 3


def test_a_file_name_that_is_not_utf8_keeps_its_log_line(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    name = os.fsdecode(b"caf\xe9.dcm")  # Latin-1 on disk: a surrogate escape in Python
    (job / "OUTPUT" / name).write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "failed"
    log = (tmp_path / "routing.log").read_text(encoding="utf-8")
    [entry_line] = [line for line in log.splitlines() if " entry=1 " in line]
    assert "OUTPUT/caf\\udce9.dcm" in entry_line and "outcome=failed" in entry_line
    # the report stays serialisable for --json and the UI, whose JSON is strict UTF-8
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")
    assert "OUTPUT/caf\\udce9.dcm" in report.reason()  # type: ignore[operator]


# --- a record that cannot be written: a full disk ----------------------------------------

_FULL_DISK = r"""
set -eu
mount -t tmpfs -o size=1m tmpfs "$MNT"
cp -a "$JOB" "$MNT/job"
# fill the file system, then free two pages: the lock's line and the record's first lines
dd if=/dev/zero of="$MNT/fill" bs=4096 2>/dev/null || true
truncate -s -8192 "$MNT/fill"
"$PYTHON" -c "$RUNNER" "$CONFIG" "$MNT/job" "$LOG" || echo "runner exit $?"
cp "$MNT/job/routing-record.jsonl" "$OUT/record" || true
cp "$MNT/job/routing-status.json" "$OUT/status" 2>/dev/null || true
"""


def test_a_full_disk_stops_the_send_and_fails_the_job(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a tmpfs in a mount namespace")
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=40, n_input=0)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "out").mkdir()
    log = tmp_path / "routing.log"
    config = {"routing": [{"send": [{".*": dest(server.port)}]}]}
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", _FULL_DISK],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MNT": str(tmp_path / "mnt"),
            "JOB": str(job),
            "OUT": str(tmp_path / "out"),
            "PYTHON": sys.executable,
            "RUNNER": _RUNNER,
            "CONFIG": json.dumps(config),
            "LOG": str(log),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["raised"] == "JobFailed"
    assert "No space left on device; sending stopped" in outcome["message"]
    record_text = (tmp_path / "out" / "record").read_text()
    recorded = {
        e["sop"]
        for line in record_text.splitlines()
        if line.startswith("{") and line.endswith("}")
        for e in [json.loads(line)]
        if e.get("event") == "store" and e["stored"]
    }
    arrived = set(server.counts)
    assert recorded <= arrived  # nothing counted stored that did not arrive
    assert 0 < len(arrived) < 40  # stopped at once, not at the end of the job
    assert len(arrived - recorded) <= 1  # at most the instance in flight is not recorded
    assert "outcome=failed" in log.read_text() and "No space left on device" in log.read_text()

    # with room again, routing the same folder sends what the record lacks, once
    shutil.copy(tmp_path / "out" / "record", job / RECORD)
    report = route_job(job, parse_config(config), Settings(log_file=log))
    assert report.state == "routed"
    assert set(server.counts) == uids(files, "OUTPUT")
    assert sum(server.counts.values()) <= 41


# --- a bug in a step fails its entry, never the job's other destinations --------------------


def test_an_unexpected_error_fails_its_entry_and_the_fail_back_goes_on(
    tmp_path: Path,
    scp: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import router.route

    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    real = router.route.send_files

    def broken_for_port_1(endpoint: Any, *args: Any, **kw: Any) -> None:
        if endpoint.port == 1:
            raise KeyError("a bug")
        real(endpoint, *args, **kw)

    monkeypatch.setattr(router.route, "send_files", broken_for_port_1)
    cfg = rules({"send": [{".*": {**dest(1), "break": 1}}, {".*": dest(server.port)}]})
    report = route_job(job, cfg, settings(tmp_path))
    first, second = report.rules[0].entries
    assert first.state == "failed" and first.covered
    assert "internal error while sending to STORESCP@127.0.0.1:1" in (first.reason or "")
    assert "KeyError: 'a bug'" in (first.reason or "")
    assert second.state == "succeeded"
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    # a bug: its traceback is logged (to the run's log), the routing log has its one line
    [bug] = [r for r in caplog.records if r.name == "router.route" and r.exc_info]
    assert bug.levelname == "ERROR" and isinstance(bug.exc_info[1], KeyError)
    assert "KeyError: 'a bug'" in (tmp_path / "routing.log").read_text()


def test_an_interrupted_run_is_recorded_as_failed(
    tmp_path: Path, scp: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import router.route

    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=2, n_input=0)

    def interrupted(*args: Any, **kw: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(router.route, "send_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    status = read_status(job)
    assert status is not None and status.state == "failed"
    assert status.reason == "interrupted (KeyboardInterrupt)"
    assert record_lines(job)[-1]["event"] == "end"


def test_waiting_and_invalid_leave_their_state(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    cfg = rules({"send": [{".*": dest(server.port)}]})
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0, success=None)
    with pytest.raises(JobWaiting):
        route_job(job, cfg, settings(tmp_path))
    assert read_status(job).state == "waiting"  # type: ignore[union-attr]
    (job / "proc.json").write_text('{"success": 1}')
    with pytest.raises(JobInvalid, match="success: Input should be a valid string"):
        route_job(job, cfg, settings(tmp_path))
    assert read_status(job).state == "invalid"  # type: ignore[union-attr]
    assert server.counts == {}
