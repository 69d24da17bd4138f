"""router.send against a controllable pynetdicom SCP and against dcmtk's storescp.

Every test asserts exactly which instances arrived and how often, and what was reported for
each file: the routing record is built from those reports.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset

import router.send
from router.dimse import c_store_command
from router.model import DicomFile, Endpoint, SendError, StoreResult, Timeouts, TlsOptions
from router.send import MAX_CONTEXTS, echo
from router.transport import send_files
from tests.factory import dicom_file, write_ct
from tests.fixtures_scp import StorageSCP, our_threads
from tests.fixtures_tls import Pki

FAST = Timeouts(connect=5, acse=5, dimse=5, network=10)
STORESCP = "/usr/bin/storescp"


class Results(list[StoreResult]):
    """The on_result callback and what it collected."""

    def __call__(self, result: StoreResult) -> None:
        self.append(result)

    @property
    def stored(self) -> list[str]:
        return [r.file.sop_instance_uid for r in self if r.stored]

    @property
    def failed(self) -> dict[str, StoreResult]:
        return {r.file.sop_instance_uid: r for r in self if not r.stored}


def uids(files: list[DicomFile]) -> list[str]:
    return [f.sop_instance_uid for f in files]


@pytest.fixture
def files(make_files: Callable[..., list[DicomFile]]) -> list[DicomFile]:
    return make_files(8)


@pytest.fixture
def server(scp: Callable[..., StorageSCP]) -> StorageSCP:
    return scp()


# -- the controllable SCP ------------------------------------------------------------------


def test_all_files_stored_once_in_order_byte_identical(
    scp: Callable[..., StorageSCP], files: list[DicomFile]
) -> None:
    server = scp(keep_data=True)
    results = Results()

    send_files(server.endpoint("ROUTER"), files, FAST, results)

    assert [r.file for r in results] == files
    assert all(r.status == 0x0000 and r.error is None for r in results)
    assert [a.sop_instance_uid for a in server.arrivals] == uids(files)
    assert server.counts == Counter(uids(files))
    assert {(a.calling_aet, a.called_aet) for a in server.arrivals} == {("ROUTER", "STORESCP")}
    assert server.associations == 1
    for f in files:  # streamed as it is on disk: the data set bytes arrive unchanged
        offset = split_dataset(f.path)[1]
        assert server.data[f.sop_instance_uid] == f.path.read_bytes()[offset:]


@pytest.mark.parametrize(
    ("max_pdu", "rows", "count"),
    [(4096, 16, 3), (16382, 800, 2), (131072, 800, 2), (0, 800, 2)],
    ids=["pdu-4k", "pdu-16k-1.3MB", "pdu-128k-1.3MB", "pdu-unlimited-1.3MB"],
)
def test_framing_for_any_peer_pdu_size_and_file_size(
    scp: Callable[..., StorageSCP],
    make_files: Callable[..., list[DicomFile]],
    max_pdu: int,
    rows: int,
    count: int,
) -> None:
    server = scp(keep_data=True, max_pdu=max_pdu)
    files = make_files(count, rows=rows, cols=rows)  # 800x800: more than one 1 MB block
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert results.stored == uids(files) and server.counts == Counter(uids(files))
    for f in files:
        offset = split_dataset(f.path)[1]
        assert server.data[f.sop_instance_uid] == f.path.read_bytes()[offset:]


def test_pynetdicom_own_send_path_still_works(
    scp: Callable[..., StorageSCP], files: list[DicomFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the direct write switched off, every PDU goes through pynetdicom's DUL."""
    monkeypatch.setattr(router.send, "DIRECT_DATA", False)
    server = scp(keep_data=True)
    server.refuse_at[2] = 0xA700
    server.abort_instances.add(files[5].sop_instance_uid)  # each time it comes
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    # The file that aborts is put aside, the others go on, it fails alone when sent alone.
    assert [r.file for r in results] == [*files, files[5]]
    assert [r.status for r in results] == [0, 0xA700, 0, 0, 0, None, 0, 0, None]
    assert "aborted" in (results[5].error or "") and not results[5].permanent
    assert results[-1].permanent
    assert (results[-1].error or "").startswith(
        "the destination aborted the association twice while receiving this file"
    )
    stored = [files[0], *files[2:5], *files[6:]]
    assert server.counts == Counter(uids(stored))
    assert server.associations == 3
    for f in stored:
        offset = split_dataset(f.path)[1]
        assert server.data[f.sop_instance_uid] == f.path.read_bytes()[offset:]


