"""The error report: a Basic Text SR built from proc.json, in the job's study.

Validity is judged by a second implementation: dcmtk's dsrdump must parse the document
tree without errors, and Orthanc must accept and index the instance by C-STORE.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian

from router.error_report import (
    build_error_report,
    find_reference,
    report_path,
    write_error_report,
)
from router.job import Job, load_job
from tests.factory import write_ct, write_job
from tests.fixtures_dcmtk import peer_env, run_storescu
from tests.fixtures_orthanc import Orthanc

DSRDUMP = "/usr/bin/dsrdump"
# dcmtk 3.6.7's VR checker cannot check UTF-8 strings and says so; that is not a defect.
DCMTK_UTF8_NOTE = "W: The VR checker does not support this Specific Character Set: ISO_IR 192"

FAILED = "Segmentation failed: model returned no mask"


def failed_job(job_dir: Path, message: str = FAILED, extra: list | None = None, **kw) -> Job:
    """A job whose computation failed, with `extra` further proc.json entries."""
    write_job(job_dir, success="failed", message=message, **kw)
    proc = [{"success": "failed", "message": message}, *(extra or [])]
    (job_dir / "proc.json").write_text(json.dumps(proc, ensure_ascii=False), encoding="utf-8")
    return load_job(job_dir)


def dsrdump(path: Path) -> str:
    """dcmtk's rendering of the SR tree (full values, UTF-8); fails on any error."""
    cmd = [DSRDUMP, "+Pl", "+Pc", "+U8", str(path)]
    result = subprocess.run(cmd, env=peer_env(), capture_output=True, timeout=60, check=False)
    stdout = result.stdout.decode("utf-8")
    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 0, f"dsrdump exited {result.returncode}\n{stdout}\n{stderr}"
    problems = [line for line in stderr.splitlines() if line and line != DCMTK_UTF8_NOTE]
    assert not problems, f"dsrdump complained:\n{stderr}"
    return stdout


def texts(ds: pydicom.Dataset) -> dict[str, str]:
    """Concept meaning -> TextValue of the report's content items."""
    return {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in ds.ContentSequence
    }


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- the report ---------------------------------------------------------------------------


