"""pytest plugin: a real Prefect server on a throwaway PostgreSQL, work pools and workers.

Service-level tests need what production runs: `prefect server start` as its own process,
PostgreSQL behind it (SQLite answers "database is locked" once runs overlap, PERF-NOTES),
and workers that pick runs up: `dicom-router worker` (the warm routing worker, which runs
them in its own process: `warm=True`), or `prefect worker start --type process`, which
executes each in a fresh interpreter. Everything listens on 127.0.0.1 and free ports and lives in temp
dirs; nothing of the developer's ~/.prefect or PREFECT_* environment is used.

Fixtures: `postgres` (session), `prefect_servers` (session factory), `prefect_server`
(session, on `postgres`), `work_pool` (per-test factory; `work_pools()` for wider scopes).
`PrefectServer` has the helpers tests need: `deploy`, `cli` (`prefect deploy` with the
repo's prefect.yaml), `run_deployment`, `wait_for_flow_runs`, `task_runs`, `logs`,
`retry_flow_run` (the UI's Retry), `timeline`.

Process hygiene, because a worker's flow runs do not stay in its process group:

- every process started here runs in its own session and gets a death signal when
  pytest's thread ends (`prctl(PR_SET_PDEATHSIG)`);
- Prefect 3.9's process worker starts each flow run in a *new session* (a workspace
  supervisor that execs `prefect.engine`), out of reach of a signal to the worker's
  group. So each started process gets a marker variable in its environment, which
  Prefect passes on to the flow runs; `stop()` kills whatever still carries it;
- a stopped worker may hang on its way out when the server is gone already; and if
  pytest is killed, nobody escalates. A watchdog process (stdlib only) waits for
  pytest's pipe to close, then SIGKILLs what is still marked and removes the PostgreSQL
  directory. Ctrl-C tears down normally (~8 s).

Worker settings (`WORKER_SETTINGS`): `PREFECT_WORKER_QUERY_SECONDS=1` (default 10)
bounds pickup latency to ~1 s. Prefetch (10 s) and heartbeat (30 s; the first one is
sent at start) keep their defaults: runs are scheduled "now", so neither delays them.
`PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES=false` although it is the default: our
pyproject.toml declares prefect, and with it on and `uv` on PATH a run would become
`uv run` and build a venv in the checkout.

Use with ``-p tests.fixtures_prefect`` or from conftest's ``pytest_plugins``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest

from tests.fixtures_dcmtk import HOST, free_port

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun, Log, TaskRun

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install PostgreSQL with scripts/install-system-deps (as root)"

MARK_VAR = "DICOM_ROUTER_TEST_PROCESS"
"""Environment marker of every process started here and of everything they start."""
_SESSION = uuid.uuid4().hex[:12]
_counter = itertools.count(1)

SERVER_UNIT = REPO_ROOT / "deployments" / "systemd" / "prefect-server.service"


def shipped_server_settings(unit: Path = SERVER_UNIT) -> dict[str, str]:
    """The services' tuning that the documented systemd unit gives the server
    (`Environment=PREFECT_SERVER_SERVICES_*`), so tests and benches run it as sites do."""
    settings: dict[str, str] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment=PREFECT_SERVER_SERVICES_"):
            name, _, value = line.removeprefix("Environment=").partition("=")
            settings[name] = value
    return settings


SERVER_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",  # no static UI build at start-up
    "PREFECT_SERVER_LOGGING_LEVEL": "INFO",
    **shipped_server_settings(),
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # test deployments have no schedules
}
"""Server process settings; its services stay on (the task run recorder writes task runs)."""

SERVER_PYTHON_VAR = "DICOM_ROUTER_TEST_SERVER_PYTHON"
SERVER_VENV = REPO_ROOT / ".server-venv"


def server_python() -> str:
    """The interpreter `prefect server start` runs on. A site's server has a virtualenv of
    its own (deployments/install-server.sh; scripts/test makes `.server-venv` and names it
    in DICOM_ROUTER_TEST_SERVER_PYTHON); without one, the tests' own."""
    if named := os.environ.get(SERVER_PYTHON_VAR):
        return named
    venv = SERVER_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclass(frozen=True)
