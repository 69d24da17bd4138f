"""Only the site's administrators decide where patient data goes (README, "Security").

Against real SCPs on 127.0.0.1 and a real Prefect API: the destination allow-list of the
routing host, job folders only under the jobs root, which rules sent a job, patterns that
cannot stall a worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.config import ConfigError, parse_config
from router.explain import explain, render
from router.job import JobRefused, load_job
from router.record import RECORD, read_status
from router.route import route_job
from tests.factory import write_ct, write_job
from tests.test_flow import cli
from tests.test_route import dest, record_lines, rules, settings, uids

pytestmark = pytest.mark.peers


def allow(path: Path, *lines: str) -> Path:
    path.write_text("# destinations this host may send to\n" + "\n".join(lines) + "\n")
    return path


# --- the allow-list -------------------------------------------------------------------------


def test_a_destination_outside_the_allow_list_gets_nothing(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    allowed, other = scp(ae_title="PACS"), scp(ae_title="EVIL")
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    listed = allow(tmp_path / "allowed", f"127.0.0.1:{allowed.port} PACS  # the PACS")
    cfg = rules(
        {"send": [{".*": dest(other.port, "EVIL")}]},
        {"send": [{".*": dest(allowed.port, "PACS")}]},
        {"send": [{".*": dest(allowed.port, "OTHERAET")}]},  # listed with one AE title only
    )
    report = route_job(job, cfg, settings(tmp_path, allowlist=listed))
    assert report.state == "failed"
    assert other.counts == {} and other.associations == 0  # not even an association
    assert allowed.counts == {u: 1 for u in uids(files, "OUTPUT")}
    evil, ok, wrong_aet = (rule.entries[0] for rule in report.rules)
    assert evil.reason == f"EVIL@127.0.0.1:{other.port} is not in the allow-list {listed}"
    assert ok.state == "succeeded"
    assert (
        wrong_aet.reason == f"OTHERAET@127.0.0.1:{allowed.port} is not in the allow-list {listed}"
    )
    log = (tmp_path / "routing.log").read_text()
    assert "is not in the allow-list" in log and "outcome=failed" in log

    # validate and explain say the same before anything is routed
    (tmp_path / "rules.json").write_text(
        json.dumps({"routing": [{"send": [{".*": dest(other.port, "EVIL")}]}]})
    )
    env = {"DICOM_ROUTER_ALLOWLIST": str(listed)}
    checked = cli("validate", str(tmp_path / "rules.json"), env=env)
    assert checked.returncode == 2
    assert f"send entry 1 ('.*'): EVIL@127.0.0.1:{other.port} is not in the allow-list" in (
        checked.stderr
    )
    views, scans = explain(load_job(job), cfg, settings(tmp_path, allowlist=listed))
    text = "\n".join(render(load_job(job), views, scans))
    assert f"would fail: EVIL@127.0.0.1:{other.port} is not in the allow-list {listed}" in text


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read: No such file or directory"),
        ("pacs.example.org\n", "line 1: 'pacs.example.org' is neither HOST:PORT [AETITLE] nor"),
        ("ftp://x/\n", "line 1: 'ftp://x/' is not an http(s) URL"),
        ("h:99999\n", "line 1: 'h:99999' is neither"),
    ],
)
def test_an_allow_list_that_cannot_be_used_refuses_every_destination(
    tmp_path: Path, scp: Callable[..., Any], content: str | None, problem: str
) -> None:
    server = scp()
    listed = tmp_path / "allowed"
    if content is not None:
        listed.write_text(content)
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    report = route_job(
        job, rules({"send": [{".*": dest(server.port)}]}), settings(tmp_path, allowlist=listed)
    )
    assert report.state == "failed" and server.associations == 0
    reason = report.rules[0].entries[0].reason or ""
    assert reason.startswith(f"the allow-list {listed} cannot be used (") and problem in reason


def test_allow_list_forms(tmp_path: Path) -> None:
    from router.allowlist import load_allowlist
    from router.model import Endpoint

    listed = load_allowlist(
        allow(
            tmp_path / "a",
            "PACS.example.org:104",
            "[fd00::20]:11112 ARCHIVE",
            "https://vna.example.org/dicomweb",
        )
    )
    assert listed.refusal(Endpoint("pacs.EXAMPLE.org", 104, "ANY", "R")) is None
    assert listed.refusal(Endpoint("fd00::20", 11112, "ARCHIVE", "R")) is None
    assert listed.refusal(Endpoint("fd00::20", 11112, "OTHER", "R")) is not None
    assert listed.refusal(Endpoint("pacs.example.org", 105, "ANY", "R")) is not None
    assert listed.url_refusal("https://VNA.example.org/dicomweb/studies") is None
    assert listed.url_refusal("https://vna.example.org/dicomweb") is None
    assert listed.url_refusal("https://vna.example.org/dicomweb-evil/") is not None
    assert listed.url_refusal("http://vna.example.org/dicomweb/") is not None


# --- job folders only under the jobs root ---------------------------------------------------


def test_job_folders_outside_the_jobs_root_are_refused_before_anything_is_read(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    root = tmp_path / "jobs"
    inside = root / "site-a" / "job"
    write_job(inside, n_output=1, n_input=0)
    outside = tmp_path / "home" / "someone" / "scans"
    write_job(outside, n_output=2, n_input=0)
    os.symlink(outside, root / "site-a" / "link-out")
    cfg = rules({"send": [{".*": dest(server.port)}]})
    s = settings(tmp_path, jobs_root=[root])
    for asked in (
        outside,  # absolute, elsewhere
        root / "site-a" / ".." / ".." / "home" / "someone" / "scans",  # .. out of the root
        root / "site-a" / "link-out",  # a link out of the root
        root,  # the root itself is no job
    ):
        with pytest.raises(JobRefused, match="not under the jobs root"):
            route_job(asked, cfg, s, origin="a test request")
    assert server.counts == {}
    # nothing was read from or written into the folder outside
    assert sorted(p.name for p in outside.iterdir()) == [
        "INPUT",
        "OUTPUT",
        "info.json",
        "proc.json",
    ]
    log = (tmp_path / "routing.log").read_text()
    assert log.count('outcome=refused origin="a test request"') == 4
    assert route_job(inside, cfg, s).state == "routed"


@pytest.mark.flow
def test_flow_parameters_and_the_sweep_root_are_held_to_the_jobs_root(
    prefect_api: str, tmp_path: Path, scp: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.route_job import in_process, route_job_flow
    from flows.sweep import sweep_unrouted_flow

    server = scp()
    root = tmp_path / "jobs"
    outside = tmp_path / "elsewhere"
    write_job(outside / "job", n_output=1, n_input=0)
    config = tmp_path / "rules.json"
    config.write_text(json.dumps({"routing": [{"send": [{".*": dest(server.port)}]}]}))
    monkeypatch.setenv("DICOM_ROUTER_JOBS_ROOT", str(root))
    params = {"config": str(config), "log_file": str(tmp_path / "routing.log")}
    with in_process():
        state = route_job_flow(
            job_dir=str(root / ".." / "elsewhere" / "job"), **params, return_state=True
        )
        swept = sweep_unrouted_flow(root=str(outside), **params, return_state=True)
    assert (state.type.value, state.name) == ("FAILED", "Refused")
    assert isinstance(state.result(raise_on_failure=False), JobRefused)
    assert swept.is_failed() and "not under the jobs root" in str(
        swept.result(raise_on_failure=False)
    )
    assert server.counts == {} and read_status(outside / "job") is None
    log = (tmp_path / "routing.log").read_text()
    assert "outcome=refused" in log and 'origin="prefect, flow run job (' in log


# --- which rules sent this ----------------------------------------------------------------


def test_the_record_and_report_name_the_rules_version(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    document = {"routing": [{"send": [{".*": dest(server.port)}]}]}
    cfg = parse_config(document, "rules.json")
    spaced = parse_config(json.loads(json.dumps(document, indent=4)), "other.json")
    assert cfg.sha256 == spaced.sha256 and len(cfg.sha256) == 64
    changed = parse_config({"routing": [{"send": [{".*": dest(server.port + 1)}]}]})
    assert changed.sha256 != cfg.sha256
    report = route_job(job, cfg, settings(tmp_path))
    assert report.rules_version == {"source": "rules.json", "sha256": cfg.sha256}
    run_line = next(e for e in record_lines(job) if e["event"] == "run")
    assert run_line["rules"] == {"source": "rules.json", "sha256": cfg.sha256}
    assert report.to_dict()["rules_version"]["sha256"] == cfg.sha256
    assert (job / RECORD).exists()


@pytest.mark.flow
def test_config_push_and_ui_edits_leave_a_trail(
    prefect_api: str, tmp_path: Path, scp: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client

    from flows.config_source import BLOCK_TYPE
    from flows.route_job import in_process, route_job_flow

    allowed, other = scp(ae_title="PACS"), scp(ae_title="EVIL")
    listed = allow(tmp_path / "allowed", f"127.0.0.1:{allowed.port}")
    env = {"DICOM_ROUTER_CONFIG_BLOCK": "trail-test"}
    first = tmp_path / "rules.json"
    first.write_text(json.dumps({"routing": [{"send": [{".*": dest(allowed.port, "PACS")}]}]}))
    pushed = cli("config", "push", str(first), env=env, api=prefect_api)
    assert pushed.returncode == 0, pushed.stderr

    # what the UI does: the block document's data replaced through the API
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name("trail-test", BLOCK_TYPE)
        document.data = {"rules": {"routing": [{"send": [{".*": dest(other.port, "EVIL")}]}]}}
        client.update_block_document(document.id, document)  # type: ignore[arg-type]

    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    monkeypatch.setenv("DICOM_ROUTER_ALLOWLIST", str(listed))
    monkeypatch.setenv("DICOM_ROUTER_CONFIG_BLOCK", "trail-test")
    with in_process():
        state = route_job_flow(
            job_dir=str(job), log_file=str(tmp_path / "r.log"), return_state=True
        )
    assert state.is_failed() and other.counts == {} and other.associations == 0
    failure = state.result(raise_on_failure=False)
    assert f"EVIL@127.0.0.1:{other.port} is not in the allow-list {listed}" in str(failure)

    shown = cli("config", "history", "--diff", env=env, api=prefect_api)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].endswith("trail-test: 2 version(s)")
    assert f"pushed from {first}" in lines[1]
    assert "edited in the Prefect UI (current)" in lines[2]
    assert any('"AETitleTo": "EVIL"' in line and line.strip().startswith("+") for line in lines)
    as_json = json.loads(cli("config", "history", "--json", env=env, api=prefect_api).stdout)
    assert [v["how"] for v in as_json["versions"]] == [
        f"pushed from {first}",
        "edited in the Prefect UI",
    ]


# --- patterns that cannot stall routing ---------------------------------------------------


def test_a_catastrophic_pattern_cannot_stall_routing(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    write_job(job, n_output=0, n_input=0)
    write_ct(job / "OUTPUT" / "a.dcm", series_description="a" * 64 + "!")
    # Python's re backtracks 2**64 times on this; RE2 matches in linear time
    cfg = rules({"send": [{".*": dest(server.port, which=[{"SeriesDescription": "(a+)+$"}])}]})
    start = time.monotonic()
    report = route_job(job, cfg, settings(tmp_path))
    assert time.monotonic() - start < 30
    assert report.rules[0].entries[0].state == "skipped"
    assert (
        "does not match '(a+)+$'"
        in next(iter(explain(load_job(job), cfg, settings(tmp_path))[0][0].entries)).excluded[0][1]
    )


@pytest.mark.parametrize("pattern", [r"(\w)\1", r"(?=a)b", r"(?<!x)y"])
def test_patterns_that_need_backtracking_are_refused(pattern: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"routing": [{"AETitleIn": pattern, "send": [{".*": dest(104)}]}]})
    [problem] = caught.value.problems
    assert problem.startswith('rule 1 "rule 1": AETitleIn: invalid regular expression')
    assert "matched in linear time, without backreferences or lookaround" in problem
