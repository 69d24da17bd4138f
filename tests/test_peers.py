"""Smoke tests of the real peers: if these fail, routing tests against them mean nothing.

dcmtk's storescu is the reference sender, so a failure here is the fixture's or the
peer's, never the router's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.fixtures_dcmtk import free_port, run_storescu

pytestmark = pytest.mark.peers


def write_ct(path: Path, study_uid: str, series_uid: str, number: int) -> str:
    """Write a minimal 8x8 CT image (explicit VR little endian); return its SOPInstanceUID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "PEERS"
    ds.PatientName = "Peers^Smoke"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint16).reshape(8, 8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return uid


@pytest.fixture
def three_cts(tmp_path: Path) -> dict[str, Path]:
    """Three CT files of one series: SOPInstanceUID -> path."""
    folder = tmp_path / "cts"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    files = {}
    for n in range(1, 4):
        path = folder / f"ct{n}.dcm"
        files[write_ct(path, study, series, n)] = path
    return files


def test_storescp_receives_exactly_what_was_sent(storescp, three_cts):
    scp = storescp("DCMTK_SCP")
    run_storescu(scp.port, three_cts.values(), called_aet=scp.aet)
    assert scp.received() == Counter(dict.fromkeys(three_cts, 1))


def test_storescp_counts_a_duplicate_receipt(storescp, three_cts):
    scp = storescp("DCMTK_SCP")
    first, second, _ = three_cts.values()
    run_storescu(scp.port, [first, second])
    run_storescu(scp.port, [first])  # a second association, the same instance again
    uid_first, uid_second, _ = three_cts
    assert scp.received() == Counter({uid_first: 2, uid_second: 1})


def test_storescp_refusing_stores_nothing(storescp, three_cts):
    scp = storescp("REFUSER", "--refuse")
    result = run_storescu(scp.port, three_cts.values(), check=False)
    assert result.returncode != 0
    assert "Rejected" in result.stdout + result.stderr
    assert scp.received() == Counter()


def test_storescp_restarts_on_its_port(storescp, three_cts):
    """A destination that goes down and comes back, as fail-back and retry tests need."""
    scp = storescp("FLAKY")
    scp.stop()
    assert run_storescu(scp.port, three_cts.values(), check=False).returncode != 0
    again = storescp("FLAKY", port=scp.port)
    run_storescu(again.port, three_cts.values())
    assert again.received() == Counter(dict.fromkeys(three_cts, 1))


def test_nothing_listens_on_a_free_port(three_cts):
    result = run_storescu(free_port(), three_cts.values(), check=False)
    assert result.returncode != 0


def test_orthanc_receives_exactly_what_was_sent(orthanc_clean, three_cts):
    run_storescu(
        orthanc_clean.port, three_cts.values(), called_aet=orthanc_clean.aet, calling_aet="ROUTER"
    )
    assert orthanc_clean.instances() == Counter(dict.fromkeys(three_cts, 1))
    meta = orthanc_clean.metadata()
    assert {m["RemoteAET"] for m in meta.values()} == {"ROUTER"}
    assert {m["TransferSyntax"] for m in meta.values()} == {ExplicitVRLittleEndian}


def test_orthanc_rejects_a_wrong_called_aet(orthanc_clean, three_cts):
    result = run_storescu(
        orthanc_clean.port, three_cts.values(), called_aet="NOT_ORTHANC", check=False
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert orthanc_clean.instances() == Counter()
