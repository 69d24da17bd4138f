"""The sending thread's own C-STORE exchange (`router.dimse`): file meta, responses, faults.

The file meta walker is held to pydicom's and pynetdicom's reading of the same files.
Responses come from pynetdicom's SCP: as it frames them (fragmented, for a small
maximum PDU), and, to see each fault reported in words, as bytes it writes on the
connection in place of its answer (a wrong message ID, another command, a release
request, an abort, a closed connection).
"""

from __future__ import annotations

import io
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ, P_DATA_TF

from router.dimse import read_file_meta
from router.model import DicomFile, StoreResult, Timeouts
from router.transport import send_files
from tests.fixtures_scp import StorageSCP, our_threads

FAST = Timeouts(connect=5, acse=5, dimse=5, network=10)


# -- file meta -------------------------------------------------------------------------------


def bundled_test_files() -> list[Path]:
    """pydicom's own test files (those shipped with it: nothing is downloaded)."""
    return sorted(Path(pydicom.data.__file__).parent.glob("test_files/**/*.dcm"))


def test_file_meta_is_read_as_pydicom_and_pynetdicom_read_it() -> None:
    checked = refused = 0
    for name in bundled_test_files():
        try:
            theirs, offset = split_dataset(name)
        except Exception:
            theirs = None
        with open(name, "rb") as fh:
            try:
                ours = read_file_meta(fh)
            except ValueError:
                # Only a file pynetdicom cannot send from disk either: no meta, no syntax.
                assert theirs is None or not theirs.get("TransferSyntaxUID"), name
                refused += 1
                continue
            assert fh.tell() == ours.offset, name
        assert theirs is not None, name
        assert ours.offset == offset, name
        assert ours.sop_class_uid == theirs.get("MediaStorageSOPClassUID", ""), name
        assert ours.sop_instance_uid == theirs.get("MediaStorageSOPInstanceUID", ""), name
        assert ours.transfer_syntax_uid == theirs.TransferSyntaxUID, name
        checked += 1
    assert checked > 50 and refused > 0  # both kinds are in pydicom's test files


def meta_file(elements: bytes, data_set: bytes = b"\x08\x00\x16\x00UI\x02\x001\x00") -> bytes:
    return b"\0" * 128 + b"DICM" + elements + data_set


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


GOOD_META = (
    element(2, 1, b"OB", b"\0\1")
    + element(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
    + element(2, 3, b"UI", b"1.2.3.4\0")
    + element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1\0")
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not dicom at all", "not a DICOM Part 10 file (no DICM preamble)"),
        (meta_file(GOOD_META[:30], b""), "its file meta information is cut short"),
        (
            meta_file(GOOD_META[:-28]),
            "its file meta information has no TransferSyntaxUID",
        ),
        (
            meta_file(struct.pack("<HHL", 2, 0x10, 20) + b"1.2.840.10008.1.2\0\0\0"),
            "its file meta information is not in Explicit VR Little Endian",
        ),
        (
            meta_file(struct.pack("<HH2s2xL", 2, 1, b"OB", 0xFFFFFFFF) + GOOD_META),
            "its file meta information has an undefined length element",
        ),
    ],
    ids=["no-preamble", "cut-short", "no-syntax", "implicit-vr", "undefined-length"],
)
def test_file_meta_faults_name_the_fault(content: bytes, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        read_file_meta(io.BytesIO(content))
    assert str(info.value) == reason


def test_file_meta_offset_and_values() -> None:
    meta = read_file_meta(io.BytesIO(meta_file(GOOD_META)))
    assert meta.offset == 132 + len(GOOD_META)
    assert meta.sop_class_uid == CTImageStorage
    assert meta.sop_instance_uid == "1.2.3.4"
    assert meta.transfer_syntax_uid == "1.2.840.10008.1.2.1"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tail=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=200))
def test_any_bytes_are_a_file_meta_or_a_value_error(tail: bytes, cut: int) -> None:
    for content in (meta_file(b"", b"") + tail, meta_file(GOOD_META)[: 132 + cut] + tail):
        try:
            meta = read_file_meta(io.BytesIO(content))
        except ValueError:
            continue
        assert 132 <= meta.offset <= len(content)


# -- responses from a real peer --------------------------------------------------------------


class Results(list[StoreResult]):
    def __call__(self, result: StoreResult) -> None:
        self.append(result)


def pdata(message: C_STORE_RSP | C_ECHO_RSP, max_pdu: int = 0) -> bytes:
    """The message as pynetdicom frames it into P-DATA-TF PDUs (context 1)."""
    out = b""
    for primitive in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


def store_rsp(message_id: int, status: int, *, data_set: bytes | None = None) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    if data_set is not None:
        message.command_set.CommandDataSetType = 0x0001
        message.data_set = io.BytesIO(data_set)
    return pdata(message, max_pdu=40)  # split over several PDUs


def echo_rsp(message_id: int) -> bytes:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    primitive.Status = 0
    message = C_ECHO_RSP()
    message.primitive_to_message(primitive)
    return pdata(message)


