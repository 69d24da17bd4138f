"""Hard cases on the wire, routed end to end (`route_job`) against real peers on 127.0.0.1.

Transfer syntaxes: a PACS that takes only uncompressed data gets compressed files decoded
(losslessly from what the file holds, lossy ones still marked lossy), a PACS that takes
them as they are gets them unchanged, and a file that cannot be decoded here fails alone,
with the reason. DICOM TLS: dcmtk's storescp with certificates made by the test.
The compressed files are pydicom's own test files and one made by dcmtk's JPEG encoder.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG4HP41,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from router.config import RoutingConfig, parse_config
from router.record import RECORD
from router.report import JobReport
from router.route import route_job
from router.settings import Settings
from tests.factory import write_ct, write_job
from tests.fixtures_dcmtk import StoreSCP
from tests.fixtures_orthanc import Orthanc
from tests.fixtures_tls import Pki

pytestmark = pytest.mark.peers

DCMCJPEG = "/usr/bin/dcmcjpeg"
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}

# storescp's association profile (-xf FILE PROFILE): the image classes of these tests, and
# the two little endian uncompressed syntaxes, nothing else: a PACS without codecs.
UNCOMPRESSED_ONLY = """\
[[TransferSyntaxes]]
[LittleEndian]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[Uncompressed]
PresentationContext1 = VerificationSOPClass\\LittleEndian
PresentationContext2 = SecondaryCaptureImageStorage\\LittleEndian
PresentationContext3 = MRImageStorage\\LittleEndian
PresentationContext4 = CTImageStorage\\LittleEndian
PresentationContext5 = VideoEndoscopicImageStorage\\LittleEndian

[[Profiles]]
[Uncompressed]
PresentationContexts = Uncompressed
"""


def settings(tmp_path: Path) -> Settings:
    """Short time-outs; retries on, so a test shows that permanent failures skip them."""
    return Settings(
        me="127.0.0.1",
        port=104,
        log_file=tmp_path / "routing.log",
        retries=2,
        retry_delay=0.05,
        connect_timeout=2,
        acse_timeout=5,
        dimse_timeout=10,
        network_timeout=10,
    )


def rules(port: int, aet: str, **extensions: Any) -> RoutingConfig:
    destination = {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": aet}
    return parse_config({"routing": [{"send": [{"success": destination | extensions}]}]})


def stores(job: Path) -> dict[str, dict[str, Any]]:
    """File (relative path) -> its last store line in the job's record."""
    lines = [json.loads(line) for line in (job / RECORD).read_text().splitlines() if line]
    return {e["file"]: e for e in lines if e["event"] == "store"}


def delivery(report: JobReport) -> Any:
    (entry,) = report.rules[0].entries
    assert entry.delivery is not None
    return entry.delivery


def make_job(tmp_path: Path, name: str = "job") -> Path:
    """A finished job with empty folders; tests put their files in OUTPUT/."""
    job = tmp_path / name
    write_job(job, n_output=0, n_input=0)
    return job


