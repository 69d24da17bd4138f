"""Routing a job: rules in order, send entries with break and fail-back (SPEC section 4).

`route_rules` holds the semantics once. It calls its steps (scan a folder, select files,
deliver to a destination) through a `Steps` object, so that the plain path (`LocalSteps`,
used by tests and by anything that runs without Prefect) and the Prefect flow (which
wraps each step in a task) run the very same branching.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from router import allowlist, observe, routing_log
from router.config import RoutingConfig, RuleSpec, SendEntry
from router.error_report import find_reference, report_path, write_error_report
from router.job import (
    PROC,
    Job,
    JobError,
    JobFailed,
    JobInvalid,
    JobRefused,
    JobWaiting,
    check_job_dir,
    load_job,
)
from router.lock import JobLocked, job_lock
from router.model import (
    AnyEndpoint,
    DicomFile,
    SendError,
    StopRun,
    StoreResult,
    status_is_transient,
)
from router.record import (
    REPORT,
    Record,
    RecordWriteError,
    State,
    Status,
    check_writable,
    now,
    update_status,
    write_report,
)
from router.report import Delivery, EntryOutcome, JobReport, RuleOutcome
from router.rules import RuleMatch, fullmatch, match_rules
from router.select import Scan, Selection, Unsendable, read_header, scan, select
from router.settings import Settings
from router.transport import send_files

Progress = Callable[[str, int, int], None]
"""(destination, files answered so far, files to send) after each answer."""

_MAX_LISTED_FAILURES = 20

log = logging.getLogger(__name__)

_progress: ContextVar[Progress | None] = ContextVar("router_progress", default=None)


def current_progress() -> Progress | None:
    return _progress.get()


@contextmanager
def reporting_progress(callback: Progress | None) -> Iterator[None]:
    """Report send progress to `callback` for sends started in this context (a terminal)."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


class Steps(Protocol):
    job: Job
    settings: Settings

    def endpoint(self, entry: SendEntry) -> AnyEndpoint: ...
    def error_report(self) -> DicomFile | None: ...
    def scan(self, directory: str) -> Scan: ...
    def select(self, rule: RuleSpec, entry: SendEntry, scan: Scan) -> Selection: ...
    def deliver(
        self,
        rule: RuleSpec,
        entry: SendEntry,
        endpoint: AnyEndpoint,
        files: Sequence[DicomFile],
        unsendable: Sequence[Unsendable] = (),
    ) -> Delivery: ...


def scan_tags(config: RoutingConfig, directory: str) -> set[str]:
    """Every tag any rule filters on in `directory`: one header read per file per job."""
    return {
        tag
        for spec in config.rules
        if spec.rule.RouteDirectory == directory
        for tag in spec.uses_tags()
    }


# --- delivering to one destination ------------------------------------------------------


@dataclass
class Attempt:
    """One attempt at sending what the record says is still missing."""

    number: int = 0
    """1 for the first attempt; 0 when nothing was missing and nothing was sent."""
    failures: dict[str, StoreResult] = field(default_factory=dict)
    error: SendError | None = None
    sent: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and self.error is None

    @property
    def transient(self) -> bool:
        """Whether another attempt may store what this one did not: the destination
        failed for a transient reason, or a file did (no answer, 0xA7xx) not for good."""
        if self.error is not None and self.error.transient:
            return True
        return any(not r.final for r in self.failures.values())

    def reason(self) -> str | None:
        if self.error is not None:
            return self.error.reason
        if not self.failures:
            return None
        first = next(iter(self.failures.values()))
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return f"{len(self.failures)} not stored: {first.file.relpath}: {first.error}{more}"


def missing(
    record: Record, endpoint: AnyEndpoint, files: Sequence[DicomFile], force: bool
) -> list[DicomFile]:
    """What still has to go: all but what the record shows stored (by this run, if forced)."""
    done = record.stored_at(endpoint.key, this_run_only=force)
    return [f for f in files if f.sop_instance_uid not in done]


def to_send(
    record: Record, endpoint: AnyEndpoint, files: Sequence[DicomFile], force: bool
) -> list[DicomFile]:
    """What an attempt sends: what is missing, less what failed for good in this run."""
    given_up = record.failed_for_good(endpoint.key)
    return [
        f for f in missing(record, endpoint, files, force) if f.sop_instance_uid not in given_up
    ]