def abort_pdu(source: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = 0 if source == 0 else 2
    return pdu.encode()


def test_responses_in_many_small_pdus(
    scp: Callable[..., StorageSCP], make_files: Callable[..., list[DicomFile]]
) -> None:
    server = scp(keep_data=True)
    files = make_files(4)
    server.refuse_at[2] = 0xA700
    results = Results()

    # Our maximum PDU of 64 bytes makes the SCP split every response over several PDUs.
    send_files(server.endpoint(), files, Timeouts(dimse=5, max_pdu=64), results)

    assert [r.status for r in results] == [0, 0xA700, 0, 0]
    assert server.counts == Counter(f.sop_instance_uid for f in files if f is not files[1])


def test_a_response_followed_by_a_data_set_is_read_whole(
    scp: Callable[..., StorageSCP], make_files: Callable[..., list[DicomFile]]
) -> None:
    server = scp(stall_seconds=0.2)
    files = make_files(1)
    server.raw_answer_at[1] = store_rsp(1, 0xB000, data_set=b"\x08\x00\x18\x00\x04\x00\x00\x00" * 9)
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert [(r.status, r.error) for r in results] == [(0xB000, None)]


PROTOCOL_FAULTS = [
    (
        store_rsp(7, 0x0000),
        "no valid C-STORE response from {key}: a C-STORE-RSP to message 7, while message 2 "
        "was waiting; association aborted",
    ),
    (
        echo_rsp(2),
        "no valid C-STORE response from {key}: a message with command field 0x8030 instead "
        "of a C-STORE-RSP; association aborted",
    ),
    (
        A_RELEASE_RQ().encode(),
        "no valid C-STORE response from {key}: an unexpected A-RELEASE-RQ; association aborted",
    ),
    (
        b"\x09\x00\x00\x00\x00\x02\x00\x00",
        "no valid C-STORE response from {key}: a PDU of unknown type 0x09; association aborted",
    ),
    (
        abort_pdu(0),
        "association aborted by the peer ({key}) while waiting for the C-STORE response",
    ),
    (
        abort_pdu(2),
        "association aborted by the peer's DICOM provider ({key}) while waiting for the "
        "C-STORE response",
    ),
]


@pytest.mark.parametrize(
    ("answer", "reason"),
    PROTOCOL_FAULTS,
    ids=[
        "wrong-message-id",
        "echo-response",
        "release-request",
        "unknown-pdu",
        "abort",
        "provider-abort",
    ],
)
def test_a_wrong_answer_fails_the_file_in_flight_and_the_others_go_on_without_it(
    scp: Callable[..., StorageSCP],
    make_files: Callable[..., list[DicomFile]],
    answer: bytes,
    reason: str,
) -> None:
    server = scp(stall_seconds=2)
    files = make_files(4)
    server.raw_answer_at[2] = answer
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    expected = reason.format(key=server.endpoint().key)
    # The association is stopped on the wrong answer; the files after it go on over a
    # new one, and the file in flight is sent again alone at the end.
    assert [(r.file, r.status) for r in results] == [
        (files[0], 0),
        (files[1], None),
        (files[2], 0),
        (files[3], 0),
        (files[1], 0),
    ]
    assert results[1].error == expected
    assert server.counts == Counter(f.sop_instance_uid for f in files)
    assert server.associations == 3
    assert our_threads() == []


def test_an_abort_right_after_a_response_goes_on_over_a_new_association(
    scp: Callable[..., StorageSCP], make_files: Callable[..., list[DicomFile]]
) -> None:
    server = scp(stall_seconds=2)
    files = make_files(3)
    server.raw_answer_at[1] = store_rsp(1, 0x0000) + abort_pdu(0)
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    # No file was in flight: none is put aside, the next one goes on a new association.
    assert [(r.file, r.status) for r in results] == [(f, 0) for f in files]
    assert server.counts == Counter(f.sop_instance_uid for f in files[1:])  # [0]: raw answer
    assert server.associations == 2


def test_the_file_changed_since_the_scan_is_reported_and_the_rest_sent(
    scp: Callable[..., StorageSCP], make_files: Callable[..., list[DicomFile]]
) -> None:
    server = scp()
    files = make_files(3)
    ds = pydicom.dcmread(files[1].path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(files[1].path, enforce_file_format=True)
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert [r.status for r in results] == [0, None, 0]
    assert results[1].error == (
        f"cannot send {files[1].relpath}: its transfer syntax is now Implicit VR Little "
        "Endian, not Explicit VR Little Endian as when the job was scanned"
    )
    assert server.counts == Counter([files[0].sop_instance_uid, files[2].sop_instance_uid])


def test_a_send_longer_than_the_network_timeout_still_ends_in_a_release(
    scp: Callable[..., StorageSCP], make_files: Callable[..., list[DicomFile]]
) -> None:
    """pynetdicom sees none of the PDUs of our C-STOREs; its idle timer must not expire."""
    server = scp(delay=0.3)
    files = make_files(6)
    results = Results()

    began = time.monotonic()
    send_files(server.endpoint(), files, Timeouts(dimse=5, acse=20, network=1), results)

    assert [r.status for r in results] == [0] * 6
    assert server.releases == 1 and server.aborts == 0
    assert time.monotonic() - began < 10  # 1.8 s of answers, not a release that times out