def place(source: Path | str, target: Path, **changes: Any) -> Path:
    """Copy a DICOM file as a new instance (own SOPInstanceUID), data elements changed by
    keyword (None deletes), pixel data and transfer syntax as they were. Patient, study and
    series are filled in where missing (Orthanc refuses instances without them)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = ds.get("PatientID") or "WIRE"
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def jpeg_lossless(target: Path) -> Path:
    """MR_small encoded JPEG Lossless (Process 14, SV1) by dcmtk: pydicom ships none."""
    source = place(get_testdata_file("MR_small.dcm"), target.with_suffix(".raw.dcm"))
    subprocess.run([DCMCJPEG, "+e1", str(source), str(target)], check=True, timeout=30)
    source.unlink()
    return target


def video(target: Path) -> Path:
    """A one-frame MPEG-4 AVC/H.264 file: a real syntax that no pydicom plugin decodes."""
    ds = pydicom.dcmread(write_ct(target.with_suffix(".raw.dcm"), rows=8, cols=8))
    target.with_suffix(".raw.dcm").unlink()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01\x67\x64\x00\x29" * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(target, enforce_file_format=True)
    return target


@dataclass(frozen=True)
class Sample:
    """A file the job holds, and what a peer without codecs must get from it."""

    name: str
    lossy: bool
    """Its pixels went through lossy compression: the decoded copy must say so."""
    path: Path

    @property
    def syntax(self) -> str:
        return str(pydicom.dcmread(self.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)

    def pixels(self) -> np.ndarray:
        return pydicom.dcmread(self.path).pixel_array


def compressed_job(tmp_path: Path) -> tuple[Path, list[Sample]]:
    """A job with one file in each compressed syntax there is a decoder for, and two not
    compressed (sent as they are)."""
    job = make_job(tmp_path)
    out = job / "OUTPUT"
    testdata: list[tuple[str, str, bool, dict[str, Any]]] = [
        ("j2k.dcm", "JPEG2000.dcm", True, {}),  # says LossyImageCompression 01
        ("j2k-lossless.dcm", "MR_small_jp2klossless.dcm", False, {}),
        ("jpeg-extended.dcm", "JPGExtended.dcm", True, {}),
        # Baseline JPEG, YBR_FULL colour, with no LossyImageCompression: added on decoding.
        ("jpeg-baseline.dcm", "SC_rgb_jpeg_dcmtk.dcm", True, {"LossyImageCompression": None}),
        ("rle.dcm", "MR_small_RLE.dcm", False, {}),
        ("rle-rgb.dcm", "SC_rgb_rle.dcm", False, {}),
        ("jpeg-ls.dcm", "MR_small_jpeg_ls_lossless.dcm", False, {}),
        ("jpeg-ls-near.dcm", "JPEGLSNearLossless_16.dcm", True, {}),  # says nothing
        ("deflated.dcm", "image_dfl.dcm", False, {}),
        ("explicit.dcm", "MR_small.dcm", False, {}),
        ("implicit.dcm", "MR_small_implicit.dcm", False, {}),
    ]
    samples = [
        Sample(name, lossy, place(get_testdata_file(source), out / name, **changes))
        for name, source, lossy, changes in testdata
    ]
    samples.append(Sample("jpeg-lossless.dcm", False, jpeg_lossless(out / "jpeg-lossless.dcm")))
    return job, samples


@pytest.fixture
def uncompressed_pacs(storescp: Callable[..., StoreSCP], tmp_path: Path) -> StoreSCP:
    """dcmtk's storescp taking Explicit and Implicit VR Little Endian only."""
    profile = tmp_path / "uncompressed-only.cfg"
    profile.write_text(UNCOMPRESSED_ONLY)
    return storescp("PACS", "-xf", str(profile), "Uncompressed")


def received(scp: StoreSCP) -> dict[str, Dataset]:
    """SOPInstanceUID -> the data set storescp wrote (each arrived once, asserted)."""
    counts = scp.received()
    assert set(counts.values()) <= {1}, f"received twice: {counts}"
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, scp.files())}


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- transfer syntaxes ------------------------------------------------------------------------


def test_compressed_files_are_decoded_for_a_pacs_without_codecs(
    tmp_path: Path, uncompressed_pacs: StoreSCP
) -> None:
    """Every compressed file arrives once, uncompressed, with the same pixels; lossy ones
    stay marked lossy; the record says from which syntax to which each was converted."""
    job, samples = compressed_job(tmp_path)

    report = route_job(job, rules(uncompressed_pacs.port, "PACS"), settings(tmp_path))

    assert report.state == "routed", report.reason()
    assert delivery(report).stored == len(samples)
    arrived = received(uncompressed_pacs)
    assert set(arrived) == {uid(s.path) for s in samples}
    record = stores(job)
    for s in samples:
        got = arrived[uid(s.path)]
        sent_in = str(got.file_meta.TransferSyntaxUID)
        assert sent_in in UNCOMPRESSED, s.name
        assert np.array_equal(got.pixel_array, s.pixels()), s.name
        assert (got.get("LossyImageCompression") == "01") == s.lossy, s.name
        line = record[f"OUTPUT/{s.name}"]
        assert line["stored"] and line["status"] == 0
        if s.syntax in UNCOMPRESSED:  # sent as it is, byte for byte
            assert "converted_from" not in line, s.name
            assert sent_in == s.syntax
        else:
            assert (line["converted_from"], line["converted_to"]) == (s.syntax, sent_in), s.name
    # Independent of the decoders: what arrives from the lossless MR_small encodings is
    # exactly the uncompressed MR_small.
    mr_small = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    for name in ("j2k-lossless.dcm", "rle.dcm", "jpeg-ls.dcm", "jpeg-lossless.dcm"):
        (s,) = [s for s in samples if s.name == name]
        assert np.array_equal(arrived[uid(s.path)].pixel_array, mr_small), name
    baseline = arrived[uid(samples[3].path)]
    assert baseline.LossyImageCompressionMethod == "ISO_10918_1"
    assert baseline.PhotometricInterpretation == "RGB"  # decoded from YBR_FULL


