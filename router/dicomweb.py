"""The STOW-RS messages (PS3.18 10.5): the request body we stream, the answer we read.

The request is multipart/related with one `application/dicom` part per instance: the
Part 10 file as it is on disk, read in chunks while the request goes out. Its length is
known before the first byte is sent (the files' sizes and the part headers), so it goes
with a Content-Length and never in chunked transfer encoding, which some servers take
badly (dicomweb-client issue #42: Orthanc answered 200 to a chunked request and stored
nothing).

The answer is a data set in DICOM JSON (PS3.18 F.2) or XML (PS3.19, the Native DICOM
Model): ReferencedSOPSequence lists what was stored (with a WarningReason if so),
FailedSOPSequence what was not (with its FailureReason). An instance in neither was not
stored as far as anyone can tell.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from xml.etree import ElementTree

from router.model import DicomFile

CHUNK = 1 << 20
"""Bytes read from a file at a time: memory per request, whatever the files' sizes."""

_REFERENCED, _FAILED = "00081199", "00081198"
_SOP_INSTANCE, _FAILURE, _WARNING = "00081155", "00081197", "00081196"

REASONS = {
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0122: "Referenced SOP Class not supported",
    0x0124: "Not authorized",
    0xA700: "Refused: Out of Resources",
    0xA900: "Data Set does not match SOP Class",
    0xB000: "Coercion of Data Elements",
    0xB006: "Elements Discarded",
    0xB007: "Data Set does not match SOP Class",
    0xC000: "Cannot understand",
    0xC122: "Referenced Transfer Syntax not supported",
}
"""FailureReason and WarningReason values (PS3.18 10.5.3, PS3.4 Annex B and C)."""


def reason_text(code: int) -> str:
    meaning = REASONS.get(code)
    if meaning is None and (code & 0xFF00) == 0xA700:
        meaning = REASONS[0xA700]
    if meaning is None and (code & 0xF000) == 0xC000:
        meaning = REASONS[0xC000]
    return f"0x{code:04X} ({meaning or 'unknown'})"


class FileChanged(Exception):
    """A file is not the size it had when its request was planned (changed meanwhile)."""

    def __init__(self, file: DicomFile, detail: str) -> None:
        super().__init__(detail)
        self.file = file
        self.detail = detail


@dataclass(frozen=True)
class Part:
    file: DicomFile
    size: int


class MultipartBody:
    """A multipart/related body of Part 10 files, iterated as it is sent.

    Holds at most one chunk of one file at a time. A file that turns out shorter or longer
    than planned raises `FileChanged` from the iteration (the request is then broken off:
    its length would be a lie).
    """

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = list(parts)
        self.boundary = uuid.uuid4().hex
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    @property
    def length(self) -> int:
        each = len(self._head) + 2  # the part's header, and the CRLF after its file
        return sum(p.size + each for p in self.parts) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            yield self._head
            yield from _read_exactly(part)
            yield b"\r\n"
        yield self._tail


def _read_exactly(part: Part) -> Iterator[bytes]:
    try:
        fd = os.open(part.file.path, os.O_RDONLY)
    except OSError as exc:
        raise FileChanged(part.file, f"cannot be read: {exc.strerror or exc}") from exc
    try:
        left = part.size
        while left:
            try:
                chunk = os.read(fd, min(CHUNK, left))
            except OSError as exc:
                raise FileChanged(part.file, f"cannot be read: {exc.strerror or exc}") from exc
            if not chunk:
                raise FileChanged(
                    part.file, f"it is now shorter than its {part.size} bytes when planned"
                )
            left -= len(chunk)
            yield chunk
        if os.read(fd, 1):
            raise FileChanged(part.file, f"it is now longer than its {part.size} bytes")
    finally:
        os.close(fd)


@dataclass
class Answer:
    """What a STOW-RS response data set says of each instance it lists."""

    stored: dict[str, int | None] = field(default_factory=dict)
    """SOPInstanceUID -> WarningReason (None: none) of each instance in ReferencedSOPSequence."""
    failed: dict[str, int | None] = field(default_factory=dict)
    """SOPInstanceUID -> FailureReason (None: not given) in FailedSOPSequence."""

    @property
    def lists_any(self) -> bool:
        return bool(self.stored or self.failed)


class BadAnswer(ValueError):
    """The response body is neither DICOM JSON nor DICOM XML of a STOW-RS answer."""


def parse_answer(body: bytes) -> Answer:
    """Read a STOW-RS response data set, JSON or XML (told by its first character, since
    servers label it loosely: Orthanc 1.10 sends none). An empty body lists nothing."""
    text = body.lstrip()
    if not text:
        return Answer()
    if text[:1] in (b"{", b"["):
        return _parse_json(text)
    if text[:1] == b"<":
        return _parse_xml(text)
    raise BadAnswer(f"the answer is neither DICOM JSON nor XML: {text[:60]!r}")


def _parse_json(text: bytes) -> Answer:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadAnswer(f"the answer is not valid JSON: {exc}") from None
    if isinstance(data, list) and len(data) == 1:  # some servers wrap the data set
        data = data[0]
    if not isinstance(data, dict):
        raise BadAnswer("the JSON answer is not a data set (an object)")
    answer = Answer()
    for tag, target, reason_tag in (
        (_REFERENCED, answer.stored, _WARNING),
        (_FAILED, answer.failed, _FAILURE),
    ):
        for item in _json_values(data.get(tag)):
            if not isinstance(item, dict):
                continue
            uids = _json_values(item.get(_SOP_INSTANCE))
            reasons = _json_values(item.get(reason_tag))
            reason = reasons[0] if reasons and isinstance(reasons[0], int) else None
            for uid in uids[:1]:
                if isinstance(uid, str):
                    target[uid.strip()] = reason
    return answer


def _json_values(element: object) -> list[object]:
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _parse_xml(text: bytes) -> Answer:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise BadAnswer(f"the answer is not valid XML: {exc}") from None
    answer = Answer()
    for element in _xml_attributes(root):
        tag = (element.get("tag") or "").upper()
        if tag not in (_REFERENCED, _FAILED):
            continue
        target, reason_tag = (
            (answer.stored, _WARNING) if tag == _REFERENCED else (answer.failed, _FAILURE)
        )
        for item in element:
            if _local(item.tag) != "Item":
                continue  # Orthanc 1.10 puts empty <Value/> elements between the items
            values: dict[str, str] = {}
            for attribute in _xml_attributes(item):
                value = next((v for v in attribute if _local(v.tag) == "Value"), None)
                if value is not None and value.text:
                    values[(attribute.get("tag") or "").upper()] = value.text.strip()
            uid = values.get(_SOP_INSTANCE)
            if uid:
                reason = values.get(reason_tag)
                target[uid] = int(reason) if reason and reason.isdigit() else None
    return answer


def _xml_attributes(parent: ElementTree.Element) -> list[ElementTree.Element]:
    return [child for child in parent if _local(child.tag) == "DicomAttribute"]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
