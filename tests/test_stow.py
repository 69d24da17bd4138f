"""DICOMweb destinations: STOW-RS next to C-STORE (README, "DICOMweb destinations").

Against a STOW-RS service of the tests' own (tests/fixtures_stow.py), which refuses,
scripts, omits and breaks on request and counts every receipt, and against Orthanc's
DICOMweb plugin, with and without HTTP basic authentication, over TLS (through a TLS
terminator: Debian's Orthanc crashes on HTTPS). Each test asserts which instances
arrived where and how often, and what the report and the record say.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

import router.parallel
from router.config import ConfigError, parse_config
from router.dicomweb import MultipartBody, Part, parse_answer
from router.explain import explain, render
from router.job import load_job
from router.route import route_job
from tests.factory import dicom_file, write_ct, write_job
from tests.fixtures_dcmtk import free_port
from tests.fixtures_orthanc import Orthanc, start_orthanc
from tests.fixtures_stow import StowServer
from tests.fixtures_tls import Pki, TlsTerminator
from tests.test_route import dest, record_lines, rules, settings, uids

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parents[1]


def web(url: str, **kw: Any) -> dict[str, Any]:
    return {"URL": url, **kw}


def delivery(report: Any, rule: int = 0, entry: int = 0) -> Any:
    return report.rules[rule].entries[entry].delivery


def store_lines(job: Path, dest_key: str) -> list[dict[str, Any]]:
    return [e for e in record_lines(job) if e["event"] == "store" and e["dest"] == dest_key]


# --- the messages -----------------------------------------------------------------------------


def test_the_request_body_is_as_long_as_it_says(tmp_path: Path) -> None:
    paths = [write_ct(tmp_path / f"{i}.dcm", rows=64, cols=64 * (i + 1)) for i in range(3)]
    parts = [Part(dicom_file(p), p.stat().st_size) for p in paths]
    body = MultipartBody(parts)
    data = b"".join(body)
    assert len(data) == body.length
    for p in paths:  # each file as it is on disk, between the delimiters
        assert p.read_bytes() in data
    assert data.endswith(f"--{body.boundary}--\r\n".encode())


def test_answers_are_read_from_json_and_from_orthancs_xml() -> None:
    xml = b"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">272</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.4</Value></DicomAttribute>
    </Item>
    <Value number="1" />
  </DicomAttribute>
</NativeDicomModel>"""
    answer = parse_answer(xml)
    assert answer.failed == {"1.2.3": 0x0110} and answer.stored == {"1.2.4": None}
    js = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["9.8"]}}]}}
    assert parse_answer(json.dumps([js]).encode()).stored == {"9.8": None}
    assert not parse_answer(b"").lists_any  # an empty 200 lists nothing: nothing stored


# --- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "problem"),
    [
        (
            {"URL": "http://h/dw", "IP": "h", "AETitleTo": "X"},
            ".IP: not a key of a DICOMweb destination (URL): one destination is one kind",
        ),
        ({"URL": "http://h/dw", "associations": 2}, "(its key is requests)"),
        ({**dest(104), "auth": {"type": "none"}}, ".auth: a key of a DICOMweb destination only"),
        ({"AETitleSender": "R"}, ".IP: required key is missing"),
        ({"URL": "https://u:pw@h/dw"}, ".URL: URL holds credentials"),
        ({"URL": "http://h/dw/studies"}, "ends in /studies: give the service root"),
        ({"URL": "http://h/dw", "tls": {"ca": "ca.pem"}}, "tls is for an https:// URL"),
        (
            {"URL": "https://h/dw", "auth": {"type": "basic", "username": "u", "password": "pw"}},
            ".auth: password: a secret is never written in the rules",
        ),
        (
            {"URL": "https://h/dw", "auth": {"type": "bearer"}},
            "needs its token from exactly one of token_env",
        ),
        (
            {"URL": "https://h/dw", "auth": {"type": "oauth2", "client_secret_env": "S"}},
            "auth type 'oauth2' needs client_id; auth type 'oauth2' needs token_url",
        ),
    ],
)
def test_validate_refuses_what_a_dicomweb_destination_cannot_be(
    destination: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"routing": [{"name": "web", "send": [{".*": destination}]}]})
    assert any(
        p.startswith('rule 1 "web": send[0][".*"]') and problem in p for p in caught.value.problems
    ), caught.value.problems