def test_explicit_vr_files_go_implicit_to_a_pacs_that_takes_only_implicit(
    tmp_path: Path, storescp: Callable[..., StoreSCP]
) -> None:
    """storescp +xi: explicit VR (and compressed) files are re-encoded implicit VR."""
    pacs = storescp("IMPLICIT", "+xi")
    job = make_job(tmp_path)
    files = {
        "explicit.dcm": place(get_testdata_file("CT_small.dcm"), job / "OUTPUT" / "explicit.dcm"),
        "implicit.dcm": place(
            get_testdata_file("MR_small_implicit.dcm"), job / "OUTPUT" / "implicit.dcm"
        ),
        "rle.dcm": place(get_testdata_file("MR_small_RLE.dcm"), job / "OUTPUT" / "rle.dcm"),
    }

    report = route_job(job, rules(pacs.port, "IMPLICIT"), settings(tmp_path))

    assert report.state == "routed", report.reason()
    arrived = received(pacs)
    record = stores(job)
    for name, path in files.items():
        got = arrived[uid(path)]
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian, name
        original = pydicom.dcmread(path)
        assert np.array_equal(got.pixel_array, original.pixel_array), name
        assert got.PatientName == original.PatientName, name
    assert "converted_from" not in record["OUTPUT/implicit.dcm"]
    assert record["OUTPUT/explicit.dcm"]["converted_from"] == ExplicitVRLittleEndian
    assert {record[f"OUTPUT/{n}"].get("converted_to") for n in ("explicit.dcm", "rle.dcm")} == {
        ImplicitVRLittleEndian
    }


def test_a_pacs_that_takes_compressed_data_gets_the_files_unchanged(
    tmp_path: Path, orthanc_clean: Orthanc
) -> None:
    """Orthanc accepts every syntax: nothing is converted, each is stored as it was."""
    job, samples = compressed_job(tmp_path)

    report = route_job(job, rules(orthanc_clean.port, orthanc_clean.aet), settings(tmp_path))

    assert report.state == "routed", report.reason()
    metadata = orthanc_clean.metadata()
    assert {u: meta["TransferSyntax"] for u, meta in metadata.items()} == {
        uid(s.path): s.syntax for s in samples
    }
    assert not [line for line in stores(job).values() if "converted_from" in line]