def judged(record: Record, dest: str, result: StoreResult, send: int) -> StoreResult:
    """`result`, counted as the file's own refusal when it says so.

    A 0xA7xx (out of resources) refusal is retried as a transient failure of the
    destination, unless the destination refused this file so on an earlier attempt of this
    run and then stored another file over the same association: it has the resources,
    just not for this file (Orthanc refusing a codec it lacks). The file then fails alone,
    like a permanent refusal; a destination that refuses everything is still retried.
    Decided from the record, so the Prefect task's retries decide the same.
    """
    if result.stored or result.permanent or result.status is None:
        return result
    if not status_is_transient(result.status):
        return result
    earlier = record.busy_refusals(dest, result.file.sop_instance_uid, send)
    if not any(earlier):
        return result
    why = (
        f"{result.error}; refused so on {len(earlier) + 1} attempts, while the destination "
        "stored other files over the same association: counted as refused, not retried"
    )
    return replace(result, error=why, permanent=True)


def attempt_once(
    record: Record,
    endpoint: AnyEndpoint,
    files: Sequence[DicomFile],
    settings: Settings,
    attempt: int,
    force: bool,
    progress: Progress | None = None,
) -> Attempt:
    """Send what is missing once; every answer is in the record before this returns.

    Files that failed for good earlier in this run (refused permanently, ended an
    association twice, refused as above) are not sent again: they stay failed.
    """
    todo = to_send(record, endpoint, files, force)
    result = Attempt()
    if not todo:
        return result
    result.number = attempt
    send = record.new_send()
    answered: set[str] = set()  # a file put aside is answered twice

    def on_result(r: StoreResult) -> None:
        r = judged(record, endpoint.key, r, send)
        record.store(endpoint.key, r, attempt, send)
        answered.add(r.file.sop_instance_uid)
        if r.stored:
            result.failures.pop(r.file.sop_instance_uid, None)
        else:
            result.failures[r.file.sop_instance_uid] = r
            if r.final:
                routing_log.file_failed(record.job_dir, endpoint, r, attempt)
        if progress:
            progress(endpoint.key, len(answered), len(todo))

    try:
        send_files(endpoint, todo, settings.timeouts(), on_result)
    except SendError as exc:
        result.error = exc
    result.sent = len(answered)
    return result


def summarize(
    record: Record,
    endpoint: AnyEndpoint,
    files: Sequence[DicomFile],
    done_before: set[str],
    attempts: int,
    seconds: float,
    last: Attempt | None,
    force: bool,
    unsendable: Sequence[Unsendable] = (),
) -> Delivery:
    """The entry's delivery as the record tells it after the last attempt.

    `done_before`: what counted as there when the entry began (`already_there`); an
    instance an earlier entry of this run stored counts as already there, not as stored
    again. Unsendable files are failures of the entry, listed first. Each file not stored
    is listed with its last answer in this run (a file that failed for good on an earlier
    attempt keeps its own reason); one never answered gets the reason the last attempt
    ended with.
    """
    uids = {f.sop_instance_uid for f in files}
    stored_now = record.stored_at(endpoint.key, this_run_only=True) - done_before
    left = missing(record, endpoint, files, force)
    ended = last.error.reason if last and last.error else None
    failures: list[dict[str, Any]] = [
        {"file": u.relpath, "status": None, "reason": u.reason}
        for u in unsendable[:_MAX_LISTED_FAILURES]
    ]
    own: list[tuple[DicomFile, str]] = []  # files with a reason of their own
    for f in left:
        answer = record.answer(endpoint.key, f.sop_instance_uid)
        reason = (answer.error if answer else None) or ended or "not sent"
        if answer is not None and answer.error and answer.error != ended:
            own.append((f, answer.error))
        if len(failures) < _MAX_LISTED_FAILURES:
            status = None if answer is None or answer.status is None else answer.status
            failures.append(
                {
                    "file": f.relpath,
                    "status": None if status is None else f"0x{status:04X}",
                    "reason": reason,
                }
            )
    parts = []
    if unsendable:
        first_u = unsendable[0]
        more_u = f" (and {len(unsendable) - 1} more)" if len(unsendable) > 1 else ""
        parts.append(
            f"{len(unsendable)} cannot be sent: {first_u.relpath}: {first_u.reason}{more_u}"
        )
    if left:
        if ended:
            parts.append(ended)
        if own:
            (first, why), more = own[0], len(own) - 1
            others = f" (and {more} more)" if more else ""
            parts.append(f"{len(own)} not stored: {first.relpath}: {why}{others}")
        if not ended and not own:
            parts.append(f"{len(left)} not stored")
    sent_bytes = 0
    for f in files:
        if f.sop_instance_uid in stored_now:
            with contextlib.suppress(OSError):
                sent_bytes += os.stat(f.path).st_size
    return Delivery(
        destination=str(endpoint),
        key=endpoint.key,
        bytes=sent_bytes,
        selected=len(files) + len(unsendable),
        already=len(uids & done_before),
        stored=len(stored_now & uids),
        failed=len(left) + len(unsendable),
        attempts=attempts,
        seconds=seconds,
        error="; ".join(parts) or None,
        transient=bool(left and last and last.transient)
        and not any(u.permanent for u in unsendable),
        failures=failures,
    )


