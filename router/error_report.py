"""An error report for a failed computation: one Basic Text SR to send with the results.

When the computation fails, the user looks for the result in the PACS, not in the job
folder. This module turns proc.json into one DICOM Structured Report in the job's study
(patient and study attributes copied from an input file), so the failure and its message
show where the result would have been.

Why Basic Text SR (1.2.840.10008.5.1.4.1.1.88.11): it is plain text in every SR-capable
viewer, needs no PDF library, and PACS such as Orthanc store it like any instance.

Coded concepts (no template is claimed, so no ContentTemplateSequence):

- Document title: DCM 111024 "Failed Analyses", defined by DICOM (PS3.16) as a group of
  analysis algorithms that were attempted but failed, which is what this report says.
  A title from CID 7000 (e.g. LOINC 18748-4 "Diagnostic Imaging Report") would present a
  technical failure as a clinical report, so none is used.
- Content items: TEXT with concept names of a local coding scheme, designator
  `99DICOMROUTER` (PS3.3 8.2: designators starting with "99" are local). DICOM has no
  concepts for a job folder, its AE titles or proc.json; they are described in
  CodingSchemeIdentificationSequence.

The UIDs are derived from the job and proc.json's content, so routing the same failed job
again sends the same instance (the PACS keeps one), while a changed proc.json makes a new one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import PersonName

from router.job import PROC, Job
from router.select import folder_outside, resolved

__all__ = ["build_error_report", "find_reference", "report_path", "write_error_report"]

REPORT_DIR = ".routing"
REPORT_NAME = "error-report.dcm"
SERIES_DESCRIPTION = "Processing error report"
SERIES_NUMBER = 999
"""High enough to sort after the series of a typical study."""

TITLE = ("111024", "DCM", "Failed Analyses")
SCHEME = "99DICOMROUTER"
CONCEPTS: dict[str, tuple[str, str, str]] = {
    key: (code, SCHEME, meaning)
    for key, code, meaning in (
        ("status", "PROC_STATUS", "Processing status"),
        ("message", "PROC_MESSAGE", "Processing message"),
        ("job", "JOB", "Processing job"),
        ("received", "RECEIVED", "Input received"),
        ("called", "CALLED_AET", "Called AE Title"),
        ("caller", "CALLING_AET", "Calling AE Title"),
        ("caller_ip", "CALLER_IP", "Caller IP address"),
        ("entry", "PROC_ENTRY", "Further processing result"),
        ("source", "PATIENT_SOURCE", "Source of patient and study"),
    )
}
"""The local concepts of the content items, by role: (code value, scheme, meaning)."""

# Patient and study attributes copied from the reference file. The first nine are Type 2
# in the Patient and General Study modules: present (empty) even without a reference.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
OPTIONAL_COPIED = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ReferencedStudySequence",
    "PatientComments",
)

# Characters UT may not hold with ISO_IR 192: controls other than TAB, LF, FF, CR (ESC
# would start an ISO 2022 escape sequence), and surrogates that UTF-8 cannot encode.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ud800-\udfff]")


def report_path(job_dir: Path) -> Path:
    """JOB/.routing/error-report.dcm: outside INPUT/ and OUTPUT/, which stay untouched."""
    return Path(job_dir) / REPORT_DIR / REPORT_NAME


def _candidates(root: Path, job_real: Path) -> Iterator[Path]:
    """Regular files under `root` by sorted path; links leaving the job folder are skipped."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, files in os.walk(root, followlinks=False, onerror=lambda _e: None):
        dirs.sort()
        for name in files:
            path = Path(folder, name)
            if path.is_symlink():
                target = resolved(path)
                if isinstance(target, str) or not target.is_relative_to(job_real):
                    continue
                if not target.is_file():
                    continue
            elif not path.is_file():
                continue
            found.append((path.relative_to(root).parts, path))
    found.sort(key=lambda item: item[0])
    yield from (path for _parts, path in found)