def test_undecodable_files_fail_alone_with_their_reason(
    tmp_path: Path, uncompressed_pacs: StoreSCP
) -> None:
    """To a PACS without codecs: MPEG-4 video (no decoder here for the syntax) and a 12-bit
    JPEG that libjpeg refuses fail at once (no retry can help), each with its reason; the
    others are stored, and the entry and the job fail."""
    job = make_job(tmp_path)
    video(job / "OUTPUT" / "clip.dcm")
    place(get_testdata_file("JPEG-lossy.dcm"), job / "OUTPUT" / "jpeg12.dcm")
    others = [
        place(get_testdata_file("JPEG2000.dcm"), job / "OUTPUT" / "j2k.dcm"),
        place(get_testdata_file("MR_small.dcm"), job / "OUTPUT" / "mr.dcm"),
    ]

    report = route_job(job, rules(uncompressed_pacs.port, "PACS"), settings(tmp_path))

    assert report.state == "failed"
    assert report.rules[0].entries[0].state == "failed"
    sent = delivery(report)
    assert (sent.stored, sent.failed, sent.attempts, sent.transient) == (2, 2, 1, False)
    clip = (
        "cannot convert OUTPUT/clip.dcm from MPEG-4 AVC/H.264 High Profile / Level 4.1: "
        "No pixel data decoders have been implemented for "
        "'MPEG-4 AVC/H.264 High Profile / Level 4.1'"
    )
    jpeg12 = (
        "cannot convert OUTPUT/jpeg12.dcm from JPEG Extended (Process 2 and 4): "
        "Unable to decode as exceptions were raised by all available plugins:"
    )
    failures = {f["file"]: f for f in sent.failures}
    assert failures["OUTPUT/clip.dcm"] == {
        "file": "OUTPUT/clip.dcm",
        "status": None,
        "reason": clip,
    }
    assert failures["OUTPUT/jpeg12.dcm"]["reason"].startswith(jpeg12)
    assert "libjpeg error" in failures["OUTPUT/jpeg12.dcm"]["reason"]
    assert set(received(uncompressed_pacs)) == {uid(p) for p in others}
    record = stores(job)
    assert (record["OUTPUT/clip.dcm"]["stored"], record["OUTPUT/clip.dcm"]["error"]) == (
        False,
        clip,
    )
    assert record["OUTPUT/jpeg12.dcm"]["stored"] is False


def test_with_convert_off_a_compressed_file_fails_without_retries(
    tmp_path: Path, uncompressed_pacs: StoreSCP
) -> None:
    """`convert: false`: what the PACS does not take as it is fails, permanently."""
    job = make_job(tmp_path)
    j2k = place(get_testdata_file("JPEG2000.dcm"), job / "OUTPUT" / "j2k.dcm")
    mr = place(get_testdata_file("MR_small.dcm"), job / "OUTPUT" / "mr.dcm")

    config = rules(uncompressed_pacs.port, "PACS", convert=False)
    report = route_job(job, config, settings(tmp_path))

    assert report.state == "failed"
    sent = delivery(report)
    assert (sent.stored, sent.failed, sent.attempts) == (1, 1, 1)
    assert sent.failures[0]["reason"] == (
        "no accepted presentation context for Secondary Capture Image Storage "
        "in JPEG 2000 Image Compression"
    )
    assert set(received(uncompressed_pacs)) == {uid(mr)}
    assert stores(job)["OUTPUT/j2k.dcm"]["stored"] is False and j2k.exists()


def test_converting_never_changes_the_job_files(
    tmp_path: Path, uncompressed_pacs: StoreSCP
) -> None:
    job, samples = compressed_job(tmp_path)
    before = {s.path: s.path.read_bytes() for s in samples}

    route_job(job, rules(uncompressed_pacs.port, "PACS"), settings(tmp_path))

    assert {p: p.read_bytes() for p in before} == before


# -- DICOM TLS --------------------------------------------------------------------------------


def tls_pacs(storescp: Callable[..., StoreSCP], pki: Pki, *, client_cert: bool) -> StoreSCP:
    """storescp over TLS (BCP 195 profile, its default); `client_cert`: requires ours."""
    peer = "--require-peer-cert" if client_cert else "--ignore-peer-cert"
    args = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), peer]
    return storescp("SECURE", *args)


def tls(**options: Any) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in options.items()}


def test_tls_to_a_verified_server(
    tmp_path: Path, storescp: Callable[..., StoreSCP], pki: Pki
) -> None:
    pacs = tls_pacs(storescp, pki, client_cert=False)
    job = make_job(tmp_path)
    files = [write_ct(job / "OUTPUT" / f"ct{i}.dcm", rows=64, cols=64) for i in range(3)]

    config = rules(pacs.port, "SECURE", tls=tls(ca=pki.ca, verify=True))
    report = route_job(job, config, settings(tmp_path))

    assert report.state == "routed", report.reason()
    assert pacs.received() == Counter({uid(p): 1 for p in files})
    for path in files:  # byte for byte what the job holds, data set included
        (got,) = [f for f in pacs.files() if uid(f) == uid(path)]
        assert pydicom.dcmread(got).PixelData == pydicom.dcmread(path).PixelData


