"""The fault matrix: one instance of a 20-file job makes the destination fail, six ways.

For each fault, over 1 and over 4 associations, routed end to end (`route_job`) into a
pynetdicom SCP that the test controls: which instances arrived and how often, what the
report, the record and the routing log say, how many associations were set up, and how
long it took. The faulty instance is the 7th file (k); with 4 associations it is the 2nd
of the second run of 5. A fault of one file must cost that file alone: the other 19 are
stored in the first attempt, without any retry delay (the bounds below are shorter than
the retry delay), and the file fails alone with its own reason, or arrives on a retry
when the destination itself was the problem (the crashed SCP, restarted on its port).

The table of outcomes is printed at the end of the module's run (`pytest -s` not needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import router.parallel
from router.config import parse_config
from router.record import RECORD
from router.report import Delivery, JobReport
from router.route import route_job
from router.settings import Settings
from tests.factory import dicom_file, write_job
from tests.fixtures_dcmtk import die_with_parent, free_port, wait_for_port
from tests.fixtures_scp import StorageSCP

pytestmark = pytest.mark.peers

FILES = 20
K = 7
"""The faulty instance: the 7th file of the job (OUTPUT/OU000007.dcm)."""
DIMSE = 1.0
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    """One row of the matrix: how the SCP fails on instance k, and what must follow."""

    name: str
    arm: Callable[[StorageSCP, str], None]
    retry_delay: float
    """First retry delay (backoff 4): longer than the whole run, unless a retry is due."""
    attempts: int
    arrived_k: int
    """How often instance k reaches the SCP's storage."""
    status: str | None
    """Its status in the report's failures; None with `reason`: it was never answered."""
    reason: str
    """How the report's reason for k begins."""
    k_lines: list[tuple[int | None, bool, bool]]
    """k's record lines: (status, permanent, possible_duplicate)."""
    extra_associations: int
    """Set-ups beyond one per association of the first attempt."""
    seconds: tuple[float, float]
    """Bounds of the run's duration: at least, less than."""


def _abort(server: StorageSCP, uid: str) -> None:
    server.abort_instances.add(uid)


def _reset(server: StorageSCP, uid: str) -> None:
    server.reset_instances.add(uid)


def _stall(server: StorageSCP, uid: str) -> None:
    server.stall_instances.add(uid)
    server.stall_seconds = 3


def _refuse(status: int) -> Callable[[StorageSCP, str], None]:
    def arm(server: StorageSCP, uid: str) -> None:
        server.refuse_instances[uid] = status

    return arm


FAULTS = [
    Fault(
        "abort",
        _abort,
        retry_delay=8.0,
        attempts=1,
        arrived_k=0,
        status=None,
        reason="the destination aborted the association twice while receiving this file",
        k_lines=[(None, False, False), (None, True, True)],
        extra_associations=2,
        seconds=(0.0, 8.0),
    ),
    Fault(
        "TCP reset",
        _reset,
        retry_delay=8.0,
        attempts=1,
        arrived_k=0,
        status=None,
        reason="the connection to the destination was lost twice while sending this file",
        k_lines=[(None, False, False), (None, True, True)],
        extra_associations=2,
        seconds=(0.0, 8.0),
    ),
    Fault(
        "stall past the DIMSE time-out",
        _stall,
        retry_delay=8.0,
        attempts=1,
        arrived_k=2,  # the SCP keeps it, each time, and never answers
        status=None,
        reason="the destination did not answer this file twice within the DIMSE time-out",
        k_lines=[(None, False, False), (None, True, True)],
        extra_associations=2,
        seconds=(2 * DIMSE, 2 * DIMSE + 8.0),
    ),
    Fault(
        "0xA700 forever",
        _refuse(0xA700),
        retry_delay=1.0,  # one retry (1 s), not a second (4 s more)
        attempts=2,
        arrived_k=0,
        status="0xA700",
        reason="C-STORE refused with status 0xA700 (Failure: Refused: Out of Resources)",
        k_lines=[(0xA700, False, False), (0xA700, True, False)],
        extra_associations=1,
        seconds=(1.0, 5.0),
    ),
    Fault(
        "0xC000",
        _refuse(0xC000),
        retry_delay=8.0,
        attempts=1,
        arrived_k=0,
        status="0xC000",
        reason="C-STORE refused with status 0xC000 (Failure: Cannot Understand)",
        k_lines=[(0xC000, False, False)],
        extra_associations=0,
        seconds=(0.0, 8.0),
    ),
]


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """Rows of the outcome table, printed once the module's tests have run."""
    rows: list[dict[str, Any]] = []
    yield rows
    columns = ["fault", "assoc", "arrived", "duplicates", "set-ups", "attempts", "seconds"]
    columns.append("report")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns} if rows else {}
    lines = ["", "fault matrix: instance k = file 7 of 20"]
    lines.append("  ".join(c.ljust(widths.get(c, len(c))) for c in columns))
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