class ServerRuntime:
    """What a running `prefect server` process runs on."""

    interpreter: str
    python: str
    prefect: str
    uvloop: bool
    httptools: bool

    def __str__(self) -> str:
        extras = [name for name in ("uvloop", "httptools") if getattr(self, name)]
        return (
            f"Python {self.python}, prefect {self.prefect}"
            + "".join(f", {e}" for e in extras)
            + f" ({self.interpreter})"
        )


def python_and_prefect(interpreter: str) -> tuple[str, str]:
    """The Python and Prefect versions of `interpreter`."""
    probe = "import platform, prefect; print(platform.python_version(), prefect.__version__)"
    python, prefect_version = subprocess.run(
        [interpreter, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    return python, prefect_version


def server_runtime(pid: int) -> ServerRuntime:
    """Its interpreter from its command line, the versions from that interpreter, uvloop
    and httptools from the shared objects mapped in the process (uvicorn's `loop="auto"`
    takes them when they are installed)."""
    interpreter = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    python, prefect_version = python_and_prefect(interpreter)
    maps = Path(f"/proc/{pid}/maps").read_text()
    return ServerRuntime(
        interpreter, python, prefect_version, "/uvloop/loop." in maps, "/httptools/" in maps
    )


WORKER_SETTINGS: dict[str, str] = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false",
}
"""Worker process settings on top of `PrefectServer.env()`; see the module docstring."""

_PG_START_TIMEOUT = 30.0
_SERVER_START_TIMEOUT = 120.0  # a new PostgreSQL database runs all migrations first
_WORKER_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0

TIMINGS: list[tuple[str, float]] = []
"""(what, seconds) measured by the fixtures and tests; printed in pytest's summary."""


def record_timing(what: str, seconds: float) -> None:
    """Keep a measurement for the terminal summary (CI logs show where the time goes)."""
    TIMINGS.append((what, seconds))


# --- processes ------------------------------------------------------------------------------

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _death_signal(sig: int) -> Callable[[], None]:
    """preexec_fn: die with pytest's thread (set after any uid change, which clears it)."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, sig)  # 1 = PR_SET_PDEATHSIG

    return preexec


def marked_processes(marker: str = _SESSION) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries `marker`.

    Reads /proc/PID/environ, so it also finds orphans reparented to init. PostgreSQL's
    backends overwrite theirs with their process titles: only the postmaster is found.
    """
    needle = f"{MARK_VAR}={marker}".encode()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if not any(e == needle or e.startswith(needle + b"-") for e in env):
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie waiting for its parent is already dead
        except OSError:  # gone, or not ours to read
            continue
        found[int(entry.name)] = cmd
    return found


def _kill_marked(marker: str, sig: int = signal.SIGKILL) -> None:
    for pid in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class Service:
    """A process started by these fixtures: its log, and a stop that leaves nothing behind."""

    name: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path
    marker: str
    """Value of MARK_VAR in its environment, inherited by all it starts."""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = _STOP_TIMEOUT, sig: int = signal.SIGTERM) -> None:
        """Signal its process group, SIGKILL it after `timeout`, then kill all it left."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + timeout
        while marked_processes(self.marker):
            _kill_marked(self.marker)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: left {marked_processes(self.marker)}")
            time.sleep(0.05)


_SERVICES: list[Service] = []

_WATCHDOG = r"""
import os, shutil, signal, sys, time
marker, dirs = sys.argv[1].encode(), []
for line in sys.stdin:  # until pytest closes the pipe or dies
    dirs.append(line.rstrip("\n"))
def marked():
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(e.startswith(marker) for e in f.read().split(b"\0")):
                    pids.append(int(pid))
        except OSError:
            pass
    return [p for p in pids if p != os.getpid()]
deadline = time.monotonic() + float(sys.argv[2])
while marked() and time.monotonic() < deadline:
    time.sleep(0.2)  # let the death signals work: a clean shutdown where possible
for pid in marked():
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
time.sleep(0.5)
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""
_watchdog: subprocess.Popen | None = None