def already_there(
    record: Record, endpoint: AnyEndpoint, files: Sequence[DicomFile], force: bool
) -> set[str]:
    """The selected instances that count as delivered before an entry sends anything."""
    done = record.stored_at(endpoint.key, this_run_only=force)
    return {f.sop_instance_uid for f in files} & done


def note_unsendable(
    record: Record, endpoint: AnyEndpoint, unsendable: Sequence[Unsendable]
) -> None:
    for u in unsendable:
        record.not_sent(endpoint.key, u.relpath, u.reason, u.sop_instance_uid)


def deliver_with_retries(
    record: Record,
    endpoint: AnyEndpoint,
    files: Sequence[DicomFile],
    settings: Settings,
    force: bool,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    unsendable: Sequence[Unsendable] = (),
) -> Delivery:
    """Attempt, and retry transient failures with backoff; permanent ones fail at once.

    A retry sends what is still missing and may still be stored (`attempt_once`).
    """
    done_before = already_there(record, endpoint, files, force)
    note_unsendable(record, endpoint, unsendable)
    delays = settings.retry_delays()
    start = time.monotonic()
    last: Attempt | None = None
    attempts = 0
    for attempt in range(1, len(delays) + 2):
        if not to_send(record, endpoint, files, force):
            break
        attempts = attempt
        last = attempt_once(record, endpoint, files, settings, attempt, force, progress)
        if last.ok or not last.transient or attempt > len(delays):
            break
        routing_log.retry(record.job_dir, endpoint, attempt, delays[attempt - 1], last.reason())
        sleep(delays[attempt - 1])
    seconds = time.monotonic() - start
    return summarize(
        record, endpoint, files, done_before, attempts, seconds, last, force, unsendable
    )


# --- the rules ------------------------------------------------------------------------------


@dataclass
class Routing:
    rules: list[RuleOutcome] = field(default_factory=list)
    not_evaluated_rules: list[int] = field(default_factory=list)
    """Rules left after a rule with break: 1 succeeded."""
    scans: dict[str, Scan] = field(default_factory=dict)

    def skipped_files(self) -> dict[str, list[dict[str, str]]]:
        return {
            d: [{"file": s.relpath, "reason": s.reason} for s in scan.skipped]
            for d, scan in self.scans.items()
            if scan.skipped
        }


