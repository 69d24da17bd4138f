"""The API a command starts for itself when no Prefect server is set (no PREFECT_API_URL).

Prefect's own ephemeral API (`prefect.server.api.server.SubprocessASGIServer`, which
`get_client` starts) runs `uvicorn` as a plain child: a command killed with SIGKILL
leaves it running for good, and every start migrates the database, registers block
types and starts the automation services. This is the same server class with the same
command, started by the command itself:

- the uvicorn process gets PR_SET_PDEATHSIG (SIGKILL): it dies with the command, however
  the command ends (SQLite in WAL mode survives that);
- the database is migrated and block types registered only on the first start with this
  Prefect version (a marker file beside the database remembers it);
- the services a single routing run does not use are off: automations (triggers and
  actions), the event and log streams to subscribers, the event logger. The task-run
  recorder and event persister stay, or the run's task history would be lost.

It registers itself as Prefect's ephemeral server instance, so anything in the process
that asks Prefect for a client gets this one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

TRIMMED: dict[str, str] = {
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _die_with_parent() -> None:
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _sqlite_path() -> Path | None:
    url = str(get_current_settings().server.database.connection_url or "")
    prefix = "sqlite+aiosqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def _marker(db: Path) -> Path:
    return db.with_name(f"{db.name}.dicom-router-ready")


def _is_current(db: Path | None) -> bool:
    """Was this database migrated (and blocks registered) by this Prefect version?"""
    if db is None or not db.exists():
        return False
    try:
        return _marker(db).read_text().strip() == prefect.__version__
    except OSError:
        return False


class RouterEphemeralAPI(SubprocessASGIServer):
    """Prefect's subprocess API server, dying with its parent, trimmed for one run."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
            **TRIMMED,
        }
        if _is_current(_sqlite_path()):
            env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
            env["PREFECT_SERVER_REGISTER_BLOCKS_ON_START"] = "false"
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            preexec_fn=_die_with_parent,
        )


@contextmanager
def prefect_api() -> Iterator[str]:
    """PREFECT_API_URL's server, or a trimmed ephemeral API for the enclosed block."""
    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    server = RouterEphemeralAPI()
    server.start()
    try:
        db = _sqlite_path()
        if db is not None and db.exists() and not _is_current(db):
            _marker(db).write_text(prefect.__version__ + "\n")
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:  # the run's last logs and events reach the API before it stops
                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        server.stop()
