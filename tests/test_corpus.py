"""pydicom's test files as one job, as a new user would try them, into Orthanc and storescp.

The corpus (`tests.factory.write_pydicom_corpus`: ~150 instances re-saved with fresh UIDs,
defects included, and the files that are not instances) holds what real jobs hold: a data
set in implicit VR under an explicit meta, a truncated file, codecs a PACS lacks. First
each instance is sent on its own, over an association of its own; then the job is routed
as a whole. Every instance the destination stored when sent on its own must arrive from
the job; every other one is reported (report, `--json`, record) with its file and reason;
the rest of the folder is listed as skipped, with reasons; and the job fails (exit 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import parse_config
from router.model import Endpoint, SendError, StoreResult, Timeouts
from router.record import RECORD
from router.route import route_job
from router.select import scan
from router.settings import Settings
from router.transport import send_files
from tests.factory import write_job, write_pydicom_corpus
from tests.fixtures_dcmtk import StoreSCP
from tests.fixtures_orthanc import Orthanc

pytestmark = pytest.mark.peers

DIMSE = 1.5
"""A file Orthanc never answered cost this, twice (none is left since the scan's check)."""
TIMEOUTS = Timeouts(connect=2, acse=5, dimse=DIMSE, network=5)
ENV = {
    "DICOM_ROUTER_RETRIES": "3",
    "DICOM_ROUTER_RETRY_DELAY": "0.2",
    "DICOM_ROUTER_CONNECT_TIMEOUT": "2",
    "DICOM_ROUTER_ACSE_TIMEOUT": "5",
    "DICOM_ROUTER_DIMSE_TIMEOUT": str(DIMSE),
    "DICOM_ROUTER_NETWORK_TIMEOUT": "5",
}


def corpus_job(tmp_path: Path) -> Path:
    job = tmp_path / "corpus"
    write_job(job, n_output=0, n_input=0)
    write_pydicom_corpus(job / "OUTPUT")
    return job


def stored_alone(
    job: Path, endpoint: Endpoint, arrived: Callable[[], set[str]]
) -> tuple[set[str], dict[str, str]]:
    """Send each instance over an association of its own: what the destination keeps,
    and what the others' last answer said (file -> reason)."""
    files = scan(job, "OUTPUT").files
    last: dict[str, str] = {}
    for f in files:
        answers: list[StoreResult] = []
        try:
            send_files(endpoint, [f], TIMEOUTS, answers.append)
        except SendError as exc:
            last[f.relpath] = exc.reason
        if answers and not answers[-1].stored:
            last[f.relpath] = answers[-1].error or ""
    kept = arrived()
    by_uid = {f.sop_instance_uid: f.relpath for f in files}
    assert set(by_uid) >= kept
    return kept, {by_uid[u]: last.get(by_uid[u], "?") for u in set(by_uid) - kept}


CHECKED_OUT = {
    "OUTPUT/SC_rgb_jpeg.dcm": "its data set is encoded in implicit VR little endian, while its "
    "file meta declares JPEG Baseline (Process 1) (explicit VR little endian)",
    "OUTPUT/rtplan_truncated.dcm": "its data set does not read in Implicit VR Little Endian: a "
    "sequence item at byte ",  # where depends on the length of the fresh UIDs
}
"""What the scan's check refuses before anything is sent (README, "Files checked before
they go"): these two are never streamed, so neither costs a DIMSE time-out any more."""


def check(job: Path, report: dict[str, Any], alone: set[str], arrived: set[str]) -> list[str]:
    """The job's outcome against the instances stored alone; the files not stored."""
    files = scan(job, "OUTPUT")
    by_uid = {f.sop_instance_uid: f.relpath for f in files.files}
    assert arrived == alone, {by_uid.get(u, u) for u in arrived ^ alone}
    assert report["state"] == "failed"
    (rule,) = report["rules"]
    (entry,) = rule["entries"]
    delivery = entry["delivery"]
    missing = sorted(by_uid[u] for u in set(by_uid) - alone)
    refused = {u.relpath: u.reason for u in files.unsendable}
    assert sorted(refused) == sorted(CHECKED_OUT)
    assert all(refused[name].startswith(start) for name, start in CHECKED_OUT.items())
    assert "more than (300A,00B0) BeamSequence holds" in refused["OUTPUT/rtplan_truncated.dcm"]
    assert (delivery["stored"], delivery["failed"]) == (len(alone), len(missing) + len(refused))
    listed = {f["file"]: f for f in delivery["failures"]}
    assert sorted(listed) == sorted([*missing, *refused])
    assert all(f["reason"] for f in listed.values())
    assert {name: listed[name]["reason"] for name in refused} == refused
    # The record has the same reason on the file's last line.
    lines = [json.loads(x) for x in (job / RECORD).read_text().splitlines() if x]
    last = {e["file"]: e for e in lines if e["event"] == "store"}
    for name in missing:
        assert not last[name]["stored"] and last[name]["error"] == listed[name]["reason"]
    not_sent = {e["file"]: e["error"] for e in lines if e["event"] == "not_sent"}
    assert not_sent == refused
    # The rest of the folder: skipped, each with its reason.
    skipped = {s["file"]: s["reason"] for s in report["skipped_files"].get("OUTPUT", [])}
    assert sorted(skipped) == sorted(s.relpath for s in files.skipped)
    assert all(skipped.values()) and "OUTPUT/README.txt" in skipped
    assert (
        skipped["OUTPUT/dicomdirtests/DICOMDIR"] == "a DICOMDIR (media directory), not an instance"
    )
    return missing


@pytest.mark.flow
def test_corpus_into_orthanc_through_the_command_line(
    tmp_path: Path, orthanc_clean: Orthanc, prefect_api: str
) -> None:
    job = corpus_job(tmp_path)
    endpoint = Endpoint("127.0.0.1", orthanc_clean.port, orthanc_clean.aet, "ROUTER")
    alone, why = stored_alone(job, endpoint, lambda: set(orthanc_clean.instances()))
    assert len(alone) > 100 and why, why
    orthanc_clean.reset()
    config = tmp_path / "routing.json"
    destination = {"IP": "127.0.0.1", "PORT": orthanc_clean.port, "AETitleSender": "ROUTER"}
    rules = {"routing": [{"send": [{".*": {**destination, "AETitleTo": orthanc_clean.aet}}]}]}
    config.write_text(json.dumps(rules))
    env = {
        **os.environ,
        **ENV,
        "DICOM_ROUTER_LOG_FILE": str(tmp_path / "routing.log"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }

    done = subprocess.run(
        [sys.executable, "-m", "router", "route", str(job), "--config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    missing = check(job, report, alone, set(orthanc_clean.instances()))
    assert sorted(why) == missing
    # Orthanc refuses the JPEG-LS near-lossless files with 0xA700 while it stores the
    # others: counted as refused after the first retry, not retried three times.
    delivery = report["rules"][0]["entries"][0]["delivery"]
    assert delivery["attempts"] == 2
    busy = [f for f in delivery["failures"] if f["status"] == "0xA700"]
    assert busy and all("counted as refused, not retried" in f["reason"] for f in busy)


def test_corpus_into_storescp(tmp_path: Path, storescp: Callable[..., StoreSCP]) -> None:
    job = corpus_job(tmp_path)
    peer = storescp("STORESCP")
    endpoint = Endpoint("127.0.0.1", peer.port, peer.aet, "ROUTER")
    alone, why = stored_alone(job, endpoint, lambda: set(peer.received()))
    assert len(alone) > 100 and why, why
    peer.clear()
    destination = {"IP": "127.0.0.1", "PORT": peer.port, "AETitleSender": "ROUTER"}
    config = parse_config({"routing": [{"send": [{".*": {**destination, "AETitleTo": peer.aet}}]}]})
    settings = Settings(
        log_file=tmp_path / "routing.log",
        **{k.removeprefix("DICOM_ROUTER_").lower(): v for k, v in ENV.items()},
    )

    report = route_job(job, config, settings)

    received = peer.received()
    assert set(received.values()) == {1}  # nothing twice
    missing = check(job, report.to_dict(), alone, set(received))
    assert sorted(why) == missing
