"""Does a file's data set read back in the transfer syntax its meta declares?

Files are sent as they are on disk, so a receiver parses the data set bytes in the
transfer syntax of the presentation context, which is the one the file meta declares. A
file written wrongly (a data set in implicit VR behind a meta that says explicit, the wrong
byte order, an element longer than the file, a file cut short) then makes the receiver
abort the association or store garbage. Such a file is found here, before it goes, and
fails alone with the reason (README, "Files checked before they go").

The check walks the data set's element headers (tag, VR, length) and the item structure of
sequences and encapsulated pixel data, seeking over values: no value is decoded and pixel
data is never read. When the declared encoding does not walk, the other encodings are
tried, so that the reason can say what the data set really is.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
"""Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2)."""

_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 64
_CHUNK = 1 << 16
_PADDING_PEEK = 1 << 16
"""Trailing zero bytes up to this many after the last element are taken for padding."""


class Damaged(ValueError):
    """The data set does not read back in its declared transfer syntax; the message says how."""


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    little: bool

    def __str__(self) -> str:
        vr = "implicit VR" if self.implicit else "explicit VR"
        return f"{vr} {'little' if self.little else 'big'} endian"


_ENCODINGS = (_Encoding(True, True), _Encoding(False, True), _Encoding(False, False))


class _Bad(Exception):
    """The walk failed: `str()` says where and why."""


class _Reader:
    """Sequential reads over the data set of an open file, with seeks for skipped values."""

    def __init__(self, fh: BinaryIO, start: int, size: int) -> None:
        self.fh = fh
        self.size = size
        self.pos = start
        self._buf = b""
        self._buf_at = start

    def left(self) -> int:
        return self.size - self.pos

    def read(self, count: int) -> bytes:
        offset = self.pos - self._buf_at
        if offset + count > len(self._buf):
            self.fh.seek(self.pos)
            self._buf = self.fh.read(max(count, _CHUNK))
            self._buf_at, offset = self.pos, 0
        data = self._buf[offset : offset + count]
        if len(data) < count:
            raise _Bad(f"the file ends inside an element header at byte {self.pos}")
        self.pos += count
        return data

    def skip(self, count: int) -> None:
        self.pos += count

    def only_zeros_left(self) -> bool:
        left = self.left()
        if left > _PADDING_PEEK:
            return False
        self.fh.seek(self.pos)
        return self.fh.read(left).count(0) == left


def _is_sequence(tag: int) -> bool:
    """Whether the data dictionary has `tag` as a sequence (implicit VR does not say)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _tag_text(group: int, element: int) -> str:
    keyword = keyword_for_tag((group << 16) | element) if group != 0xFFFE else ""
    return f"({group:04X},{element:04X})" + (f" {keyword}" if keyword else "")