def route_rules(matches: Sequence[RuleMatch], steps: Steps) -> Routing:
    """Route every applying rule in order until a rule with break: 1 succeeds.

    A step that raises (a bug, or a file system error other than the record's) fails the
    entries it concerns, with the error as their reason, and routing goes on with the
    next entry (the fail-back) and the next rule: one broken step never blocks the
    others. A record that cannot be written stops the run (`RecordWriteError`).
    """
    routing = Routing()
    outcomes = routing.rules
    scans = routing.scans
    for position, match in enumerate(matches):
        spec = match.spec
        outcome = RuleOutcome(
            index=spec.index,
            name=spec.name,
            applied=match.applies,
            why_not=match.why_not,
            directory=spec.rule.RouteDirectory,
            not_matching=[e.entry.index for e in match.entries if not e.matches],
        )
        outcomes.append(outcome)
        if not match.applies:
            continue
        directory = spec.rule.RouteDirectory
        broken: str | None = None  # why no entry of this rule can be evaluated
        try:
            if directory not in scans:
                scans[directory] = steps.scan(directory)
            report = steps.error_report() if spec.rule.error_report else None
        except (RecordWriteError, StopRun):
            raise
        except Exception as exc:
            broken = _step_failed(f"scanning {directory}/ of the job", exc)
            report = None
        folder = scans.get(directory, Scan(directory, ()))
        matching = match.matching
        for n, entry in enumerate(matching):
            dest = entry.destination
            result = EntryOutcome(
                index=entry.index,
                pattern=entry.pattern,
                destination=dest.label,
                break_=dest.break_,
                state="failed",
                reason=broken,
            )
            outcome.entries.append(result)
            if broken:
                routing_log.entry_failed(steps.job, spec, entry, result.destination, broken)
                continue
            try:
                if _route_entry(steps, spec, entry, folder, report, result):
                    outcome.not_evaluated = [e.index for e in matching[n + 1 :]]
                    break
            except (RecordWriteError, StopRun):
                raise
            except Exception as exc:
                result.state = "failed"
                result.reason = _step_failed(f"sending to {result.destination}", exc)
                routing_log.entry_failed(steps.job, spec, entry, result.destination, result.reason)
        _mark_covered(outcome.entries)
        if outcome.succeeded and spec.rule.break_:
            outcome.stopped_later_rules = True
            routing.not_evaluated_rules = [m.spec.index for m in matches[position + 1 :]]
            break
    return routing


def _route_entry(
    steps: Steps,
    spec: RuleSpec,
    entry: SendEntry,
    folder: Scan,
    report: DicomFile | None,
    result: EntryOutcome,
) -> bool:
    """Select and deliver one entry into `result`; True when routing stops (break: 1)."""
    endpoint = steps.endpoint(entry)
    result.destination = str(endpoint)
    refusal = allowlist.refusal(steps.settings.allowlist, endpoint)
    if refusal:  # before anything is read for it: nothing goes there
        result.reason = refusal
        result.delivery = Delivery(
            destination=str(endpoint), selected=0, key=endpoint.key, error=refusal
        )
        routing_log.entry(steps.job, spec, entry, result.delivery)
        return False
    selection = steps.select(spec, entry, folder)
    if report is not None:  # goes with the results, whatever `which` selects
        selection = replace(selection, selected=(*selection.selected, report))
    result.selected = len(selection.selected) + len(selection.unsendable)
    result.excluded = len(selection.excluded)
    if not selection.selected and not selection.unsendable:
        result.state = "skipped"
        result.reason = folder.note or (
            "no file passes the which filter" if selection.excluded else "no DICOM files"
        )
        return False
    delivery = steps.deliver(spec, entry, endpoint, selection.selected, selection.unsendable)
    result.delivery = delivery
    result.state = "succeeded" if delivery.ok else "failed"
    result.reason = delivery.error
    return delivery.ok and entry.destination.break_


def _step_failed(doing: str, exc: Exception) -> str:
    """The reason an unexpected error gives an entry; its traceback goes to the log."""
    if isinstance(exc, OSError):
        text = f"{doing} failed: {exc.strerror or exc}" + (
            f": {exc.filename}" if exc.filename else ""
        )
        log.error("%s", text, exc_info=exc)
        return text
    log.error("internal error while %s", doing, exc_info=exc)
    return f"internal error while {doing}: {type(exc).__name__}: {exc} (a bug; see the log)"


def _mark_covered(entries: list[EntryOutcome]) -> None:
    """A failed entry with break: 1 is covered when a later entry of the rule succeeded."""
    for i, entry in enumerate(entries):
        if entry.state == "failed" and entry.break_:
            entry.covered = any(later.state == "succeeded" for later in entries[i + 1 :])


def make_error_report(job: Job, settings: Settings) -> DicomFile | None:
    """The error report of a failed computation, written under JOB/.routing/; else None."""
    if fullmatch(settings.success_pattern, job.success):
        return None
    target = report_path(job.path)
    write_error_report(job, find_reference(job.path), target)
    return read_header(str(job.path), target.relative_to(job.path).as_posix())


# --- the plain path -------------------------------------------------------------------------


