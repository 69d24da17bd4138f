"""Files checked before they go: a data set that does not read in its declared transfer
syntax is found by the scan, named with the reason, and never streamed (no network)."""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from router.check import Damaged, check_dataset
from router.dimse import read_file_meta
from router.select import scan
from tests.factory import write_ct, write_encoded_as, write_job

KNOWN_DAMAGED = {
    "MR_truncated.dcm": "its data set does not read in Explicit VR Little Endian: it is cut "
    "short: element (7FE0,0010) PixelData at byte 1488 declares 8192 bytes, and the file has "
    "8130 left",
    "DICOMDIR-nooffset": "its data set does not read in Explicit VR Little Endian: a sequence "
    "item at byte 10860 declares 248 bytes, more than (0004,1220) DirectoryRecordSequence "
    "holds (224 left)",
    "SC_rgb_jpeg.dcm": "its data set is encoded in implicit VR little endian, while its file "
    "meta declares JPEG Baseline (Process 1) (explicit VR little endian)",
    "rtplan_truncated.dcm": "its data set does not read in Implicit VR Little Endian: it is "
    "cut short: element (300A,00B0) BeamSequence at byte 1410 declares 976 bytes, and the "
    "file has 711 left",
}
"""pydicom's own test files that are wrong on disk, with what the check says of them."""


def check(path: Path) -> None:
    with open(path, "rb") as fh:
        meta = read_file_meta(fh)
        check_dataset(fh, meta.offset, meta.transfer_syntax_uid)


def test_pydicom_test_files_pass_except_the_damaged_ones() -> None:
    passed, damaged = 0, {}
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            check(path)
            passed += 1
        except Damaged as exc:
            damaged[path.name] = str(exc)
        except ValueError:
            continue  # no Part 10 meta: the scan skips or refuses it before the check
    assert damaged == KNOWN_DAMAGED
    assert passed >= 150  # the rest of the corpus reads as it declares


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
def test_good_files_pass_and_cut_ones_say_where(tmp_path: Path, syntax: str) -> None:
    path = write_ct(tmp_path / "a.dcm", rows=32, cols=32, transfer_syntax=syntax)
    check(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(Damaged, match="cut short: .*(PixelData|fragment)"):
        check(path)


@pytest.mark.parametrize(
    ("implicit", "little", "declared", "found"),
    [
        (True, True, ExplicitVRLittleEndian, "implicit VR little endian"),
        (False, True, ImplicitVRLittleEndian, "explicit VR little endian"),
        (False, False, ExplicitVRLittleEndian, "explicit VR big endian"),
    ],
)
def test_a_data_set_encoded_otherwise_than_declared_is_named(
    tmp_path: Path, implicit: bool, little: bool, declared: str, found: str
) -> None:
    path = write_ct(tmp_path / "a.dcm", transfer_syntax=declared)
    write_encoded_as(path, implicit_vr=implicit, little_endian=little)
    with pytest.raises(Damaged) as caught:
        check(path)
    assert str(caught.value).startswith(f"its data set is encoded in {found}, while its file meta")


def test_big_endian_files_read_as_declared(tmp_path: Path) -> None:
    check(write_ct(tmp_path / "be.dcm", transfer_syntax=ExplicitVRBigEndian))


def test_an_unclosed_sequence_and_a_bad_fragment_are_found(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "a.dcm")
    with open(path, "rb") as fh:
        offset = read_file_meta(fh).offset
    head = path.read_bytes()[:offset]
    # (0008,1140) SQ of undefined length with one undefined-length item, never closed
    sq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    path.write_bytes(head + sq + item)
    with pytest.raises(Damaged, match="not closed before the end of the file"):
        check(path)
    pixel = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    bad = struct.pack("<HHL", 0x0008, 0x0000, 4) + b"abcd"
    path.write_bytes(head + pixel + struct.pack("<HHL", 0xFFFE, 0xE000, 0) + bad)
    with pytest.raises(Damaged, match="where a fragment item was expected"):
        check(path)


def test_the_scan_fails_damaged_files_alone_and_keeps_their_tags(tmp_path: Path) -> None:
    write_job(tmp_path, n_output=2, n_input=0)
    bad = write_ct(tmp_path / "OUTPUT" / "mask.dcm", series_description="MASK")
    write_encoded_as(bad, implicit_vr=True)
    jpeg = tmp_path / "OUTPUT" / "rgb.dcm"
    jpeg.write_bytes(Path(get_testdata_files("SC_rgb_jpeg.dcm")[0]).read_bytes())
    result = scan(tmp_path, "OUTPUT", {"0008103E"})
    assert [f.relpath for f in result.files] == ["OUTPUT/OU000001.dcm", "OUTPUT/OU000002.dcm"]
    by_name = {u.relpath: u for u in result.unsendable}
    assert set(by_name) == {"OUTPUT/mask.dcm", "OUTPUT/rgb.dcm"}
    assert all(u.permanent for u in by_name.values())
    # the tags still read, so `which` can tell which entries would have sent it
    assert by_name["OUTPUT/mask.dcm"].values == {"0008103E": "MASK"}
    assert by_name["OUTPUT/rgb.dcm"].reason == KNOWN_DAMAGED["SC_rgb_jpeg.dcm"]


def test_the_check_costs_no_pixel_read(tmp_path: Path) -> None:
    """A 64 MB file is checked by reading its headers only (seeks over the pixels)."""
    path = write_ct(tmp_path / "big.dcm", rows=4096, cols=8192)
    reads: list[int] = []

    class Counting(io.FileIO):
        def read(self, size: int = -1) -> bytes:  # type: ignore[override]
            data = super().read(size)
            reads.append(len(data))
            return data

    with Counting(path, "rb") as fh:
        meta = read_file_meta(fh)  # type: ignore[arg-type]
        check_dataset(fh, meta.offset, meta.transfer_syntax_uid)  # type: ignore[arg-type]
    assert os.path.getsize(path) > 60_000_000
    assert sum(reads) < 200_000


SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=400), st.sampled_from(SYNTAXES))
def test_arbitrary_bytes_pass_or_are_damaged(data: bytes, syntax: str) -> None:
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        try:
            check_dataset(fh, 0, syntax)
        except Damaged as exc:
            assert str(exc)


def test_explain_marks_the_files_that_would_fail(tmp_path: Path) -> None:
    from router.config import parse_config
    from router.explain import explain, render
    from router.job import load_job
    from router.settings import Settings

    write_job(tmp_path, n_output=1, n_input=0)
    write_encoded_as(write_ct(tmp_path / "OUTPUT" / "bad.dcm"), implicit_vr=True)
    dest = {"IP": "127.0.0.1", "PORT": 104, "AETitleSender": "A", "AETitleTo": "B"}
    cfg = parse_config({"routing": [{"send": [{".*": dest}]}]})
    job = load_job(tmp_path)
    views, scans = explain(job, cfg, Settings())
    lines = list(render(job, views, scans))
    reason = (
        "its data set is encoded in implicit VR little endian, while its file meta declares "
        "Explicit VR Little Endian"
    )
    assert f"    ! OUTPUT/bad.dcm (damaged): {reason}" in lines
    assert any(
        "would fail: 1 file(s) it selects cannot be sent; 1 file(s) would go" in x for x in lines
    )
    assert f"      ! OUTPUT/bad.dcm: {reason}" in lines
