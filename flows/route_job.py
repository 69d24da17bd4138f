"""The `route-job` flow: one job folder, routed by the rules, as Prefect tasks.

Thin on purpose: the branching (rules in order, break, fail-back, covered entries) is
`router.route.route_rules`, the same code the plain path runs. This module only turns
its steps into tasks (load the job, match the rules, select files per entry, send per
destination), so that each shows in the UI with its own state and retries, and ends the
run with a table of what went where. Scanning a folder is a step of the flow itself, not a
task: see `scan_folder`.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Cancelled, Failed, State
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ValidationError, create_model

from flows import cancel
from flows.alerts import announce_job_failed, announce_report
from flows.concurrency import (
    DestinationLimit,
    destination_limit,
    destination_slot,
    read_destination_limit,
)
from flows.config_source import resolve_config
from router import routing_log
from router.config import RoutingConfig, RuleSpec, SendEntry
from router.job import Job, JobFailed, JobInvalid, JobRefused, JobWaiting, load_job
from router.lock import JobLocked
from router.model import DicomFile, Endpoint
from router.parallel import associations_for
from router.record import Record
from router.report import Delivery, JobReport
from router.route import (
    Attempt,
    already_there,
    attempt_once,
    current_progress,
    make_error_report,
    note_unsendable,
    run_job,
    scan_tags,
    summarize,
)
from router.rules import RuleMatch, match_rules
from router.select import Scan, Selection, Unsendable, scan, select
from router.settings import Settings
from router.text import printable


class RoutingFailed(Exception):
    """The job was routed and some rule failed; the report says where and why."""

    def __init__(self, report: JobReport) -> None:
        super().__init__(f"routing failed: {report.reason()}")
        self.report = report


class TransientSendFailure(Exception):
    """Raised by the send task so that Prefect retries it with backoff."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.reason())
        self.attempt = attempt


class JobRunName:
    """A route-job run's name: its job folder's.

    `of(parameters)` gives it without a run: the announcer, the sweep and the command line
    name the runs they create so, and the warm worker then spares the engine its rename
    (`flows.worker.named_at_creation`).
    """

    @staticmethod
    def of(parameters: Mapping[str, Any]) -> str:
        return Path(str(parameters.get("job_dir", ""))).name

    def __call__(self) -> str:
        return self.of(flow_run.parameters)


@task(name="load-job", cache_policy=NO_CACHE)
def load_job_task(job_dir: Path) -> Job:
    return load_job(job_dir)


@task(name="match-rules", cache_policy=NO_CACHE)
def match_rules_task(config: RoutingConfig, job: Job) -> tuple[RuleMatch, ...]:
    matches = match_rules(config, job)
    logger = get_run_logger()
    for m in matches:
        logger.info("%s: %s", m.spec.label, "applies" if m.applies else m.why_not)
    return matches


def scan_folder(job_dir: Path, directory: str, tags: set[str]) -> Scan:
    """A folder's files, read in the flow itself: a task of its own would cost the server
    more than the scan (a task run is three events and a row, ~30 ms of server CPU); the
    selection and the send that use it are tasks, and skipped files are logged here."""
    result = scan(job_dir, directory, tags)
    if result.skipped:
        get_run_logger().warning(
            "%d file(s) in %s skipped: %s",
            len(result.skipped),
            directory,
            "; ".join(f"{s.relpath}: {s.reason}" for s in result.skipped[:10]),
        )
    return result


@task(name="error-report", cache_policy=NO_CACHE)
def error_report_task(job: Job, settings: Settings) -> DicomFile | None:
    return make_error_report(job, settings)


@task(name="select-files", cache_policy=NO_CACHE)
def select_task(
    files: Sequence[DicomFile], which: Any, unsendable: Sequence[Unsendable] = ()
) -> Selection:
    return select(files, which, unsendable)


