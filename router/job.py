"""The job folder: info.json, proc.json, INPUT/ and OUTPUT/ (SPEC section 1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

INFO = "info.json"
PROC = "proc.json"


class JobError(Exception):
    """Base of the reasons a job cannot be routed now."""


class JobWaiting(JobError):
    """No proc.json yet: the computation has not finished."""


class JobFailed(JobError):
    """The run ended outside the rules' account (a full disk, a bug); `reason` says how."""

    def __init__(self, job_dir: Path, reason: str) -> None:
        super().__init__(f"{job_dir}: routing failed: {reason}")
        self.job_dir = job_dir
        self.reason = reason


class JobRefused(JobError):
    """A job folder outside the configured jobs roots: refused before any file is read.

    Not a state of a job (the folder may be anything, so nothing is written into it):
    the refusal is logged with the origin of the request.
    """

    def __init__(self, job_dir: Path, reason: str, origin: str) -> None:
        super().__init__(f"{job_dir}: refused: {reason}")
        self.job_dir = job_dir
        self.reason = reason
        self.origin = origin


def under_roots(path: Path, roots: list[Path], *, root_itself: bool = False) -> bool:
    """Whether `path`, with links followed and `..` resolved, lies under one of `roots`."""
    real = path.resolve()
    for root in roots:
        top = root.resolve()
        if real.is_relative_to(top) and (root_itself or real != top):
            return True
    return False


def check_job_dir(job_dir: Path, roots: list[Path], origin: str) -> None:
    """Raise JobRefused unless `job_dir` lies under a jobs root (no roots: any folder)."""
    if not roots:
        return
    try:
        inside = under_roots(job_dir, roots)
    except (OSError, RuntimeError) as exc:  # a link loop, an unreadable path
        raise JobRefused(job_dir, f"cannot resolve it: {exc}", origin) from None
    if not inside:
        listed = ", ".join(str(r) for r in roots)
        raise JobRefused(
            job_dir,
            f"it is not under the jobs root ({listed}; DICOM_ROUTER_JOBS_ROOT) once links "
            f"are followed (it is {job_dir.resolve()})",
            origin,
        )


class JobInvalid(JobError):
    """A job file is missing or malformed; `file` names it."""

    def __init__(self, file: Path, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


def clean_aet(value: str) -> str:
    """Older writers wrapped AE titles in literal quotes: `"\\"PACS\\" "` → `PACS`."""
    return value.strip().strip('"').strip()


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")

    AETitleCalled: str
    AETitleCaller: str
    CallerIP: str | None = None
    received: str | None = None

    @field_validator("AETitleCalled", "AETitleCaller")
    @classmethod
    def _clean(cls, value: str) -> str:
        return clean_aet(value)

    @field_validator("CallerIP", "received", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return None if value is None else clean_aet(str(value))


class ProcEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    success: str
    message: str = ""

    @field_validator("message", mode="before")
    @classmethod
    def _message_text(cls, value: Any) -> str:
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Job:
    path: Path
    called: str
    caller: str
    caller_ip: str | None
    received: str | None
    success: str
    message: str
    proc: tuple[dict[str, Any], ...]
    """Every proc.json entry as written: only the first decides routing."""

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobInvalid(path, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise JobInvalid(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobInvalid(
            path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise JobInvalid(path, "not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise JobInvalid(path, f"not valid JSON: {exc}") from None


def _problems(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = "missing" if err["type"] == "missing" else err["msg"]
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def read_info(job_dir: Path) -> Info:
    path = job_dir / INFO
    if not path.is_file():
        raise JobInvalid(path, "missing: every job folder needs info.json")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise JobInvalid(path, f"must be a JSON object, got {type(data).__name__}")
    try:
        return Info.model_validate(data)
    except ValidationError as exc:
        raise JobInvalid(path, _problems(exc)) from None


def read_proc(job_dir: Path) -> list[ProcEntry]:
    path = job_dir / PROC
    if not path.exists():
        raise JobWaiting(f"{job_dir}: no {PROC} yet, the computation has not finished")
    data = _read_json(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise JobInvalid(path, f"must be a list of objects, got {type(data).__name__}")
    if not data:
        raise JobInvalid(path, "is an empty list: the first entry decides routing")
    entries = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise JobInvalid(path, f"entry {i} must be an object, got {type(raw).__name__}")
        try:
            entries.append(ProcEntry.model_validate(raw))
        except ValidationError as exc:
            raise JobInvalid(path, f"entry {i}: {_problems(exc)}") from None
    return entries


def load_job(job_dir: Path | str) -> Job:
    """Read a job folder; raises JobWaiting or JobInvalid with the file and problem."""
    path = Path(job_dir).absolute()
    if not path.is_dir():
        raise JobInvalid(path, "not a job folder (no such directory)")
    info = read_info(path)
    proc = read_proc(path)
    return Job(
        path=path,
        called=info.AETitleCalled,
        caller=info.AETitleCaller,
        caller_ip=info.CallerIP,
        received=info.received,
        success=proc[0].success,
        message=proc[0].message,
        proc=tuple(p.model_dump() for p in proc),
    )
