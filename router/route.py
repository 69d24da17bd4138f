"""Routing a job: rules in order, send entries with break and fail-back (SPEC section 4).

`route_rules` holds the semantics once. It calls its steps (scan a folder, select files,
deliver to a destination) through a `Steps` object, so that the plain path (`LocalSteps`,
used by tests and by anything that runs without Prefect) and the Prefect flow (which
wraps each step in a task) run the very same branching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from router import routing_log
from router.config import RoutingConfig, RuleSpec, SendEntry
from router.error_report import find_reference, report_path, write_error_report
from router.job import Job, JobInvalid, load_job
from router.lock import job_lock
from router.model import DicomFile, Endpoint, SendError, StoreResult, status_is_transient
from router.record import Record, Status, now, read_status, write_status
from router.report import Delivery, EntryOutcome, JobReport, RuleOutcome
from router.rules import RuleMatch, fullmatch, match_rules
from router.select import Scan, Selection, read_header, scan, select
from router.send import send_files
from router.settings import Settings

Progress = Callable[[str, int, int], None]
"""(destination, files answered so far, files to send) after each answer."""

_MAX_LISTED_FAILURES = 20

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
    def endpoint(self, entry: SendEntry) -> Endpoint: ...
    def error_report(self) -> DicomFile | None: ...
    def scan(self, directory: str) -> Scan: ...
    def select(self, rule: RuleSpec, entry: SendEntry, scan: Scan) -> Selection: ...
    def deliver(
        self, rule: RuleSpec, entry: SendEntry, endpoint: Endpoint, files: Sequence[DicomFile]
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
    record: Record, endpoint: Endpoint, files: Sequence[DicomFile], force: bool
) -> list[DicomFile]:
    """What still has to go: all but what the record shows stored (by this run, if forced)."""
    done = record.stored_at(endpoint.key, this_run_only=force)
    return [f for f in files if f.sop_instance_uid not in done]


def to_send(
    record: Record, endpoint: Endpoint, files: Sequence[DicomFile], force: bool
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
    endpoint: Endpoint,
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
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    force: bool,
    already: int,
    attempts: int,
    seconds: float,
    last: Attempt | None,
) -> Delivery:
    """The entry's delivery as the record tells it after the last attempt.

    Each file not stored is listed with its last answer in this run (a file that failed
    for good on an earlier attempt keeps its own reason); one never answered gets the
    reason the last attempt ended with.
    """
    stored_now = record.stored_at(endpoint.key, this_run_only=True)
    uids = {f.sop_instance_uid for f in files}
    left = missing(record, endpoint, files, force)
    ended = last.error.reason if last and last.error else None
    failures = []
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
    error = None
    if left:
        parts = [ended] if ended else []
        if own:
            (first, why), more = own[0], len(own) - 1
            others = f" (and {more} more)" if more else ""
            parts.append(f"{len(own)} not stored: {first.relpath}: {why}{others}")
        error = "; ".join(parts) or f"{len(left)} not stored"
    return Delivery(
        destination=str(endpoint),
        selected=len(files),
        already=already,
        stored=len(stored_now & uids),
        failed=len(left),
        attempts=attempts,
        seconds=seconds,
        error=error,
        transient=bool(left and last and last.transient),
        failures=failures,
    )


def deliver_with_retries(
    record: Record,
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    settings: Settings,
    force: bool,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Attempt, and retry transient failures with backoff; permanent ones fail at once.

    A retry sends what is still missing and may still be stored (`attempt_once`).
    """
    already = len(files) - len(missing(record, endpoint, files, force))
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
    return summarize(record, endpoint, files, force, already, attempts, seconds, last)


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
    """Route every applying rule in order until a rule with break: 1 succeeds."""
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
        if directory not in scans:
            scans[directory] = steps.scan(directory)
        folder = scans[directory]
        report = steps.error_report() if spec.rule.error_report else None
        matching = match.matching
        for n, entry in enumerate(matching):
            dest = entry.destination
            endpoint = steps.endpoint(entry)
            selection = steps.select(spec, entry, folder)
            if report is not None:  # goes with the results, whatever `which` selects
                selection = Selection((*selection.selected, report), selection.excluded)
            result = EntryOutcome(
                index=entry.index,
                pattern=entry.pattern,
                destination=str(endpoint),
                break_=dest.break_,
                state="skipped",
                selected=len(selection.selected),
                excluded=len(selection.excluded),
            )
            outcome.entries.append(result)
            if not selection.selected:
                result.reason = folder.note or (
                    "no file passes the which filter" if selection.excluded else "no DICOM files"
                )
                continue
            delivery = steps.deliver(spec, entry, endpoint, selection.selected)
            result.delivery = delivery
            result.state = "succeeded" if delivery.ok else "failed"
            result.reason = delivery.error
            if delivery.ok and dest.break_:
                outcome.not_evaluated = [e.index for e in matching[n + 1 :]]
                break
        _mark_covered(outcome.entries)
        if outcome.succeeded and spec.rule.break_:
            outcome.stopped_later_rules = True
            routing.not_evaluated_rules = [m.spec.index for m in matches[position + 1 :]]
            break
    return routing


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

    def endpoint(self, entry: SendEntry) -> Endpoint:
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
        return select(scan.files, entry.destination.which)

    def deliver(
        self, rule: RuleSpec, entry: SendEntry, endpoint: Endpoint, files: Sequence[DicomFile]
    ) -> Delivery:
        delivery = deliver_with_retries(
            self.record,
            endpoint,
            files,
            self.settings,
            self.force,
            self.progress or current_progress(),
        )
        routing_log.entry(self.job, rule, entry, delivery)
        return delivery