def _read_reference(path: Path) -> Dataset:
    """The header of a Part 10 file with a StudyInstanceUID; ValueError with the reason."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                raise ValueError("not a DICOM file (no DICM preamble)")
            fh.seek(0)
            ds = dcmread(fh, stop_before_pixels=True)
    except ValueError:
        raise
    except Exception as exc:  # anything pydicom or the disk raises means "unreadable"
        raise ValueError(f"unreadable: {exc}") from None
    uid = str(ds.get("StudyInstanceUID") or "").strip()
    if not uid:
        raise ValueError("no StudyInstanceUID")
    return ds


def _first_readable(job_dir: Path, skip: Path | None = None) -> tuple[Path, Dataset] | None:
    job_dir = Path(job_dir)
    job_real = job_dir.resolve()
    for folder in ("INPUT", "OUTPUT"):
        root = job_dir / folder
        if folder_outside(job_dir, folder) or not root.is_dir():
            continue
        for path in _candidates(root, job_real):
            if skip is not None and path == skip:
                continue
            try:
                return path, _read_reference(path)
            except ValueError:
                continue
    return None


def find_reference(job_dir: Path) -> Path | None:
    """The file whose patient and study the report joins: INPUT/ first, as received.

    The first readable Part 10 file by sorted path of INPUT/, else of OUTPUT/, at any
    depth; unreadable files are passed over. None when there is none.
    """
    found = _first_readable(job_dir)
    return None if found is None else found[0]


def _clean(text: str) -> str:
    return _FORBIDDEN.sub("\ufffd", text)


def _copy(elem: DataElement) -> DataElement:
    """A decoded copy of an element, so it is re-encoded in UTF-8 whatever its source."""
    if elem.VR == "SQ":
        items = []
        for item in elem.value:
            copied = Dataset()
            for sub in item:
                copied.add(_copy(sub))
            items.append(copied)
        return DataElement(elem.tag, "SQ", Sequence(items))
    value: Any = elem.value
    if elem.VR == "PN":
        if isinstance(value, MultiValue | list | tuple):
            value = [PersonName(_clean(str(v))) for v in value]
        elif value is not None:
            value = PersonName(_clean(str(value)))
    elif isinstance(value, str):
        value = _clean(value)
    return DataElement(elem.tag, elem.VR, value)


def _copy_patient_study(report: Dataset, source: Dataset | None) -> None:
    for keyword in (*TYPE2_COPIED, *OPTIONAL_COPIED):
        elem = None
        if source is not None:
            try:
                elem = source.data_element(keyword)
                elem = None if elem is None else _copy(elem)
            except Exception:  # an undecodable value is left out, never fatal
                elem = None
        if elem is not None:
            report.add(elem)
        elif keyword in TYPE2_COPIED:
            setattr(report, keyword, "")


def _code(concept: tuple[str, str, str]) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = concept
    return code


def _text_item(role: str, text: str, meaning: str | None = None) -> Dataset:
    value, scheme, default = CONCEPTS[role]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [_code((value, scheme, meaning or default))]
    # TextValue is Type 1: an empty proc.json value is shown as such, not left out.
    item.TextValue = _clean(text) if text.strip() else "(empty)"
    return item


def _content_time(job: Job) -> datetime:
    """When the computation ended (proc.json's mtime), else when the input was received.

    Both stay the same while the job is untouched, so a rebuilt report is identical.
    """
    try:
        mtime = (job.path / PROC).stat().st_mtime
        return datetime.fromtimestamp(mtime, tz=timezone.utc).astimezone()
    except OSError:
        pass
    if job.received:
        try:
            received = datetime.fromisoformat(job.received.replace("Z", "+00:00"))
            return received if received.tzinfo else received.astimezone()
        except ValueError:
            pass
    return datetime.now().astimezone()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _version() -> str:
    try:
        return metadata.version("dicom-router")
    except metadata.PackageNotFoundError:
        return "unknown"


def _content(job: Job, reference: Path | None, note: str | None) -> list[Dataset]:
    items = [
        _text_item("status", job.success),
        _text_item("message", job.message),
        _text_item("job", job.name),
        _text_item("received", job.received or "(not recorded in info.json)"),
        _text_item("called", job.called),
        _text_item("caller", job.caller),
    ]
    if job.caller_ip:
        items.append(_text_item("caller_ip", job.caller_ip))
    for i, entry in enumerate(job.proc):
        if i == 0:
            extra = {k: v for k, v in entry.items() if k not in ("success", "message")}
            if not extra:
                continue
            text = _canonical(extra)
        else:
            text = _canonical(entry)
        items.append(_text_item("entry", text, f"proc.json entry {i + 1}"))
    if reference is not None:
        source = f"Patient and study attributes copied from {_relative(reference, job.path)}."
    else:
        source = (
            "No readable DICOM file in INPUT/ or OUTPUT/: this report starts a new study "
            "and carries no patient attributes."
        )
    if note:
        source = f"{source} {note}"
    items.append(_text_item("source", source))
    return items


def _relative(path: Path, job_dir: Path) -> str:
    try:
        return Path(path).absolute().relative_to(Path(job_dir).absolute()).as_posix()
    except ValueError:
        return str(path)


def build_error_report(job: Job, reference: Path | None) -> Dataset:
    """A Basic Text SR with proc.json's outcome, in the study of `reference`.

    `reference` is usually `find_reference(job.path)`. If it cannot be read, the next
    readable file of the job is used instead, and without one the report starts a new
    study with empty patient attributes (and says so). Never raises on odd job contents.
    """
    source: Dataset | None = None
    note = None
    if reference is not None:
        reference = Path(reference)
        try:
            source = _read_reference(reference)
        except ValueError as exc:
            note = f"({_relative(reference, job.path)} was not used: {exc}.)"
            found = _first_readable(job.path, skip=reference)
            reference, source = found if found is not None else (None, None)

    study_uid = str(source.StudyInstanceUID).strip() if source is not None else None
    entropy = [
        "dicom-router error report",
        job.name,
        job.called,
        job.caller,
        job.received or "",
        _canonical(list(job.proc)),
        study_uid or "",
    ]
    if study_uid is None:
        study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    instance_uid = generate_uid(entropy_srcs=[*entropy, "instance"])
    when = _content_time(job)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.TimezoneOffsetFromUTC = when.strftime("%z") or "+0000"
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = instance_uid
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "dicom-router processing report"
    scheme.CodingSchemeResponsibleOrganization = "dicom-router project"
    ds.CodingSchemeIdentificationSequence = [scheme]

    _copy_patient_study(ds, source)
    ds.StudyInstanceUID = study_uid

    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.Manufacturer = "dicom-router"
    ds.SoftwareVersions = _version()

    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code(TITLE)]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentSequence = _content(job, reference, note)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(BasicTextSRStorage)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_error_report(job: Job, reference: Path | None, target: Path) -> Path:
    """Write the report as a Part 10 file (explicit VR little endian); returns `target`.

    Written to a temporary file and renamed, so a crash never leaves half a report for
    routing to send. ValueError names the target and the reason when it cannot be written.
    """
    target = Path(target)
    ds = build_error_report(job, reference)
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide it from other accounts
        os.replace(tmp_name, target)
    except OSError as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        raise ValueError(f"cannot write the error report to {target}: {exc}") from None
    return target
