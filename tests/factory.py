"""Build small, valid DICOM files and job folders for tests, benchmarks and examples.

A plain module (no pytest) so that `bench/` and the examples can import it too. Files are
built from scratch with pydicom; the pixel buffer of each size is made once and reused, so
hundreds of 512x512 CT images (~0.5 MB each) take well under a second per hundred.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from router.model import DicomFile

__all__ = ["dicom_file", "write_ct", "write_encoded_as", "write_job", "write_pydicom_corpus"]


@lru_cache(maxsize=8)
def _pixels(rows: int, cols: int) -> np.ndarray:
    """A deterministic, non-constant 16-bit image, built once per size (read-only)."""
    y, x = np.indices((rows, cols), dtype=np.uint32)
    arr = ((x * 7 + y * 13) % 4096).astype(np.uint16)
    arr.setflags(write=False)
    return arr


@lru_cache(maxsize=8)
def _pixel_bytes(rows: int, cols: int, big_endian: bool) -> bytes:
    arr = _pixels(rows, cols)
    return (arr.byteswap() if big_endian else arr).tobytes()


def write_ct(
    path: Path | str,
    *,
    sop_instance_uid: str | None = None,
    series_description: str = "",
    modality: str = "CT",
    rows: int = 16,
    cols: int = 16,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "PAT001",
    patient_name: str = "Test^Patient",
    instance_number: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one Part 10 image file with 16-bit pixel data and return its path.

    Any SOP class UID may be given (the content stays a CT-like image), so tests can
    fabricate many (SOP class, transfer syntax) pairs. Uncompressed transfer syntaxes and
    Deflated are written directly; RLE Lossless is encoded by pydicom (numpy only); other
    compressed syntaxes need the matching pydicom encoder plugin. `extra` sets further
    elements by keyword, e.g. `{"BodyPartExamined": "HEAD"}`.
    """
    path = Path(path)
    ts = UID(transfer_syntax)
    sop_instance_uid = sop_instance_uid or generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    if ts.is_compressed:
        ds.compress(ts, _pixels(rows, cols), generate_instance_uid=False)
    else:
        ds.PixelData = _pixel_bytes(rows, cols, ts == ExplicitVRBigEndian)
        ds["PixelData"].VR = "OW"

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_encoded_as(path: Path | str, *, implicit_vr: bool, little_endian: bool = True) -> Path:
    """Re-encode the data set of the Part 10 file `path` as given, leaving its file meta
    (and the transfer syntax it declares) as it was: a file written wrongly, as some
    converters do."""
    path = Path(path)
    ds = dcmread(path)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = little_endian, implicit_vr
    write_dataset(body, ds)
    path.write_bytes(head.getvalue() + body.getvalue())
    return path


def dicom_file(path: Path | str, root: Path | str | None = None) -> DicomFile:
    """Describe a file as the router does (relpath against `root`, or the file name)."""
    path = Path(path).absolute()
    meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
    base = Path(root).absolute() if root else path.parent
    return DicomFile(
        root=str(base),
        relpath=path.relative_to(base).as_posix(),
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
    )


def write_job(
    job_dir: Path | str,
    *,
    called: str = "PROCRSI",
    caller: str = "PACS",
    success: str | None = "success",
    message: str = "done",
    n_output: int = 3,
    n_input: int = 2,
    caller_ip: str = "10.0.0.5",
    **kw: Any,
) -> list[Path]:
    """Build a SPEC section-1 job folder and return its DICOM files, INPUT first.

    `success=None` leaves out proc.json (a job still waiting for its computation). INPUT
    and OUTPUT are two series of one study ("INPUT" / "OUTPUT" as SeriesDescription unless
    `series_description` is given); further keywords go to `write_ct` (rows, cols,
    modality, transfer_syntax, ...).
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "AETitleCalled": called,
        "AETitleCaller": caller,
        "CallerIP": caller_ip,
        "received": "2024-01-01T12:00:00",
    }
    (job_dir / "info.json").write_text(json.dumps(info, indent=2))
    if success is not None:
        proc = [{"success": success, "message": message}]
        (job_dir / "proc.json").write_text(json.dumps(proc, indent=2))

    kw.setdefault("study_instance_uid", generate_uid())
    files: list[Path] = []
    for folder, count in (("INPUT", n_input), ("OUTPUT", n_output)):
        series_kw = {"series_instance_uid": generate_uid(), "series_description": folder, **kw}
        (job_dir / folder).mkdir(exist_ok=True)
        for number in range(1, count + 1):
            target = job_dir / folder / f"{folder[:2]}{number:06d}.dcm"
            files.append(write_ct(target, instance_number=number, **series_kw))
    return files


def write_pydicom_corpus(folder: Path | str) -> list[Path]:
    """Copy pydicom's test files (those on disk) under `folder`; return the instances.

    What a new user would try: every file that pydicom reads and that has a
    SOPInstanceUID is re-saved by pydicom with fresh Study, Series and SOP Instance UIDs
    (so that a PACS holds them apart from any earlier copy) and is otherwise as it is,
    defects included: `SC_rgb_jpeg.dcm`, whose data set is in implicit VR under a meta
    that says JPEG Baseline, cannot be written by pydicom that way and is written in
    implicit VR, as it was. DICOMDIRs and files that are not DICOM are copied byte for
    byte. Left out: the few data sets without a SOPInstanceUID (fragments for pydicom's
    parser tests), which a receiver stores under a UID of its own making, so what
    arrived could not be counted. Paths below `folder` are those below pydicom's folder.
    """
    folder = Path(folder)
    source = Path(pydicom.data.__file__).parent / "test_files"
    instances: list[Path] = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        target = folder / (path.relative_to(source) if path.is_relative_to(source) else path.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about each defect it reads
            try:
                ds = dcmread(path)
            except (InvalidDicomError, OSError, ValueError):
                ds = None
            target.parent.mkdir(parents=True, exist_ok=True)
            if ds is None or ds.get("DirectoryRecordSequence") is not None:
                shutil.copyfile(path, target)
                continue
            if "SOPInstanceUID" not in ds:
                continue
            fresh: dict[str, str] = {}
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if keyword in ds:
                    setattr(ds, keyword, fresh.setdefault(str(ds[keyword].value), generate_uid()))
            meta = getattr(ds, "file_meta", None)
            if meta is not None and "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            try:
                ds.save_as(target)
            except (TypeError, ValueError):
                dcmwrite(target, ds, implicit_vr=True, little_endian=True, force_encoding=True)
        instances.append(target)
    return instances
