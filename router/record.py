"""The routing record: what was stored where, kept in the job folder (SPEC section 5).

`routing-record.jsonl` is append-only, one JSON object a line, flushed after every
instance, so a crash loses at most the instance in flight and a torn last line is all a
kill can leave. It is what keeps a re-run (CLI, sweep, or a retry from the Prefect UI,
which re-executes the whole flow) from sending an instance twice.

`routing-status.json` is a small summary rewritten atomically at the end of each run so
that a sweep over thousands of jobs reads one small file per job instead of the record.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from router.model import StoreResult, status_is_transient

RECORD = "routing-record.jsonl"
STATUS = "routing-status.json"

log = logging.getLogger(__name__)

State = Literal["routed", "failed", "invalid"]


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


def read_status(job_dir: Path) -> Status | None:
    """The summary, or None when the job was never routed (or the summary is unreadable)."""
    path = job_dir / STATUS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Status(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable routing status, treated as never routed: %s", path, exc)
        return None


def write_status(job_dir: Path, status: Status) -> None:
    path = job_dir / STATUS
    tmp = path.with_name(f".{STATUS}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(status), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number >= len(lines) - 1:
                    log.warning("%s: last line is torn (an interrupted run); ignored", self.path)
                    continue
                raise ValueError(f"{self.path}: line {number} is not valid JSON") from None
            if entry.get("event") == "store":
                self._apply(
                    entry["dest"], entry["sop"], entry["run"], entry["stored"], entry["status"]
                )

    def _apply(self, dest: str, sop: str, run: str, stored: bool, status: int | None) -> None:
        if stored:
            self._stored.setdefault(dest, {})[sop] = run
            self._unanswered.get(dest, set()).discard(sop)
        elif status is None and sop not in self._stored.get(dest, {}):
            self._unanswered.setdefault(dest, set()).add(sop)

    def begin(self, *, forced: bool, origin: str) -> str:
        self.run_id = uuid.uuid4().hex[:12]
        self._fh = self.path.open("a", encoding="utf-8")
        self._write({"event": "run", "forced": forced, "origin": origin, "pid": os.getpid()})
        return self.run_id

    def _write(self, entry: dict[str, Any]) -> None:
        entry = {"time": now(), "run": self.run_id, **entry}
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._fh.flush()

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

    def end(self, state: State, reason: str | None, summary: Iterable[dict[str, Any]]) -> Status:
        """Close the run: an `end` line, the file synced, the status summary replaced."""
        self._write({"event": "end", "state": state, "reason": reason, "entries": list(summary)})
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        previous = read_status(self.job_dir)
        runs = (previous.runs if previous else 0) + 1
        failures = (
            0 if state == "routed" else (previous.consecutive_failures if previous else 0) + 1
        )
        status = Status(state, runs, failures, now(), reason)
        write_status(self.job_dir, status)
        return status

    def close(self) -> None:
        """Close without an `end` line (the run was interrupted by an exception)."""
        fh = getattr(self, "_fh", None)
        if fh and not fh.closed:
            fh.flush()
            fh.close()