def settings(tmp_path: Path, associations: int, retry_delay: float) -> Settings:
    return Settings(
        log_file=tmp_path / "routing.log",
        associations=associations,
        retries=3,
        retry_delay=retry_delay,
        retry_backoff=4,
        connect_timeout=2,
        acse_timeout=5,
        dimse_timeout=DIMSE,
        network_timeout=5,
    )


def one_destination(port: int, associations: int) -> Any:
    destination = {
        "IP": "127.0.0.1",
        "PORT": port,
        "AETitleSender": "ROUTER",
        "AETitleTo": "STORESCP",
        "associations": associations,
    }
    return parse_config({"routing": [{"send": [{".*": destination}]}]})


def make_job(tmp_path: Path) -> tuple[Path, list[str], str]:
    """The job, its instances in the job's order, and the relpath of instance k."""
    job = tmp_path / "job"
    paths = write_job(job, n_output=FILES, n_input=0)
    files = [dicom_file(p, job) for p in paths]
    assert [f.relpath for f in files] == sorted(f.relpath for f in files)
    return job, [f.sop_instance_uid for f in files], files[K - 1].relpath


def store_lines(job: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (job / RECORD).read_text().splitlines() if line]
    return [e for e in lines if e["event"] == "store"]


def delivery_of(report: JobReport) -> Delivery:
    delivery = report.rules[0].entries[0].delivery
    assert delivery is not None
    return delivery


def summary(report: JobReport, delivery: Delivery) -> str:
    if report.state == "routed":
        return "routed"
    (failure,) = delivery.failures
    return f"failed: {failure['file']}: {failure['reason'][:60]}..."


@pytest.fixture(params=[1, 4], ids=["1 association", "4 associations"])
def associations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(router.parallel, "MIN_SHARE_FILES", 1)  # 20 files: 4 runs of 5
    return int(request.param)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_one_faulty_instance_costs_that_instance_alone(
    tmp_path: Path,
    scp: Callable[..., StorageSCP],
    associations: int,
    fault: Fault,
    table: list[dict[str, Any]],
) -> None:
    server = scp()
    job, uids, k_file = make_job(tmp_path)
    k = uids[K - 1]
    fault.arm(server, k)

    begun = time.monotonic()
    report = route_job(
        job,
        one_destination(server.port, associations),
        settings(tmp_path, associations, fault.retry_delay),
    )
    seconds = time.monotonic() - begun

    delivery = delivery_of(report)
    table.append(
        {
            "fault": fault.name,
            "assoc": associations,
            "arrived": f"{len(server.counts)}/{FILES}",
            "duplicates": sum(server.counts.values()) - len(server.counts),
            "set-ups": server.associations,
            "attempts": delivery.attempts,
            "seconds": f"{seconds:.2f}",
            "report": summary(report, delivery),
        }
    )
    # What arrived: every other instance once, k as the fault allows.
    expected = Counter({uid: 1 for uid in uids if uid != k})
    if fault.arrived_k:
        expected[k] = fault.arrived_k
    assert server.counts == expected
    assert server.associations == associations + fault.extra_associations
    lo, hi = fault.seconds
    assert lo <= seconds < hi, f"{seconds:.2f} s"

    # The report (and --json, which prints it): k failed alone, with its own reason.
    assert report.state == "failed" and delivery.attempts == fault.attempts
    assert (delivery.stored, delivery.failed) == (FILES - 1, 1)
    assert not delivery.transient
    (failure,) = delivery.failures
    assert failure["file"] == k_file and failure["status"] == fault.status
    assert failure["reason"].startswith(fault.reason), failure["reason"]
    assert report.to_dict()["rules"][0]["entries"][0]["delivery"]["failures"] == [failure]
    assert k_file in (delivery.error or "") and fault.reason in (delivery.error or "")

    # The record: one stored line for each other instance; k's lines tell its story.
    stores = store_lines(job)
    others = [e for e in stores if e["sop"] != k]
    assert sorted(e["sop"] for e in others) == sorted(u for u in uids if u != k)
    assert all(e["stored"] and e["attempt"] == 1 for e in others)
    assert not any(e.get("possible_duplicate") for e in others)
    k_lines = [e for e in stores if e["sop"] == k]
    assert [
        (e["status"], e.get("permanent", False), e.get("possible_duplicate", False))
        for e in k_lines
    ] == fault.k_lines
    assert all(e["file"] == k_file and not e["stored"] and e["error"] for e in k_lines)
    assert k_lines[-1]["error"] == failure["reason"]
    assert k_lines[-1]["attempt"] == fault.attempts

    # The routing log: a line for the file, as it failed, and the entry's line.
    log = (tmp_path / "routing.log").read_text()
    (line,) = [x for x in log.splitlines() if "outcome=file-failed" in x]
    assert f"file={k_file}" in line and fault.reason in line
    retries = [x for x in log.splitlines() if "outcome=retrying" in x]
    assert len(retries) == fault.attempts - 1