def test_report_is_valid_sr_in_the_input_study(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job", extra=[{"success": "warning", "message": "slice 7 odd"}])
    reference = find_reference(job.path)
    assert reference == job.path / "INPUT" / "IN000001.dcm"
    target = write_error_report(job, reference, report_path(job.path))
    assert target == job.path / ".routing" / "error-report.dcm"

    out = dsrdump(target)
    assert "Basic Text SR Document" in out
    assert FAILED in out
    assert '(111024,DCM,"Failed Analyses")' in out

    ds = pydicom.dcmread(target)
    ref = pydicom.dcmread(reference, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == BasicTextSRStorage
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime"):
        assert ds[keyword].value == ref[keyword].value, keyword
    assert ds.SeriesInstanceUID != ref.SeriesInstanceUID
    assert (ds.Modality, ds.SeriesDescription) == ("SR", "Processing error report")
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert ds.ValueType == "CONTAINER"
    assert texts(ds) == {
        "Processing status": "failed",
        "Processing message": FAILED,
        "Processing job": "job",
        "Input received": "2024-01-01T12:00:00",
        "Called AE Title": "PROCRSI",
        "Calling AE Title": "PACS",
        "Caller IP address": "10.0.0.5",
        "proc.json entry 2": '{"message": "slice 7 odd", "success": "warning"}',
        "Source of patient and study": "Patient and study attributes copied from INPUT/IN000001.dcm.",
    }
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientSex"):
        assert keyword in ds and ds[keyword].value in ("", None), keyword


def test_extra_fields_of_the_first_entry_are_kept(tmp_path: Path) -> None:
    write_job(tmp_path / "job", success="failed")
    proc = {"success": "failed", "message": "oom", "exit_code": 137, "log": ["a", "b"]}
    (tmp_path / "job" / "proc.json").write_text(json.dumps(proc))
    ds = build_error_report(load_job(tmp_path / "job"), None)
    assert texts(ds)["proc.json entry 1"] == '{"exit_code": 137, "log": ["a", "b"]}'


def test_without_reference_a_new_study_with_empty_patient(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job", n_input=0, n_output=0)
    assert find_reference(job.path) is None
    target = write_error_report(job, None, tmp_path / "report.dcm")
    out = dsrdump(target)
    assert "starts a new study" in out

    ds = pydicom.dcmread(target)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert keyword in ds and not ds[keyword].value, keyword
    assert ds.StudyInstanceUID
    inputs = {pydicom.dcmread(p).StudyInstanceUID for p in job.path.rglob("*.dcm")}
    assert ds.StudyInstanceUID not in inputs
    assert "carries no patient attributes" in texts(ds)["Source of patient and study"]
    again = build_error_report(job, None)
    assert again.StudyInstanceUID == ds.StudyInstanceUID


def test_uids_are_stable_until_proc_json_changes(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job")
    reference = find_reference(job.path)
    first = build_error_report(job, reference)
    second = build_error_report(load_job(job.path), reference)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "ContentTime"):
        assert first[keyword].value == second[keyword].value, keyword
    written = pydicom.dcmread(write_error_report(job, reference, tmp_path / "a.dcm"))
    assert written.SOPInstanceUID == first.SOPInstanceUID

    proc = [{"success": "failed", "message": "another failure"}]
    (job.path / "proc.json").write_text(json.dumps(proc))
    third = build_error_report(load_job(job.path), reference)
    assert third.SOPInstanceUID != first.SOPInstanceUID
    assert third.SeriesInstanceUID != first.SeriesInstanceUID
    assert third.StudyInstanceUID == first.StudyInstanceUID

    other = failed_job(tmp_path / "other")
    assert build_error_report(other, find_reference(other.path)).SOPInstanceUID not in {
        first.SOPInstanceUID,
        third.SOPInstanceUID,
    }


def test_non_ascii_message_and_latin1_reference_round_trip(tmp_path: Path) -> None:
    message = "Échec du calcul — 計算に失敗しました — Ошибка: ёмкость ≠ 0 ✗"
    job = failed_job(tmp_path / "job", message=message, n_input=0)
    # A reference in ISO_IR 100 (Latin-1): its names must arrive intact in UTF-8.
    write_ct(
        job.path / "INPUT" / "latin1.dcm",
        patient_name="Müller^Jürgen",
        extra={"SpecificCharacterSet": "ISO_IR 100", "StudyDescription": "Thorax ärztlich"},
    )
    target = write_error_report(job, find_reference(job.path), tmp_path / "report.dcm")
    assert message in dsrdump(target)
    ds = pydicom.dcmread(target)
    assert texts(ds)["Processing message"] == message
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert ds.StudyDescription == "Thorax ärztlich"
    raw = target.read_bytes()
    assert "Müller".encode() in raw and message.encode() in raw


def test_odd_proc_values_give_a_valid_report(tmp_path: Path) -> None:
    long_message = "Traceback (most recent call last):\n" + "  frame\n" * 200_000
    write_job(tmp_path / "job", success="")
    proc = [
        {"success": "", "message": long_message},
        {"success": "x", "message": None},
        {"success": "bad\x00\x1b[31m", "message": {"nested": [1, 2.5, None]}},
    ]
    (tmp_path / "job" / "proc.json").write_text(json.dumps(proc))
    job = load_job(tmp_path / "job")
    target = write_error_report(job, find_reference(job.path), tmp_path / "report.dcm")
    out = dsrdump(target)
    assert "(empty)" in out
    values = texts(pydicom.dcmread(target))
    assert values["Processing message"].rstrip() == long_message.rstrip()
    assert "\x00" not in values["proc.json entry 3"] and "\x1b" not in values["proc.json entry 3"]


# -- the reference ------------------------------------------------------------------------


def test_reference_prefers_input_and_sorted_path(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    write_job(job_dir, n_input=0, n_output=2)
    assert find_reference(job_dir) == job_dir / "OUTPUT" / "OU000001.dcm"
    write_ct(job_dir / "INPUT" / "b" / "deep" / "x.dcm")
    write_ct(job_dir / "INPUT" / "c.dcm")
    write_ct(job_dir / "INPUT" / "b" / "a.dcm")
    assert find_reference(job_dir) == job_dir / "INPUT" / "b" / "a.dcm"


def test_unreadable_candidates_fall_back_to_the_next(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job", n_input=1)
    inputs = job.path / "INPUT"
    (inputs / "0-report.pdf").write_bytes(b"%PDF-1.4 not dicom")
    (inputs / "1-truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
    no_study = write_ct(inputs / "2-nostudy.dcm")
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(no_study)
    outside = write_ct(tmp_path / "elsewhere.dcm")
    (inputs / "00-link.dcm").symlink_to(outside)
    assert find_reference(job.path) == inputs / "IN000001.dcm"

    # An explicitly given reference that cannot be read: the next readable file is used.
    report = build_error_report(job, inputs / "1-truncated.dcm")
    good = pydicom.dcmread(inputs / "IN000001.dcm")
    assert report.StudyInstanceUID == good.StudyInstanceUID
    source = texts(report)["Source of patient and study"]
    assert "copied from INPUT/IN000001.dcm" in source
    assert "INPUT/1-truncated.dcm was not used" in source


def test_nothing_readable_means_no_reference(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job", n_input=0, n_output=0)
    (job.path / "OUTPUT" / "notes.txt").write_text("not dicom")
    assert find_reference(job.path) is None
    assert find_reference(tmp_path / "no-such-job") is None
    report = build_error_report(job, job.path / "OUTPUT" / "notes.txt")
    assert "starts a new study" in texts(report)["Source of patient and study"]


# -- writing ------------------------------------------------------------------------------


def test_writing_leaves_the_job_files_alone(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job")
    before = {d: digest(job.path / d) for d in ("INPUT", "OUTPUT")}
    target = write_error_report(job, find_reference(job.path), report_path(job.path))
    assert {d: digest(job.path / d) for d in ("INPUT", "OUTPUT")} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["error-report.dcm"]
    assert target.read_bytes()[128:132] == b"DICM"
    assert os.stat(target).st_mode & 0o777 == 0o644
    # Written again (a re-run): replaced in place, still one file.
    write_error_report(job, find_reference(job.path), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["error-report.dcm"]


def test_unwritable_target_raises_value_error(tmp_path: Path) -> None:
    job = failed_job(tmp_path / "job")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ValueError, match="cannot write the error report to .*file/sub/r.dcm"):
        write_error_report(job, None, blocker / "sub" / "r.dcm")


# -- a real PACS --------------------------------------------------------------------------


@pytest.mark.peers
def test_orthanc_stores_it_in_the_input_study(tmp_path: Path, orthanc_clean: Orthanc) -> None:
    job = failed_job(tmp_path / "job", message="Registrierung fehlgeschlagen: 計算")
    reference = find_reference(job.path)
    assert reference is not None
    target = write_error_report(job, reference, report_path(job.path))
    run_storescu(orthanc_clean.port, [target], called_aet=orthanc_clean.aet, calling_aet="ROUTER")

    ref = pydicom.dcmread(reference, stop_before_pixels=True)
    sent = pydicom.dcmread(target)
    assert set(orthanc_clean.instances()) == {sent.SOPInstanceUID}
    (instance_id,) = orthanc_clean.get("/instances")
    tags = orthanc_clean.get(f"/instances/{instance_id}/simplified-tags")
    assert tags["StudyInstanceUID"] == ref.StudyInstanceUID
    assert tags["PatientID"] == ref.PatientID
    assert tags["Modality"] == "SR"
    assert tags["SOPClassUID"] == BasicTextSRStorage
    items = tags["ContentSequence"]
    assert {"Processing message": "Registrierung fehlgeschlagen: 計算"}.items() <= {
        i["ConceptNameCodeSequence"][0]["CodeMeaning"]: i["TextValue"] for i in items
    }.items()
