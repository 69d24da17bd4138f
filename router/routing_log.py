"""The routing log: one line per step (the seed's `/data/logs/routing.log`).

Lines go to the `router.routing` logger, so they also reach Prefect's run logs and any
logging configuration a site has; `writing_to` adds the file handler for the configured
path. Format: time, job, rule, destination, counts, outcome, as `key=value` pairs that
grep and awk can read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.config import RuleSpec, SendEntry
    from router.job import Job, JobInvalid
    from router.model import Endpoint, StoreResult
    from router.report import Delivery, JobReport

logger = logging.getLogger("router.routing")

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class LogFileError(OSError):
    """The routing log cannot be written; routing refuses rather than run unlogged."""


@contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """Write the routing log to `path` for the duration of one routing run.

    Scoped rather than installed once, so that runs with different log files in one
    process (tests, a worker serving several sites) each write only their own lines.
    """
    path = Path(path).absolute()
    if any(Path(getattr(h, "baseFilename", "")) == path for h in logger.handlers):
        yield  # a logging configuration (deployments/logging.yml) writes it already
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise LogFileError(
            f"cannot write the routing log {path}: {exc.strerror or exc} "
            "(set --log-file or DICOM_ROUTER_LOG_FILE)"
        ) from None
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _q(value: object) -> str:
    text = str(value)
    return f'"{text}"' if not text or any(c.isspace() for c in text) else text


def _line(**fields: object) -> str:
    return " ".join(f"{k}={_q(v)}" for k, v in fields.items() if v is not None)


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
    logger.error(_line(job=job_dir, outcome="invalid", reason=str(error)))