def _watch(directory: Path | None = None) -> None:
    """Start (once) a watchdog that outlives pytest; tell it about a dir to remove.

    PR_SET_PDEATHSIG only reaches our direct children, and a worker can hang on its
    way out (it retries the API's websocket): if pytest is killed, the watchdog sees
    its stdin close, waits for the marked processes to go, SIGKILLs the rest (flow runs
    in their own sessions included) and removes the dirs it was told about.
    """
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, f"{MARK_VAR}={_SESSION}", str(_STOP_TIMEOUT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to pytest's process group is not for it
            text=True,
        )
    if directory is not None and _watchdog.stdin is not None:
        _watchdog.stdin.write(f"{directory}\n")
        _watchdog.stdin.flush()


def _clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without the caller's PREFECT_* (a profile, an API URL), plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.pop(MARK_VAR, None)
    return {**base, **(env or {})}


def spawn(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    user: str | None = None,
    death_signal: int = signal.SIGTERM,
) -> Service:
    """Start `cmd` in its own session with its output in `log_path`, marked and registered."""
    _watch()
    marker = f"{_SESSION}-{next(_counter)}"
    with log_path.open("a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} $ {' '.join(cmd)}\n")
        log.flush()
        process = subprocess.Popen(
            list(cmd),
            env={**env, MARK_VAR: marker},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            extra_groups=[] if user else None,
            preexec_fn=_death_signal(death_signal),
        )
    service = Service(name, process, log_path, marker)
    _SERVICES.append(service)
    return service


def _tail(text: str, limit: int = 20_000) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def _wait(ready: Callable[[], bool], service: Service, timeout: float, what: str) -> float:
    """Poll `ready` until true; fail with the service's log if it exits or times out."""
    start = time.monotonic()
    while not ready():
        if not service.running:
            raise RuntimeError(
                f"{service.name} exited with code {service.process.returncode} before {what}\n"
                + _tail(service.log())
            )
        if time.monotonic() - start > timeout:
            raise RuntimeError(
                f"{service.name}: no {what} after {timeout:.0f} s\n" + _tail(service.log())
            )
        time.sleep(0.1)
    return time.monotonic() - start


# --- PostgreSQL ---------------------------------------------------------------------------