def start_scp(port: int, events: Path, hold: str | None = None) -> subprocess.Popen[bytes]:
    """The SCP of `tests.scp_process` on `port`, up and accepting."""
    args = [sys.executable, "-m", "tests.scp_process", str(port), str(events)]
    proc = subprocess.Popen(
        [*args, *([hold] if hold else [])],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    wait_for_port(port, proc, 20, lambda: events.read_text() if events.exists() else "")
    return proc


def wait_for_line(events: Path, line: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.exists() and line in events.read_text().splitlines():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    raise AssertionError(f"no {line!r} from the SCP: {events.read_text()}")


def test_a_crash_after_storing_instance_k_is_retried_and_nothing_is_lost(
    tmp_path: Path, associations: int, table: list[dict[str, Any]]
) -> None:
    port = free_port()
    events = tmp_path / "events"
    job, uids, k_file = make_job(tmp_path)
    k = uids[K - 1]
    config = one_destination(port, associations)
    outcome: dict[str, Any] = {}

    def route() -> None:
        try:
            outcome["report"] = route_job(job, config, settings(tmp_path, associations, 1.0))
        except BaseException as exc:  # shown by the assertion below
            outcome["error"] = exc

    procs = [start_scp(port, events, hold=k)]
    try:
        # The router in a thread, so that this one can crash the destination and start it
        # again (peers are started from the test's thread: they die with it).
        router_thread = threading.Thread(target=route, name="route-job")
        begun = time.monotonic()
        router_thread.start()
        wait_for_line(events, f"holding {k}", procs[0], 30)
        os.kill(procs[0].pid, signal.SIGKILL)  # it stored k, and dies before answering
        assert procs[0].wait(10) == -signal.SIGKILL
        procs.append(start_scp(port, events))
        router_thread.join(60)
        seconds = time.monotonic() - begun
        assert not router_thread.is_alive() and "error" not in outcome, outcome
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    report: JobReport = outcome["report"]
    delivery = delivery_of(report)
    lines = events.read_text().splitlines()
    counts = Counter(line.split()[1] for line in lines if line.startswith("stored "))
    setups = lines.count("association")
    table.append(
        {
            "fault": "SCP crash after storing k",
            "assoc": associations,
            "arrived": f"{len(counts)}/{FILES}",
            "duplicates": sum(counts.values()) - len(counts),
            "set-ups": setups,
            "attempts": delivery.attempts,
            "seconds": f"{seconds:.2f}",
            "report": summary(report, delivery),
        }
    )
    # Nothing lost: everything arrived once the destination was back, k twice (it was
    # stored before the crash and never answered); any other duplicate is a file that
    # was in flight on another association when the SCP died.
    assert set(counts) == set(uids) and counts[k] == 2
    duplicates = {uid for uid, n in counts.items() if n > 1}
    assert len(duplicates) <= associations and max(counts.values()) == 2
    assert report.state == "routed" and delivery.stored == FILES
    # Retries after 1, 4, 16 s: the destination is back once its process has started
    # again (1-2 s here; a loaded machine may need the third retry).
    assert 2 <= delivery.attempts <= 4
    assert seconds < 1.0 + 4.0 + 16.0 + 10.0
    # The record: k unanswered in attempt 1, stored in a later one as a possible duplicate;
    # so is every instance that arrived twice.
    stores = store_lines(job)
    k_lines = [e for e in stores if e["sop"] == k]
    assert (k_lines[0]["status"], k_lines[0]["attempt"]) == (None, 1)
    assert k_lines[-1]["stored"] and k_lines[-1]["possible_duplicate"] is True
    assert k_lines[-1]["attempt"] >= 2 and k_file == k_lines[-1]["file"]
    for uid in duplicates:
        assert any(e["sop"] == uid and e.get("possible_duplicate") for e in stores)
    assert not [e for e in stores if e.get("permanent")]
