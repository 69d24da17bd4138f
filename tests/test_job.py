"""Reading job folders: info.json, proc.json, waiting and invalid jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.job import JobInvalid, JobWaiting, load_job
from tests.factory import write_job


def test_reads_a_job(tmp_path: Path) -> None:
    write_job(tmp_path / "job", n_output=1, n_input=0, success="partial", message="2 of 3")
    job = load_job(tmp_path / "job")
    assert (job.called, job.caller, job.success, job.message) == (
        "PROCRSI",
        "PACS",
        "partial",
        "2 of 3",
    )
    assert job.caller_ip == "10.0.0.5"
    assert job.name == "job"


def test_quoted_ae_titles_are_cleaned(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    (tmp_path / "info.json").write_text(
        json.dumps(
            {"AETitleCalled": ' "PROCRSI" ', "AETitleCaller": '"PACS"', "CallerIP": '"1.2.3.4"'}
        )
    )
    job = load_job(tmp_path)
    assert (job.called, job.caller, job.caller_ip) == ("PROCRSI", "PACS", "1.2.3.4")


def test_single_object_proc_and_extra_entries_kept(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    (tmp_path / "proc.json").write_text('{"success": "failed", "message": "today is Monday"}')
    assert load_job(tmp_path).success == "failed"
    entries = [{"success": "success", "message": "ok"}, {"success": "failed", "message": "x"}]
    (tmp_path / "proc.json").write_text(json.dumps(entries))
    job = load_job(tmp_path)
    assert job.success == "success"
    assert [e["success"] for e in job.proc] == ["success", "failed"]


def test_no_proc_json_is_waiting(tmp_path: Path) -> None:
    write_job(tmp_path, success=None, n_output=0, n_input=0)
    with pytest.raises(JobWaiting, match="no proc.json yet"):
        load_job(tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("proc.json", "[{'success': 1}]", "not valid JSON"),
        ("proc.json", "[]", "empty list"),
        ("proc.json", '"done"', "must be a list of objects"),
        ("proc.json", '[{"message": "x"}]', "entry 0: success: missing"),
        ("proc.json", '[{"success": 1}]', "entry 0: success"),
        ("proc.json", "[1]", "entry 0 must be an object"),
        ("proc.json", b"\xff\xfe", "not UTF-8"),
        ("info.json", "{", "not valid JSON"),
        ("info.json", "[]", "must be a JSON object"),
        ("info.json", '{"AETitleCalled": "A"}', "AETitleCaller: missing"),
    ],
)
def test_malformed_files_are_invalid_and_named(
    tmp_path: Path, file: str, content: str | bytes, problem: str
) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    target = tmp_path / file
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(JobInvalid) as info:
        load_job(tmp_path)
    assert info.value.file == target
    assert problem in info.value.problem
    assert str(target) in str(info.value)


def test_missing_info_and_missing_folder(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    (tmp_path / "info.json").unlink()
    with pytest.raises(JobInvalid, match="info.json: missing"):
        load_job(tmp_path)
    with pytest.raises(JobInvalid, match="not a job folder"):
        load_job(tmp_path / "nope")
