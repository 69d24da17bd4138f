"""Finding the jobs a sweep should route (SPEC section 6).

A sweep runs every few minutes over a folder that may hold tens of thousands of jobs,
almost all of them routed long ago. It therefore reads, per job, one directory listing and
at most the small `routing-status.json`; never the record or the DICOM files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from router.job import INFO, PROC
from router.record import STATUS, Status, read_status, write_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """When a failed job is tried again, and when the sweep gives up on it."""

    delay: float = 300.0
    """Seconds after the first failure."""
    factor: float = 2.0
    max_failures: int = 5
    """Consecutive failed runs after which the sweep stops trying (a user still can)."""

    def next_try(self, status: Status) -> datetime:
        wait = self.delay * self.factor ** max(0, status.consecutive_failures - 1)
        return _parse(status.updated) + timedelta(seconds=wait)


@dataclass
class SweepPlan:
    due: list[Path] = field(default_factory=list)
    """To route now: never routed, invalid but changed since, or failed and past backoff."""
    routed: int = 0
    waiting: list[Path] = field(default_factory=list)
    invalid: list[tuple[Path, str]] = field(default_factory=list)
    backing_off: list[tuple[Path, datetime]] = field(default_factory=list)
    given_up: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "due": len(self.due),
            "routed": self.routed,
            "waiting": len(self.waiting),
            "invalid": len(self.invalid),
            "backing_off": len(self.backing_off),
            "given_up": len(self.given_up),
        }


def _parse(stamp: str) -> datetime:
    moment = datetime.fromisoformat(stamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


JOB_MARKERS = frozenset({INFO, PROC, "INPUT", "OUTPUT"})
"""Names that make a folder a job folder: without info.json it is an invalid one."""


def find_jobs(root: Path) -> Iterator[tuple[Path, set[str]]]:
    """Every folder under `root` that holds info.json, proc.json, INPUT/ or OUTPUT/.

    Job folders are not descended into (their INPUT/OUTPUT trees can be large), and
    hidden folders are passed over.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = {e.name for e in entries}
        if names & JOB_MARKERS:
            yield Path(folder), names
            continue
        stack.extend(
            e.path
            for e in sorted(entries, key=lambda e: e.name, reverse=True)
            if _is_folder(e) and not e.name.startswith(".")
        )


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _changed_since(job: Path, status_path: Path) -> bool:
    """Was info.json or proc.json written after the status (an invalid job fixed)?"""
    try:
        stamp = status_path.stat().st_mtime
    except OSError:
        return True
    for name in (INFO, PROC):
        try:
            if (job / name).stat().st_mtime > stamp:
                return True
        except FileNotFoundError:
            continue
        except OSError:
            return True
    return False


NOT_WRITABLE = (
    "the job folder is not writable: routing keeps its record and status there; fix its permissions"
)


def _plan_one(plan: SweepPlan, job: Path, names: set[str], backoff: Backoff, now: datetime) -> None:
    if PROC not in names:
        plan.waiting.append(job)
        return
    status = read_status(job) if STATUS in names else None
    if status is not None and status.state == "routed":
        plan.routed += 1
        return
    if not os.access(job, os.W_OK | os.X_OK):
        plan.invalid.append((job, NOT_WRITABLE))
        return
    if status is None or status.state == "waiting":
        plan.due.append(job)
    elif status.state == "invalid":
        if _changed_since(job, job / STATUS):
            plan.due.append(job)
        else:
            plan.invalid.append((job, status.reason or "invalid"))
    elif status.given_up or status.consecutive_failures >= backoff.max_failures:
        plan.given_up.append((job, status.reason or "failed"))
    elif now >= backoff.next_try(status):
        plan.due.append(job)
    else:
        plan.backing_off.append((job, backoff.next_try(status)))


def plan_sweep(root: Path, backoff: Backoff, now: datetime | None = None) -> SweepPlan:
    """Sort every job under `root` by what a sweep does with it; nothing is written.

    One job that cannot be planned (an unexpected error) is routed, which records why,
    rather than stopping the sweep of all the others.
    """
    now = now or datetime.now(timezone.utc)
    plan = SweepPlan()
    for job, names in find_jobs(root):
        try:
            _plan_one(plan, job, names, backoff, now)
        except Exception:
            log.exception("%s: cannot tell what the sweep should do; routing it", job)
            plan.due.append(job)
    return plan


def mark_given_up(job: Path, backoff: Backoff) -> Status | None:
    """Record in the job's status that sweeps no longer try it, so the UI and logs say so."""
    status = read_status(job)
    if status is None or status.state != "failed" or status.given_up:
        return status
    if status.consecutive_failures < backoff.max_failures:
        return status
    given_up = replace(status, given_up=True)
    try:
        write_status(job, given_up)
    except OSError as exc:
        log.error("%s: cannot record that sweeps gave it up: %s", job, exc.strerror or exc)
    return given_up