def new_report(job: Job, record: Record, force: bool) -> JobReport:
    return JobReport(
        job=str(job.path),
        called=job.called,
        caller=job.caller,
        success=job.success,
        message=job.message,
        forced=force,
        run_id=record.run_id or "",
        started=now(),
    )


def finish(report: JobReport, record: Record, routing: Routing) -> Status:
    """Close the record with the report's outcome and log the job's line."""
    report.rules = routing.rules
    report.not_evaluated_rules = routing.not_evaluated_rules
    report.skipped_files = routing.skipped_files()
    report.finished = now()
    status = record.end(report.state, report.reason(), report.rows())
    routing_log.job_done(report)
    return status


def mark_invalid(job_dir: Path, error: JobInvalid) -> None:
    """Keep the reason in the job's status so sweeps and users see why it is not routed."""
    previous = read_status(job_dir)
    runs = previous.runs if previous else 0
    failures = previous.consecutive_failures if previous else 0
    write_status(job_dir, Status("invalid", runs, failures, now(), str(error)))
    routing_log.invalid(job_dir, error)


def run_job(
    job_dir: Path | str,
    settings: Settings,
    *,
    force: bool,
    origin: str,
    load: Callable[[Path], Job],
    match: Callable[[Job], Sequence[RuleMatch]],
    steps_for: Callable[[Job, Record], Steps],
) -> JobReport:
    """One routing of a job: lock, load, record, rules, report; the same for every caller.

    Raises JobWaiting, JobInvalid (after recording it in the job's status) or JobLocked.
    """
    path = Path(job_dir).absolute()
    if not path.is_dir():
        raise JobInvalid(path, "not a job folder (no such directory)")
    with routing_log.writing_to(settings.log_file), job_lock(path):
        try:
            job = load(path)
        except JobInvalid as exc:
            mark_invalid(path, exc)
            raise
        record = Record(job.path)
        record.begin(forced=force, origin=origin)
        try:
            report = new_report(job, record, force)
            finish(report, record, route_rules(match(job), steps_for(job, record)))
            return report
        finally:
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
    )
