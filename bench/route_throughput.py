#!/usr/bin/env python3
"""Route throughput: the router's send rate against dcmtk's storescu, same files, same receiver.

Absolute rates depend on the machine, so every figure is measured in the same invocation as
its reference and reported as a ratio: one `/usr/bin/storescp --ignore` receiver, one job
folder of N 512x512 CT images (cached under bench/out/), the page cache warmed once, then
`storescu` (one association), `dicom-router route` (the Prefect flow, as users run it) and
the plain path (`router.route.route_job`, no Prefect) each send the same files to it.

Every child runs in its own process group, so Ctrl-C, SIGTERM or an error in the bench
kills the receiver, the router and the router's Prefect server together; nothing is left.
See bench/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
STORESCP = "/usr/bin/storescp"  # not `storescp` on PATH: a Python shim shadows it
STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"
HOST = "127.0.0.1"
RECEIVER_AET = "BENCHSCP"
ROWS = COLS = 512
SEND_RATIO_TARGET = 0.3
PARALLEL_RATIO_TARGET = 0.6
"""With more than one association a job (of --files 1500 or more) must reach this."""
MEMORY_RATIO_TARGET = 1.1
BUSY_WARNING = 0.1
ROUTING_FILES = ("routing-record.jsonl", "routing-status.json", ".routing.lock")
COMPLETE = ".bench-complete"

PLAIN_PATH = """\
import json, sys
from router.config import load_config
from router.route import route_job
from router.settings import Settings
job, config, log_file = sys.argv[1:4]
settings = Settings(config=config, log_file=log_file)
report = route_job(job, load_config(settings.config), settings, origin="bench")
print(json.dumps(report.to_dict()))
"""

IMPORT_ONLY = "import router.config, router.route, router.settings"

DEFAULT_ASSOCIATIONS = "from router.settings import Settings; print(Settings().associations)"


# --- children that never outlive the bench --------------------------------------------------

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None

_live: set[subprocess.Popen[bytes]] = set()


def _die_with_parent() -> None:
    """preexec_fn: a new process group (so Ctrl-C reaches only us) and PDEATHSIG as a backstop
    should the bench be SIGKILLed before its cleanup runs.

    SIGINT rather than SIGTERM: Python children then unwind and run their atexit hooks, which
    is how the router stops its ephemeral Prefect server (that grandchild has no PDEATHSIG).
    """
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def spawn(
    args: Sequence[str],
    env: dict[str, str],
    stdout: Any,
    stderr: Any,
    *,
    stdin: Any = subprocess.DEVNULL,
    text: bool = False,
    cwd: Path = REPO,  # `python -c` children import `tests.factory` from the checkout
) -> subprocess.Popen:
    proc = subprocess.Popen(
        list(args),
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        text=text,
        preexec_fn=_die_with_parent,
    )
    _live.add(proc)
    return proc


def _group_alive(pgid: int) -> bool:
    """Whether a live process is left in the group (a zombie about to be reaped is not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(_group_members(pgid, live_only=True))


def stop_group(proc: subprocess.Popen, timeout: float = 5.0) -> bool:
    """SIGTERM the child's whole group, SIGKILL what is left; True if anything was still there.

    Called after a child exits too: a router that leaves its Prefect server running is a bug
    the bench should see, not inherit.
    """
    found = False
    if proc.returncode is None or _group_alive(proc.pid):
        found = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(proc.pid):
            if proc.returncode is None:
                proc.poll()
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        proc.wait()
    _live.discard(proc)
    return found


def stop_all() -> None:
    for proc in list(_live):
        stop_group(proc)


class Terminated(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every `finally` stops its children."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """`run()` with Ctrl-C, SIGTERM and SIGHUP unwinding it, every child stopped at the end:
    its result, or the exit code of an interruption (said on stderr)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGHUP, _terminated)
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        stop_all()


# --- measuring one child --------------------------------------------------------------------


def _vm_hwm_kib(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


def _group_members(pgid: int, live_only: bool = False) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and not (live_only and fields[0] == b"Z"):  # state, ppid, pgrp
            members.append(int(name))
    return members


class PeakWatcher(threading.Thread):
    """Samples each process of a child's group for its own peak RSS (VmHWM).

    wait4's ru_maxrss is the largest of the child and the descendants it reaped: for the
    CLI that is the router *or* its ephemeral Prefect server, whichever is bigger. VmHWM is
    a high-water mark, so the last sample before a process exits is its peak (minus what
    it grows in its final interval).
    """

    def __init__(self, pgid: int, interval: float = 0.05, rescan: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pgid = pgid
        self.interval = interval
        self.rescan = rescan
        self.peaks: dict[int, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        members = {self.pgid}
        last_scan = 0.0
        while not self._done.is_set():
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                members |= set(_group_members(self.pgid))
                last_scan = now
            for pid in members:
                hwm = _vm_hwm_kib(pid)
                if hwm is not None:
                    self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass
class ChildRun:
    seconds: float
    exit_code: int
    stdout: str
    wait4_peak_mib: float
    own_peak_mib: float
    """The child process itself (sampled VmHWM; wait4's figure when there is no child)."""
    descendants_peak_mib: float | None
    """Largest process the child started (for the CLI: the ephemeral Prefect server)."""
    leftovers: bool


def run_child(args: Sequence[str], env: dict[str, str], log: Path) -> ChildRun:
    """Run to completion; wall time from spawn to reaping, peak RSS from wait4 and VmHWM."""
    with tempfile.TemporaryFile() as out, log.open("wb") as err:
        start = time.perf_counter()
        proc = spawn(args, env, out, err)
        watcher = PeakWatcher(proc.pid)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watcher.stop()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        leftovers = stop_group(proc)
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    wait4_mib = usage.ru_maxrss / 1024
    own = watcher.peaks.pop(proc.pid, 0) / 1024
    others = max(watcher.peaks.values(), default=0) / 1024
    return ChildRun(
        seconds=seconds,
        exit_code=proc.returncode,
        stdout=stdout,
        wait4_peak_mib=wait4_mib,
        own_peak_mib=own if own else wait4_mib,
        descendants_peak_mib=others or None,
        leftovers=leftovers,
    )


# --- the job folder, the receiver, the environment ------------------------------------------


def ensure_job(out: Path, n: int) -> Path:
    """The cached job of `n` CT images (see `build_job`)."""
    code = (
        "import sys; from tests.factory import write_job; "
        f"write_job(sys.argv[1], n_output={n}, n_input=0, rows={ROWS}, cols={COLS})"
    )
    return build_job(out / "jobs" / f"ct{ROWS}-{n}", code, [], f"{n} images of {ROWS}x{COLS}")


def build_job(job: Path, code: str, args: list[str], what: str) -> Path:
    """A cached job folder: `code` run as `python -c code PARTIAL *args` builds it once,
    into a temporary name then renamed, so an interrupted build is never taken for a job.

    Built in a child process so the bench itself never imports numpy and pydicom: a forked
    child's ru_maxrss starts from its parent's RSS, and the bench must stay small for wait4's
    figure to be the router's.
    """
    if (job / COMPLETE).exists():
        return job
    partial = job.with_name(job.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(job, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"building {job} ({what}) ...", file=sys.stderr, flush=True)
    argv = [sys.executable, "-c", code, str(partial), *args]
    proc = spawn(argv, dict(os.environ), subprocess.DEVNULL, None)  # stdout may be --json's
    try:
        if proc.wait() != 0:
            raise RuntimeError(f"building {job.name} failed (exit {proc.returncode})")
    finally:
        stop_group(proc)
    (partial / COMPLETE).write_text(json.dumps({"what": what}) + "\n")
    partial.rename(job)
    print(f"built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return job


def output_files(job: Path) -> list[Path]:
    return sorted(p for p in (job / "OUTPUT").rglob("*") if p.is_file())


def warm_page_cache(files: Sequence[Path]) -> int:
    """Read every file once so storescu and the router both start from a warm cache."""
    total = 0
    for path in files:
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    return total


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy while the bench sits idle: others' load skews every figure."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def reset_record(job: Path) -> None:
    """Forget earlier routings, or the record would make the next run send nothing."""
    for name in ROUTING_FILES:
        (job / name).unlink(missing_ok=True)
    for tmp in job.glob(".routing-status.json.*.tmp"):
        tmp.unlink()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def dcmtk_env() -> dict[str, str]:
    """Debian's dcmtk leaves Nagle on unless told: ~45 ms per image otherwise (PERF-NOTES)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def router_env(
    prefect_home: Path, associations: int | None = None, most: int | None = None
) -> dict[str, str]:
    """The caller's environment without its Prefect and router settings, so runs are
    reproducible and never land on a real Prefect server; a PREFECT_HOME of our own.
    `associations`: DICOM_ROUTER_ASSOCIATIONS (None: the router's default), with
    DICOM_ROUTER_MAX_ASSOCIATIONS raised to `most` (the largest value of the invocation) so
    that the concurrency limit the first CLI run creates (4 by default) caps none."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DICOM_ROUTER_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TCP_NODELAY="1",
    )
    if associations is not None:
        env["DICOM_ROUTER_ASSOCIATIONS"] = str(associations)
        env["DICOM_ROUTER_MAX_ASSOCIATIONS"] = str(max(associations, most or 0, 2))
    return env


def default_associations(env: dict[str, str]) -> int:
    """The router's `associations` setting as the runs see it (in a child: no pydantic here)."""
    out = subprocess.run(
        [sys.executable, "-c", DEFAULT_ASSOCIATIONS],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@dataclass
class Receiver:
    """Where every sender sends: a port, and how to empty it before each run."""

    port: int
    program: str
    reset: Callable[[], None]
    http_url: str = ""
    """Orthanc's REST root (its DICOMweb service root is this + /dicom-web)."""
    count: Callable[[], int] = lambda: -1
    """Instances it holds (Orthanc), or -1 when it cannot tell (storescp --ignore)."""


@contextlib.contextmanager
def receiver(kind: str, max_pdu: int, logs: Path, out: Path) -> Iterator[Receiver]:
    """The receiver on a free port of 127.0.0.1, stopped (with its process group) at exit."""
    if kind == "orthanc":
        with orthanc(max_pdu, logs, out) as rec:
            yield rec
        return
    with storescp(max_pdu, logs) as port:
        yield Receiver(port, f"{STORESCP} --fork --ignore", lambda: None)


def _wait_for_port(proc: subprocess.Popen, port: int, log: Path, what: str, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def storescp(max_pdu: int, logs: Path) -> Iterator[int]:
    """`storescp --fork --ignore`: receives and discards.

    --fork: a process per association. Without it storescp serves one association at a
    time and keeps the others waiting, so parallel associations could never gain.
    """
    port = free_port()
    log = logs / "storescp.log"
    args = [STORESCP, "--fork", "--ignore", "--max-pdu", str(max_pdu), "-aet", RECEIVER_AET]
    args.append(str(port))
    with log.open("wb") as fh:
        proc = spawn(args, dcmtk_env(), fh, subprocess.STDOUT)
    try:
        _wait_for_port(proc, port, log, "storescp", 10)
        yield port
    finally:
        stop_group(proc)


ORTHANC_THREADS = 4
"""Orthanc's own default of DicomThreadsCount: associations it serves at once."""


ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@contextlib.contextmanager
def orthanc(max_pdu: int, logs: Path, out: Path, *, dicomweb: bool = False) -> Iterator[Receiver]:
    """Debian's Orthanc as a PACS that stores what it gets: its own index and storage in
    `out/orthanc/` (emptied first), emptied over REST before every run so each run stores
    every instance anew (Orthanc keeps the first copy of a duplicate and discards it).
    `dicomweb`: with Debian's DICOMweb plugin (orthanc-dicomweb), STOW-RS at
    `http_url` + /dicom-web."""
    workdir = out / "orthanc"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port, http_port = free_port(), free_port()
    config = {
        "Name": "dicom-router-bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "Plugins": [ORTHANC_DICOMWEB] if dicomweb else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": RECEIVER_AET,
        "DicomPort": port,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "UnknownSopClassAccepted": True,
        "DicomThreadsCount": ORTHANC_THREADS,
        "MaximumPduLength": max_pdu,
        "SaveJobs": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = logs / "orthanc.log"
    url = f"http://{HOST}:{http_port}"

    def call(method: str, path: str) -> Any:
        req = urllib.request.Request(url + path, method=method)
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def reset() -> None:
        for patient in call("GET", "/patients"):
            call("DELETE", f"/patients/{patient}")
        if call("GET", "/instances"):
            raise RuntimeError("Orthanc still holds instances after the reset")

    with log.open("wb") as fh:
        args = [ORTHANC, "--no-jobs", str(workdir / "orthanc.json")]
        proc = spawn(args, dcmtk_env(), fh, subprocess.STDOUT)  # its DICOM side is dcmtk
    try:
        _wait_for_port(proc, port, log, "Orthanc", 60)
        if dicomweb:
            _wait_for_port(proc, http_port, log, "Orthanc's HTTP server", 60)
        program = f"{ORTHANC} (storing, {ORTHANC_THREADS} DICOM threads)"
        yield Receiver(port, program, reset, url, lambda: len(call("GET", "/instances")))
    finally:
        stop_group(proc, timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


def write_config(path: Path, port: int) -> Path:
    destination = {
        "IP": HOST,
        "PORT": port,
        "AETitleSender": "DICOM-ROUTER",
        "AETitleTo": RECEIVER_AET,
    }
    config = {"routing": [{"name": "bench", "send": [{".*": destination}]}]}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def router_cli() -> str:
    """The console script beside this interpreter: a pyenv shim would add its own start-up."""
    beside = Path(sys.executable).with_name("dicom-router")
    if beside.exists():
        return str(beside)
    found = shutil.which("dicom-router")
    if not found:
        raise SystemExit("dicom-router is not installed (pip install -e .)")
    return found


# --- the runs -------------------------------------------------------------------------------


@dataclass
class Rate:
    seconds: float
    img_per_s: float
    mb_per_s: float

    @classmethod
    def of(cls, seconds: float, files: int, nbytes: int) -> Rate:
        return cls(seconds, files / seconds, nbytes / 1e6 / seconds)


@dataclass
class Send:
    destination: str
    seconds: float
    selected: int
    stored: int
    state: str


@dataclass
class RouterRun:
    path: str
    """`cli` (dicom-router route, the Prefect flow) or `plain` (route_job, no Prefect)."""
    run: int
    associations: int
    """DICOM_ROUTER_ASSOCIATIONS of the run: associations per destination for the job."""
    prefect_home: str | None
    exit_code: int
    state: str | None
    total_seconds: float
    sends: list[Send]
    send_seconds: float
    fixed_seconds: float
    """total − send: interpreter, imports, Prefect, scanning, the record."""
    img_per_s: float
    mb_per_s: float
    ratio_to_storescu: float | None
    peak_rss_mib: float
    """The router process's own peak RSS."""
    children_peak_rss_mib: float | None
    """Largest process the router started: the CLI's Prefect server, or a sending process."""
    wait4_peak_rss_mib: float
    left_processes_behind: bool
    problems: list[str] = field(default_factory=list)


def storescu_run(job: Path, port: int, files: int, nbytes: int, logs: Path, run: int) -> Rate:
    """One association, only the needed contexts (-R), every file under OUTPUT."""
    args = [STORESCU, "-aet", "BENCHSCU", "-aec", RECEIVER_AET, "-R", "+sd", "+r"]
    args += [HOST, str(port), str(job / "OUTPUT")]
    result = run_child(args, dcmtk_env(), logs / f"storescu-{run}.log")
    if result.exit_code != 0:
        text = (logs / f"storescu-{run}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"storescu exited with {result.exit_code}:\n{text}")
    return Rate.of(result.seconds, files, nbytes)


def router_run(
    path: str,
    run: int,
    associations: int,
    args: Sequence[str],
    env: dict[str, str],
    job: Path,
    files: int,
    nbytes: int,
    log: Path,
    prefect_home: str | None = None,
) -> RouterRun:
    """One routing of the job from a fresh record; `ratio_to_storescu` is set by the caller."""
    reset_record(job)
    result = run_child(args, env, log)
    problems: list[str] = []
    report: dict[str, Any] = {}
    try:
        report = json.loads(result.stdout[result.stdout.index("{") :])
    except ValueError:
        problems.append(f"no JSON report on stdout (exit {result.exit_code}); see {log}")
    sends = [
        Send(
            e["destination"],
            e["delivery"]["seconds"],
            e["delivery"]["selected"],
            e["delivery"]["stored"],
            e["state"],
        )
        for rule in report.get("rules", [])
        for e in rule["entries"]
        if e.get("delivery")
    ]
    send_seconds = sum(s.seconds for s in sends)
    stored = sum(s.stored for s in sends)
    if result.exit_code != 0:
        problems.append(f"exit code {result.exit_code}; see {log}")
    if report and stored != files:
        problems.append(f"stored {stored} of {files}: {report.get('reason')}")
    if result.leftovers:
        problems.append("processes of the run were still alive after it exited (killed)")
    rate = Rate.of(send_seconds, stored, nbytes * stored // files) if send_seconds else None
    return RouterRun(
        path=path,
        run=run,
        associations=associations,
        prefect_home=prefect_home,
        exit_code=result.exit_code,
        state=report.get("state"),
        total_seconds=result.seconds,
        sends=sends,
        send_seconds=send_seconds,
        fixed_seconds=result.seconds - send_seconds,
        img_per_s=rate.img_per_s if rate else 0.0,
        mb_per_s=rate.mb_per_s if rate else 0.0,
        ratio_to_storescu=None,
        peak_rss_mib=result.own_peak_mib,
        children_peak_rss_mib=result.descendants_peak_mib,
        wait4_peak_rss_mib=result.wait4_peak_mib,
        left_processes_behind=result.leftovers,
        problems=problems,
    )


def plain_args(job: Path, config: Path, log_file: Path) -> list[str]:
    return [sys.executable, "-c", PLAIN_PATH, str(job), str(config), str(log_file)]


def baseline_rss(env: dict[str, str], logs: Path) -> float:
    """Peak RSS of importing the plain path and doing nothing: what no job size changes."""
    result = run_child([sys.executable, "-c", IMPORT_ONLY], env, logs / "baseline.log")
    return result.own_peak_mib


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job = ensure_job(out, args.files)
    files = output_files(job)
    nbytes = warm_page_cache(files)
    prefect_home = out / "prefect-home"
    if not args.keep_prefect_home:
        shutil.rmtree(prefect_home, ignore_errors=True)
    new_home = not (prefect_home / "prefect.db").exists()
    env = router_env(prefect_home)
    counts: list[int] = args.associations or [default_associations(env)]
    envs = {a: router_env(prefect_home, a, max(counts)) for a in counts}
    routing_log = logs / "routing.log"
    routing_log.unlink(missing_ok=True)

    busy = cpu_busy()
    with receiver(args.receiver, args.max_pdu, logs, out) as rec:
        port = rec.port
        config = write_config(out / "route-bench.json", port)
        cli = [router_cli(), "route", str(job), "--config", str(config)]
        cli += ["--log-file", str(routing_log), "--json"]
        plain = plain_args(job, config, routing_log)
        n = len(files)
        # Interleaved, with storescu before every round and once after the last, so that
        # the reference sees the same drift in the machine's load as the router runs.
        scu: list[Rate] = []
        runs: list[RouterRun] = []
        for k in range(1, args.repeat + 1):
            rec.reset()
            scu.append(storescu_run(job, port, n, nbytes, logs, k))
            for a in counts:
                tag = f"-a{a}" if len(counts) > 1 else ""
                if not args.plain_only:
                    home = "new" if k == 1 and new_home and a == counts[0] else "warm"
                    log = logs / f"router-cli-{k}{tag}.log"
                    rec.reset()
                    runs.append(router_run("cli", k, a, cli, envs[a], job, n, nbytes, log, home))
                log = logs / f"router-plain-{k}{tag}.log"
                rec.reset()
                runs.append(router_run("plain", k, a, plain, envs[a], job, n, nbytes, log))
        rec.reset()
        scu.append(storescu_run(job, port, n, nbytes, logs, args.repeat + 1))
        baseline = baseline_rss(env, logs)
    reset_record(job)
    reference = Rate.of(statistics.median(r.seconds for r in scu), n, nbytes)
    for run in runs:
        run.ratio_to_storescu = run.img_per_s / reference.img_per_s if run.img_per_s else None
    runs.sort(key=lambda r: (r.path != "cli", r.associations, r.run))
    return {
        "files": len(files),
        "bytes": nbytes,
        "image": f"CT {ROWS}x{COLS}, explicit VR little endian",
        "job": str(job),
        "cpus": os.cpu_count(),
        "cpu_busy_before": busy,
        "receiver": {
            "program": rec.program,
            "host": HOST,
            "max_pdu": args.max_pdu,
            "env": "TCP_NODELAY=1",
        },
        "storescu": {
            "runs": [asdict(r) for r in scu],
            "median": asdict(reference),
            "options": "-R +sd +r, one association, TCP_NODELAY=1",
        },
        "router": [asdict(r) for r in runs],
        "import_only_peak_rss_mib": baseline,
        "targets": [target(runs, a) for a in counts],
        "logs": str(logs),
    }


def _median_ratio(runs: Sequence[RouterRun]) -> float | None:
    ratios = [r.ratio_to_storescu for r in runs if not r.problems and r.ratio_to_storescu]
    return statistics.median(ratios) if ratios else None


def target(runs: Sequence[RouterRun], associations: int) -> dict[str, Any]:
    """The send-ratio target for one associations setting: warm CLI runs decide, else plain."""
    mine = [r for r in runs if r.associations == associations]
    cli = [r for r in mine if r.path == "cli"]
    warm = [r for r in cli if r.prefect_home == "warm"] or cli
    plain = _median_ratio([r for r in mine if r.path == "plain"])
    warm_cli = _median_ratio(warm)
    decides = warm_cli if cli else plain
    minimum = PARALLEL_RATIO_TARGET if associations > 1 else SEND_RATIO_TARGET
    return {
        "associations": associations,
        "send_ratio_min": minimum,
        "plain_median": plain,
        "warm_cli_median": warm_cli,
        "decided_by": "warm cli" if cli else "plain",
        "met": decides is not None and decides >= minimum,
    }


def memory_check(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    small, large = args.memory_files
    jobs = {n: ensure_job(out, n) for n in (small, large)}
    env = router_env(out / "prefect-home", args.associations[0] if args.associations else None)
    associations = args.associations[0] if args.associations else default_associations(env)
    routing_log = logs / "routing.log"
    results: dict[int, RouterRun] = {}
    sizes: dict[int, int] = {}
    with receiver("storescp", args.max_pdu, logs, out) as rec:
        config = write_config(out / "route-bench.json", rec.port)
        for n, job in jobs.items():
            files = output_files(job)
            sizes[n] = warm_page_cache(files)
            log = logs / f"memory-plain-{n}.log"
            args_ = plain_args(job, config, routing_log)
            results[n] = router_run("plain", 1, associations, args_, env, job, n, sizes[n], log)
            reset_record(job)
        baseline = baseline_rss(env, logs)
    a, b = results[small], results[large]
    ratio = b.peak_rss_mib / a.peak_rss_mib
    per_1000 = (b.peak_rss_mib - a.peak_rss_mib) / (large - small) * 1000
    return {
        "memory_check": {
            "path": "plain (router.route.route_job, no Prefect)",
            "associations": associations,
            "import_only_peak_rss_mib": baseline,
            "runs": {str(n): asdict(r) for n, r in results.items()},
            "peak_rss_mib": {str(small): a.peak_rss_mib, str(large): b.peak_rss_mib},
            "ratio": ratio,
            "growth_mib_per_1000_files": per_1000,
            "target_ratio_max": MEMORY_RATIO_TARGET,
            "met": ratio <= MEMORY_RATIO_TARGET and not (a.problems or b.problems),
        },
        "logs": str(logs),
    }


# --- output ---------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    """`spec` is "WIDTH.PRECISIONf": a missing value is a right-aligned dash of that width."""
    return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)


def print_throughput(r: dict[str, Any]) -> None:
    rec = r["receiver"]
    print(
        f"{r['files']} files, {r['bytes'] / 1e6:.0f} MB ({r['image']}) → {rec['program']} "
        f"--max-pdu {rec['max_pdu']} on {rec['host']}"
    )
    head = (
        f"{'':28}{'assoc':>6}{'total s':>8}{'send s':>8}{'fixed s':>9}{'img/s':>8}{'MB/s':>8}"
        f"{'× scu':>7}{'RSS MiB':>9}{'child':>8}"
    )
    print(head)
    for k, run in enumerate(r["storescu"]["runs"], start=1):
        print(
            f"{f'storescu {k}':28}{1:6}{run['seconds']:8.2f}{run['seconds']:8.2f}{'-':>9}"
            f"{run['img_per_s']:8.0f}{run['mb_per_s']:8.0f}{'':>7}{'-':>9}{'-':>8}"
        )
    med = r["storescu"]["median"]
    print(
        f"{'storescu median':28}{'':6}{'':8}{med['seconds']:8.2f}{'':9}"
        f"{med['img_per_s']:8.0f}{med['mb_per_s']:8.0f}{1:7.2f}"
    )
    for run in r["router"]:
        label = (
            f"dicom-router route {run['run']} ({run['prefect_home']})"
            if run["path"] == "cli"
            else f"plain route_job {run['run']}"
        )
        print(
            f"{label:28}{run['associations']:6}{run['total_seconds']:8.2f}"
            f"{run['send_seconds']:8.2f}{run['fixed_seconds']:9.2f}{run['img_per_s']:8.0f}"
            f"{run['mb_per_s']:8.0f}{_f(run['ratio_to_storescu'], '7.2f')}"
            f"{run['peak_rss_mib']:9.0f}{_f(run['children_peak_rss_mib'], '8.0f')}"
        )
        for problem in run["problems"]:
            print(f"    PROBLEM: {problem}")
    print(f"{'import only (plain path)':28}{'':64}{r['import_only_peak_rss_mib']:9.0f}")
    if r["cpu_busy_before"] > BUSY_WARNING:
        print(
            f"WARNING: {r['cpu_busy_before']:.0%} of the {r['cpus']} cores were busy with "
            "other work before the runs: the figures are skewed, run again on a quiet machine"
        )
    for t in r["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        print(
            f"associations {t['associations']}: median × scu plain "
            f"{_f(t['plain_median'], '.2f')}, warm dicom-router route "
            f"{_f(t['warm_cli_median'], '.2f')}; target ≥ {t['send_ratio_min']:.2f} "
            f"({t['decided_by']}) → {verdict}"
        )
    print(f"logs: {r['logs']}")


def print_memory(r: dict[str, Any]) -> None:
    m = r["memory_check"]
    print(f"peak RSS of the {m['path']}, {m['associations']} association(s)")
    print(f"  import only      {m['import_only_peak_rss_mib']:7.1f} MiB")
    for n, run in m["runs"].items():
        senders = run["children_peak_rss_mib"]
        print(
            f"  {n:>6} files     {run['peak_rss_mib']:7.1f} MiB   "
            f"(send {run['send_seconds']:.1f} s, {run['img_per_s']:.0f} img/s"
            + (f"; largest sending process {senders:.1f} MiB)" if senders else ")")
        )
        for problem in run["problems"]:
            print(f"    PROBLEM: {problem}")
    sizes = list(m["peak_rss_mib"])
    verdict = "met" if m["met"] else "NOT met"
    print(
        f"  ratio {sizes[1]}/{sizes[0]}: {m['ratio']:.3f} "
        f"({m['growth_mib_per_1000_files']:+.2f} MiB per 1000 files); "
        f"target ≤ {m['target_ratio_max']:.2f} → {verdict}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1500, help="images in the job (1500)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each sender (2)")
    parser.add_argument("--max-pdu", type=int, default=131072, help="receiver max PDU (131072)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--receiver",
        choices=("storescp", "orthanc"),
        default="storescp",
        help="storescp --fork --ignore (discards; the default) or Orthanc (stores, like a PACS)",
    )
    parser.add_argument(
        "--associations",
        type=int,
        nargs="+",
        metavar="N",
        help="DICOM_ROUTER_ASSOCIATIONS of the router runs; several values are run in turn "
        "in every round (default: the router's default)",
    )
    parser.add_argument(
        "--plain-only",
        action="store_true",
        help="only the plain path (no dicom-router route runs): quicker sweeps",
    )
    parser.add_argument(
        "--memory-check",
        action="store_true",
        help="only compare the plain path's peak RSS on --memory-files A B images",
    )
    parser.add_argument("--memory-files", type=int, nargs=2, default=(1500, 6000))
    parser.add_argument(
        "--keep-prefect-home",
        action="store_true",
        help="reuse bench/out/prefect-home (default: start from a new one each invocation)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="cache and logs (bench/out)")
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeat < 1:
        parser.error("--files and --repeat must be at least 1")
    if args.associations and min(args.associations) < 1:
        parser.error("--associations must be at least 1")
    for binary in (STORESCP, STORESCU) + ((ORTHANC,) if args.receiver == "orthanc" else ()):
        if not os.access(binary, os.X_OK):
            parser.error(f"{binary} missing: run scripts/install-system-deps (as root)")
    args.out = args.out.absolute()

    result = guarded(lambda: memory_check(args) if args.memory_check else throughput(args))
    if isinstance(result, int):
        return result
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.memory_check:
        print_memory(result)
    else:
        print_throughput(result)
    runs = result["router"] if "router" in result else result["memory_check"]["runs"].values()
    return 1 if any(run["problems"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