@dataclass
class LocalSteps:
    """The steps run in this process, without Prefect."""

    job: Job
    config: RoutingConfig
    settings: Settings
    record: Record
    force: bool = False
    progress: Progress | None = None

    def endpoint(self, entry: SendEntry) -> AnyEndpoint:
        return entry.destination.endpoint(
            self.settings.me, self.settings.port, self.settings.associations
        )

    def error_report(self) -> DicomFile | None:
        if not hasattr(self, "_report"):
            self._report = make_error_report(self.job, self.settings)
        return self._report

    def scan(self, directory: str) -> Scan:
        return scan(self.job.path, directory, scan_tags(self.config, directory))

    def select(self, rule: RuleSpec, entry: SendEntry, scan: Scan) -> Selection:
        return select(scan.files, entry.destination.which, scan.unsendable)

    def deliver(
        self,
        rule: RuleSpec,
        entry: SendEntry,
        endpoint: AnyEndpoint,
        files: Sequence[DicomFile],
        unsendable: Sequence[Unsendable] = (),
    ) -> Delivery:
        delivery = deliver_with_retries(
            self.record,
            endpoint,
            files,
            self.settings,
            self.force,
            self.progress or current_progress(),
            unsendable=unsendable,
        )
        routing_log.entry(self.job, rule, entry, delivery)
        return delivery


def new_report(
    job: Job,
    record: Record,
    force: bool,
    rules: Mapping[str, str] | None = None,
    origin: str = "",
) -> JobReport:
    return JobReport(
        job=str(job.path),
        called=job.called,
        caller=job.caller,
        success=job.success,
        message=job.message,
        forced=force,
        run_id=record.run_id or "",
        origin=origin,
        rules_version=dict(rules or {}),
        started=now(),
    )


def finish(report: JobReport, record: Record, routing: Routing) -> Status:
    """Close the record with the report's outcome and log the job's line."""
    report.rules = routing.rules
    report.not_evaluated_rules = routing.not_evaluated_rules
    report.skipped_files = routing.skipped_files()
    report.finished = now()
    status = record.end(report.state, report.reason(), report.rows(), report.deliveries())
    try:
        write_report(record.job_dir, report.to_dict())
    except OSError as exc:  # the record and the status hold the outcome; say what is missing
        routing_log.not_written(record.job_dir, REPORT, report.state, exc)
    routing_log.job_done(report)
    watcher = observe.current()
    if watcher is not None:
        for delivery in report.deliveries():
            watcher.delivered(delivery)
        watcher.job_ended(report.state)
    return status


def _ended(outcome: str) -> None:
    watcher = observe.current()
    if watcher is not None:
        watcher.job_ended(outcome)


def _keep_status(job_dir: Path, state: State, reason: str | None, *, counts: bool) -> None:
    """Write the job's status; a folder that refuses it is logged, never a crash."""
    try:
        update_status(job_dir, state, reason, counts=counts)
    except OSError as exc:
        routing_log.status_not_written(job_dir, state, exc)


def mark_invalid(job_dir: Path, error: JobInvalid) -> None:
    """Keep the reason in the job's status so sweeps and users see why it is not routed."""
    _keep_status(job_dir, "invalid", str(error), counts=False)
    routing_log.invalid(job_dir, error)
    _ended("invalid")


def mark_waiting(job_dir: Path, waiting: JobWaiting) -> None:
    _keep_status(job_dir, "waiting", str(waiting), counts=False)
    routing_log.waiting(job_dir, waiting)
    _ended("waiting")


def mark_failed(job_dir: Path, exc: BaseException, record: Record | None) -> JobFailed:
    """A run that ended outside the rules' account: a full disk, an interruption, a bug.

    It counts as a failed run (sweeps back off and give up as for any failure), with the
    reason in the record (if it still takes a line), the status and the routing log.
    """
    if isinstance(exc, OSError):
        reason = str(exc) if isinstance(exc, RecordWriteError) else _step_failed("routing", exc)
        if isinstance(exc, RecordWriteError):
            reason += "; sending stopped"
    elif isinstance(exc, StopRun):
        reason = f"interrupted: {exc}"
    elif isinstance(exc, Exception):
        reason = _step_failed("routing the job", exc)
    else:
        reason = f"interrupted ({type(exc).__name__})"
    if record is not None:
        record.abandon("failed", reason)
    _keep_status(job_dir, "failed", reason, counts=True)
    routing_log.failed(job_dir, reason)
    _ended("failed")
    return JobFailed(job_dir, reason)