def pg_bin() -> Path:
    """Directory of initdb/pg_ctl/postgres: $PG_BIN, else Debian's newest, else PATH."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail(f"PostgreSQL's initdb not found: {INSTALL_HINT}")


def _pg_os_user() -> str | None:
    """The OS user to run PostgreSQL as: None (ourselves) unless root, which it refuses."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:  # the Debian package creates it; a bare machine may not have it
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "postgres"], check=True
        )
    return "postgres"


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster: TCP on 127.0.0.1:`port`, socket in `socket_dir`."""

    port: int
    user: str
    password: str
    database: str
    data_dir: Path
    socket_dir: Path
    service: Service = field(repr=False)
    host: str = HOST

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL for Prefect (`PREFECT_API_DATABASE_CONNECTION_URL`)."""
        return (
            f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/"
            f"{database or self.database}"
        )

    def psql(self, *sql: str, database: str = "postgres") -> str:
        """Run statements as the superuser over the unix socket; return psql's output."""
        cmd = [str(pg_bin() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", database]
        for statement in sql:
            cmd += ["-c", statement]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql}: {result.stderr}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """A new empty database owned by our user (a clean Prefect); returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use [a-z0-9_]")
        self.psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url(name)

    def log(self) -> str:
        return self.service.log()


def start_postgres(base: Path) -> Postgres:
    """initdb a cluster in `base` and run `postgres` in the foreground as our child.

    fsync, synchronous_commit and full_page_writes are off: durability is worth nothing
    for a cluster that is thrown away, and every commit would wait for the disk.
    """
    bindir = pg_bin()
    user = _pg_os_user()
    data, sockets, log_path = base / "data", base / "run", base / "postgres.log"
    sockets.mkdir()
    if user:
        entry = pwd.getpwnam(user)
        for path in (base, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    env = _clean_env({"LC_ALL": "C.UTF-8", "TZ": "UTC"})
    start = time.monotonic()
    initdb_cmd = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8"]
    initdb_cmd += ["--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]
    initdb = subprocess.run(
        initdb_cmd,
        env=env,
        user=user,
        capture_output=True,
        text=True,
        cwd=base,
        timeout=120,
        check=False,
    )
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
    record_timing("postgres initdb", time.monotonic() - start)
    password = uuid.uuid4().hex
    for attempt in range(3):  # a free port can be taken before postgres binds it
        port = free_port()
        settings = {
            "listen_addresses": HOST,
            "port": str(port),
            "unix_socket_directories": str(sockets),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        cmd = [str(bindir / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients to leave.
        service = spawn(
            "postgres", cmd, log_path, env, cwd=base, user=user, death_signal=signal.SIGINT
        )
        pg = Postgres(port, "prefect", password, "prefect", data, sockets, service)
        isready = [str(bindir / "pg_isready"), "-q", "-h", str(sockets), "-p", str(port)]
        try:
            _wait(
                lambda cmd=isready: subprocess.run(cmd, check=False).returncode == 0,
                service,
                _PG_START_TIMEOUT,
                "pg_isready",
            )
        except RuntimeError:
            if attempt < 2 and "could not bind" in service.log():
                continue
            raise
        break
    pg.psql(
        f"CREATE ROLE prefect LOGIN PASSWORD '{password}'", "CREATE DATABASE prefect OWNER prefect"
    )
    record_timing("postgres start (initdb to database ready)", time.monotonic() - start)
    return pg


def stop_postgres(pg: Postgres) -> None:
    """`pg_ctl stop -m fast`, then make sure the postmaster has gone."""
    if pg.service.running:
        subprocess.run(
            [str(pg_bin() / "pg_ctl"), "stop", "-D", str(pg.data_dir), "-m", "fast", "-w"],
            user=_pg_os_user(),
            env=_clean_env(),
            capture_output=True,
            timeout=60,
            check=False,
        )
    pg.service.stop(sig=signal.SIGINT)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the session, database `prefect` owned by user `prefect`.

    Its directory is under /tmp, not pytest's tmp (0700 root dirs that the postgres user,
    which the server must run as when we are root, cannot enter).
    """
    base = Path(tempfile.mkdtemp(prefix="router-pg-"))
    _watch(base)
    try:
        pg = start_postgres(base)
    except RuntimeError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc}")
    try:
        yield pg
    finally:
        stop_postgres(pg)
        shutil.rmtree(base, ignore_errors=True)


# --- Prefect server -------------------------------------------------------------------------


def _final(run: FlowRun | None) -> bool:
    return run is not None and run.state is not None and run.state.is_final()


