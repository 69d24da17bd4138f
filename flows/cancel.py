"""Stopping a run that is cancelled from the UI, between two C-STOREs.

A run executed in the warm worker's process cannot be killed as a process worker kills
its child: it shares the process with other runs. The worker sets the run's stop event
instead, and the run checks it where stopping leaves the record true: after each answer
has been written to the record, before each send attempt, and while it waits for a
destination's concurrency slot. `RunCancelled` (a `StopRun`: routing neither fails the
entry nor goes on with the others) then unwinds the run (the association is aborted, the
record ends with the reason, the job's status says "interrupted", so a sweep routes what
is missing after its backoff, the job's lock is released) and the worker reports the run
Cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from router.model import StopRun

_stop: ContextVar[threading.Event | None] = ContextVar("dicom_router_stop", default=None)


class RunCancelled(StopRun):
    """The run was cancelled; it stopped between two C-STOREs with every answer recorded."""

    def __init__(self) -> None:
        super().__init__("cancelled: stopped between C-STOREs; the record holds every answer")


@contextmanager
def stoppable(event: threading.Event) -> Iterator[None]:
    """Run the enclosed code so that `event` being set stops it at its next check."""
    token = _stop.set(event)
    try:
        yield
    finally:
        _stop.reset(token)


def check() -> None:
    """Raise RunCancelled if this run was asked to stop."""
    event = _stop.get()
    if event is not None and event.is_set():
        raise RunCancelled()


def checking(
    progress: Callable[[str, int, int], None] | None,
) -> Callable[[str, int, int], None] | None:
    """`progress` (called after each recorded answer), checking for a stop first."""
    if _stop.get() is None:
        return progress

    def report(destination: str, done: int, total: int) -> None:
        if progress is not None:
            progress(destination, done, total)
        check()

    return report
