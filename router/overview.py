"""The state of a whole site at a glance: `dicom-router status ROOT`, and the sweep's artifact.

Read-only and fast: per job folder one directory listing (the sweep's `find_jobs`) and at
most the small `routing-status.json`, never a record or a DICOM file. Per destination the
figures come from the jobs' status files, which keep each destination's last success,
last failure and instances stored by day (`router.record.merge_destinations`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from router.job import INFO, PROC
from router.record import STATUS, read_status
from router.sweep import Backoff, find_jobs

STATES = ("routed", "failed", "given_up", "waiting", "invalid", "never_tried")


@dataclass
class DestinationView:
    last_success: str | None = None
    last_failure: str | None = None
    failure: str | None = None
    """The reason of the last failure."""
    stored_today: int = 0


@dataclass
class Overview:
    root: str
    taken: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    oldest_unrouted: str | None = None
    """The job folder waiting longest for a successful routing (proc.json written)."""
    oldest_unrouted_age_seconds: float | None = None
    destinations: dict[str, DestinationView] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def site_overview(root: Path, backoff: Backoff, now: datetime | None = None) -> Overview:
    """Count the jobs under `root` by state and sum each destination's figures."""
    moment = now or datetime.now(timezone.utc)
    today = moment.date().isoformat()
    view = Overview(str(root), moment.isoformat(timespec="seconds"))
    oldest: tuple[float, Path] | None = None
    for job, names in find_jobs(root):
        status = read_status(job) if STATUS in names else None
        if PROC not in names:
            state = "waiting"
        elif status is None or status.state == "waiting":
            state = "never_tried" if INFO in names else "invalid"
        elif status.state == "failed" and (
            status.given_up or status.consecutive_failures >= backoff.max_failures
        ):
            state = "given_up"
        else:
            state = status.state
        view.counts[state] += 1
        if state not in ("routed", "waiting"):
            ready = _mtime(job / PROC)
            if ready is not None and (oldest is None or ready < oldest[0]):
                oldest = (ready, job)
        for key, figures in (status.destinations if status else {}).items():
            dest = view.destinations.setdefault(key, DestinationView())
            success, failure = figures.get("last_success"), figures.get("last_failure")
            if isinstance(success, str) and (dest.last_success or "") < success:
                dest.last_success = success
            if isinstance(failure, str) and (dest.last_failure or "") < failure:
                dest.last_failure, dest.failure = failure, figures.get("failure")
            stored = figures.get("stored")
            if isinstance(stored, dict) and isinstance(stored.get(today), int):
                dest.stored_today += stored[today]
    if oldest is not None:
        view.oldest_unrouted = str(oldest[1])
        view.oldest_unrouted_age_seconds = round(moment.timestamp() - oldest[0], 1)
    view.destinations = dict(sorted(view.destinations.items()))
    return view


def render(view: Overview) -> list[str]:
    """Plain text for a terminal or a log."""
    lines = [f"site {view.root} at {view.taken}"]
    lines.append(
        "  jobs: " + ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in view.counts.items())
    )
    if view.oldest_unrouted:
        age = view.oldest_unrouted_age_seconds or 0
        lines.append(f"  oldest not routed: {view.oldest_unrouted} ({_age(age)})")
    for key, dest in view.destinations.items():
        lines.append(
            f"  {key}: {dest.stored_today} stored today; last success {dest.last_success or '-'}"
        )
        if dest.last_failure:
            lines.append(f"    last failure {dest.last_failure}: {dest.failure}")
    return lines


def _age(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"