@dataclass
class PrefectServer:
    """A running `prefect server start`, how to reach it, and what tests do with it."""

    api_url: str
    port: int
    home: Path
    """Its own PREFECT_HOME; clients and workers get their own next to it."""
    database_url: str
    service: Service = field(repr=False)
    _client: SyncPrefectClient | None = field(default=None, repr=False)
    auth: str | None = None
    """The API's basic authentication ("user:password"), given to clients, if any."""

    def env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for a client, CLI or worker subprocess of this server.

        The caller's PREFECT_* variables are dropped; `home` (default: a client home
        shared by such subprocesses) becomes PREFECT_HOME, so ~/.prefect is not touched.
        """
        home = home or self.home.parent / "client-home"
        home.mkdir(parents=True, exist_ok=True)
        auth = {"PREFECT_API_AUTH_STRING": self.auth} if self.auth else {}
        return _clean_env(
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                **auth,
                **extra,
            }
        )

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point Prefect in *this* process at the server (nests inside prefect_test_harness)."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        updates: dict[Any, Any] = {PREFECT_API_URL: self.api_url}
        if self.auth:
            updates[PREFECT_API_AUTH_STRING] = self.auth
        _drain_workers()  # events and logs go to the server of the current settings
        try:
            with temporary_settings(updates):
                yield
        finally:
            _drain_workers()

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A synchronous client, opened once: each new one costs ~0.4 s (CSRF, version)."""
        from prefect.client.orchestration import get_client

        with self.settings():
            if self._client is None:
                self._client = get_client(sync_client=True).__enter__()
            yield self._client

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.service.log()

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.__exit__(None, None, None)
            self._client = None
        self.service.stop()

    def cli(
        self,
        *args: str,
        cwd: Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `prefect --no-prompt ARGS` against this server (~3 s: a new interpreter).

        E.g. ``cli("deploy", "--name", "route-job", "--pool", pool.name)`` deploys from
        the repo's prefect.yaml as production does; no git remote is needed (its pull
        step is `set_working_directory`). Raises with the output when it fails.
        """
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
        result = subprocess.run(
            cmd,
            cwd=cwd,
            env={**self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}{result.stderr}"
            )
        return result

    # deployments and runs

    def deploy(
        self,
        entrypoint: str,
        pool: str,
        name: str = "test",
        *,
        job_variables: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> str:
        """Deploy `entrypoint` ("path/in/repo.py:flow_function") from the working tree.

        A local path source needs no git remote: the deployment's pull step sets the
        working directory to REPO_ROOT, where the worker's flow runs load the entrypoint.
        No image (process pool). Returns "flow-name/deployment-name" for `run_deployment`.
        """
        from prefect import Flow

        start = time.monotonic()
        with self.settings():
            flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)
            flow.deploy(
                name=name,
                work_pool_name=pool,
                job_variables=job_variables,
                parameters=parameters,
                build=False,
                push=False,
                print_next_steps=False,
                ignore_warnings=True,
            )
        record_timing(f"deploy {entrypoint}", time.monotonic() - start)
        return f"{flow.name}/{name}"

    def run_deployment(
        self, name: str, parameters: dict[str, Any] | None = None, **kw: Any
    ) -> FlowRun:
        """Create a run of deployment `name` ("flow/deployment"), scheduled now; no waiting.

        Like `prefect.deployments.run_deployment(name, parameters, timeout=0)`, but on the
        open client (that one opens a client per call, ~0.8 s). `kw` goes to
        `create_flow_run_from_deployment` (`name`, `tags`, `job_variables`...).
        """
        with self.client() as client:
            deployment = client.read_deployment_by_name(name)
            return client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters or {}, **kw
            )

    def flow_runs(self, ids: Iterable[UUID]) -> dict[UUID, FlowRun]:
        """id -> FlowRun as the API has it now (with `.state`, `.run_count`...)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        ids = list(ids)
        with self.client() as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids) or 1
            )
        return {r.id: r for r in runs}

    def wait_for_flow_runs(
        self,
        ids: Iterable[UUID],
        timeout: float = 60.0,
        *,
        pool: WorkPool | None = None,
        interval: float = 0.25,
    ) -> dict[UUID, FlowRun]:
        """Wait until every run is in a final state; return id -> FlowRun.

        On time-out, raise with each unfinished run's state and last log lines, and the
        workers' logs when `pool` is given.
        """
        ids = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            runs = self.flow_runs(ids)
            pending = [i for i in ids if not _final(runs.get(i))]
            if not pending:
                return runs
            if time.monotonic() > deadline:
                lines = [
                    f"{len(pending)} of {len(ids)} flow run(s) not final after {timeout:.0f} s"
                ]
                for i in pending:
                    run = runs.get(i)
                    lines.append(f"- {i}: {run.state.name if run and run.state else 'missing'}")
                    lines += [f"    {log.message}" for log in self.logs(i)[-20:]]
                if pool is not None:
                    lines.append(pool.logs())
                raise TimeoutError("\n".join(lines))
            time.sleep(interval)

    def task_runs(
        self, flow_run_id: UUID, *, at_least: int = 0, timeout: float = 15.0
    ) -> list[TaskRun]:
        """The flow run's task runs, waiting up to `timeout` s until there are `at_least`,
        each in a final state (call it once the flow run is final).

        Task runs reach the database through events and the server's task run recorder,
        which writes them in batches (up to 1 s later), after the flow run's own final
        state: read at once, some may be missing or still show Running.
        """
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        deadline = time.monotonic() + timeout
        while True:
            with self.client() as client:
                runs = list(
                    client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
                    )
                )
            final = all(r.state is not None and r.state.is_final() for r in runs)
            if (len(runs) >= at_least and final) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)

    def logs(
        self, flow_run_id: UUID, *, containing: str | None = None, timeout: float = 15.0
    ) -> list[Log]:
        """The run's log records as the UI shows them, oldest first.

        Records reach the API in batches, after the run's state: with `containing`, wait
        up to `timeout` s for a record whose message contains it.
        """
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        deadline = time.monotonic() + timeout
        while True:
            with self.client() as client:
                logs = list(
                    client.read_logs(
                        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                        sort=LogSort.TIMESTAMP_ASC,
                        limit=200,
                    )
                )
            if containing is None or any(containing in log.message for log in logs):
                return logs
            if time.monotonic() > deadline:
                return logs
            time.sleep(0.2)

    def retry_flow_run(self, flow_run_id: UUID) -> Any:
        """What the UI's Retry button does: force the run to Scheduled "AwaitingRetry".

        Prefect 3.9's UI (v2, the default: ui-v2/assets/flow-run._id-*.js) posts
        `/flow_runs/{id}/set_state` with state {type: SCHEDULED, name: "AwaitingRetry",
        message: "Retry from the UI"} and `force: true` (the legacy v1 UI sends force
        false). A worker picks the run up again; the whole flow re-executes. Returns
        the OrchestrationResult.
        """
        from prefect.states import AwaitingRetry

        with self.client() as client:
            return client.set_flow_run_state(
                flow_run_id, AwaitingRetry(message="Retry from the UI"), force=True
            )

    def timeline(self, flow_run_id: UUID) -> dict[str, float]:
        """Seconds from the run's creation to the first time it entered each state.

        "Pending": a worker took it; "Running": its flow process started executing it.
        """
        with self.client() as client:
            run = client.read_flow_run(flow_run_id)
            states = client.read_flow_run_states(flow_run_id)
        timeline: dict[str, float] = {}
        for state in sorted(states, key=lambda s: s.timestamp):
            timeline.setdefault(str(state.name), (state.timestamp - run.created).total_seconds())
        return timeline