class _Walk:
    def __init__(self, reader: _Reader, encoding: _Encoding) -> None:
        self.r = reader
        self.enc = encoding
        order = "<" if encoding.little else ">"
        self.tag = struct.Struct(order + "HH")
        self.ul = struct.Struct(order + "L")
        self.us = struct.Struct(order + "H")

    def dataset(self, end: int | None, depth: int, implicit: bool) -> None:
        """Elements up to `end`, or up to an item delimiter (`end` None), or to EOF (top)."""
        r = self.r
        top = depth == 0
        while True:
            if end is not None and r.pos >= end:
                if r.pos > end:
                    raise _Bad(f"an element runs past the end of its item (byte {end})")
                return
            if top and (r.left() == 0 or r.only_zeros_left()):
                return
            if r.left() == 0:
                raise _Bad("an item of a sequence is not closed before the end of the file")
            at = r.pos
            group, element = self.tag.unpack(r.read(4))
            if group == 0xFFFE:
                r.read(4)
                if element == _ITEM_END and end is None and not top:
                    return
                raise _Bad(f"an unexpected delimiter {_tag_text(group, element)} at byte {at}")
            if implicit:
                vr = None
                length = self.ul.unpack(r.read(4))[0]
            else:
                vr = r.read(2)
                if vr not in _VRS:
                    raise _Bad(
                        f"element {_tag_text(group, element)} at byte {at} has no valid VR ({vr!r})"
                    )
                if vr in _LONG:
                    r.read(2)
                    length = self.ul.unpack(r.read(4))[0]
                else:
                    length = self.us.unpack(r.read(2))[0]
            tag = (group << 16) | element
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and (vr is None or vr in (b"OB", b"OW")):
                    self.fragments(at)
                elif vr in (None, b"SQ", b"UN"):
                    self.sequence(depth + 1, implicit or vr == b"UN")
                else:
                    raise _Bad(
                        f"element {_tag_text(group, element)} at byte {at} has an undefined "
                        f"length, which VR {vr.decode('latin-1')} cannot have"
                    )
            elif length > r.left():
                raise _Bad(
                    f"it is cut short: element {_tag_text(group, element)} at byte {at} "
                    f"declares {length} bytes, and the file has {r.left()} left"
                )
            elif length and (vr == b"SQ" or (vr is None and _is_sequence(tag))):
                self.sequence(depth + 1, implicit, end=r.pos + length, tag=(group, element))
            else:
                r.skip(length)

    def sequence(
        self,
        depth: int,
        implicit: bool,
        end: int | None = None,
        tag: tuple[int, int] | None = None,
    ) -> None:
        """Items up to the sequence delimiter, or up to `end` (a defined length)."""
        if depth > _MAX_DEPTH:
            raise _Bad(f"sequences nested more than {_MAX_DEPTH} deep")
        r = self.r
        while True:
            if end is not None and r.pos >= end:
                if r.pos > end:
                    raise _Bad(f"an item runs past the end of its sequence (byte {end})")
                return
            if r.left() == 0:
                raise _Bad("a sequence is not closed before the end of the file")
            at = r.pos
            group, element = self.tag.unpack(r.read(4))
            length = self.ul.unpack(r.read(4))[0]
            if (group, element) == (0xFFFE, _SEQUENCE_END) and end is None:
                return
            if (group, element) != (0xFFFE, _ITEM):
                raise _Bad(
                    f"{_tag_text(group, element)} at byte {at} where a sequence item was expected"
                )
            if end is not None and length != _UNDEFINED and r.pos + length > end:
                where = f"{_tag_text(*tag)}" if tag else "its sequence"
                raise _Bad(
                    f"a sequence item at byte {at} declares {length} bytes, more than "
                    f"{where} holds ({end - r.pos} left)"
                )
            if length == _UNDEFINED:
                self.dataset(None, depth, implicit)
            elif length > r.left():
                raise _Bad(
                    f"it is cut short: a sequence item at byte {at} declares {length} bytes, "
                    f"and the file has {r.left()} left"
                )
            else:
                self.dataset(r.pos + length, depth, implicit)

    def fragments(self, start: int) -> None:
        r = self.r
        while True:
            if r.left() == 0:
                raise _Bad(
                    f"it is cut short: the encapsulated pixel data at byte {start} is not "
                    "closed before the end of the file"
                )
            at = r.pos
            group, element = self.tag.unpack(r.read(4))
            length = self.ul.unpack(r.read(4))[0]
            if (group, element) == (0xFFFE, _SEQUENCE_END):
                return
            if (group, element) != (0xFFFE, _ITEM) or length == _UNDEFINED:
                raise _Bad(
                    f"{_tag_text(group, element)} at byte {at} in the encapsulated pixel data, "
                    "where a fragment item was expected"
                )
            if length > r.left():
                raise _Bad(
                    f"it is cut short: a pixel data fragment at byte {at} declares {length} "
                    f"bytes, and the file has {r.left()} left"
                )
            r.skip(length)


def _walk(fh: BinaryIO, offset: int, size: int, encoding: _Encoding) -> str | None:
    """None if the data set walks to its end in `encoding`, else why not."""
    try:
        _Walk(_Reader(fh, offset, size), encoding).dataset(None, 0, encoding.implicit)
    except _Bad as exc:
        return str(exc)
    return None


def check_dataset(fh: BinaryIO, offset: int, transfer_syntax: str) -> None:
    """Raise Damaged unless the data set from `offset` walks in `transfer_syntax`.

    Deflated data sets are not walked (they are inflated whole by the scan's read) and
    neither are syntaxes this module does not know the encoding of.
    """
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return
    declared = _Encoding(syntax.is_implicit_VR, syntax.is_little_endian)
    size = os.fstat(fh.fileno()).st_size
    problem = _walk(fh, offset, size, declared)
    if problem is None:
        return
    for other in _ENCODINGS:
        if other != declared and _walk(fh, offset, size, other) is None:
            said = syntax.name if " VR " in syntax.name else f"{syntax.name} ({declared})"
            raise Damaged(
                f"its data set is encoded in {other}, while its file meta declares {said}"
            )
    raise Damaged(f"its data set does not read in {syntax.name}: {problem}")
