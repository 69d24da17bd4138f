"""Parallel associations (router.parallel): one sending process per association.

Against the controllable pynetdicom SCP: every instance arrives once, answers reach
`on_result` one at a time in the calling thread, a failure in one process leaves the others'
files reported and the rest to a retry, and a killed router leaves no sender behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import router.parallel
from router.config import load_config, parse_config
from router.model import DicomFile, Endpoint, SendError, StoreResult, Timeouts
from router.record import RECORD
from router.route import route_job
from router.settings import Settings
from router.transport import send_files
from tests.factory import write_job
from tests.fixtures_scp import StorageSCP

pytestmark = pytest.mark.peers

FAST = Timeouts(connect=5, acse=10, dimse=10, network=10)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def small_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spread even a test's few small files (the parent decides how many associations)."""
    monkeypatch.setattr(router.parallel, "MIN_SHARE_FILES", 1)


class Results(list[StoreResult]):
    """on_result: collects, and fails if called from another thread or concurrently."""

    def __init__(self) -> None:
        super().__init__()
        self._busy = threading.Lock()

    def __call__(self, result: StoreResult) -> None:
        assert threading.current_thread() is threading.main_thread()
        assert self._busy.acquire(blocking=False), "on_result called concurrently"
        try:
            self.append(result)
        finally:
            self._busy.release()

    @property
    def stored(self) -> list[str]:
        return [r.file.sop_instance_uid for r in self if r.stored]


def uids(files: list[DicomFile]) -> list[str]:
    return [f.sop_instance_uid for f in files]


