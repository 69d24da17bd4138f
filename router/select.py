"""Which files of a job a destination gets: scanning a folder and `which` filters.

A folder is scanned once per job: each file's header is read (never its pixel data)
for the UIDs that sending needs and the tags that the rules filter on, and its data set is
checked to read in its declared transfer syntax (`router.check`). What is not an instance
(not DICOM Part 10, a DICOMDIR, a link out of the job) is skipped with a reason; a DICOM
file that cannot be read or is damaged is *unsendable*: the entries that would select it
fail with its reason (SPEC section 1), and the other files still go.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from router import dimse
from router.check import Damaged, check_dataset
from router.config import tag_label
from router.model import NO_VALUES, DicomFile
from router.rules import fullmatch

_NEEDED = ("SOPClassUID", "SOPInstanceUID")

MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage: a DICOMDIR, the index of a CD, not an instance."""


@dataclass(frozen=True)
class Skipped:
    """A file that is not an instance to send (not DICOM, a DICOMDIR, a link not followed)."""

    relpath: str
    reason: str


@dataclass(frozen=True)
class Unsendable:
    """A file that should go but cannot: the entries that would select it fail.

    `permanent`: the file itself is damaged, so no retry helps; otherwise it cannot be
    read now (permissions, an I/O error) and the job is tried again later.
    """

    relpath: str
    reason: str
    permanent: bool
    values: Mapping[str, str] | None = None
    """Its values of the `which` tags, when they could be read; None: every entry may
    select it."""
    sop_instance_uid: str | None = None


class NotAnInstance(ValueError):
    """Not a file routing sends: skipped and counted, never a failure."""


