"""Scanning job folders, `which` filters and rule matching (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from router.config import loads_config
from router.job import load_job
from router.rules import fullmatch, match_rules
from router.select import scan, select
from tests.factory import write_ct, write_job


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        (".*", "", True),
        (".*", "anything\nat all", True),
        ("success", "success", True),
        ("success", "SUCCESS", True),
        ("success", "unsuccessful", False),
        ("success", "success!", False),
        ("fail.*", "failed", True),
        ("PROC.*", "procrsi", True),
    ],
)
def test_fullmatch(pattern: str, value: str, expected: bool) -> None:
    assert fullmatch(pattern, value) is expected


def test_scan_reads_nested_files_and_skips_non_dicom(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=2, n_input=1)
    nested = tmp_path / "OUTPUT" / "a" / "b"
    nested.mkdir(parents=True)
    write_ct(nested / "deep.dcm", series_description="DEEP")
    (tmp_path / "OUTPUT" / "report.pdf").write_bytes(b"%PDF-1.4 not dicom")
    (tmp_path / "OUTPUT" / "notes.txt").write_text("hello")
    broken = tmp_path / "OUTPUT" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    result = scan(tmp_path, "OUTPUT", {"0008103E"})
    assert [f.relpath for f in result.files] == [
        "OUTPUT/OU000001.dcm",
        "OUTPUT/OU000002.dcm",
        "OUTPUT/a/b/deep.dcm",
    ]
    assert result.files[2].values == {"0008103E": "DEEP"}
    skipped = {s.relpath: s.reason for s in result.skipped}
    assert set(skipped) == {"OUTPUT/report.pdf", "OUTPUT/notes.txt"}
    assert "no DICM preamble" in skipped["OUTPUT/report.pdf"]
    # a DICOM file that cannot be read is not skipped: it should go, and cannot
    [broken_file] = result.unsendable
    assert broken_file.relpath == "OUTPUT/broken.dcm" and broken_file.permanent
    assert broken_file.reason.startswith("damaged DICOM file: ")
    assert scan(tmp_path, "INPUT").files[0].relpath == "INPUT/IN000001.dcm"


def test_links_outside_the_job_are_not_followed(tmp_path: Path) -> None:
    job = tmp_path / "job"
    write_job(job, n_output=1, n_input=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    write_ct(outside / "secret.dcm")
    os.symlink(outside, job / "OUTPUT" / "linkdir")
    os.symlink(outside / "secret.dcm", job / "OUTPUT" / "link.dcm")
    os.symlink(job / "INPUT", job / "OUTPUT" / "inside")  # inside the job: followed
    os.symlink(job / "OUTPUT", job / "OUTPUT" / "loop")  # a loop: walked once
    result = scan(job, "OUTPUT")
    relpaths = [f.relpath for f in result.files]
    assert relpaths == ["OUTPUT/OU000001.dcm", "OUTPUT/inside/IN000001.dcm"]
    reasons = {s.relpath: s.reason for s in result.skipped}
    assert "outside the job folder" in reasons["OUTPUT/linkdir"]
    assert "outside the job folder" in reasons["OUTPUT/link.dcm"]


def test_duplicate_sop_instance_is_sent_once(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    (tmp_path / "OUTPUT").mkdir(exist_ok=True)
    write_ct(tmp_path / "OUTPUT" / "a.dcm", sop_instance_uid="1.2.3.4")
    write_ct(tmp_path / "OUTPUT" / "b.dcm", sop_instance_uid="1.2.3.4")
    result = scan(tmp_path, "OUTPUT")
    assert [f.relpath for f in result.files] == ["OUTPUT/a.dcm"]
    assert result.skipped[0].reason == "same SOPInstanceUID as OUTPUT/a.dcm"


def test_missing_folder_gives_a_note(tmp_path: Path) -> None:
    result = scan(tmp_path, "OUTPUT")
    assert result.files == () and "OUTPUT/ does not exist" in (result.note or "")


def test_which_filters(tmp_path: Path) -> None:
    for name, desc, modality in [("t1", "T1 axial", "MR"), ("t2", "T2", "MR"), ("ct", "T1", "CT")]:
        write_ct(tmp_path / "OUTPUT" / f"{name}.dcm", series_description=desc, modality=modality)
    files = scan(tmp_path, "OUTPUT", {"0008103E", "00080060", "00180015"}).files
    by_name = {f.relpath.split("/")[-1]: f for f in files}
    # one object: every tag must match; several objects: any one
    sel = select(files, [{"0008103E": "t1.*", "00080060": "MR"}])
    assert [f.relpath for f in sel.selected] == ["OUTPUT/t1.dcm"]
    assert len(sel.excluded) == 2
    reasons = {f.relpath: r for f, r in sel.excluded}
    assert "(0008,0060) Modality 'CT' does not match 'MR'" in reasons["OUTPUT/ct.dcm"]
    sel = select(files, [{"0008103E": "T2"}, {"00080060": "CT"}])
    assert {f.relpath for f in sel.selected} == {"OUTPUT/t2.dcm", "OUTPUT/ct.dcm"}
    # a missing tag has the value ""
    assert by_name["t1.dcm"].values["00180015"] == ""
    assert len(select(files, [{"00180015": ""}]).selected) == 3
    assert select(files, None).selected == files


def test_multivalued_tags_are_joined_with_backslash(tmp_path: Path) -> None:
    write_ct(tmp_path / "OUTPUT" / "x.dcm", extra={"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]})
    files = scan(tmp_path, "OUTPUT", {"00080008"}).files
    assert files[0].values["00080008"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert select(files, [{"00080008": r"ORIGINAL\\.*"}]).selected


RULES = {
    "routing": [
        {
            "name": "off",
            "status": 0,
            "send": [{".*": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "B"}}],
        },
        {
            "name": "disabled",
            "enabled": "F",
            "send": [{".*": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "B"}}],
        },
        {
            "name": "other box",
            "AETitleIn": "OTHER",
            "send": [{".*": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "B"}}],
        },
        {
            "name": "other caller",
            "AETitleFrom": "MODALITY",
            "send": [{".*": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "B"}}],
        },
        {
            "name": "results",
            "AETitleIn": "procrsi",
            "AETitleFrom": "PAC.",
            "send": [
                {
                    "success": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "B"},
                    "failed": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "C"},
                },
                {".*": {"IP": "h", "PORT": 1, "AETitleSender": "A", "AETitleTo": "D"}},
            ],
        },
    ]
}


def test_rule_matching_explains_why_not(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=0, n_input=0)
    job = load_job(tmp_path)
    matches = match_rules(loads_config(json.dumps(RULES)), job)
    assert [m.applies for m in matches] == [False, False, False, False, True]
    assert matches[0].why_not == "deactivated (status 0)"
    assert matches[1].why_not == 'disabled (enabled "F")'
    assert matches[2].why_not == "AETitleIn 'OTHER' does not match the called AE title 'PROCRSI'"
    assert matches[3].why_not == "AETitleFrom 'MODALITY' does not match the caller AE title 'PACS'"
    assert [e.pattern for e in matches[4].matching] == ["success", ".*"]