def _check_root(path: Path, settings: Settings, origin: str) -> None:
    """Refuse, and log, a job folder outside the jobs roots: before any file is read."""
    try:
        check_job_dir(path, settings.jobs_root, origin)
    except JobRefused as exc:
        with routing_log.writing_to(settings.log_file):
            routing_log.refused(path, origin, exc.reason)
        _ended("refused")
        raise


def precheck(job_dir: Path | str, settings: Settings, origin: str = "cli") -> Path:
    """What `run_job` refuses first, without starting anything: a missing or unwritable
    folder (JobInvalid) and a job whose computation has not finished (JobWaiting), each
    recorded as `run_job` records it. Returns the job folder's absolute path."""
    path = Path(job_dir).absolute()
    _check_root(path, settings, origin)
    if not path.is_dir():
        raise JobInvalid(path, "not a job folder (no such directory)")
    with routing_log.writing_to(settings.log_file):
        _check_writable(path)
        if not (path / PROC).exists():
            waiting = JobWaiting(f"{path}: no {PROC} yet, the computation has not finished")
            mark_waiting(path, waiting)
            raise waiting
    return path


def _check_writable(path: Path) -> None:
    try:
        check_writable(path)
    except OSError as exc:
        error = JobInvalid(
            path,
            f"the job folder is not writable ({exc.strerror or exc}): routing keeps its "
            "record and status there; fix its permissions, then route it again",
        )
        mark_invalid(path, error)
        raise error from None


def run_job(
    job_dir: Path | str,
    settings: Settings,
    *,
    force: bool,
    origin: str,
    load: Callable[[Path], Job],
    match: Callable[[Job], Sequence[RuleMatch]],
    steps_for: Callable[[Job, Record], Steps],
    rules: Mapping[str, str] | None = None,
) -> JobReport:
    """One routing of a job: lock, load, record, rules, report; the same for every caller.

    This is the one place that decides how a job ends (SPEC section 1). It returns the
    report of a job that was routed or failed by its rules, or raises one of: JobRefused
    (a folder outside the jobs roots: nothing read or written there), JobWaiting,
    JobInvalid (also for a folder this process cannot write), JobLocked, JobFailed (a
    full disk, an interruption, a bug). Each has left its state in the job's status file
    (locked: the other run does) and a line in the routing log before it is raised;
    nothing else escapes.
    """
    path = Path(job_dir).absolute()
    _check_root(path, settings, origin)
    if not path.is_dir():
        raise JobInvalid(path, "not a job folder (no such directory)")
    with routing_log.writing_to(settings.log_file):
        _check_writable(path)
        try:
            with job_lock(path):
                return _run_locked(path, force, origin, load, match, steps_for, rules)
        except JobLocked as exc:
            routing_log.locked(path, exc)
            _ended("locked")
            raise
        except JobError:
            raise
        except OSError as exc:  # the lock itself (e.g. no locking on this file system)
            raise mark_failed(path, exc, None) from exc


def _run_locked(
    path: Path,
    force: bool,
    origin: str,
    load: Callable[[Path], Job],
    match: Callable[[Job], Sequence[RuleMatch]],
    steps_for: Callable[[Job, Record], Steps],
    rules: Mapping[str, str] | None,
) -> JobReport:
    record: Record | None = None
    try:
        try:
            job = load(path)
        except JobWaiting as exc:
            mark_waiting(path, exc)
            raise
        except JobInvalid as exc:
            mark_invalid(path, exc)
            raise
        record = Record(job.path)
        record.begin(forced=force, origin=origin, rules=rules)
        report = new_report(job, record, force, rules, origin)
        finish(report, record, route_rules(match(job), steps_for(job, record)))
        return report
    except JobError:
        raise
    except BaseException as exc:
        failed = mark_failed(path, exc, record)
        if isinstance(exc, StopRun) or not isinstance(exc, Exception):
            raise  # Ctrl-C, a cancellation: recorded, and on its way
        raise failed from exc
    finally:
        if record is not None:
            record.close()


def route_job(
    job_dir: Path | str,
    config: RoutingConfig,
    settings: Settings,
    *,
    force: bool = False,
    origin: str = "direct",
    progress: Progress | None = None,
) -> JobReport:
    """Route one job in this process, without Prefect."""
    return run_job(
        job_dir,
        settings,
        force=force,
        origin=origin,
        load=load_job,
        match=lambda job: match_rules(config, job),
        steps_for=lambda job, record: LocalSteps(job, config, settings, record, force, progress),
        rules=config.version,
    )
