"""The API a command starts for itself when no Prefect server is set (no PREFECT_API_URL).

Prefect's own ephemeral API (`prefect.server.api.server.SubprocessASGIServer`, which
`get_client` starts) runs `uvicorn` as a plain child: a command killed with SIGKILL
leaves it running for good, and every start migrates the database, registers block
types and starts the automation services; and importing that module imports the whole
server into the command (seconds of CPU). This starts the same command itself, and
points PREFECT_API_URL at it for the run:

- the uvicorn process gets PR_SET_PDEATHSIG (SIGKILL): it dies with the command, however
  the command ends (SQLite in WAL mode survives that);
- the database is migrated and block types registered only on the first start with this
  Prefect version (a marker file beside the database remembers it);
- the services a single routing run does not use are off: automations (triggers and
  actions), the event and log streams to subscribers, the event logger. The task-run
  recorder and event persister stay, or the run's task history would be lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)

log = logging.getLogger(__name__)

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
    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url or "")
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(port: int) -> subprocess.Popen[bytes]:
    """Prefect's own ephemeral command (`SubprocessASGIServer._run_uvicorn_command`)."""
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
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent)]
    cmd += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _serve() -> tuple[subprocess.Popen[bytes], str]:
    """Start the API and wait until /health answers (as Prefect's ephemeral mode does)."""
    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    for _ in range(5):
        port = _free_port()
        process = _start(port)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break  # exit code 3: the port was taken meanwhile; try another
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/health").status_code == 200:
                        log.info("Started a Prefect API for this command on %s", url)
                        return process, url
                time.sleep(0.1)
        if process.poll() is None:
            _stop(process)
            raise RuntimeError(f"the ephemeral Prefect API did not answer within {timeout} s")
    raise RuntimeError(f"the ephemeral Prefect API exited with code {process.returncode}")


@contextmanager
def prefect_api() -> Iterator[str]:
    """PREFECT_API_URL's server, or a trimmed ephemeral API for the enclosed block."""
    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    process, api_url = _serve()
    try:
        db = _sqlite_path()
        if db is not None and db.exists() and not _is_current(db):
            _marker(db).write_text(prefect.__version__ + "\n")
        with temporary_settings({PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:  # the run's last logs and events reach the API before it stops
                APILogWorker.drain_all(timeout=5)
                EventsWorker.drain_all(timeout=5)
    finally:
        _stop(process)
