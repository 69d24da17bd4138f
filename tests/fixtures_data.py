"""Pytest plugin: sample DICOM files and job folders in the test's tmp_path.

Thin fixtures over `tests.factory`, which the benchmarks and examples import directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.model import DicomFile
from tests.factory import dicom_file, write_ct, write_job


@pytest.fixture
def make_dicom() -> Callable[..., Path]:
    """`make_dicom(path, *, sop_instance_uid=None, series_description="", modality="CT",
    rows=16, cols=16, transfer_syntax=ExplicitVRLittleEndian, sop_class=CTImageStorage,
    study_instance_uid=None, series_instance_uid=None, patient_id=..., extra=None) -> Path`.
    """
    return write_ct


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """`make_job(name="job", **write_job_kw) -> Path` of a job folder under tmp_path."""

    def make(name: str = "job", **kw: Any) -> Path:
        job_dir = tmp_path / name
        write_job(job_dir, **kw)
        return job_dir

    return make


@pytest.fixture
def make_files(tmp_path: Path) -> Callable[..., list[DicomFile]]:
    """`make_files(n, folder="files", **write_ct_kw) -> list[DicomFile]`, in order."""

    def make(n: int, folder: str = "files", **kw: Any) -> list[DicomFile]:
        root = tmp_path / folder
        paths = [write_ct(root / f"IM{i:06d}.dcm", instance_number=i, **kw) for i in range(n)]
        return [dicom_file(p, tmp_path) for p in paths]

    return make