def _transient_only(task: Any, run: Any, state: State) -> bool:
    """Retry transient failures; a permanent one (or a bug) fails the task at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientSendFailure)


@task(name="send", cache_policy=NO_CACHE, retry_condition_fn=_transient_only)
def send_task(
    record: Record,
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    settings: Settings,
    force: bool,
    limit: DestinationLimit | None = None,
) -> Attempt:
    """One attempt at what the record says is missing; Prefect retries the transient.

    The destination's concurrency slot is held only while sending, not during the
    backoff between retries, so a waiting retry does not block other jobs.
    """
    cancel.check()
    with destination_slot(limit, occupy=endpoint.associations):
        progress = cancel.checking(current_progress())
        attempt = attempt_once(
            record, endpoint, files, settings, task_run.run_count, force, progress
        )
    if not attempt.ok and attempt.transient:
        delays = settings.retry_delays()
        if task_run.run_count <= len(delays):
            delay = delays[task_run.run_count - 1]
            routing_log.retry(record.job_dir, endpoint, task_run.run_count, delay, attempt.reason())
        raise TransientSendFailure(attempt)
    return attempt


@dataclass
class FlowSteps:
    """`router.route.Steps` as Prefect tasks."""

    job: Job
    config: RoutingConfig
    settings: Settings
    record: Record
    force: bool
    limits: dict[str, DestinationLimit] = field(default_factory=dict)
    """Destination key -> its concurrency limit as read (for a send of several
    associations), once per run."""
    report: list[DicomFile | None] = field(default_factory=list)

    def endpoint(self, entry: SendEntry) -> Endpoint:
        return entry.destination.endpoint(
            self.settings.me, self.settings.port, self.settings.associations
        )

    def error_report(self) -> DicomFile | None:
        if not self.report:
            self.report.append(error_report_task(self.job, self.settings))
        return self.report[0]

    def scan(self, directory: str) -> Scan:
        return scan_folder(self.job.path, directory, scan_tags(self.config, directory))

    def select(self, rule: RuleSpec, entry: SendEntry, scan: Scan) -> Selection:
        dest = entry.destination
        name = f"select {rule.index}.{entry.index} {dest.AETitleTo or dest.URL}"
        return select_task.with_options(task_run_name=name)(
            quote(scan.files), entry.destination.which, quote(scan.unsendable)
        )

    def deliver(
        self,
        rule: RuleSpec,
        entry: SendEntry,
        endpoint: Endpoint,
        files: Sequence[DicomFile],
        unsendable: Sequence[Unsendable] = (),
    ) -> Delivery:
        done_before = already_there(self.record, endpoint, files, self.force)
        note_unsendable(self.record, endpoint, unsendable)
        if not files:  # only files that cannot go: nothing to send
            delivery = summarize(
                self.record, endpoint, files, done_before, 0, 0.0, None, self.force, unsendable
            )
            routing_log.entry(self.job, rule, entry, delivery)
            return delivery
        size = entry.destination.max_associations or self.settings.max_associations
        # one slot per association it will open (a small job: one), never more than the limit
        wanted = associations_for(endpoint, files)
        limit = self.limits.get(endpoint.key)
        if limit is None and wanted > 1:
            limit = self.limits[endpoint.key] = read_destination_limit(endpoint, size)
        limit = limit or destination_limit(endpoint, size)
        slots = wanted if limit.size is None else min(wanted, limit.size)
        endpoint = replace(endpoint, associations=slots)
        send = send_task.with_options(
            task_run_name=f"send {rule.index}.{entry.index} → {endpoint.key}",
            retries=self.settings.retries,
            retry_delay_seconds=self.settings.retry_delays() or 0,
        )
        start = time.monotonic()
        # Prefect walks each task parameter twice looking for futures to wait on (the
        # task's inputs, then their resolution): ~0.17 s for 1,500 files. These are plain
        # data and never futures, so they are quoted past the walk.
        state = send(
            quote(self.record),
            endpoint,
            quote(files),
            quote(self.settings),
            self.force,
            limit,
            return_state=True,
        )
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, TransientSendFailure):
            last: Attempt | None = outcome.attempt
        elif isinstance(outcome, Attempt):
            last = outcome
        else:  # an unexpected error is a bug: fail the run with it rather than hide it
            raise outcome
        attempts = last.number if last else 0
        delivery = summarize(
            self.record,
            endpoint,
            files,
            done_before,
            attempts,
            time.monotonic() - start,
            last,
            self.force,
            unsendable,
        )
        routing_log.entry(self.job, rule, entry, delivery)
        return delivery


def _artifact_key(job_path: str) -> str:
    name = Path(job_path).name.lower()
    return "route-" + (re.sub(r"[^a-z0-9-]+", "-", name).strip("-") or "job")


def _markdown(report: JobReport) -> str:
    lines = [
        f"**{report.state}** · job `{report.job}` · success `{report.success}`",
        f"called `{report.called}` · caller `{report.caller}` · forced: {report.forced}",
    ]
    if report.rules_version:
        version = report.rules_version
        lines.append(f"rules: {version['source']} · sha256 `{version['sha256'][:16]}`")
    if report.reason():
        lines.append(f"reason: {report.reason()}")
    for rule in report.rules:
        if not rule.applied:
            lines.append(f'- rule {rule.index} "{rule.name}": not applied ({rule.why_not})')
    for folder, skipped in report.skipped_files.items():
        lines.append(
            f"- {len(skipped)} file(s) in {folder} skipped (not instances, or links not followed)"
        )
    return "\n\n".join(lines)


def local_result_storage() -> Path:
    """Where results would go, named so that a run does not ask the server.

    The router's runs persist no result (the job's record is the result); without a
    storage of its own Prefect asks the server for its default storage three times per run
    (`prefect/results.py`, `_get_default_result_storage`), which a busy server answers in
    tens of milliseconds each.
    """
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


@flow(
    name="route-job",
    flow_run_name=JobRunName(),
    validate_parameters=False,
    persist_result=False,
    result_storage=local_result_storage(),
)
def route_job_flow(
    job_dir: str,
    config: str | None = None,
    force: bool = False,
    me: str | None = None,
    port: int | None = None,
    log_file: str | None = None,
    origin: str = "prefect",
) -> dict[str, Any] | State:
    """Route one job folder; the run fails when any rule fails.

    Ends Completed (routed), Failed (a rule failed, or the run could not route: a full
    disk, a bug), Failed named Invalid, or Cancelled named Waiting or Locked.

    Parameters left empty come from the worker's `DICOM_ROUTER_*` environment.
    """
    try:  # the server does not check them (prefect.yaml: enforce_parameter_schema)
        checked = ROUTE_JOB_PARAMETERS.model_validate(locals())  # the parameters, so far
    except ValidationError as exc:
        message = f"invalid parameters: {parameter_errors(exc)}"
        get_run_logger().error(message)
        return Failed(name="Invalid", message=message)
    job_dir, config, force, me = checked.job_dir, checked.config, checked.force, checked.me
    port, log_file, origin = checked.port, checked.log_file, checked.origin
    overrides = {"config": config, "me": me, "port": port, "log_file": log_file}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if flow_run.id:  # which request asked, for the record and a refusal's log line
        origin = f"{origin}, flow run {flow_run.name} ({flow_run.id})"
    cfg = resolve_config(settings)
    try:
        report = run_job(
            job_dir,
            settings,
            force=force,
            origin=origin,
            load=load_job_task,
            match=lambda job: match_rules_task(cfg, job),
            steps_for=lambda job, record: FlowSteps(job, cfg, settings, record, force),
            rules=cfg.version,
        )
    except (JobInvalid, JobRefused) as exc:
        announce_job_failed(job_dir, ENDING_NAMES[type(exc)].lower(), str(exc))  # alerts
        return ending_state(exc)
    except (JobWaiting, JobLocked) as exc:
        return ending_state(exc)
    except JobFailed as exc:
        announce_job_failed(job_dir, "failed", exc.reason)
        raise
    create_table_artifact(
        key=_artifact_key(report.job),
        table=report.rows() or [{"outcome": "no rule applied"}],
        description=printable(_markdown(report)),
    )
    if report.state == "failed":
        announce_report(report)  # alerts
        raise RoutingFailed(report)
    return report.to_dict()


def parameters_model(fn: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of `fn`'s parameters, built once.

    What Prefect's `validate_parameters` checks, without building the model again for
    every run (6 ms each); the deployment leaves the check to the run
    (`enforce_parameter_schema: false`), since the server's check validates the schema
    itself against JSON Schema's meta-schema for every new run: 14 ms of its CPU.
    """
    fields: dict[str, Any] = {
        name: (p.annotation, ... if p.default is p.empty else p.default)
        for name, p in inspect.signature(fn, eval_str=True).parameters.items()
    }
    return create_model(f"{fn.__name__}_parameters", **fields)