def test_c_store_command_set_is_encoded_as_pynetdicom_does() -> None:
    for extra in (
        {},
        {"MoveOriginatorApplicationEntityTitle": "MOVER"},
        {"MoveOriginatorMessageID": 7},
    ):
        primitive = C_STORE()
        primitive.MessageID = 65535
        primitive.Priority = 2
        primitive.AffectedSOPClassUID = CTImageStorage
        primitive.AffectedSOPInstanceUID = "1.2.3.45"
        for keyword, value in extra.items():
            setattr(primitive, keyword, value)
        primitive._dataset_path = (Path("x.dcm"), 0)
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        ours = c_store_command(
            CTImageStorage,
            "1.2.3.45",
            65535,
            2,
            primitive.MoveOriginatorApplicationEntityTitle,
            primitive.MoveOriginatorMessageID,
        )
        assert ours == encode(message.command_set, True, True)


def test_empty_job_opens_no_association(server: StorageSCP) -> None:
    results = Results()
    send_files(server.endpoint(), [], FAST, results)
    assert results == [] and server.associations == 0


def test_refusals_are_reported_per_file_and_the_rest_still_stored(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.refuse_instances[files[2].sop_instance_uid] = 0xA700
    server.refuse_at[6] = 0xC000  # the 6th C-STORE: files[5]
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert len(results) == len(files)
    failed = results.failed
    assert set(failed) == {files[2].sop_instance_uid, files[5].sop_instance_uid}
    a700, c000 = failed[files[2].sop_instance_uid], failed[files[5].sop_instance_uid]
    assert a700.status == 0xA700 and "0xA700" in a700.error and "Out of Resources" in a700.error
    assert c000.status == 0xC000 and "0xC000" in c000.error and "Cannot Understand" in c000.error
    expected = [u for u in uids(files) if u not in failed]
    assert [a.sop_instance_uid for a in server.arrivals] == expected
    assert server.counts == Counter(expected)
    assert server.associations == 1


def test_warning_statuses_count_as_stored(server: StorageSCP, files: list[DicomFile]) -> None:
    for f, status in zip(files, (0xB000, 0xB006, 0xB007), strict=False):
        server.refuse_instances[f.sop_instance_uid] = status
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert [r.status for r in results[:4]] == [0xB000, 0xB006, 0xB007, 0x0000]
    assert all(r.stored and r.error is None for r in results)


def test_an_abort_puts_the_file_in_flight_aside_and_the_others_go_on_at_once(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.abort_after(3)  # the 4th C-STORE, once
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    # Reported unanswered as the association ended, then stored when sent alone at the end.
    assert [r.file for r in results] == [*files, files[3]]
    assert results[3].status is None and "aborted by the peer" in (results[3].error or "")
    assert server.endpoint().key in (results[3].error or "")
    assert not results[3].permanent and results[-1].stored
    assert server.counts == Counter(uids(files))
    assert server.associations == 3  # the first, one for the files after it, one for it
    assert len({r.association for r in results}) == 3


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("abort_instances", "the destination aborted the association twice"),
        ("reset_instances", "the connection to the destination was lost twice"),
    ],
)
def test_a_file_that_ends_the_association_twice_fails_alone_for_good(
    server: StorageSCP, files: list[DicomFile], fault: str, words: str
) -> None:
    getattr(server, fault).add(files[2].sop_instance_uid)  # each time it comes
    results = Results()
    begun = time.monotonic()

    send_files(server.endpoint(), files, FAST, results)

    assert time.monotonic() - begun < 3
    assert [r.file for r in results] == [*files, files[2]]
    first, last = results[2], results[-1]
    assert first.status is None and not first.permanent
    assert last.status is None and last.permanent
    assert (last.error or "").startswith(f"{words} while ")
    assert "sent with the others, then alone" in (last.error or "")
    others = [f for f in files if f is not files[2]]
    assert server.counts == Counter(uids(others))
    assert server.associations == 3
    assert our_threads() == []


