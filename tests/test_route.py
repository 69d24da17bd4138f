"""Routing jobs end to end on the plain path, against real peers on 127.0.0.1.

Every test asserts which instances arrived where, and how often.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import RoutingConfig, parse_config
from router.job import JobInvalid, JobWaiting
from router.lock import JobLocked, job_lock
from router.record import RECORD, REPORT, read_report, read_status
from router.route import route_job
from router.settings import Settings
from tests.factory import dicom_file, write_ct, write_job
from tests.fixtures_dcmtk import free_port

pytestmark = pytest.mark.peers


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "me": "127.0.0.1",
        "port": 104,
        "log_file": tmp_path / "routing.log",
        "retries": 2,
        "retry_delay": 0.05,
        "connect_timeout": 2,
        "acse_timeout": 5,
        "dimse_timeout": 5,
        "network_timeout": 5,
    }
    base.update(kw)
    return Settings(**base)


def dest(port: int, aet: str = "STORESCP", **kw: Any) -> dict[str, Any]:
    return {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": aet, **kw}


def rules(*rule_list: dict[str, Any]) -> RoutingConfig:
    return parse_config({"routing": list(rule_list)})


def uids(paths: list[Path], folder: str) -> set[str]:
    return {dicom_file(p).sop_instance_uid for p in paths if p.parent.name == folder}


def record_lines(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / RECORD).read_text().splitlines() if line]


def test_routes_output_to_a_destination(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=2)
    cfg = rules({"name": "results", "send": [{"success": dest(server.port)}]})
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    assert {a.calling_aet for a in server.arrivals} == {"ROUTER"}
    status = read_status(job)
    assert status is not None and (status.state, status.runs) == ("routed", 1)
    stores = [e for e in record_lines(job) if e["event"] == "store"]
    assert sorted(e["sop"] for e in stores) == sorted(uids(files, "OUTPUT"))
    assert all(e["status"] == 0 and e["stored"] and e["attempt"] == 1 for e in stores)
    log = (tmp_path / "routing.log").read_text()
    assert "rule=1:results" in log and "stored=3" in log and "outcome=routed" in log


def test_the_job_folder_keeps_the_last_run_s_report(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    server.refuse_instances[dicom_file(files[0]).sop_instance_uid] = 0xC000
    cfg = rules({"name": "results", "send": [{"success": dest(server.port)}]})
    first = route_job(job, cfg, settings(tmp_path), origin="test, first")
    assert first.state == "failed"
    assert read_report(job) == first.to_dict()
    assert read_report(job)["origin"] == "test, first"  # type: ignore[index]

    (job / REPORT).unlink()
    (job / REPORT).mkdir()  # the report cannot be written: logged, the job still ends
    server.refuse_instances.clear()
    second = route_job(job, cfg, settings(tmp_path), origin="test, second")
    assert second.state == "routed" and read_status(job).state == "routed"  # type: ignore[union-attr]
    assert server.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    log = (tmp_path / "routing.log").read_text()
    assert "outcome=report-not-written" in log and "routing-report.json" in log


def test_fail_back_lands_at_the_alternative_and_a_rerun_sends_nothing_twice(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    backup = scp(ae_title="BACKUP")
    dead = free_port()
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)
    cfg = rules(
        {
            "name": "pacs with fail-back",
            "send": [
                {"success": dest(dead, "PACS", **{"break": 1})},
                {"success": dest(backup.port, "BACKUP", **{"break": 1})},
            ],
        }
    )
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    primary, alternative = report.rules[0].entries
    assert (primary.state, primary.covered) == ("failed", True)
    assert primary.delivery and primary.delivery.attempts == 3  # 1 + 2 retries
    assert "connection refused" in (primary.reason or "")
    assert alternative.state == "succeeded"
    assert backup.counts == {uid: 1 for uid in uids(files, "OUTPUT")}

    again = route_job(job, cfg, settings(tmp_path))
    assert again.state == "routed"
    assert again.rules[0].entries[1].delivery.already == 4  # type: ignore[union-attr]
    assert again.rules[0].entries[1].delivery.stored == 0  # type: ignore[union-attr]
    assert backup.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    assert read_status(job).runs == 2  # type: ignore[union-attr]


def test_break_after_success_skips_later_entries(tmp_path: Path, scp: Callable[..., Any]) -> None:
    primary, copy = scp(ae_title="PRIMARY"), scp(ae_title="COPY")
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    cfg = rules(
        {
            "send": [
                {
                    "success": dest(primary.port, "PRIMARY", **{"break": 1}),
                    ".*": dest(copy.port, "COPY"),
                }
            ]
        }
    )
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert primary.instances == uids(files, "OUTPUT")
    assert copy.counts == {}
    assert report.rules[0].not_evaluated == [2]


def test_a_failed_copy_is_never_covered(tmp_path: Path, scp: Callable[..., Any]) -> None:
    other = scp(ae_title="OTHER")
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    cfg = rules({"send": [{".*": dest(free_port(), "COPY")}, {".*": dest(other.port, "OTHER")}]})
    report = route_job(job, cfg, settings(tmp_path, retries=0))
    assert report.state == "failed"
    assert other.instances == uids(files, "OUTPUT")  # later entries still evaluated
    copy = report.rules[0].entries[0]
    assert copy.state == "failed" and not copy.covered
    assert read_status(job).state == "failed"  # type: ignore[union-attr]
    assert "connection refused" in (report.reason() or "")


def test_rule_level_break(tmp_path: Path, scp: Callable[..., Any]) -> None:
    first, second = scp(ae_title="FIRST"), scp(ae_title="SECOND")
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    cfg = rules(
        {"name": "first", "break": 1, "send": [{".*": dest(first.port, "FIRST")}]},
        {"name": "second", "send": [{".*": dest(second.port, "SECOND")}]},
    )
    report = route_job(job, cfg, settings(tmp_path))
    assert len(first.instances) == 1 and second.counts == {}
    assert report.not_evaluated_rules == [2]

    # the first rule failing does not stop later rules
    job2 = tmp_path / "job2"
    write_job(job2, n_output=1, n_input=0)
    first.reject_next(10, transient=False)
    report = route_job(job2, cfg, settings(tmp_path))
    assert report.state == "failed" and report.not_evaluated_rules == []
    assert len(second.instances) == 1


def test_partial_send_is_a_failure_and_a_rerun_sends_only_what_is_missing(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)
    outputs = sorted(uids(files, "OUTPUT"))
    refused = outputs[1]
    server.refuse_instances[refused] = 0xC000  # permanent: not retried
    cfg = rules({"send": [{"success": dest(server.port)}]})
    report = route_job(job, cfg, settings(tmp_path))
    entry = report.rules[0].entries[0]
    assert report.state == "failed" and entry.state == "failed"
    assert entry.delivery and (entry.delivery.stored, entry.delivery.failed) == (3, 1)
    assert entry.delivery.attempts == 1
    assert "0xC000" in (entry.reason or "")
    assert server.instances == set(outputs) - {refused}

    del server.refuse_instances[refused]
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {uid: 1 for uid in outputs}


def test_out_of_resources_is_retried(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    server.refuse_at[2] = 0xA700
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "routed"
    assert report.rules[0].entries[0].delivery.attempts == 2  # type: ignore[union-attr]
    assert server.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    refused = [e for e in record_lines(job) if e.get("status") == 0xA700]
    assert len(refused) == 1 and refused[0]["attempt"] == 1


def test_a_destination_that_refuses_everything_with_0xa700_is_retried(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    for uid in uids(files, "OUTPUT"):
        server.refuse_instances[uid] = 0xA700
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    delivery = report.rules[0].entries[0].delivery
    assert report.state == "failed" and delivery is not None
    assert delivery.attempts == 3 and delivery.transient  # all its retries: out of resources
    assert [f["status"] for f in delivery.failures] == ["0xA700"] * 3
    assert not any("counted as refused" in f["reason"] for f in delivery.failures)
    assert server.counts == {} and server.requests == 9


def test_abort_mid_association_is_isolated_without_a_retry(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=6, n_input=0)
    server.abort_at.update({3, 4})  # the 3rd and 4th file, once each
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    assert report.rules[0].entries[0].delivery.attempts == 1  # type: ignore[union-attr]
    assert server.associations == 5  # 3 in order, then the two files put aside, alone


def test_a_destination_that_aborts_everything_is_retried_without_duplicates(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=6, n_input=0)
    server.abort_at.update({1, 2, 3})  # three associations in a row end before any answer
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "routed"
    assert server.counts == {uid: 1 for uid in uids(files, "OUTPUT")}
    assert report.rules[0].entries[0].delivery.attempts == 2  # type: ignore[union-attr]
    assert server.associations == 3 + 1
    log = (tmp_path / "routing.log").read_text()
    assert "outcome=retrying" in log and "3 associations in a row ended before any" in log


def test_a_lost_response_is_resent_and_recorded_as_a_possible_duplicate(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp(stall_seconds=4)
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    server.stall_at.add(2)
    report = route_job(
        job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path, dimse_timeout=1)
    )
    assert report.state == "routed"
    counts = server.counts
    assert set(counts) == uids(files, "OUTPUT")
    stalled = [uid for uid, n in counts.items() if n == 2]
    assert len(stalled) == 1 and sum(counts.values()) == 4
    lines = [e for e in record_lines(job) if e.get("sop") == stalled[0]]
    assert [e["status"] for e in lines] == [None, 0]
    assert lines[1].get("possible_duplicate") is True


def test_association_rejections(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=2, n_input=0)
    cfg = rules({"send": [{".*": dest(server.port)}]})
    server.reject_next(2, transient=True)
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    assert report.rules[0].entries[0].delivery.attempts == 3  # type: ignore[union-attr]
    assert len(server.instances) == 2

    job2 = tmp_path / "job2"
    write_job(job2, n_output=2, n_input=0)
    server.reject_next(1, transient=False)
    report = route_job(job2, cfg, settings(tmp_path))
    entry = report.rules[0].entries[0]
    assert report.state == "failed" and entry.delivery.attempts == 1  # type: ignore[union-attr]
    assert "rejected" in (entry.reason or "") and "permanent" in (entry.reason or "")
    assert len(server.instances) == 2  # nothing of job2 arrived


def test_which_route_directory_and_placeholders(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=2)
    write_ct(job / "OUTPUT" / "seg.dcm", series_description="SEGMENTATION")
    cfg = rules(
        {
            "name": "inputs",
            "RouteDirectory": "INPUT",
            "send": [
                {
                    ".*": {
                        "IP": "$me",
                        "PORT": "$port",
                        "AETitleSender": "R",
                        "AETitleTo": "STORESCP",
                    }
                }
            ],
        },
        {
            "name": "segmentations only",
            "send": [{"success": dest(server.port, which=[{"0008,103e": "seg.*"}])}],
        },
        {"name": "wrong success", "send": [{"failed": dest(server.port)}]},
    )
    report = route_job(job, cfg, settings(tmp_path, port=server.port))
    assert report.state == "routed"
    seg = dicom_file(job / "OUTPUT" / "seg.dcm").sop_instance_uid
    assert server.counts == {**{u: 1 for u in uids(files, "INPUT")}, seg: 1}
    assert report.rules[0].entries[0].destination.startswith(f"STORESCP@127.0.0.1:{server.port}")
    assert report.rules[1].entries[0].excluded == 2
    assert report.rules[2].entries == [] and report.rules[2].not_matching == [1]


def test_non_dicom_files_are_skipped_and_counted(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    (job / "OUTPUT" / "report.pdf").write_bytes(b"%PDF-1.4")
    (job / "OUTPUT" / "notes.txt").write_text("x")
    report = route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert report.state == "routed"
    assert server.instances == uids(files, "OUTPUT")
    assert sorted(s["file"] for s in report.skipped_files["OUTPUT"]) == [
        "OUTPUT/notes.txt",
        "OUTPUT/report.pdf",
    ]


def test_nothing_applies_is_routed(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0, called="OTHERBOX")
    report = route_job(
        job,
        rules({"AETitleIn": "PROCRSI", "send": [{".*": dest(server.port)}]}),
        settings(tmp_path),
    )
    assert report.state == "routed" and server.counts == {}
    assert not report.rules[0].applied


def test_waiting_invalid_and_locked_jobs_send_nothing(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    cfg = rules({"send": [{".*": dest(server.port)}]})
    waiting = tmp_path / "waiting"
    write_job(waiting, success=None, n_output=1, n_input=0)
    with pytest.raises(JobWaiting):
        route_job(waiting, cfg, settings(tmp_path))
    status = read_status(waiting)
    assert status is not None and (status.state, status.runs) == ("waiting", 0)
    assert f"job={waiting} outcome=waiting" in (tmp_path / "routing.log").read_text()

    invalid = tmp_path / "invalid"
    write_job(invalid, n_output=1, n_input=0)
    (invalid / "proc.json").write_text("[{")
    with pytest.raises(JobInvalid, match="proc.json: not valid JSON"):
        route_job(invalid, cfg, settings(tmp_path))
    status = read_status(invalid)
    assert status is not None and status.state == "invalid" and "proc.json" in (status.reason or "")
    assert "outcome=invalid" in (tmp_path / "routing.log").read_text()
    (invalid / "proc.json").write_text('[{"success": "success", "message": ""}]')
    assert route_job(invalid, cfg, settings(tmp_path)).state == "routed"

    locked = tmp_path / "locked"
    write_job(locked, n_output=1, n_input=0)
    with job_lock(locked), pytest.raises(JobLocked, match="another routing of this job"):
        route_job(locked, cfg, settings(tmp_path))
    assert len(server.instances) == 1  # only the fixed invalid job's one file


def test_force_sends_again_once(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    cfg = rules({"send": [{".*": dest(server.port)}, {".*": dest(server.port)}]})
    route_job(job, cfg, settings(tmp_path))
    # the second entry to the same destination found everything there already
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    route_job(job, cfg, settings(tmp_path), force=True)
    assert server.counts == {u: 2 for u in uids(files, "OUTPUT")}


def test_routing_never_changes_the_job_files(tmp_path: Path, scp: Callable[..., Any]) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=2)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    route_job(job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path))
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before


def test_real_peers_storescp_and_orthanc(
    tmp_path: Path, storescp: Callable[..., Any], orthanc_clean: Any
) -> None:
    dcmtk = storescp("DCMTK")
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=1)
    cfg = rules(
        {
            "name": "orthanc, wrong AE title first",
            "send": [
                {"success": dest(orthanc_clean.port, "NOTORTHANC", **{"break": 1})},
                {"success": dest(orthanc_clean.port, orthanc_clean.aet, **{"break": 1})},
            ],
        },
        {
            "name": "copy to dcmtk",
            "RouteDirectory": "INPUT",
            "send": [{".*": dest(dcmtk.port, "DCMTK")}],
        },
    )
    report = route_job(job, cfg, settings(tmp_path))
    assert report.state == "routed"
    wrong, _right = report.rules[0].entries
    assert wrong.state == "failed" and wrong.covered and wrong.delivery.attempts == 1  # type: ignore[union-attr]
    assert orthanc_clean.instances() == {u: 1 for u in uids(files, "OUTPUT")}
    assert dcmtk.received() == {u: 1 for u in uids(files, "INPUT")}


KILLED_RUN = """
import sys
from router.config import load_config
from router.route import route_job
from router.settings import Settings
route_job(sys.argv[1], load_config(sys.argv[2]), Settings(log_file=sys.argv[3]))
"""


def test_a_killed_run_run_again_completes_without_losing_an_instance(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp(delay=0.05)
    job = tmp_path / "job"
    files = write_job(job, n_output=40, n_input=0)
    config = tmp_path / "routing.json"
    config.write_text(json.dumps({"routing": [{"send": [{".*": dest(server.port)}]}]}))
    args = [sys.executable, "-c", KILLED_RUN, str(job), str(config), str(tmp_path / "r.log")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 30
    while len(server.counts) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    arrived_before = set(server.counts)
    assert 10 <= len(arrived_before) < 40
    assert read_status(job) is None  # the run never finished

    report = route_job(job, load_config_path(config), settings(tmp_path))
    assert report.state == "routed"
    outputs = uids(files, "OUTPUT")
    assert set(server.counts) == outputs
    duplicates = [u for u, n in server.counts.items() if n > 1]
    assert len(duplicates) <= 1  # at most the instance in flight at the kill
    assert all(n <= 2 for n in server.counts.values())
    delivery = report.rules[0].entries[0].delivery
    assert delivery is not None and delivery.already + delivery.stored == 40
    assert delivery.already >= len(arrived_before) - 1


def load_config_path(path: Path) -> RoutingConfig:
    from router.config import load_config

    return load_config(path)


def test_error_report_goes_with_the_results_of_a_failed_computation(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    from pydicom import dcmread
    from pydicom.uid import BasicTextSRStorage

    server = scp(keep_data=True)
    cfg = rules(
        {
            "error_report": 1,
            "send": [{".*": dest(server.port, which=[{"SeriesDescription": "OUTPUT"}])}],
        }
    )
    failed = tmp_path / "failed"
    files = write_job(
        failed, n_output=2, n_input=1, success="failed", message="Segmentation did not converge"
    )
    report = route_job(failed, cfg, settings(tmp_path))
    assert report.state == "routed"
    sr = [a for a in server.arrivals if a.sop_instance_uid not in uids(files, "OUTPUT")]
    assert len(sr) == 1 and len(server.arrivals) == 3
    stored = dcmread(__import__("io").BytesIO(server.data[sr[0].sop_instance_uid]), force=True)
    assert stored.SOPClassUID == BasicTextSRStorage
    assert stored.StudyInstanceUID == dicom_study(files[0])
    texts = [item.get("TextValue", "") for item in stored.ContentSequence]
    assert "Segmentation did not converge" in texts

    route_job(failed, cfg, settings(tmp_path))  # again: nothing new, the report included
    assert all(n == 1 for n in server.counts.values())

    ok = tmp_path / "ok"
    files = write_job(ok, n_output=2, n_input=0, success="success")
    route_job(ok, cfg, settings(tmp_path))
    assert len(server.counts) == 5  # the two results, no report
    assert not (ok / ".routing").exists()


def dicom_study(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_the_routing_core_runs_without_prefect() -> None:
    """router/ is plain Python: importing the routing path must not import Prefect."""
    code = (
        "import sys, router.route, router.explain, router.sweep, router.cli; "
        "sys.exit('prefect' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
