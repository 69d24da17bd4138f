"""`dicom-router status`: the site at a glance, from the jobs' status files only."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.job import JobInvalid
from router.overview import site_overview
from router.record import STATUS, read_status, write_status
from router.route import route_job
from router.sweep import Backoff
from tests.factory import write_job
from tests.fixtures_dcmtk import free_port
from tests.test_flow import cli
from tests.test_route import dest, rules, settings

pytestmark = pytest.mark.peers


def test_status_counts_every_state_and_each_destination(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp(ae_title="PACS")
    dead = free_port()
    root = tmp_path / "jobs"
    good = rules({"send": [{".*": dest(server.port, "PACS")}]})
    down = rules({"send": [{".*": dest(dead, "DOWN")}]})
    s = settings(tmp_path, retries=0)
    for name in ("routed-1", "routed-2"):
        write_job(root / name, n_output=2, n_input=0)
        route_job(root / name, good, s)
    write_job(root / "failed", n_output=1, n_input=0)
    route_job(root / "failed", down, s)
    write_job(root / "given-up", n_output=1, n_input=0)
    for _ in range(3):
        route_job(root / "given-up", down, s)
    write_job(root / "waiting", n_output=1, n_input=0, success=None)
    write_job(root / "invalid", n_output=1, n_input=0)
    (root / "invalid" / "proc.json").write_text("[")
    with pytest.raises(JobInvalid):
        route_job(root / "invalid", good, s)
    write_job(root / "site-b" / "never", n_output=1, n_input=0)
    os.utime(root / "site-b" / "never" / "proc.json", (1_000_000_000, 1_000_000_000))
    before = (root / "routed-1" / STATUS).read_bytes()

    view = site_overview(root, Backoff(max_failures=3))
    assert view.counts == {
        "routed": 2,
        "failed": 1,
        "given_up": 1,
        "waiting": 1,
        "invalid": 1,
        "never_tried": 1,
    }
    assert view.oldest_unrouted == str(root / "site-b" / "never")
    assert view.oldest_unrouted_age_seconds is not None and view.oldest_unrouted_age_seconds > 1e8
    pacs = view.destinations[f"PACS@127.0.0.1:{server.port}"]
    assert pacs.stored_today == 4 and pacs.last_success is not None and pacs.last_failure is None
    down_view = view.destinations[f"DOWN@127.0.0.1:{dead}"]
    assert down_view.last_success is None and down_view.stored_today == 0
    assert f"connection refused by 127.0.0.1:{dead}" in (down_view.failure or "")
    assert (root / "routed-1" / STATUS).read_bytes() == before  # read only

    shown = cli("status", str(root), "--json", env={"DICOM_ROUTER_SWEEP_MAX_FAILURES": "3"})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["counts"] == view.counts
    text = cli("status", str(root), env={"DICOM_ROUTER_SWEEP_MAX_FAILURES": "3"}).stdout
    assert "2 routed, 1 failed, 1 given up, 1 waiting, 1 invalid, 1 never tried" in text
    assert f"PACS@127.0.0.1:{server.port}: 4 stored today" in text


def test_status_keeps_two_days_of_counts(tmp_path: Path) -> None:
    from router.record import merge_destinations
    from router.report import Delivery

    delivered = [Delivery("D", 3, key="D@h:1", stored=3)]
    first = merge_destinations({}, delivered, "2026-01-01T10:00:00+00:00")
    second = merge_destinations(first, delivered, "2026-01-02T10:00:00+00:00")
    third = merge_destinations(second, delivered, "2026-01-03T10:00:00+00:00")
    assert third["D@h:1"]["stored"] == {"2026-01-02": 3, "2026-01-03": 3}
    job = tmp_path / "job"
    write_job(job, n_output=0, n_input=0)
    status = read_status(job)
    assert status is None
    from router.record import Status

    write_status(job, Status("routed", 1, 0, "2026-01-03T10:00:00+00:00", destinations=third))
    assert read_status(job).destinations == third  # type: ignore[union-attr]