def test_no_sending_module_is_on_an_import_cycle() -> None:
    """The sending interface, its links and its lanes import one way (README, Layout)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "router").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports in functions count too
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("router")
            ):
                names = (
                    [f"router.{a.name}" for a in node.names]
                    if node.module == "router"
                    else [node.module]
                )
                deps.update(names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("router."))
        graph[f"router.{path.stem}"] = deps - {f"router.{path.stem}"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})):
                return True
        return False

    sending = ["transport", "send", "stow", "parallel", "dicomweb", "webauth", "dimse"]
    assert [m for m in sending if reaches(f"router.{m}", f"router.{m}", set())] == []
    assert "router.parallel" not in graph["router.send"] | graph["router.stow"]


# --- honest outcomes, against the tests' own service -----------------------------------------


@pytest.mark.parametrize("xml", [False, True])
def test_refused_instances_are_reported_each_with_its_reason(
    tmp_path: Path, stow_server: Callable[..., StowServer], xml: bool
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=6, n_input=0)
    out = sorted(uids(files, "OUTPUT"))
    server = stow_server(refuse={out[0]: 0xC000, out[1]: 0x0122}, answer_xml=xml)

    report = route_job(job, rules({"send": [{".*": web(server.url)}]}), settings(tmp_path))

    assert server.counts == {u: 1 for u in out[2:]}
    assert len(server.stow_requests) == 1  # refusals for good: not retried
    d = delivery(report)
    assert (d.stored, d.failed, d.attempts) == (4, 2, 1) and report.state == "failed"
    reasons = {f["status"]: f["reason"] for f in d.failures}
    assert "FailureReason 0xC000 (Cannot understand)" in reasons["0xC000"]
    assert "0x0122 (Referenced SOP Class not supported)" in reasons["0x0122"]
    lines = {e["sop"]: e for e in store_lines(job, server.url)}
    assert (lines[out[0]]["status"], lines[out[0]]["stored"]) == (0xC000, False)
    assert all(lines[u]["stored"] and lines[u]["status"] == 0 for u in out[2:])


def test_a_503_is_retried_and_a_short_retry_after_waited_for(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    server = stow_server(script=[(503, {}), (429, {"Retry-After": "1"})])
    started = time.monotonic()

    report = route_job(job, rules({"send": [{".*": web(server.url)}]}), settings(tmp_path))

    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    assert [r.status for r in server.stow_requests] == [503, 429, 200]
    # the 503 cost a retry (attempt 2), the 429 a wait of 1 s within it
    assert delivery(report).attempts == 2 and delivery(report).ok
    assert time.monotonic() - started >= 1.0


def test_an_instance_the_answer_leaves_out_is_not_counted_as_stored(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)
    out = sorted(uids(files, "OUTPUT"))
    server = stow_server(omit_once={out[0]})

    report = route_job(job, rules({"send": [{".*": web(server.url)}]}), settings(tmp_path))

    assert delivery(report).ok and delivery(report).attempts == 2
    # It was stored the first time, unknown to us: sent again, and marked so in the record.
    assert server.counts == {out[0]: 2, **{u: 1 for u in out[1:]}}
    first, second = [e for e in store_lines(job, server.url) if e["sop"] == out[0]]
    assert first["status"] is None and "without listing this instance" in first["error"]
    assert second["stored"] and second["possible_duplicate"]


def test_413_splits_the_request_and_a_file_too_big_alone_fails_alone(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    job = tmp_path / "job"
    small = write_job(job, n_output=6, n_input=0)
    big = write_ct(job / "OUTPUT" / "big.dcm", rows=256, cols=256)  # 128 KiB of pixels
    server = stow_server(max_body=60_000)

    report = route_job(job, rules({"send": [{".*": web(server.url)}]}), settings(tmp_path))

    big_uid = dicom_file(big).sop_instance_uid
    assert server.counts == {u: 1 for u in uids(small, "OUTPUT")}
    d = delivery(report)
    assert (d.stored, d.failed, d.attempts) == (6, 1, 1)
    [failure] = d.failures
    assert failure["file"] == "OUTPUT/big.dcm" and "HTTP 413" in failure["reason"]
    assert "(this file alone)" in failure["reason"]
    assert big_uid not in server.counts
    assert 413 in [r.status for r in server.stow_requests]


def test_requests_have_a_length_and_stay_within_their_size(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=12, n_input=0, rows=128, cols=128)  # 32 KiB each
    server = stow_server()
    cfg = rules({"send": [{".*": web(server.url, instances_per_request=5)}]})

    route_job(job, cfg, settings(tmp_path))

    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    requests = server.stow_requests
    assert [len(r.uids) for r in requests] == [5, 5, 2]
    assert all(r.content_length and not r.chunked for r in requests)
    size = max((job / "OUTPUT").iterdir(), key=lambda p: p.stat().st_size).stat().st_size
    cfg = rules({"send": [{".*": web(server.url, bytes_per_request=3 * size)}]})
    server.requests.clear()
    route_job(job, cfg, settings(tmp_path), force=True)
    assert [len(r.uids) for r in server.stow_requests] == [3, 3, 3, 3]


def test_a_request_that_breaks_off_costs_only_its_own_file(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=10, n_input=0)
    bad = dicom_file(job / "OUTPUT" / "OU000006.dcm").sop_instance_uid
    server = stow_server(break_on={bad})
    cfg = rules({"send": [{".*": web(server.url, instances_per_request=4)}]})

    report = route_job(job, cfg, settings(tmp_path))

    others = uids(files, "OUTPUT") - {bad}
    assert server.counts == {u: 1 for u in others}
    d = delivery(report)
    assert (d.stored, d.failed, d.attempts) == (9, 1, 1)
    [failure] = d.failures
    assert failure["file"] == "OUTPUT/OU000006.dcm"
    assert "the request broke off twice while sending this file" in failure["reason"]
    # 3 requests of 4, 4, 2, then the 4 of the broken one alone
    assert [len(r.uids) for r in server.stow_requests] == [4, 4, 2, 1, 1, 1, 1]


def test_parallel_requests_each_carry_their_share(
    tmp_path: Path, stow_server: Callable[..., StowServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router.parallel, "MIN_WEB_SHARE_FILES", 1)
    job = tmp_path / "job"
    files = write_job(job, n_output=9, n_input=0)
    server = stow_server(delay=0.2)
    cfg = rules({"send": [{".*": web(server.url, requests=3, instances_per_request=1)}]})

    started = time.monotonic()
    report = route_job(job, cfg, settings(tmp_path))

    assert delivery(report).ok
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    lanes = {e["association"].split(".")[0] for e in store_lines(job, server.url)}
    assert lanes == {"1", "2", "3"}
    assert time.monotonic() - started < 9 * 0.2  # they overlapped


# --- fail-back between the kinds, and re-runs ------------------------------------------------


def test_a_stow_primary_that_is_down_lands_at_its_c_store_fallback(
    tmp_path: Path, scp: Callable[..., Any]
) -> None:
    server = scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    cfg = rules({"send": [{".*": web(down, **{"break": 1})}, {".*": dest(server.port)}]})

    report = route_job(job, cfg, settings(tmp_path))

    primary, fallback = report.rules[0].entries
    assert primary.state == "failed" and primary.covered
    assert primary.delivery.attempts == 3  # transient: retried
    assert "connection refused by 127.0.0.1" in primary.reason
    assert fallback.state == "succeeded" and report.state == "routed"
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}

    again = route_job(job, cfg, settings(tmp_path))  # a re-run sends nothing twice
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    assert again.rules[0].entries[1].delivery.already == 4


def test_a_c_store_primary_that_is_down_lands_at_its_stow_fallback(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    server = stow_server()
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)
    cfg = rules({"send": [{".*": dest(free_port(), **{"break": 1})}, {".*": web(server.url)}]})

    report = route_job(job, cfg, settings(tmp_path))
    again = route_job(job, cfg, settings(tmp_path))

    assert report.state == "routed" and report.rules[0].entries[0].covered
    assert server.counts == {u: 1 for u in uids(files, "OUTPUT")}
    assert len(server.stow_requests) == 1  # the re-run sent nothing
    assert again.rules[0].entries[1].delivery.already == 4


def test_a_refused_login_fails_at_once_and_falls_back(
    tmp_path: Path,
    stow_server: Callable[..., StowServer],
    scp: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secured, other = stow_server(user=("router", "right")), scp()
    job = tmp_path / "job"
    files = write_job(job, n_output=3, n_input=0)
    auth = {"type": "basic", "username": "router", "password_env": "TEST_STOW_PASSWORD"}
    cfg = rules(
        {"send": [{".*": web(secured.url, auth=auth, **{"break": 1})}, {".*": dest(other.port)}]}
    )
    monkeypatch.setenv("TEST_STOW_PASSWORD", "wrong")
    report = route_job(job, cfg, settings(tmp_path))
    monkeypatch.delenv("TEST_STOW_PASSWORD")

    primary = report.rules[0].entries[0]
    assert primary.covered and primary.delivery.attempts == 1  # permanent: not retried
    assert len(secured.stow_requests) == 1 and secured.counts == {}
    assert "HTTP 401" in primary.reason and "refuses our credentials" in primary.reason
    assert "password from environment variable TEST_STOW_PASSWORD" in primary.reason
    assert other.counts == {u: 1 for u in uids(files, "OUTPUT")}

    # no variable at all: said so, and nothing sent
    report = route_job(job, cfg, settings(tmp_path))
    assert "the environment variable TEST_STOW_PASSWORD is not set" in (
        report.rules[0].entries[0].reason or ""
    )
    assert len(secured.stow_requests) == 1


def test_an_allow_list_keeps_data_from_a_url_it_does_not_list(
    tmp_path: Path, stow_server: Callable[..., StowServer]
) -> None:
    allowed, other = stow_server(), stow_server()
    listed = tmp_path / "allowed"
    listed.write_text(f"{allowed.url}/  # the archive\n")
    job = tmp_path / "job"
    files = write_job(job, n_output=2, n_input=0)
    cfg = rules({"send": [{".*": web(other.url)}, {".*": web(allowed.url)}]})

    report = route_job(job, cfg, settings(tmp_path, allowlist=listed))

    refused, ok = report.rules[0].entries
    assert refused.reason == f"{other.url} is not in the allow-list {listed}"
    assert other.requests == []  # not even a connection
    assert ok.state == "succeeded" and allowed.counts == {u: 1 for u in uids(files, "OUTPUT")}
    views, scans = explain(load_job(job), cfg, settings(tmp_path, allowlist=listed))
    text = "\n".join(render(load_job(job), views, scans))
    assert f"→ STOW-RS {other.url}: would fail: {other.url} is not in the allow-list" in text
    assert f"→ STOW-RS {allowed.url}: 2 file(s), 2 already there" in text


# --- authentication --------------------------------------------------------------------------


def test_bearer_token_from_a_file_and_oauth2_tokens_fetched_before_they_expire(
    tmp_path: Path, stow_server: Callable[..., StowServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-3f9a\n")
    bearer = stow_server(bearer="tok-3f9a")
    oauth = stow_server(oauth2=("router", "cs-77e1", 1.0), delay=0.3)
    monkeypatch.setenv("TEST_CLIENT_SECRET", "cs-77e1")
    job = tmp_path / "job"
    files = write_job(job, n_output=5, n_input=0)
    cfg = rules(
        {
            "send": [
                {".*": web(bearer.url, auth={"type": "bearer", "token_file": str(token_file)})},
                {
                    ".*": web(
                        oauth.url,
                        instances_per_request=1,
                        auth={
                            "type": "oauth2",
                            "token_url": f"http://127.0.0.1:{oauth.port}/token",
                            "client_id": "router",
                            "client_secret_env": "TEST_CLIENT_SECRET",
                        },
                    )
                },
            ]
        }
    )

    report = route_job(job, cfg, settings(tmp_path))

    assert report.state == "routed", report.reason()
    out = {u: 1 for u in uids(files, "OUTPUT")}
    assert bearer.counts == out and oauth.counts == out
    # 5 requests of ~0.3 s with tokens that live 1 s: fetched anew before each lapsed
    assert oauth.token_requests >= 2 and oauth.expired_tokens_seen == 0
    assert all(r.status == 200 for r in oauth.stow_requests)

    monkeypatch.setenv("TEST_CLIENT_SECRET", "wrong")
    report = route_job(job, cfg, settings(tmp_path), force=True)
    reason = report.rules[0].entries[1].reason or ""
    assert "OAuth2 token request to" in reason and "answered HTTP 401: invalid_client" in reason


@pytest.mark.flow
def test_secrets_appear_in_no_output(
    tmp_path: Path, stow_server: Callable[..., StowServer], prefect_api: str
) -> None:
    """The command line through Prefect: its output, log, record, status and the run's
    logs, parameters and artifact hold no secret (nor a token made from one)."""
    password, token, client_secret = "pw-51c0ffee", "tk-0ddba11", "cs-deadbeef"
    basic = stow_server(user=("router", password))
    bearer = stow_server(bearer=token)
    oauth = stow_server(oauth2=("router", client_secret, 60.0))
    refusing = stow_server(user=("router", "something else"))
    (tmp_path / "token").write_text(token)
    job = tmp_path / f"secrets-{time.time_ns()}"  # the flow run's name: one of its kind
    files = write_job(job, n_output=2, n_input=0)
    failing = {"type": "basic", "username": "router", "password_env": "TEST_BAD_PASSWORD"}
    send = [
        {
            ".*": web(
                basic.url,
                auth={"type": "basic", "username": "router", "password_env": "TEST_PASSWORD"},
            )
        },
        {".*": web(bearer.url, auth={"type": "bearer", "token_file": str(tmp_path / "token")})},
        {
            ".*": web(
                oauth.url,
                auth={
                    "type": "oauth2",
                    "token_url": f"http://127.0.0.1:{oauth.port}/token",
                    "client_id": "router",
                    "client_secret_env": "TEST_CLIENT_SECRET",
                },
            )
        },
        {".*": web(refusing.url, auth=failing, **{"break": 1})},  # refused: 401
    ]
    config = tmp_path / "routing.json"
    config.write_text(json.dumps({"routing": [{"send": send}]}))
    log = tmp_path / "routing.log"
    env = {
        **os.environ,
        "DICOM_ROUTER_LOG_FILE": str(log),
        "DICOM_ROUTER_RETRY_DELAY": "0.05",
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TEST_PASSWORD": password,
        "TEST_BAD_PASSWORD": token + password,
        "TEST_CLIENT_SECRET": client_secret,
    }
    done = subprocess.run(
        [sys.executable, "-m", "router", "route", str(job), "--config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # the last entry failed, uncovered
    report = json.loads(done.stdout)
    out = {u: 1 for u in uids(files, "OUTPUT")}
    assert basic.counts == out and bearer.counts == out and oauth.counts == out
    assert refusing.counts == {} and "HTTP 401" in report["reason"]

    import base64

    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[job.name]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
        artifacts = client.read_artifacts()
    prefect_side = json.dumps(
        [
            run.model_dump(mode="json"),
            [entry.message for entry in logs],
            [t.model_dump(mode="json") for t in tasks],
            [a.model_dump(mode="json") for a in artifacts],
        ]
    )
    assert logs and len(tasks) >= 4  # what is searched is there
    outputs = {
        "stdout (--json)": done.stdout,
        "stderr": done.stderr,
        "routing log": log.read_text(),
        "record": (job / "routing-record.jsonl").read_text(),
        "status": (job / "routing-status.json").read_text(),
        "Prefect: run, logs, task runs, artifacts": prefect_side,
    }
    issued = list(oauth._tokens)
    assert issued
    secrets = [password, token, client_secret, *issued]
    secrets += [
        base64.b64encode(f"router:{s}".encode()).decode() for s in (password, token + password)
    ]
    leaks = [(where, s) for where, text in outputs.items() for s in secrets if s in text]
    assert leaks == []


# --- Orthanc's DICOMweb plugin ----------------------------------------------------------------


def test_stow_into_orthanc_stores_each_file_byte_for_byte(
    tmp_path: Path, orthanc_clean: Orthanc
) -> None:
    job = tmp_path / "job"
    files = write_job(job, n_output=8, n_input=0)
    for i, syntax in enumerate((ImplicitVRLittleEndian, RLELossless)):
        files.append(
            write_ct(job / "OUTPUT" / f"ts{i}.dcm", transfer_syntax=syntax, rows=32, cols=32)
        )
    cfg = rules({"send": [{".*": web(orthanc_clean.dicomweb_url, instances_per_request=4)}]})

    report = route_job(job, cfg, settings(tmp_path))

    assert report.state == "routed", report.reason()
    stored = orthanc_clean.files()
    assert set(stored) == uids(files, "OUTPUT")
    for path in files:  # no re-encoding: what arrived is the file
        assert stored[dicom_file(path).sop_instance_uid] == path.read_bytes()
    syntaxes = {m["TransferSyntax"] for m in orthanc_clean.metadata().values()}
    assert syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless}


@pytest.fixture(scope="module")
def orthanc_behind_tls(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[Orthanc, TlsTerminator]]:
    """An Orthanc with HTTP basic authentication, reached over TLS with a client
    certificate required (a TLS terminator in front of its plain HTTP port)."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-auth"), user=("router", "pw-orthanc"))
    terminator = TlsTerminator(server.http_port, pki.server_cert, pki.server_key, pki.ca).start()
    try:
        yield server, terminator
    finally:
        terminator.stop()
        server.stop()


