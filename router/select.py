"""Which files of a job a destination gets: scanning a folder and `which` filters.

A folder is scanned once per job: each file's header is read (never its pixel data)
for the UIDs that sending needs and the tags that the rules filter on. Anything that is
not a DICOM Part 10 file is skipped with a reason and never aborts the job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from router.config import tag_label
from router.model import NO_VALUES, DicomFile
from router.rules import fullmatch

_NEEDED = ("SOPClassUID", "SOPInstanceUID")

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
"""The SOP class of a DICOMDIR, which the file meta gives where the data set has none."""


@dataclass(frozen=True)
class Skipped:
    relpath: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """The DICOM files of one job folder (OUTPUT or INPUT), sorted by path."""

    directory: str
    files: tuple[DicomFile, ...]
    skipped: tuple[Skipped, ...] = ()
    note: str | None = None
    """Why the folder gave nothing, when it does not exist."""


@dataclass(frozen=True)
class Selection:
    selected: tuple[DicomFile, ...]
    excluded: tuple[tuple[DicomFile, str], ...] = field(default_factory=tuple)
    """Files that passed no `which` entry, with the reason in words."""


def _walk(root: Path, job_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """Yield (path, None) for regular files, (path, reason) for links that are skipped.

    Links are followed only while they stay inside the job folder; a folder reached twice
    (a link loop) is walked once.
    """
    job_real = job_dir.resolve()
    seen: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield folder, f"cannot list folder: {exc.strerror or exc}"
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(job_real):
                    yield path, f"symbolic link leads outside the job folder (to {target})"
                    continue
                if not target.exists():
                    yield path, "broken symbolic link"
                    continue
            if entry.is_dir():
                subfolders.append(path)
            elif entry.is_file():
                yield path, None
        stack.extend(reversed(subfolders))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    return str(value)


def read_header(root: str, relpath: str, tags: Iterable[str] = ()) -> DicomFile:
    """Read what routing needs from the file `relpath` under `root` (the job folder).

    Raises ValueError with the reason for a file routing cannot send; pydicom may raise
    other errors on a damaged file, which `scan` reports as unreadable.
    """
    with open(os.path.join(root, relpath), "rb") as fh:
        head = fh.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise ValueError("not a DICOM file (no DICM preamble)")
        fh.seek(0)
        wanted = [Tag(t) for t in _NEEDED] + [Tag(int(t, 16)) for t in tags]
        ds = dcmread(fh, stop_before_pixels=True, specific_tags=wanted)
    ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    if not ts:
        raise ValueError("DICOM file without a transfer syntax in its file meta")
    if not sop_class or not sop_instance:
        raise ValueError("DICOM file without SOPClassUID or SOPInstanceUID")
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise ValueError("a DICOMDIR (a media directory, not an instance)")
    for name, uid in (("transfer syntax", ts), ("SOPClassUID", sop_class)):
        if not UID(str(uid)).is_valid:
            raise ValueError(f"invalid {name} {str(uid)[:70]!r}")
    if not UID(str(sop_instance)).is_valid:
        raise ValueError(f"invalid SOPInstanceUID {str(sop_instance)[:70]!r}")
    values = {}
    for tag in tags:
        elem = ds.get(Tag(int(tag, 16)))
        values[tag] = "" if elem is None else _text(elem.value)
    return DicomFile(
        root=root,
        relpath=relpath,
        sop_class_uid=sys.intern(str(sop_class)),
        sop_instance_uid=str(sop_instance),
        transfer_syntax_uid=sys.intern(str(ts)),
        values=values or NO_VALUES,
    )


def scan(job_dir: Path, directory: str, tags: Iterable[str] = ()) -> Scan:
    """Read the headers of every file under JOB/directory, at any depth."""
    root = job_dir / directory
    if not root.is_dir():
        return Scan(directory, (), (), note=f"{directory}/ does not exist in the job folder")
    tags = sorted(set(tags))
    job_root = str(job_dir)  # one string shared by every file of the job
    files: list[DicomFile] = []
    skipped: list[Skipped] = []
    seen_uids: dict[str, str] = {}
    for path, problem in _walk(root, job_dir):
        relpath = path.relative_to(job_dir).as_posix()
        if problem:
            skipped.append(Skipped(relpath, problem))
            continue
        try:
            dicom = read_header(job_root, relpath, tags)
        except Exception as exc:  # any unreadable file is skipped and counted, never fatal
            reason = str(exc) if isinstance(exc, ValueError) else f"unreadable: {exc}"
            skipped.append(Skipped(relpath, reason))
            continue
        first = seen_uids.setdefault(dicom.sop_instance_uid, relpath)
        if first != relpath:
            skipped.append(Skipped(relpath, f"same SOPInstanceUID as {first}"))
            continue
        files.append(dicom)
    return Scan(directory, tuple(files), tuple(skipped))


def _passes(file: DicomFile, which: Mapping[str, str]) -> str | None:
    """None if every tag matches, otherwise why not."""
    for tag, pattern in which.items():
        value = file.values.get(tag, "")
        if not fullmatch(pattern, value):
            return f"{tag_label(tag)} {value!r} does not match {pattern!r}"
    return None


def select(files: Sequence[DicomFile], which: Sequence[Mapping[str, str]] | None) -> Selection:
    """Files that satisfy at least one `which` object (all of them without `which`)."""
    if not which:
        return Selection(tuple(files))
    selected: list[DicomFile] = []
    excluded: list[tuple[DicomFile, str]] = []
    for file in files:
        reasons = []
        for i, entry in enumerate(which):
            reason = _passes(file, entry)
            if reason is None:
                selected.append(file)
                break
            reasons.append(f"which[{i}]: {reason}")
        else:
            excluded.append((file, "; ".join(reasons)))
    return Selection(tuple(selected), tuple(excluded))