class CannotSend(ValueError):
    """A DICOM file routing should send but cannot (see `Unsendable`)."""

    def __init__(
        self,
        reason: str,
        *,
        permanent: bool,
        values: Mapping[str, str] | None = None,
        sop_instance_uid: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.values = values
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class Scan:
    """The DICOM files of one job folder (OUTPUT or INPUT), sorted by path."""

    directory: str
    files: tuple[DicomFile, ...]
    skipped: tuple[Skipped, ...] = ()
    unsendable: tuple[Unsendable, ...] = ()
    note: str | None = None
    """Why the folder gave nothing, when it does not exist or is not followed."""


@dataclass(frozen=True)
class Selection:
    selected: tuple[DicomFile, ...]
    excluded: tuple[tuple[DicomFile, str], ...] = field(default_factory=tuple)
    """Files that passed no `which` entry, with the reason in words."""
    unsendable: tuple[Unsendable, ...] = ()
    """Files the entry would select (or may: their tags could not be read) that cannot go."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def resolved(path: Path) -> Path | str:
    """The path with links followed, or why it cannot be (a loop, an I/O error).

    `Path.resolve` raises RuntimeError on a link loop before Python 3.13, OSError after.
    """
    try:
        return path.resolve(strict=True)
    except RuntimeError:
        return "symbolic link loop"
    except FileNotFoundError:
        return "broken symbolic link"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot follow symbolic link: {_reason(exc)}"


def folder_outside(job_dir: Path, directory: str) -> str | None:
    """Why JOB/directory is not followed (a link leading out of the job), else None."""
    root = job_dir / directory
    if not root.is_symlink():
        return None
    target = resolved(root)
    if isinstance(target, str):
        return f"{directory} is a {target}: not followed"
    if not target.is_relative_to(job_dir.resolve()):
        return (
            f"{directory} is a symbolic link that leads outside the job folder "
            f"(to {target}): not followed"
        )
    return None


def _walk(root: Path, job_dir: Path) -> Iterator[tuple[Path, Skipped | Unsendable | None]]:
    """Yield (path, None) for regular files, (path, why) for what is skipped or unreadable.

    Links are followed only while they stay inside the job folder; a folder reached twice
    (a link loop) is walked once. A folder that cannot be listed is unreadable: the
    files in it should go.
    """
    job_real = job_dir.resolve()
    seen: set[Path] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = resolved(folder)
        rel = folder.relative_to(job_dir).as_posix()
        if isinstance(real, str):
            yield folder, Skipped(rel, real)
            continue
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            reason = f"cannot list folder {rel}: {_reason(exc)}"
            yield folder, Unsendable(rel, reason, permanent=False)
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            relpath = path.relative_to(job_dir).as_posix()
            try:
                if entry.is_symlink():
                    target = resolved(path)
                    if isinstance(target, str):
                        yield path, Skipped(relpath, target)
                        continue
                    if not target.is_relative_to(job_real):
                        reason = f"symbolic link leads outside the job folder (to {target})"
                        yield path, Skipped(relpath, reason)
                        continue
                if entry.is_dir():
                    subfolders.append(path)
                elif entry.is_file():
                    yield path, None
                else:
                    yield path, Skipped(relpath, "not a regular file (a device, pipe or socket)")
            except OSError as exc:
                yield path, Unsendable(relpath, f"cannot read: {_reason(exc)}", permanent=False)
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

    Raises NotAnInstance for a file that is not sent (not Part 10, a DICOMDIR) and
    CannotSend for one that should be but cannot: unreadable (OSError), or damaged (no
    UIDs, or a data set that does not read in its declared transfer syntax: `router.check`).
    """
    try:
        with open(os.path.join(root, relpath), "rb") as fh:
            head = fh.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                raise NotAnInstance("not a DICOM file (no DICM preamble)")
            fh.seek(0)
            try:
                meta = dimse.read_file_meta(fh)
            except ValueError as exc:
                raise CannotSend(f"damaged DICOM file: {exc}", permanent=True) from None
            if meta.sop_class_uid == MEDIA_DIRECTORY:
                raise NotAnInstance("a DICOMDIR (media directory), not an instance")
            damage = None
            try:
                check_dataset(fh, meta.offset, meta.transfer_syntax_uid)
            except Damaged as exc:
                damage = str(exc)
            fh.seek(0)
            try:
                wanted = [Tag(t) for t in _NEEDED] + [Tag(int(t, 16)) for t in tags]
                ds = dcmread(fh, stop_before_pixels=True, specific_tags=wanted)
            except OSError:
                raise
            except Exception as exc:  # pydicom raises many kinds on a damaged file
                raise CannotSend(
                    damage or f"damaged DICOM file: pydicom cannot read it: {exc}", permanent=True
                ) from None
    except OSError as exc:
        raise CannotSend(f"cannot read: {_reason(exc)}", permanent=False) from None
    ts = meta.transfer_syntax_uid
    sop_class = ds.get("SOPClassUID") or meta.sop_class_uid
    sop_instance = ds.get("SOPInstanceUID") or meta.sop_instance_uid
    values = {}
    for tag in tags:
        elem = ds.get(Tag(int(tag, 16)))
        values[tag] = "" if elem is None else _text(elem.value)
    problem = damage
    if not problem and (not sop_class or not sop_instance):
        problem = "damaged DICOM file: no SOPClassUID or SOPInstanceUID"
    if not problem:
        for name, uid in (
            ("transfer syntax", ts),
            ("SOPClassUID", sop_class),
            ("SOPInstanceUID", sop_instance),
        ):
            if not UID(str(uid)).is_valid:
                problem = f"damaged DICOM file: invalid {name} {str(uid)[:70]!r}"
                break
    if problem:
        raise CannotSend(
            problem,
            permanent=True,
            values=values or NO_VALUES,
            sop_instance_uid=str(sop_instance) if sop_instance else None,
        )
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
    outside = folder_outside(job_dir, directory)
    if outside:
        return Scan(directory, (), (Skipped(directory, outside),), note=outside)
    if not root.is_dir():
        return Scan(directory, (), (), note=f"{directory}/ does not exist in the job folder")
    tags = sorted(set(tags))
    job_root = str(job_dir)  # one string shared by every file of the job
    files: list[DicomFile] = []
    skipped: list[Skipped] = []
    unsendable: list[Unsendable] = []
    seen_uids: dict[str, str] = {}
    for path, problem in _walk(root, job_dir):
        if isinstance(problem, Skipped):
            skipped.append(problem)
            continue
        if isinstance(problem, Unsendable):
            unsendable.append(problem)
            continue
        relpath = path.relative_to(job_dir).as_posix()
        try:
            dicom = read_header(job_root, relpath, tags)
        except NotAnInstance as exc:
            skipped.append(Skipped(relpath, str(exc)))
            continue
        except CannotSend as exc:
            unsendable.append(
                Unsendable(relpath, exc.reason, exc.permanent, exc.values, exc.sop_instance_uid)
            )
            continue
        first = seen_uids.setdefault(dicom.sop_instance_uid, relpath)
        if first != relpath:
            skipped.append(Skipped(relpath, f"same SOPInstanceUID as {first}"))
            continue
        files.append(dicom)
    return Scan(directory, tuple(files), tuple(skipped), tuple(unsendable))


def _passes(file: DicomFile, which: Mapping[str, str]) -> str | None:
    """None if every tag matches, otherwise why not."""
    for tag, pattern in which.items():
        value = file.values.get(tag, "")
        if not fullmatch(pattern, value):
            return f"{tag_label(tag)} {value!r} does not match {pattern!r}"
    return None


def _would_select(file: Unsendable, which: Sequence[Mapping[str, str]] | None) -> bool:
    """Whether an entry would select an unsendable file; yes when its tags are unknown."""
    if not which or file.values is None:
        return True
    values = file.values
    return any(all(fullmatch(p, values.get(t, "")) for t, p in entry.items()) for entry in which)


def select(
    files: Sequence[DicomFile],
    which: Sequence[Mapping[str, str]] | None,
    unsendable: Sequence[Unsendable] = (),
) -> Selection:
    """Files that satisfy at least one `which` object (all of them without `which`), and the
    unsendable files that the entry would select."""
    failing = tuple(u for u in unsendable if _would_select(u, which))
    if not which:
        return Selection(tuple(files), (), failing)
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
    return Selection(tuple(selected), tuple(excluded), failing)