def test_stow_over_tls_with_basic_auth_and_a_fallback_to_c_store(
    tmp_path: Path,
    orthanc_behind_tls: tuple[Orthanc, TlsTerminator],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orthanc, terminator = orthanc_behind_tls
    orthanc.reset()
    url = f"https://127.0.0.1:{terminator.port}/dicom-web"
    tls = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
    auth = {"type": "basic", "username": "router", "password_env": "TEST_ORTHANC_PASSWORD"}
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", "pw-orthanc")
    job = tmp_path / "job"
    files = write_job(job, n_output=4, n_input=0)

    report = route_job(
        job, rules({"send": [{".*": web(url, tls=tls, auth=auth)}]}), settings(tmp_path)
    )

    assert report.state == "routed", report.reason()
    assert orthanc.instances() == {u: 1 for u in uids(files, "OUTPUT")}

    # A wrong password is refused for good: the job falls back to Orthanc's C-STORE.
    orthanc.reset()
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", "wrong")
    job = tmp_path / "job2"
    files = write_job(job, n_output=4, n_input=0)
    c_store = dest(orthanc.port, orthanc.aet)
    cfg = rules({"send": [{".*": web(url, tls=tls, auth=auth, **{"break": 1})}, {".*": c_store}]})
    report = route_job(job, cfg, settings(tmp_path))
    primary, fallback = report.rules[0].entries
    assert primary.covered and "HTTP 401" in primary.reason and primary.delivery.attempts == 1
    assert fallback.state == "succeeded"
    assert orthanc.instances() == {u: 1 for u in uids(files, "OUTPUT")}


@pytest.mark.parametrize(
    ("tls", "reason"),
    [
        ({"ca": "other_ca", "cert": "client_cert", "key": "client_key"}, "is not trusted"),
        ({"ca": "ca"}, "TLS handshake with 127.0.0.1"),  # no client certificate
    ],
)
def test_tls_failures_are_permanent_and_say_why(
    tmp_path: Path,
    orthanc_behind_tls: tuple[Orthanc, TlsTerminator],
    pki: Pki,
    tls: dict[str, str],
    reason: str,
) -> None:
    _, terminator = orthanc_behind_tls
    options = {k: str(getattr(pki, v)) for k, v in tls.items()}
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=0)
    url = f"https://127.0.0.1:{terminator.port}/dicom-web"

    report = route_job(job, rules({"send": [{".*": web(url, tls=options)}]}), settings(tmp_path))

    entry = report.rules[0].entries[0]
    assert entry.state == "failed" and reason in (entry.reason or "")
    assert entry.delivery.attempts == 1