def parameter_errors(exc: ValidationError) -> str:
    """`force: Input should be a valid boolean (got 'maybe')`, one per bad parameter."""
    return "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'parameters'}: {e['msg']} (got {e['input']!r})"
        for e in exc.errors()
    )


ROUTE_JOB_PARAMETERS = parameters_model(route_job_flow.fn)


ENDING_NAMES: dict[type[Exception], str] = {
    JobRefused: "Refused",
    JobInvalid: "Invalid",
    JobWaiting: "Waiting",
    JobLocked: "Locked",
}
"""State names of runs that did not route for a reason other than a failed send, so the
UI, a deployed sweep and automations tell them apart from a Failed run."""


def ending_state(exc: JobInvalid | JobWaiting | JobLocked | JobRefused) -> State:
    """Invalid and Refused are Failed (a person must look); a job still waiting for its
    computation, or routed by another run right now, is Cancelled: nothing went wrong.
    Calling the flow still raises `exc`."""
    name = ENDING_NAMES[type(exc)]
    make = Failed if isinstance(exc, JobInvalid | JobRefused) else Cancelled
    return make(name=name, message=printable(str(exc)), data=exc)


def run_route_job(
    job_dir: Path, settings: Settings, *, force: bool = False, origin: str = "cli"
) -> dict[str, Any]:
    """Run the flow in this process (ephemeral API, or PREFECT_API_URL's server)."""
    with in_process():
        return route_job_flow(
            job_dir=str(job_dir),
            config=str(settings.config) if settings.config else None,
            force=force,
            me=settings.me,
            port=settings.port,
            log_file=str(settings.log_file),
            origin=origin,
        )


@contextmanager
def in_process() -> Iterator[None]:
    """Settings for flow runs in the command's own process.

    The API is PREFECT_API_URL's server, or an ephemeral one that dies with the command
    (`flows.ephemeral`). Flow-run heartbeats let a server notice a worker that died
    mid-run; a run in the caller's process has the caller watching it, and each sync run
    otherwise waits up to a second at its end for the heartbeat thread (PERF-NOTES).
    Expected failures are logged without tracebacks (`flows.logs`).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.ephemeral import prefect_api
    from flows.logs import quiet_expected_failures

    quiet_expected_failures()
    with prefect_api(), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