def _drain_workers() -> None:
    """Flush and stop this process's events and log workers: Prefect keeps one events
    client per process whatever the API URL, so runs in this process under another
    server's settings would otherwise send their events (task runs) to the wrong one."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10)
    APILogWorker.drain_all(timeout=10)


def start_prefect_server(
    base: Path,
    database_url: str | None = None,
    auth: str | None = None,
    settings: Mapping[str, str] | None = None,
    python: str | None = None,
) -> PrefectServer:
    """`prefect server start` on 127.0.0.1 and a free port; returns once /api/health answers.

    `database_url` None: SQLite in the server's PREFECT_HOME (fine for one run at a time).
    `settings`: the server process's settings instead of SERVER_SETTINGS (the benches).
    `python`: its interpreter (default `server_python()`).
    Most of the start-up is importing the server (~7 s of CPU: pydantic schemas), not
    migrations.
    """
    home = base / "server-home"
    home.mkdir(parents=True)
    database_url = database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    interpreter = python or server_python()
    for attempt in range(3):
        port = free_port()
        api_url = f"http://{HOST}:{port}/api"
        env = _clean_env(
            {
                **(SERVER_SETTINGS if settings is None else settings),
                "PREFECT_HOME": str(home),
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
                "PREFECT_API_URL": api_url,
                **({"PREFECT_SERVER_API_AUTH_STRING": auth} if auth else {}),
            }
        )
        cmd = [interpreter, "-m", "prefect", "server", "start", "--host", HOST, "--port"]
        start = time.monotonic()
        service = spawn("prefect server", [*cmd, str(port)], base / "server.log", env, cwd=base)
        server = PrefectServer(api_url, port, home, database_url, service, auth=auth)
        try:
            _wait(server.healthy, service, _SERVER_START_TIMEOUT, "/api/health")
        except RuntimeError:
            service.stop()
            if attempt < 2 and "already in use" in service.log():
                continue
            raise
        record_timing("prefect server start (to /api/health)", time.monotonic() - start)
        return server
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def prefect_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., PrefectServer]]:
    """Factory: ``prefect_servers(database_url=None) -> PrefectServer``, stopped at the end.

    None means SQLite; pass ``postgres.url()`` or ``postgres.create_database("name")``
    (a clean Prefect) for PostgreSQL.
    """
    started: list[PrefectServer] = []

    def start(database_url: str | None = None, auth: str | None = None) -> PrefectServer:
        try:
            server = start_prefect_server(tmp_path_factory.mktemp("prefect"), database_url, auth)
        except RuntimeError as exc:
            pytest.fail(f"prefect server did not start: {exc}")
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def prefect_server(
    prefect_servers: Callable[..., PrefectServer], postgres: Postgres
) -> Iterator[PrefectServer]:
    """The session's Prefect server on PostgreSQL (stopped before PostgreSQL is)."""
    server = prefect_servers(postgres.url())
    try:
        yield server
    finally:
        server.stop()


