"""The routing log: one line per step (the seed's `/data/logs/routing.log`).

Lines go to the `router.routing` logger, so they also reach Prefect's run logs and any
logging configuration a site has; `writing_to` adds the file handler for the configured
path. Format: time, job, rule, destination, counts, outcome, as `key=value` pairs that
grep and awk can read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from router.text import printable

if TYPE_CHECKING:
    from router.config import RuleSpec, SendEntry
    from router.job import Job, JobInvalid
    from router.model import Endpoint, StoreResult
    from router.report import Delivery, JobReport

logger = logging.getLogger("router.routing")

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class LogFileError(OSError):
    """The routing log cannot be written; routing refuses rather than run unlogged."""


_writing_to: ContextVar[Path | None] = ContextVar("routing_log_path", default=None)
"""The routing log of the run in this context (thread, task): whose lines go where."""

_handlers_lock = threading.Lock()


class _RunLogFile(logging.FileHandler):
    """One routing log file, shared by the runs of this process that write to it.

    Runs in one process (the sweep's parallel jobs, a warm worker) share the
    `router.routing` logger; each line goes only to the file of the run that logged it,
    told by the context, so that no line is lost or written to another site's log.
    """

    def __init__(self, path: Path) -> None:
        # lines are printable (router.text); backslashreplace also keeps another
        # logger's line with a name that is not UTF-8
        super().__init__(path, encoding="utf-8", errors="backslashreplace")
        self.path = path
        self.users = 0

    def emit(self, record: logging.LogRecord) -> None:
        if _writing_to.get() == self.path:
            super().emit(record)


@contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """Write the routing log to `path` for the duration of one routing run.

    Scoped rather than installed once, so that runs with different log files in one
    process (tests, a worker serving several sites) each write only their own lines.
    """
    path = Path(path).absolute()
    token = _writing_to.set(path)
    try:
        configured = any(
            Path(getattr(h, "baseFilename", "")) == path and not isinstance(h, _RunLogFile)
            for h in logger.handlers
        )
        if configured:
            yield  # a logging configuration (deployments/logging.yml) writes it already
            return
        handler = _acquire(path)
        try:
            yield
        finally:
            _release(handler)
    finally:
        _writing_to.reset(token)


def _acquire(path: Path) -> _RunLogFile:
    with _handlers_lock:
        for h in logger.handlers:
            if isinstance(h, _RunLogFile) and h.path == path:
                h.users += 1
                return h
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = _RunLogFile(path)
        except OSError as exc:
            raise LogFileError(
                f"cannot write the routing log {path}: {exc.strerror or exc} "
                "(set --log-file or DICOM_ROUTER_LOG_FILE)"
            ) from None
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.users = 1
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


def _release(handler: _RunLogFile) -> None:
    with _handlers_lock:
        handler.users -= 1
        if handler.users == 0:
            logger.removeHandler(handler)
            handler.close()


def _q(value: object) -> str:
    text = str(value)
    return f'"{text}"' if not text or any(c.isspace() for c in text) else text


def _line(**fields: object) -> str:
    return printable(" ".join(f"{k}={_q(v)}" for k, v in fields.items() if v is not None))


def entry(job: Job, rule: RuleSpec, entry: SendEntry, delivery: Delivery) -> None:
    logger.log(
        logging.INFO if delivery.ok else logging.WARNING,
        _line(
            job=job.path,
            rule=f"{rule.index}:{rule.name}",
            entry=entry.index,
            dest=delivery.destination,
            selected=delivery.selected,
            already=delivery.already,
            stored=delivery.stored,
            failed=delivery.failed,
            attempts=delivery.attempts,
            seconds=f"{delivery.seconds:.3f}",
            outcome="succeeded" if delivery.ok else "failed",
            reason=delivery.error,
        ),
    )


def entry_failed(job: Job, rule: RuleSpec, entry: SendEntry, destination: str, reason: str) -> None:
    logger.warning(
        _line(
            job=job.path,
            rule=f"{rule.index}:{rule.name}",
            entry=entry.index,
            dest=destination,
            outcome="failed",
            reason=reason,
        )
    )


def retry(
    job_dir: Path, endpoint: Endpoint, attempt: int, delay: float, reason: str | None
) -> None:
    logger.warning(
        _line(
            job=job_dir,
            dest=endpoint,
            attempt=attempt,
            outcome="retrying",
            delay=f"{delay:g}s",
            reason=reason,
        )
    )


def file_failed(job_dir: Path, endpoint: Endpoint, result: StoreResult, attempt: int) -> None:
    """A file that failed for good at a destination, as it happens: which and why."""
    logger.warning(
        _line(
            job=job_dir,
            dest=endpoint,
            file=result.file.relpath,
            attempt=attempt,
            status=None if result.status is None else f"0x{result.status:04X}",
            outcome="file-failed",
            reason=result.error,
        )
    )


def job_done(report: JobReport) -> None:
    stored = sum(e.delivery.stored for r in report.rules for e in r.entries if e.delivery)
    logger.log(
        logging.INFO if report.state == "routed" else logging.ERROR,
        _line(
            job=report.job,
            success=report.success,
            rules=sum(1 for r in report.rules if r.applied),
            stored=stored,
            skipped_files=sum(len(v) for v in report.skipped_files.values()),
            outcome=report.state,
            reason=report.reason(),
        ),
    )


def invalid(job_dir: Path, error: JobInvalid) -> None:
    logger.error(_line(job=job_dir, outcome="invalid", reason=error.problem))


def waiting(job_dir: Path, reason: object) -> None:
    logger.info(_line(job=job_dir, outcome="waiting", reason="no proc.json yet"))


def locked(job_dir: Path, reason: object) -> None:
    logger.info(_line(job=job_dir, outcome="locked", reason=str(reason)))


def failed(job_dir: Path, reason: str) -> None:
    logger.error(_line(job=job_dir, outcome="failed", reason=reason))


def refused(job_dir: Path, origin: str, reason: str) -> None:
    logger.error(_line(job=job_dir, outcome="refused", origin=origin, reason=reason))


def status_not_written(job_dir: Path, state: str, exc: OSError) -> None:
    not_written(job_dir, "routing-status.json", state, exc)


def not_written(job_dir: Path, name: str, state: str, exc: OSError) -> None:
    outcome = "status-not-written" if name == "routing-status.json" else "report-not-written"
    logger.error(
        _line(
            job=job_dir,
            outcome=outcome,
            state=state,
            reason=f"cannot write {name}: {exc.strerror or exc}",
        )
    )