def test_a_destination_that_aborts_on_everything_fails_fast_and_transient(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.abort_instances.update(uids(files))
    results = Results()

    with pytest.raises(SendError) as info:
        send_files(server.endpoint(), files, FAST, results)

    assert info.value.transient
    assert info.value.reason.startswith("association aborted by the peer")
    assert info.value.reason.endswith(
        "(3 associations in a row ended before any file on them was answered)"
    )
    # The third association tried the last file, in case the first two were bad files.
    assert [r.file for r in results] == [files[0], files[1], files[-1]]
    assert all(r.status is None and not r.permanent for r in results)
    assert server.associations == 3 and server.counts == Counter()


def test_a_run_of_bad_files_is_isolated_file_by_file(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.abort_instances.update(uids(files[2:5]))  # three in a row
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    # After two associations in a row that ended before any answer, the last file goes
    # first: stored, so the destination works and the run goes on.
    order = [*files[:5], files[7], files[5], files[6], *files[2:5]]
    assert [r.file for r in results] == order
    assert [r.permanent for r in results[-3:]] == [True, True, True]
    assert server.counts == Counter(uids([*files[:2], *files[5:]]))
    assert server.associations == 4 + 3


def test_too_many_broken_associations_give_the_destination_up(
    server: StorageSCP, make_files: Callable[..., list[DicomFile]]
) -> None:
    files = make_files(16)
    for n in (2, 4, 6, 8, 10):  # every other C-STORE aborts, once
        server.abort_at.add(n)
    results = Results()

    with pytest.raises(SendError) as info:
        send_files(server.endpoint(), files, FAST, results)

    assert info.value.transient
    assert info.value.reason.endswith("(5 associations ended abnormally in one run)")
    # Up to the 5th abort: those files tried again alone (and stored), then the run ends.
    aside = [files[i] for i in (1, 3, 5, 7, 9)]
    assert [r.file for r in results] == [*files[:10], *aside]
    assert server.counts == Counter(uids(files[:10]))
    assert server.associations == 5 + 5


def test_retrying_what_is_missing_stores_everything_exactly_once(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.abort_at.update({3, 4, 5, 6})  # the 3rd to the 6th C-STORE: a peer that fell over
    results = Results()
    with pytest.raises(SendError):
        send_files(server.endpoint(), files, FAST, results)
    assert [r.file for r in results] == [*files[:5], files[7]]

    missing = [f for f in files if f.sop_instance_uid not in results.stored]
    send_files(server.endpoint(), missing, FAST, results)

    assert server.counts == Counter(uids(files))
    assert server.associations == 5


def test_a_lost_response_is_reported_unanswered_and_the_file_sent_again_alone(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.stall_at.add(2)
    server.stall_seconds = 10
    results = Results()
    begun = time.monotonic()

    send_files(server.endpoint(), files, Timeouts(dimse=1, acse=5), results)

    assert time.monotonic() - begun < 4
    assert [r.file for r in results] == [*files, files[1]]
    assert results[1].status is None
    assert (
        results[1].error == "no C-STORE response within 1 s (DIMSE time-out); association aborted"
    )
    assert all(r.stored for r in results if r is not results[1])
    # The SCP kept the stalled instance: sent again, it arrives twice, which is why the
    # caller records the first answer as unknown rather than as refused (and the second
    # as a possible duplicate).
    assert server.counts == Counter([*uids(files), files[1].sop_instance_uid])
    assert our_threads() == []


def test_a_file_never_answered_twice_fails_alone_after_two_dimse_time_outs(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    server.stall_instances.add(files[4].sop_instance_uid)
    server.stall_seconds = 10
    results = Results()
    begun = time.monotonic()

    send_files(server.endpoint(), files, Timeouts(dimse=1, acse=5), results)

    assert time.monotonic() - begun < 5
    assert [r.file for r in results] == [*files, files[4]]
    assert results[-1].permanent and results[-1].status is None
    assert (results[-1].error or "").startswith(
        "the destination did not answer this file twice within the DIMSE time-out"
    )
    assert server.counts == Counter([*uids(files), files[4].sop_instance_uid])
    assert our_threads() == []


@pytest.mark.parametrize(
    ("transient", "words"),
    [(False, "association rejected (permanent)"), (True, "association rejected (transient)")],
)
def test_association_rejected(
    server: StorageSCP, files: list[DicomFile], transient: bool, words: str
) -> None:
    server.reject_next(1, transient=transient)
    results = Results()

    with pytest.raises(SendError) as info:
        send_files(server.endpoint(), files, FAST, results)

    assert info.value.transient is transient
    reason = info.value.reason
    assert reason.startswith(f"{words} by {server.endpoint().key}: ")
    assert reason.endswith(
        "temporary congestion" if transient else "calling AE title not recognised"
    )
    assert results == [] and server.counts == Counter()

    send_files(server.endpoint(), files, FAST, results)  # the next attempt is accepted
    assert server.counts == Counter(uids(files)) and server.associations == 2


def test_unknown_called_aet_is_a_permanent_rejection(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    with pytest.raises(SendError) as info:
        send_files(server.endpoint(called_aet="NOTTHERE"), files, FAST, Results())

    assert not info.value.transient
    assert info.value.reason == (
        f"association rejected (permanent) by NOTTHERE@127.0.0.1:{server.port}: "
        "called AE title not recognised"
    )


def test_connection_refused_is_transient(files: list[DicomFile]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        results = Results()
        with pytest.raises(SendError) as info:
            send_files(Endpoint("127.0.0.1", port, "X", "ROUTER"), files, FAST, results)

    assert info.value.transient
    assert info.value.reason == f"connection refused by 127.0.0.1:{port}"
    assert results == []
    assert our_threads() == []


def test_pynetdicom_does_not_log_again_what_send_error_says(
    server: StorageSCP, files: list[DicomFile], caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom's own ERROR lines about our failed associations are left out; others stay."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = Endpoint("127.0.0.1", s.getsockname()[1], "X", "ROUTER")
        with caplog.at_level(logging.INFO, logger="pynetdicom"):
            with pytest.raises(SendError):
                send_files(refused, files, FAST, Results())
            server.reject_next(1, transient=False)
            with pytest.raises(SendError):
                send_files(server.endpoint(), files, FAST, Results())
            logging.getLogger("pynetdicom.acse").error("Association Rejected")  # not ours

    errors = [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= 40]
    assert [r.getMessage() for r in errors] == ["Association Rejected"]
    assert errors[0].threadName == threading.current_thread().name
    infos = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")]
    assert "Requesting Association" in infos  # the INFO lines are still there when asked for


def test_no_association_response_is_an_acse_timeout(files: list[DicomFile]) -> None:
    with socket.socket() as listener:  # accepts TCP, never answers the A-ASSOCIATE-RQ
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(SendError) as info:
            send_files(
                Endpoint("127.0.0.1", port, "X", "ROUTER"), files, Timeouts(acse=1), Results()
            )

    assert info.value.transient
    assert (
        info.value.reason
        == f"no association response from X@127.0.0.1:{port} within 1 s (ACSE time-out)"
    )


def test_mixed_transfer_syntaxes_each_arrive_in_their_own(
    server: StorageSCP, tmp_path: Path
) -> None:
    syntaxes = [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        RLELossless,
        ImplicitVRLittleEndian,
    ]
    files = [
        dicom_file(write_ct(tmp_path / f"{i}.dcm", transfer_syntax=ts), tmp_path)
        for i, ts in enumerate(syntaxes)
    ]
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert results.stored == uids(files)
    arrived = {a.sop_instance_uid: a.transfer_syntax for a in server.arrivals}
    assert arrived == {f.sop_instance_uid: f.transfer_syntax_uid for f in files}
    assert server.counts == Counter(uids(files)) and server.associations == 1


def test_file_without_accepted_context_is_reported_and_others_sent(
    scp: Callable[..., StorageSCP], tmp_path: Path
) -> None:
    server = scp(transfer_syntaxes=[ImplicitVRLittleEndian])
    syntaxes = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    files = [
        dicom_file(write_ct(tmp_path / f"{i}.dcm", transfer_syntax=ts), tmp_path)
        for i, ts in enumerate(syntaxes)
    ]
    results = Results()
    no_convert = dataclasses.replace(server.endpoint(), convert=False)

    send_files(no_convert, files, FAST, results)

    assert [r.file for r in results] == files
    assert results.stored == [files[0].sop_instance_uid, files[2].sop_instance_uid]
    refused = results[1]
    assert refused.status is None
    assert refused.error == (
        "no accepted presentation context for CT Image Storage in Explicit VR Little Endian"
    )
    assert server.counts == Counter(results.stored)


def test_what_the_peer_does_not_take_as_it_is_is_converted(
    scp: Callable[..., StorageSCP], tmp_path: Path
) -> None:
    server = scp(transfer_syntaxes=[ImplicitVRLittleEndian], keep_data=True)
    syntaxes = [
        RLELossless,
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ImplicitVRLittleEndian,
    ]
    files = [
        dicom_file(write_ct(tmp_path / f"{i}.dcm", transfer_syntax=ts, rows=32), tmp_path)
        for i, ts in enumerate(syntaxes)
    ]
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    as_is, converted = [files[1], files[5]], [files[0], files[2], files[3]]
    big_endian = files[4]
    # Files taken as they are go first, over the first association; then the others.
    assert [r.file for r in results] == [*as_is, *converted, big_endian]
    assert results.stored == uids([*as_is, *converted])
    assert results.failed[big_endian.sop_instance_uid].error == (
        f"cannot convert {big_endian.relpath} from Explicit VR Big Endian: "
        "big endian files are not converted"
    )
    assert server.counts == Counter(uids([*as_is, *converted]))
    assert {a.transfer_syntax for a in server.arrivals} == {ImplicitVRLittleEndian}
    assert server.associations == 2
    original = pydicom.dcmread(files[1].path).pixel_array
    for f in converted:  # same instance, same pixels
        ds = _implicit(server.data[f.sop_instance_uid])
        assert ds.SOPInstanceUID == f.sop_instance_uid
        assert (ds.pixel_array == original).all()


def _implicit(data: bytes) -> pydicom.Dataset:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def test_no_accepted_context_at_all_reports_every_file_then_raises_permanent(
    scp: Callable[..., StorageSCP], files: list[DicomFile]
) -> None:
    server = scp(transfer_syntaxes=[JPEGBaseline8Bit])
    results = Results()

    with pytest.raises(SendError) as info:
        send_files(server.endpoint(), files, FAST, results)

    assert not info.value.transient
    assert "accepted none of the 1 presentation contexts" in info.value.reason
    assert "CT Image Storage" in info.value.reason
    assert [r.file for r in results] == files
    assert all(
        r.error == "no accepted presentation context for CT Image Storage in Explicit VR "
        "Little Endian, nor in an uncompressed transfer syntax"
        for r in results
    )
    assert all(r.status is None for r in results)
    assert server.counts == Counter() and server.associations == 2

    no_convert = dataclasses.replace(server.endpoint(), convert=False)
    with pytest.raises(SendError):
        send_files(no_convert, files, FAST, results := Results())
    assert [r.error for r in results] == [
        "no accepted presentation context for CT Image Storage in Explicit VR Little Endian"
    ] * len(files)
    assert server.associations == 3


def test_more_than_128_context_pairs_use_one_association_per_128(
    server: StorageSCP, tmp_path: Path
) -> None:
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][: MAX_CONTEXTS + 2]
    paths = [
        write_ct(tmp_path / f"{i}.dcm", sop_class=sop, rows=2, cols=2)
        for i, sop in enumerate(classes)
    ]
    # Two more files of the first and the last pair, at the end of the job.
    paths.append(write_ct(tmp_path / "again-first.dcm", sop_class=classes[0], rows=2, cols=2))
    paths.append(write_ct(tmp_path / "again-last.dcm", sop_class=classes[-1], rows=2, cols=2))
    files = [dicom_file(p, tmp_path) for p in paths]
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert server.associations == 2
    assert set(results.stored) == set(uids(files)) and len(results) == len(files)
    first_group = [*files[:MAX_CONTEXTS], files[-2]]
    second_group = [*files[MAX_CONTEXTS : MAX_CONTEXTS + 2], files[-1]]
    assert [a.sop_instance_uid for a in server.arrivals] == uids(first_group + second_group)
    assert server.counts == Counter(uids(files))


def test_unreadable_file_is_reported_and_the_association_goes_on(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    files[1].path.unlink()
    files[4].path.write_bytes(b"not dicom at all")
    results = Results()

    send_files(server.endpoint(), files, FAST, results)

    assert [r.file for r in results] == files
    failed = results.failed
    assert set(failed) == {files[1].sop_instance_uid, files[4].sop_instance_uid}
    assert all(r.status is None and r.error.startswith("cannot send ") for r in failed.values())
    assert server.counts == Counter(u for u in uids(files) if u not in failed)
    assert server.associations == 1


def test_callback_errors_propagate_and_leave_no_threads(
    server: StorageSCP, files: list[DicomFile]
) -> None:
    def explode(result: StoreResult) -> None:
        raise RuntimeError("record disk full")

    with pytest.raises(RuntimeError, match="record disk full"):
        send_files(server.endpoint(), files, FAST, explode)

    assert server.counts == Counter(uids(files[:1]))
    assert our_threads() == []


def test_failures_leave_no_threads_behind(server: StorageSCP, files: list[DicomFile]) -> None:
    server.abort_at.update({2, 3, 4, 5})
    with pytest.raises(SendError):
        send_files(server.endpoint(), files, FAST, Results())
    server.reject_next(1)
    with pytest.raises(SendError):
        send_files(server.endpoint(), files, FAST, Results())
    send_files(server.endpoint(), files, FAST, Results())

    assert our_threads() == []


def test_echo(server: StorageSCP) -> None:
    assert echo(server.endpoint(), FAST) == 0x0000
    with pytest.raises(SendError) as info:
        echo(server.endpoint(called_aet="WRONG"), FAST)
    assert not info.value.transient and "called AE title not recognised" in info.value.reason


def test_echo_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(SendError) as info:
            echo(Endpoint("127.0.0.1", port, "X", "ROUTER"), FAST)
    assert info.value.transient and info.value.reason == f"connection refused by 127.0.0.1:{port}"


# -- DICOM over TLS ---------------------------------------------------------------------------


def tls_server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def tls_endpoint(server: StorageSCP, tls: TlsOptions) -> Endpoint:
    return dataclasses.replace(server.endpoint(), tls=tls)


def test_tls_send_and_echo_with_verified_server(
    scp: Callable[..., StorageSCP], files: list[DicomFile], pki: Pki
) -> None:
    server = scp(ssl_context=tls_server_context(pki), keep_data=True)
    endpoint = tls_endpoint(server, TlsOptions(ca_file=str(pki.ca)))
    results = Results()

    assert echo(endpoint, FAST) == 0x0000
    send_files(endpoint, files, FAST, results)

    assert results.stored == uids(files) and server.counts == Counter(uids(files))
    for f in files:  # over TLS too, byte-identical
        offset = split_dataset(f.path)[1]
        assert server.data[f.sop_instance_uid] == f.path.read_bytes()[offset:]
    assert our_threads() == []


def test_tls_client_certificate(
    scp: Callable[..., StorageSCP], files: list[DicomFile], pki: Pki
) -> None:
    server = scp(ssl_context=tls_server_context(pki, require_client_cert=True))
    with_cert = TlsOptions(
        ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
    )
    results = Results()

    send_files(tls_endpoint(server, with_cert), files, FAST, results)
    assert server.counts == Counter(uids(files))

    with pytest.raises(SendError) as info:  # the server insists on a client certificate
        send_files(tls_endpoint(server, TlsOptions(ca_file=str(pki.ca))), files, FAST, Results())
    assert server.counts == Counter(uids(files))
    assert not info.value.transient
    assert info.value.reason.startswith(f"TLS handshake with 127.0.0.1:{server.port} failed: ")


def test_tls_untrusted_server_is_a_permanent_failure(
    scp: Callable[..., StorageSCP], files: list[DicomFile], pki: Pki
) -> None:
    server = scp(ssl_context=tls_server_context(pki))
    results = Results()

    with pytest.raises(SendError) as info:  # the system's CAs do not know our test CA
        send_files(tls_endpoint(server, TlsOptions()), files, FAST, results)
    assert not info.value.transient
    assert info.value.reason.startswith(
        f"TLS: the certificate of 127.0.0.1:{server.port} is not trusted: "
    )
    assert results == [] and server.counts == Counter()

    send_files(tls_endpoint(server, TlsOptions(verify=False)), files, FAST, results)
    assert server.counts == Counter(uids(files))


def test_tls_to_a_plain_dicom_port_fails_permanently(
    server: StorageSCP, files: list[DicomFile], pki: Pki
) -> None:
    with pytest.raises(SendError) as info:
        send_files(tls_endpoint(server, TlsOptions(ca_file=str(pki.ca))), files, FAST, Results())
    assert not info.value.transient
    assert info.value.reason.startswith(f"TLS handshake with 127.0.0.1:{server.port} failed: ")
    assert server.counts == Counter()


def test_tls_missing_certificate_file(server: StorageSCP, files: list[DicomFile]) -> None:
    options = TlsOptions(cert_file="/nonexistent/client.pem", key_file="/nonexistent/key.pem")
    with pytest.raises(SendError) as info:
        send_files(tls_endpoint(server, options), files, FAST, Results())
    assert not info.value.transient
    assert info.value.reason.startswith(f"TLS set-up for {server.endpoint().key} failed: ")
    assert server.associations == 0


# -- dcmtk's storescp: an independent implementation ---------------------------------------


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[tuple[Endpoint, Path]]:
    """/usr/bin/storescp writing every receipt to its own file (+uf) in a fresh folder."""
    if not os.access(STORESCP, os.X_OK):
        pytest.skip(f"{STORESCP} (dcmtk) is not installed")
    out = tmp_path / "storescp"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(
        [STORESCP, "+uf", "-od", str(out), "-aet", "DCMTK", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                echo(Endpoint("127.0.0.1", port, "DCMTK", "ROUTER"), FAST)
                break
            except SendError:
                assert proc.poll() is None, "storescp exited"
                assert time.monotonic() < deadline, "storescp did not start"
                time.sleep(0.05)
        yield Endpoint("127.0.0.1", port, "DCMTK", "ROUTER"), out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def received(out: Path) -> Counter[str]:
    return Counter(str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir())


def test_dcmtk_storescp_receives_every_file(
    dcmtk_storescp: tuple[Endpoint, Path], make_files: Callable[..., list[DicomFile]]
) -> None:
    endpoint, out = dcmtk_storescp
    files = make_files(20, rows=64, cols=64)
    results = Results()

    send_files(endpoint, files, FAST, results)

    assert results.stored == uids(files)
    assert received(out) == Counter(uids(files))
    written = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.iterdir())}
    for f in files:  # what storescp wrote holds the same pixels
        assert written[f.sop_instance_uid].PixelData == pydicom.dcmread(f.path).PixelData


def test_dcmtk_storescp_mixed_transfer_syntaxes(
    dcmtk_storescp: tuple[Endpoint, Path], tmp_path: Path
) -> None:
    endpoint, out = dcmtk_storescp
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] * 3
    files = [
        dicom_file(write_ct(tmp_path / "in" / f"{i}.dcm", transfer_syntax=ts), tmp_path)
        for i, ts in enumerate(syntaxes)
    ]
    results = Results()

    send_files(endpoint, files, FAST, results)

    assert results.stored == uids(files)
    assert received(out) == Counter(uids(files))
    written = {
        str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
        for ds in (pydicom.dcmread(p) for p in out.iterdir())
    }
    assert written == {f.sop_instance_uid: f.transfer_syntax_uid for f in files}


def test_dcmtk_storescp_echo(dcmtk_storescp: tuple[Endpoint, Path]) -> None:
    assert echo(dcmtk_storescp[0], FAST) == 0x0000


def test_many_files_one_association_against_dcmtk(
    dcmtk_storescp: tuple[Endpoint, Path], make_files: Callable[..., list[DicomFile]]
) -> None:
    endpoint, out = dcmtk_storescp
    files = make_files(60, rows=8, cols=8, sop_class=CTImageStorage)
    results = Results()

    send_files(endpoint, files, FAST, results)

    assert results.stored == uids(files)
    assert received(out) == Counter(uids(files))