# --- work pools and workers -----------------------------------------------------------------


@dataclass
class Worker:
    """One `prefect worker start --type process`, or one `dicom-router worker` (warm)."""

    name: str
    pool: str
    home: Path
    service: Service = field(repr=False)

    @property
    def running(self) -> bool:
        return self.service.running

    def log(self) -> str:
        return self.service.log()

    def stop(self) -> None:
        """SIGTERM it, and kill any flow run it left (they run in sessions of their own)."""
        self.service.stop()


def create_work_pool(
    server: PrefectServer, name: str, *, direct_engine: bool = False, warm: bool = False
) -> str:
    """A process work pool with the default job template, as `prefect work-pool create`.

    `warm`: a pool of the `dicom-router` type instead, as `dicom-router setup` creates it.

    `direct_engine`: make `python -m prefect.engine` the pool's default `command`. The
    worker then starts the engine itself instead of Prefect 3.9's workspace supervisor
    (which prepares the workspace and then execs the engine: two interpreter start-ups).
    Measured: one run alone ~7.5 s instead of ~13-17 s, on a busy 2-core machine. But
    that is not how a default production pool runs flows: the flow process then shares
    the worker's process group, and the supervisor's PYTHONPATH set-up is skipped.
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    if warm:
        from flows.service import ensure_work_pool

        with server.settings():
            ensure_work_pool(name)
        return name
    template = ProcessWorker.get_default_base_job_template()
    if direct_engine:
        template["variables"]["properties"]["command"]["default"] = (
            f"{sys.executable} -m prefect.engine"
        )
    with server.client() as client:
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=template)
        )
    return name


def start_worker(
    server: PrefectServer,
    pool: str,
    name: str,
    base: Path,
    *,
    limit: int | None = None,
    env: Mapping[str, str] | None = None,
    warm: bool = False,
    heartbeat: float | None = None,
    args: Sequence[str] = (),
    cwd: Path = REPO_ROOT,
) -> Worker:
    """`prefect worker start --pool POOL --type process --name NAME`, cwd the repo root
    (or `cwd`: another checkout's worker, bench/server_ab.py).

    `warm`: `dicom-router worker --pool POOL --name NAME` instead (its own, event-driven
    pickup: no WORKER_SETTINGS), with `--heartbeat` when given.
    Does not wait: see `WorkPool.start_workers`. `env` reaches its flow runs too
    (e.g. DICOM_ROUTER_* settings); WORKER_SETTINGS are applied first.
    """
    home = base / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    if warm:
        cmd = [sys.executable, "-m", "router", "worker", "--pool", pool, "--name", name]
        if heartbeat is not None:
            cmd += ["--heartbeat", str(heartbeat)]
        settings: dict[str, str] = {}
    else:
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
        cmd += ["--type", "process", "--name", name]
        settings = WORKER_SETTINGS
    if limit is not None:
        cmd += ["--limit", str(limit)]
    cmd += list(args)
    worker_env = server.env(home, **settings, **(env or {}))
    service = spawn(f"worker {name}", cmd, base / f"{name}.log", worker_env, cwd=cwd)
    return Worker(name, pool, home, service)


@dataclass
class WorkPool:
    """A work pool on a server (process, or warm: dicom-router), and the workers serving it."""

    name: str
    server: PrefectServer
    base: Path
    workers: list[Worker] = field(default_factory=list)
    warm: bool = False
    heartbeat: float | None = None
    """The warm workers' --heartbeat."""

    def start_workers(
        self,
        n: int = 1,
        *,
        limit: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        cwd: Path = REPO_ROOT,
    ) -> list[Worker]:
        """Start `n` more workers at once; return when the server has heard from each.

        A worker's first heartbeat comes after it has read its pool: it is polling then.
        """
        start = time.monotonic()
        new = [
            start_worker(
                self.server,
                self.name,
                f"{self.name}-w{len(self.workers) + i + 1}",
                self.base,
                limit=limit,
                env=env,
                warm=self.warm,
                heartbeat=self.heartbeat,
                args=args,
                cwd=cwd,
            )
            for i in range(n)
        ]
        self.workers += new
        for worker in new:
            _wait(
                lambda w=worker: w.name in self.registered_workers(),
                worker.service,
                _WORKER_START_TIMEOUT,
                "heartbeat",
            )
        record_timing(f"{n} worker(s) start (to first heartbeat)", time.monotonic() - start)
        return new

    def registered_workers(self) -> set[str]:
        with self.server.client() as client:
            return {w.name for w in client.read_workers_for_work_pool(self.name)}

    def deploy(self, entrypoint: str, name: str = "test", **kw: Any) -> str:
        """`PrefectServer.deploy` to this pool."""
        return self.server.deploy(entrypoint, self.name, name, **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} ---\n{_tail(w.log(), 10_000)}" for w in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@contextlib.contextmanager
def work_pools(
    server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkPool]]:
    """Factory of process work pools with workers, all stopped on exit.

    For a pool shared by a module's tests, wrap it in a module-scoped fixture; the
    `work_pool` fixture is the per-test one.
    """
    pools: list[WorkPool] = []

    def make(
        workers: int = 1,
        *,
        limit: int | None = None,
        env: Mapping[str, str] | None = None,
        direct_engine: bool = False,
        warm: bool = False,
        heartbeat: float | None = None,
        args: Sequence[str] = (),
    ) -> WorkPool:
        name = create_work_pool(
            server, f"pool-{uuid.uuid4().hex[:8]}", direct_engine=direct_engine, warm=warm
        )
        pool = WorkPool(name, server, tmp_path_factory.mktemp(name), warm=warm, heartbeat=heartbeat)
        pools.append(pool)
        if workers:
            try:
                pool.start_workers(workers, limit=limit, env=env, args=args)
            except RuntimeError as exc:
                pytest.fail(f"worker did not start: {exc}")
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            pool.stop()


