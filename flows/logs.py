"""Expected failures read as one line; tracebacks are for bugs.

Prefect logs every failed task attempt with the exception's traceback, and every failed
flow run once more ("Encountered exception during execution"). For what routing expects
to meet (a destination down, a refused file, a malformed proc.json, a locked job, a bad
rule) the routing log already has a line that says what and why, and a traceback of
Prefect's task engine only buries it. `quiet_expected_failures()` makes the run loggers
drop the traceback of those exceptions (and the retry announcements the routing log
already made); any other exception keeps its traceback, on the console and in the UI.
"""

from __future__ import annotations

import logging

from flows.cancel import RunCancelled
from router.config import ConfigError
from router.job import JobInvalid, JobWaiting
from router.lock import JobLocked
from router.model import SendError
from router.routing_log import LogFileError

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def _expected() -> tuple[type[BaseException], ...]:
    from flows.concurrency import SlotUnavailable
    from flows.route_job import RoutingFailed, TransientSendFailure
    from flows.sweep import SweepFailed

    return (
        TransientSendFailure,
        RoutingFailed,
        SweepFailed,
        RunCancelled,
        SlotUnavailable,
        JobInvalid,
        JobWaiting,
        JobLocked,
        ConfigError,
        LogFileError,
        SendError,
    )


class ExpectedFailures(logging.Filter):
    """Strips the traceback of expected failures; drops Prefect's retry announcements."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = _expected()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and isinstance(record.args, tuple):
            exc = next((a for a in record.args if isinstance(a, BaseException)), None)
        if not isinstance(exc, self.expected):
            return True
        if str(record.msg).startswith("Task run failed with"):
            return False  # the routing log's line for the attempt says it, once
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_expected_failures() -> None:
    """Install the filter on Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedFailures) for f in logger.filters):
            logger.addFilter(ExpectedFailures())
