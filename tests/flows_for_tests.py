"""Trivial flows that the Prefect infrastructure tests deploy to real process workers.

Loaded by the workers from this file (a deployment entrypoint), so it imports only
Prefect and the standard library.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, task


@task
def add(a: int, b: int) -> int:
    return a + b


@flow(name="infra-add")
def add_flow(a: int, b: int) -> dict[str, int]:
    """Two task runs and the worker's pid: enough to see who ran what."""
    total = add(add(a, b), 1)
    return {"total": total, "pid": os.getpid()}


@flow(name="infra-fail-until-marker")
def fail_until_marker(marker: str) -> str:
    """Fails while `marker` is absent: a run that a retry makes succeed."""
    if not Path(marker).exists():
        raise RuntimeError(f"{marker} is missing")
    return "ok"


@flow(name="infra-sleep")
def sleep_flow(seconds: float, started: str) -> None:
    """Writes `started`, then sleeps: a run in progress, to stop a worker under."""
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