def test_tls_server_signed_by_another_ca_fails_at_once(
    tmp_path: Path, storescp: Callable[..., StoreSCP], pki: Pki
) -> None:
    """An untrusted certificate is permanent: no retries, a reason that says so."""
    pacs = tls_pacs(storescp, pki, client_cert=False)
    job = make_job(tmp_path)
    write_ct(job / "OUTPUT" / "ct.dcm")

    config = rules(pacs.port, "SECURE", tls=tls(ca=pki.other_ca))
    report = route_job(job, config, settings(tmp_path))

    assert report.state == "failed"
    sent = delivery(report)
    assert (sent.attempts, sent.transient, sent.stored) == (1, False, 0)
    assert sent.error.startswith(
        f"TLS: the certificate of 127.0.0.1:{pacs.port} is not trusted: "
    ), sent.error
    assert pacs.received() == Counter()


def test_tls_without_verification_still_encrypts_and_arrives(
    tmp_path: Path, storescp: Callable[..., StoreSCP], pki: Pki
) -> None:
    """`verify: false` (a self-signed PACS, say): any certificate is taken."""
    pacs = tls_pacs(storescp, pki, client_cert=False)
    job = make_job(tmp_path)
    path = write_ct(job / "OUTPUT" / "ct.dcm")

    config = rules(pacs.port, "SECURE", tls=tls(ca=pki.other_ca, verify=False))
    report = route_job(job, config, settings(tmp_path))

    assert report.state == "routed", report.reason()
    assert pacs.received() == Counter({uid(path): 1})


def test_tls_server_that_requires_our_certificate(
    tmp_path: Path, storescp: Callable[..., StoreSCP], pki: Pki
) -> None:
    """With `cert`/`key` the files arrive; without, the handshake fails, permanently."""
    pacs = tls_pacs(storescp, pki, client_cert=True)
    with_cert = make_job(tmp_path, "with-cert")
    path = write_ct(with_cert / "OUTPUT" / "ct.dcm")
    ours = tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)

    report = route_job(with_cert, rules(pacs.port, "SECURE", tls=ours), settings(tmp_path))

    assert report.state == "routed", report.reason()
    assert pacs.received() == Counter({uid(path): 1})

    without = make_job(tmp_path, "without-cert")
    write_ct(without / "OUTPUT" / "ct.dcm")
    config = rules(pacs.port, "SECURE", tls=tls(ca=pki.ca))
    report = route_job(without, config, settings(tmp_path))

    assert report.state == "failed"
    sent = delivery(report)
    assert (sent.attempts, sent.transient, sent.stored) == (1, False, 0)
    assert sent.error.startswith(f"TLS handshake with 127.0.0.1:{pacs.port} failed: "), sent.error
    assert "the peer requires a client certificate" in sent.error
    assert pacs.received() == Counter({uid(path): 1})


def test_tls_and_conversion_together(
    tmp_path: Path, storescp: Callable[..., StoreSCP], pki: Pki
) -> None:
    """A PACS without codecs behind TLS: the converted data set goes over TLS too."""
    profile = tmp_path / "uncompressed-only.cfg"
    profile.write_text(UNCOMPRESSED_ONLY)
    args = ["+tls", str(pki.server_key), str(pki.server_cert), "--ignore-peer-cert"]
    pacs = storescp("SECURE", *args, "-xf", str(profile), "Uncompressed")
    job = make_job(tmp_path)
    j2k = place(get_testdata_file("JPEG2000.dcm"), job / "OUTPUT" / "j2k.dcm")

    config = rules(pacs.port, "SECURE", tls=tls(ca=pki.ca))
    report = route_job(job, config, settings(tmp_path))

    assert report.state == "routed", report.reason()
    got = received(pacs)[uid(j2k)]
    assert got.file_meta.TransferSyntaxUID in UNCOMPRESSED
    assert np.array_equal(got.pixel_array, pydicom.dcmread(j2k).pixel_array)
    assert stores(job)["OUTPUT/j2k.dcm"]["converted_from"] == JPEG2000
