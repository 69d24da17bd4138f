"""The routing record: what was stored where, kept in the job folder (SPEC section 5).

`routing-record.jsonl` is append-only, one JSON object a line, flushed after every
instance, so a crash loses at most the instance in flight and a torn line is all a
kill can leave. It is what keeps a re-run (CLI, sweep, or a retry from the Prefect UI,
which re-executes the whole flow) from sending an instance twice.

`routing-status.json` is a small summary rewritten atomically at the end of each run so
that a sweep over thousands of jobs reads one small file per job instead of the record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.model import StoreResult, status_is_transient
from router.report import Delivery

RECORD = "routing-record.jsonl"
STATUS = "routing-status.json"
REPORT = "routing-report.json"

log = logging.getLogger(__name__)

State = Literal["routed", "failed", "invalid", "waiting"]


class RecordWriteError(OSError):
    """The record cannot be appended to (a full disk, a read-only folder): sending stops,
    since an instance stored without its line in the record could be sent twice."""

    def __str__(self) -> str:
        return str(self.strerror)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Status:
    """The outcome of the job's last routing run."""

    state: State
    runs: int
    consecutive_failures: int
    updated: str
    reason: str | None = None
    given_up: bool = False
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per destination key, over the job's runs: last_success, last_failure, failure
    (its reason), stored (instances stored, by UTC day, the last two days): what
    `dicom-router status` sums over a site without reading any record."""


DAYS_KEPT = 2


def merge_destinations(
    previous: dict[str, dict[str, Any]], deliveries: Iterable[Delivery], when: str
) -> dict[str, dict[str, Any]]:
    """The job's per-destination account after a run that made `deliveries`."""
    merged = {key: dict(value) for key, value in previous.items()}
    day = when[:10]
    for d in deliveries:
        if not d.key:
            continue
        entry = merged.setdefault(d.key, {})
        if d.ok:
            entry["last_success"] = when
        else:
            entry["last_failure"] = when
            entry["failure"] = d.error
        stored = dict(entry.get("stored") or {})
        if d.stored:
            stored[day] = stored.get(day, 0) + d.stored
        entry["stored"] = {k: stored[k] for k in sorted(stored)[-DAYS_KEPT:]}
    return merged


class _StatusFile(BaseModel):
    """`routing-status.json` as read: a job file, so checked at the edge. Unknown keys
    (written by a newer router) are ignored; wrong types make the file unreadable."""

    model_config = ConfigDict(extra="ignore", strict=True)

    state: State
    runs: int = Field(ge=0)
    consecutive_failures: int = Field(ge=0)
    updated: str
    reason: str | None = None
    given_up: bool = False
    destinations: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("updated")
    @classmethod
    def _a_time(cls, value: str) -> str:
        datetime.fromisoformat(value)  # sweeps compute the next try from it
        return value


def read_status(job_dir: Path) -> Status | None:
    """The summary, or None when the job was never routed (or the summary is unreadable).

    Unreadable (not JSON, wrong shape or types) is logged and treated as never routed:
    routing the job again is safe, since the record keeps what was stored.
    """
    path = job_dir / STATUS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Status(**_StatusFile.model_validate(data).model_dump())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in exc.errors()
        )
        log.warning("%s: unreadable routing status, treated as never routed: %s", path, problems)
        return None
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        log.warning("%s: unreadable routing status, treated as never routed: %s", path, exc)
        return None


def write_status(job_dir: Path, status: Status) -> None:
    _replace(job_dir / STATUS, asdict(status))


def write_report(job_dir: Path, report: Mapping[str, Any]) -> None:
    """The last routing run's report (`JobReport.to_dict()`), beside its status: what a
    person reads in the job folder without Prefect, and what `dicom-router route` prints
    when a routing worker ran the job for it."""
    _replace(job_dir / REPORT, report)