def shares(files: list[DicomFile], count: int) -> list[list[DicomFile]]:
    size, extra = divmod(len(files), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [files[bounds[i] : bounds[i + 1]] for i in range(count)]


def senders(under: int | None = None) -> dict[int, int]:
    """Live sending processes (by their command-line marker) -> their parent's pid; only
    those descending from `under`, if given (sender 1 is the router's child, the others
    sender 1's)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        state, ppid = stat[stat.rfind(b")") + 2 :].split()[:2]
        if router.parallel.MARKER.encode() in cmdline and state != b"Z":
            found[int(name)] = int(ppid)
    if under is None:
        return found
    mine: dict[int, int] = {}
    while True:
        more = {p: pp for p, pp in found.items() if (pp == under or pp in mine) and p not in mine}
        if not more:
            return mine
        mine.update(more)


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if p in senders()]:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def no_sender_left() -> Iterator[None]:
    yield
    assert senders(os.getpid()) == {}


def test_associations_for_keeps_small_jobs_on_one(
    monkeypatch: pytest.MonkeyPatch, scp: Callable[..., StorageSCP], make_files: Any
) -> None:
    monkeypatch.setattr(router.parallel, "MIN_SHARE_FILES", 200)
    files = make_files(10)
    endpoint = dataclasses.replace(scp().endpoint(), associations=3)
    assert router.parallel.associations_for(endpoint, files) == 1
    monkeypatch.setattr(router.parallel, "MIN_SHARE_BYTES", 1)  # big files: spread
    assert router.parallel.associations_for(endpoint, files) == 3
    monkeypatch.setattr(router.parallel, "MIN_SHARE_FILES", 4)
    monkeypatch.setattr(router.parallel, "MIN_SHARE_BYTES", 1 << 40)
    assert router.parallel.associations_for(endpoint, files) == 2
    one = dataclasses.replace(endpoint, associations=1)
    assert router.parallel.associations_for(one, files) == 1


def test_three_associations_every_instance_once(
    scp: Callable[..., StorageSCP], make_files: Any, no_sender_left: None
) -> None:
    server = scp(delay=0.05)  # a peer that sets the pace: the associations overlap
    files = make_files(30)
    results = Results()

    send_files(dataclasses.replace(server.endpoint(), associations=3), files, FAST, results)

    assert sorted(r.file.relpath for r in results) == sorted(f.relpath for f in files)
    assert all(r.status == 0x0000 and r.error is None for r in results)
    assert {id(r.file) for r in results} == {id(f) for f in files}  # the caller's objects
    assert server.counts == Counter(uids(files))
    assert server.associations == 3 and server.max_open >= 2
    arrived = [a.sop_instance_uid for a in server.arrivals]
    for share in shares(files, 3):  # consecutive runs, each in order
        assert [u for u in arrived if u in uids(share)] == uids(share)


def test_an_abort_in_one_process_is_isolated_within_its_run(
    tmp_path: Path, scp: Callable[..., StorageSCP], no_sender_left: None
) -> None:
    server = scp(delay=0.02)
    job = tmp_path / "job"
    write_job(job, n_output=30, n_input=0)
    destination = {"IP": "127.0.0.1", "PORT": server.port, "AETitleSender": "ROUTER"}
    config = parse_config(
        {"routing": [{"send": [{".*": {**destination, "AETitleTo": "STORESCP"}}]}]}
    )
    settings = Settings(
        log_file=tmp_path / "routing.log", associations=3, retries=0, dimse_timeout=10
    )
    server.abort_at.add(12)  # a C-STORE well into one of the three runs

    report = route_job(job, config, settings)

    delivery = report.rules[0].entries[0].delivery
    assert report.state == "routed" and delivery is not None and delivery.attempts == 1
    stores = [e for e in lines(job) if e["event"] == "store"]
    aborted = [e for e in stores if not e["stored"]]
    assert len(aborted) == 1 and aborted[0]["status"] is None  # the one in flight
    assert "association aborted by the peer" in aborted[0]["error"]
    again = [e for e in stores if e["file"] == aborted[0]["file"] and e["stored"]]
    assert len(again) == 1 and again[0]["possible_duplicate"] is True
    assert again[0]["association"] != aborted[0]["association"]
    assert len(stores) == 31 and len({e["association"] for e in stores}) == 5
    assert len(server.counts) == 30 and set(server.counts.values()) == {1}  # no duplicates
    assert server.associations == 3 + 2  # the rest of its run, then it alone

    again_report = route_job(job, config, settings)

    assert again_report.state == "routed" and server.associations == 5  # nothing to send


def lines(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / RECORD).read_text().splitlines() if line]


def test_a_file_never_answered_in_one_run_fails_alone_and_the_rest_arrive(
    scp: Callable[..., StorageSCP], make_files: Any, no_sender_left: None
) -> None:
    server = scp()
    files = make_files(6)  # runs: files[0:3] and files[3:6]
    server.stall_instances.add(files[1].sop_instance_uid)  # each time it comes
    server.stall_seconds = 10
    server.refuse_instances[files[4].sop_instance_uid] = 0xA700
    results = Results()
    endpoint = dataclasses.replace(server.endpoint(), associations=2)

    send_files(endpoint, files, Timeouts(dimse=1, acse=10), results)

    assert sorted(r.file.relpath for r in results) == sorted(
        f.relpath for f in (*files, files[1])
    )  # files[1]: unanswered with the others, then failed for good alone
    failed = [r for r in results if not r.stored]
    assert [(r.file, r.status, r.permanent) for r in failed if r.file is files[1]] == [
        (files[1], None, False),
        (files[1], None, True),
    ]
    assert [(r.file, r.status) for r in failed if r.file is not files[1]] == [(files[4], 0xA700)]
    # The SCP kept files[1] each time without answering: it holds it twice.
    assert server.counts == Counter(
        uids([files[0], files[1], files[1], files[2], files[3], files[5]])
    )


def test_a_sending_process_that_dies_is_a_transient_failure(
    scp: Callable[..., StorageSCP], make_files: Any, no_sender_left: None
) -> None:
    server = scp(delay=0.05)
    files = make_files(20)
    results = Results()
    killed: list[int] = []

    def on_result(result: StoreResult) -> None:
        results(result)
        if len(results) == 3:  # both processes are running: kill the second one
            tree = senders(os.getpid())
            assert len(tree) == 2
            second = next(pid for pid, parent in tree.items() if parent != os.getpid())
            os.kill(second, signal.SIGKILL)
            killed.append(second)

    endpoint = dataclasses.replace(server.endpoint(), associations=2)
    with pytest.raises(SendError) as info:
        send_files(endpoint, files, FAST, on_result)

    assert info.value.transient and killed
    assert info.value.reason == (
        f"sending process 2 for {endpoint.key} ended unexpectedly (killed by signal 9)"
    )
    first, _ = shares(files, 2)
    assert set(uids(first)) <= set(results.stored)  # the other one finished its run
    assert len(results) < len(files)


def test_a_sending_process_forwards_its_log_records(
    scp: Callable[..., StorageSCP],
    make_files: Any,
    caplog: pytest.LogCaptureFixture,
    no_sender_left: None,
) -> None:
    server = scp()
    caplog.set_level(logging.INFO, logger="router")
    endpoint = dataclasses.replace(server.endpoint(), associations=2)

    send_files(endpoint, make_files(4), FAST, Results())

    done = [r for r in caplog.records if "done: 2 file(s)" in r.getMessage()]
    assert sorted(r.processName for r in done) == ["sender 1", "sender 2"]
    assert all(r.name == "router.send" for r in done)


KILLED_RUN = """
import sys
import router.parallel
from router.config import load_config
from router.route import route_job
from router.settings import Settings
router.parallel.MIN_SHARE_FILES = 1
route_job(sys.argv[1], load_config(sys.argv[2]), Settings(log_file=sys.argv[3], associations=3))
"""


def test_a_killed_run_leaves_no_sender_and_a_rerun_completes(
    tmp_path: Path, scp: Callable[..., StorageSCP], no_sender_left: None
) -> None:
    server = scp(delay=0.05)
    job = tmp_path / "job"
    write_job(job, n_output=60, n_input=0)
    config = tmp_path / "routing.json"
    destination = {"IP": "127.0.0.1", "PORT": server.port, "AETitleSender": "ROUTER"}
    rules = {"routing": [{"send": [{".*": {**destination, "AETitleTo": "STORESCP"}}]}]}
    config.write_text(json.dumps(rules))
    args = [sys.executable, "-c", KILLED_RUN, str(job), str(config), str(tmp_path / "r.log")]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while len(server.counts) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        children = list(senders(proc.pid))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    arrived_before = len(server.counts)
    assert len(children) == 3 and 12 <= arrived_before < 60
    assert gone(children), "sending processes outlived the killed router"

    report = route_job(job, load_config(config), Settings(log_file=tmp_path / "r.log"))

    assert report.state == "routed"
    assert len(server.counts) == 60
    duplicates = sum(server.counts.values()) - 60
    assert duplicates <= 3  # at most the instance in flight on each association
    assert all(n <= 2 for n in server.counts.values())


def test_a_peer_that_takes_fewer_associations_gets_every_run_anyway(
    scp: Callable[..., StorageSCP], make_files: Any, no_sender_left: None
) -> None:
    server = scp(delay=0.02)
    server.reject_next(1)  # one of the three association requests: as a capped PACS does
    files = make_files(30)
    results = Results()

    send_files(dataclasses.replace(server.endpoint(), associations=3), files, FAST, results)

    assert sorted(r.file.relpath for r in results) == sorted(f.relpath for f in files)
    assert all(r.stored for r in results)
    assert server.counts == Counter(uids(files))
    assert server.rejected == 1 and server.associations == 4  # the run went on another


def test_a_peer_down_fails_every_run_once(make_files: Any, no_sender_left: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = Endpoint("127.0.0.1", port, "NOBODY", "ROUTER", associations=3)
    results = Results()

    with pytest.raises(SendError) as info:
        send_files(endpoint, make_files(9), FAST, results)

    assert info.value.transient and info.value.reason == f"connection refused by 127.0.0.1:{port}"
    assert results == []


@pytest.mark.flow
def test_the_flow_opens_no_more_associations_than_the_destination_limit_has(
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    scp: Callable[..., StorageSCP],
    no_sender_left: None,
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.concurrency import limit_name
    from flows.route_job import route_job_flow

    server = scp(delay=0.02)
    job = tmp_path / "job"
    write_job(job, n_output=12, n_input=0)
    config = tmp_path / "routing.json"
    destination = {"IP": "127.0.0.1", "PORT": server.port, "AETitleSender": "ROUTER"}
    config.write_text(
        json.dumps({"routing": [{"send": [{".*": {**destination, "AETitleTo": "STORESCP"}}]}]})
    )
    monkeypatch.setenv("DICOM_ROUTER_ASSOCIATIONS", "3")
    monkeypatch.setenv("DICOM_ROUTER_MAX_ASSOCIATIONS", "3")
    with get_client(sync_client=True) as client:  # the limit, made smaller in the UI
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=limit_name(server.endpoint()), limit=2)
        )

    state = route_job_flow(
        job_dir=str(job), config=str(config), log_file=str(tmp_path / "r.log"), return_state=True
    )

    assert state.is_completed() and state.result()["state"] == "routed"
    assert len(server.counts) == 12 and set(server.counts.values()) == {1}
    assert server.associations == 2 and server.max_open == 2