@pytest.fixture
def work_pool(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkPool]]:
    """Factory: ``work_pool(workers=1, *, limit=None, env=None, direct_engine=False,
    warm=False, heartbeat=None)``.

    Creates a process work pool (or, `warm`, a dicom-router pool with warm workers) (unique name) on the session's server and starts
    `workers` workers for it; they, and their flow runs, are stopped at teardown.
    """
    with work_pools(prefect_server, tmp_path_factory) as make:
        yield make


# --- reporting ------------------------------------------------------------------------------

_OFFSETS = pytest.StashKey[dict[int, int]]()
_PLUGIN_FIXTURES = {"postgres", "prefect_servers", "prefect_server", "work_pool"}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember where each service's log stood, to show only what this test added."""
    item.stash[_OFFSETS] = {id(s): _size(s.log_path) for s in _SERVICES}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach what the server, workers and postgres logged during a failing test."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not _PLUGIN_FIXTURES & set(getattr(item, "fixturenames", ())):
        return
    offsets = item.stash.get(_OFFSETS, {})
    for service in _SERVICES:
        try:
            with service.log_path.open("rb") as f:
                f.seek(offsets.get(id(service), 0))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        if text.strip():
            report.sections.append((f"{service.name} log", _tail(text)))


def pytest_report_header() -> str:
    """Which interpreter the Prefect servers run on (a site runs its own, on 3.13 or newer)."""
    python = server_python()
    try:
        version, prefect_version = python_and_prefect(python)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return f"prefect server: {python} (cannot run it: {exc})"
    return f"prefect server: {python} (Python {version}, prefect {prefect_version})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the timings measured (server start, pickup latency...) in the summary."""
    if TIMINGS:
        terminalreporter.section("Prefect service timings")
        terminalreporter.write_line(pytest_report_header())
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:8.2f} s  {what}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Kill whatever this session started and did not stop; let the watchdog go."""
    _kill_marked(_SESSION)
    if _watchdog is not None and _watchdog.stdin is not None:
        _watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            _watchdog.wait(2 * _STOP_TIMEOUT)