def read_report(job_dir: Path) -> dict[str, Any] | None:
    """The last run's report as written, or None (never routed, or unreadable)."""
    try:
        data = json.loads((job_dir / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("%s: unreadable routing report: %s", job_dir / REPORT, exc)
        return None
    return data if isinstance(data, dict) else None


def _replace(path: Path, data: Mapping[str, Any]) -> None:
    """Write `path` whole or not at all: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def update_status(
    job_dir: Path,
    state: State,
    reason: str | None,
    *,
    counts: bool,
    deliveries: Iterable[Delivery] = (),
) -> Status:
    """Write the job's new status after a run that ended in `state`.

    `counts`: the run was a routing attempt (runs + 1; a failure adds to the consecutive
    failures that sweeps back off on and give up after). An invalid or waiting job keeps
    its counts.
    """
    previous = read_status(job_dir)
    runs = previous.runs if previous else 0
    failures = previous.consecutive_failures if previous else 0
    if counts:
        runs += 1
        failures = 0 if state == "routed" else failures + 1
    when = now()
    destinations = merge_destinations(previous.destinations if previous else {}, deliveries, when)
    status = Status(state, runs, failures, when, reason, destinations=destinations)
    write_status(job_dir, status)
    return status


def check_writable(job_dir: Path) -> None:
    """Raise OSError unless this process can keep the job's record and status.

    Tried for real (a file created and removed), not with os.access: that is what the
    status and the record need, and it also holds on read-only mounts and for root.
    """
    probe = job_dir / f".routing-probe.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.unlink(probe)
    record = job_dir / RECORD
    if record.exists():
        os.close(os.open(record, os.O_WRONLY | os.O_APPEND))


class Record:
    """The job's ledger, loaded once per run and appended to as instances are stored."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self.path = job_dir / RECORD
        # dest key -> SOPInstanceUID -> run id in which it was stored
        self._stored: dict[str, dict[str, str]] = {}
        # dest key -> SOPInstanceUIDs sent without an answer and not stored since
        self._unanswered: dict[str, set[str]] = {}
        # This run's answers (what retries within the run decide on; a new run starts
        # afresh): dest key -> SOPInstanceUID -> its last answer,
        self._answers: dict[str, dict[str, StoreResult]] = {}
        # -> (send, association) -> instances stored over that association,
        self._stored_over: dict[str, Counter[tuple[int, str]]] = {}
        # -> SOPInstanceUID -> (send, association) of each 0xA7xx refusal of it.
        self._busy: dict[str, dict[str, list[tuple[int, str | None]]]] = {}
        self._sends = 0
        self.run_id: str | None = None
        self._torn_tail = False
        self._load()

    def _load(self) -> None:
        """Read whatever a crash, a full disk or another version of the router left.

        A line that is not a JSON object (torn by a kill, or garbage) is skipped with a
        warning, wherever it is; unknown fields and events are ignored; a store line
        without the fields it needs is skipped with a warning.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        self._torn_tail = bool(raw) and not raw.endswith(b"\n")
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                log.warning("%s: line %d is torn or not JSON; skipped", self.path, number)
                continue
            if not isinstance(entry, dict):
                log.warning("%s: line %d is not a JSON object; skipped", self.path, number)
                continue
            if entry.get("event") != "store":
                continue
            dest, sop, run = entry.get("dest"), entry.get("sop"), entry.get("run")
            stored, status = entry.get("stored"), entry.get("status")
            if not (
                isinstance(dest, str)
                and isinstance(sop, str)
                and isinstance(stored, bool)
                and (status is None or (isinstance(status, int) and not isinstance(status, bool)))
            ):
                log.warning(
                    "%s: line %d is a store line without dest, sop, stored or status; skipped",
                    self.path,
                    number,
                )
                continue
            self._apply(dest, sop, run if isinstance(run, str) else "", stored, status)

    def _apply(self, dest: str, sop: str, run: str, stored: bool, status: int | None) -> None:
        if stored:
            self._stored.setdefault(dest, {})[sop] = run
            self._unanswered.get(dest, set()).discard(sop)
        elif status is None and sop not in self._stored.get(dest, {}):
            self._unanswered.setdefault(dest, set()).add(sop)

    def begin(self, *, forced: bool, origin: str, rules: Mapping[str, str] | None = None) -> str:
        self.run_id = uuid.uuid4().hex[:12]
        try:
            self._fh = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise RecordWriteError(
                exc.errno, f"cannot write the routing record {self.path}: {exc.strerror or exc}"
            ) from exc
        if self._torn_tail:  # end the fragment a kill left, so our first line stands alone
            self._raw_write("\n")
        run: dict[str, Any] = {"event": "run", "forced": forced, "origin": origin}
        run["pid"] = os.getpid()
        if rules:
            run["rules"] = dict(rules)
        self._write(run)
        return self.run_id

    def _write(self, entry: dict[str, Any]) -> None:
        entry = {"time": now(), "run": self.run_id, **entry}
        self._raw_write(json.dumps(entry, separators=(",", ":")) + "\n")

    def _raw_write(self, text: str) -> None:
        try:
            self._fh.write(text)
            self._fh.flush()
        except OSError as exc:
            # What did not reach the disk may sit in the buffer: drop it, so that a later
            # flush cannot write half a line, and say why sending must stop.
            with contextlib.suppress(OSError):
                self._fh.close()
            raise RecordWriteError(
                exc.errno, f"cannot write the routing record {self.path}: {exc.strerror or exc}"
            ) from exc

    def stored_at(self, dest: str, *, this_run_only: bool = False) -> set[str]:
        """SOPInstanceUIDs the record shows as stored at `dest` (by this run only, if asked)."""
        runs = self._stored.get(dest, {})
        if this_run_only:
            return {sop for sop, run in runs.items() if run == self.run_id}
        return set(runs)

    def unanswered_at(self, dest: str) -> set[str]:
        """Sent without an answer: the peer may hold them, so a resend is a possible duplicate."""
        return set(self._unanswered.get(dest, ()))

    def answer(self, dest: str, sop: str) -> StoreResult | None:
        """The last answer (or its absence) recorded for `sop` at `dest` in this run."""
        return self._answers.get(dest, {}).get(sop)

    def failed_for_good(self, dest: str) -> set[str]:
        """Instances whose last answer in this run says no retry in it would store them."""
        return {sop for sop, r in self._answers.get(dest, {}).items() if r.final}

    def new_send(self) -> int:
        """Number one attempt at one destination (ascending over the whole run: two entries
        of a job may send to one destination), for `store` and `busy_refusals`."""
        self._sends += 1
        return self._sends

    def busy_refusals(self, dest: str, sop: str, before: int) -> list[bool]:
        """For each 0xA7xx (out of resources) refusal of `sop` at `dest` in this run's sends
        before `before` (`new_send`): whether the destination stored other instances over
        the same association, i.e. had the resources, just not for this one."""
        stored = self._stored_over.get(dest, Counter())
        return [
            association is not None and stored[(send, association)] > 0
            for send, association in self._busy.get(dest, {}).get(sop, [])
            if send < before
        ]

    def store(self, dest: str, result: StoreResult, attempt: int, send: int = 0) -> None:
        """Record one answer (or its absence) as soon as it is known; `send` as given by
        `new_send` for the attempt that got it."""
        sop = result.file.sop_instance_uid
        entry: dict[str, Any] = {
            "event": "store",
            "dest": dest,
            "sop": sop,
            "file": result.file.relpath,
            "status": result.status,
            "stored": result.stored,
            "attempt": attempt,
        }
        if result.error:
            entry["error"] = result.error
        if result.permanent:
            entry["permanent"] = True
        if result.converted_from:
            entry["converted_from"] = result.converted_from
            entry["converted_to"] = result.converted_to
        if result.association is not None:
            entry["association"] = result.association
        if sop in self._unanswered.get(dest, ()):
            entry["possible_duplicate"] = True
        self._write(entry)
        self._apply(dest, sop, self.run_id or "", result.stored, result.status)
        self._answers.setdefault(dest, {})[sop] = result
        if result.stored and result.association is not None:
            self._stored_over.setdefault(dest, Counter())[(send, result.association)] += 1
        elif result.status is not None and status_is_transient(result.status):
            refusals = self._busy.setdefault(dest, {}).setdefault(sop, [])
            refusals.append((send, result.association))

    def not_sent(self, dest: str, relpath: str, reason: str, sop: str | None) -> None:
        """Record a file the entry would send that cannot go (unreadable or damaged)."""
        entry: dict[str, Any] = {"event": "not_sent", "dest": dest, "file": relpath}
        if sop:
            entry["sop"] = sop
        entry["error"] = reason
        self._write(entry)

    def end(
        self,
        state: State,
        reason: str | None,
        summary: Iterable[dict[str, Any]],
        deliveries: Iterable[Delivery] = (),
    ) -> Status:
        """Close the run: an `end` line, the file synced, the status summary replaced."""
        self._write({"event": "end", "state": state, "reason": reason, "entries": list(summary)})
        try:
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise RecordWriteError(
                exc.errno, f"cannot write the routing record {self.path}: {exc.strerror or exc}"
            ) from exc
        finally:
            self.close()
        return update_status(self.job_dir, state, reason, counts=True, deliveries=deliveries)

    def abandon(self, state: State, reason: str) -> None:
        """An `end` line for a run cut short, if the record still takes one."""
        fh = getattr(self, "_fh", None)
        if fh is None or fh.closed:
            return
        with contextlib.suppress(OSError):
            self._write({"event": "end", "state": state, "reason": reason, "entries": []})

    def close(self) -> None:
        """Close without an `end` line (the run was interrupted by an exception)."""
        fh = getattr(self, "_fh", None)
        if fh and not fh.closed:
            with contextlib.suppress(OSError):  # a full disk: what it lost, the loader skips
                fh.close()
