"""pytest plugin: dcmtk's storescp as an independent C-STORE receiver, and storescu as a sender.

A second DICOM implementation keeps the router honest: a test that only talks to pynetdicom
can pass with a bug that pynetdicom shares. The binaries are Debian's dcmtk 3.6.7 at fixed
paths, because a Python `storescp` shim on PATH shadows the real one.

Quirks of storescp 3.6.7 that tests rely on or must know:

- It accepts any called AE title (no `DicomCheckCalledAet` equivalent); `-aet` only sets
  what it answers with. Use Orthanc or the pynetdicom SCP to test that a called AE is checked.
- Without `+uf` it names files after the SOP Instance UID and silently overwrites a second
  receipt. The fixture always passes `+uf`, so every receipt is its own file and duplicates
  can be counted.
- `--abort-after` / `--abort-during` abort before the file is written: nothing arrives.
- `--sleep-during N` sleeps N seconds on every progress callback (several per file, ~6 s for
  a tiny file at N=1); `--sleep-after N` sleeps once, after the file is written and before the
  response, so with a sender DIMSE time-out below N it gives "stored, response lost".
- `--refuse` rejects every association (permanent, service user); `--reject` only those
  without an implementation class UID.
- Transfer syntaxes: `+xi` accepts implicit VR little endian only; `+xs`, `+xv` ... only
  *prefer* a compressed syntax and still accept the uncompressed ones. (`-xs` is
  `--exec-sync`, not a transfer syntax option.) A strict set needs `-xf CONFIG PROFILE`.
- With `--ignore` nothing is written, so `received()` stays empty.
- Debian's build leaves Nagle on unless `TCP_NODELAY=1` is in the environment (~45 ms per
  image otherwise, PERF-NOTES); the fixture sets it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
HOST = "127.0.0.1"
INSTALL_HINT = "install the system packages with scripts/install-system-deps (as root)"

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    Also usable as a destination that refuses connections (a peer that is down).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def peer_env() -> dict[str, str]:
    """Environment for dcmtk-based processes: Nagle off, or every PDU waits for delayed ACK."""
    return {**os.environ, "TCP_NODELAY": "1"}


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)  # loaded before any fork
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """preexec_fn: have Linux kill the child if pytest dies, so no peer outlives a killed run.

    PR_SET_PDEATHSIG fires when the forking *thread* ends: start peers from the test's
    thread (fixtures do), not from a worker thread.
    """
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_for_port(
    port: int, process: subprocess.Popen, timeout: float, describe: Callable[[], str]
) -> None:
    """Block until `port` accepts a TCP connection; fail with the peer's log if it never does.

    A bare connect-and-close is harmless to storescp and Orthanc: they log a failed
    association and keep serving.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode}\n{describe()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"port {port} not accepting after {timeout:.0f} s\n{describe()}"
                ) from None
            time.sleep(0.05)


def stop_process(process: subprocess.Popen, timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if the process does not exit within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def received_instances(directory: Path) -> Counter[str]:
    """SOPInstanceUID -> number of files under `directory` (any depth) holding it.

    Every file must be DICOM: a stray file in a receiver's output is itself a bug.
    """
    counts: Counter[str] = Counter()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        counts[str(ds.SOPInstanceUID)] += 1
    return counts


def run_storescu(
    port: int,
    files: Iterable[Path | str],
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    args: Sequence[str] = (),
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Send `files` with dcmtk's storescu to 127.0.0.1:`port` over one association.

    A reference sender: what it delivers is what a correct SCU delivers. `check=False`
    returns the result of a refused or failed send instead of raising.
    """
    if not os.access(STORESCU, os.X_OK):
        pytest.fail(f"{STORESCU} not found: {INSTALL_HINT}")
    cmd = [STORESCU, "-aet", calling_aet, "-aec", called_aet, *args, HOST, str(port)]
    cmd += [str(f) for f in files]
    result = subprocess.run(
        cmd, env=peer_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"storescu exited {result.returncode}: {' '.join(cmd)}\n{result.stdout}{result.stderr}"
        )
    return result


@dataclass
class StoreSCP:
    """One running dcmtk storescp, with what a test needs to address and inspect it."""

    aet: str
    port: int
    output_dir: Path
    log_path: Path
    args: tuple[str, ...]
    process: subprocess.Popen = field(repr=False)
    host: str = HOST

    def received(self) -> Counter[str]:
        """SOPInstanceUID -> times received (each receipt is a file, thanks to `+uf`)."""
        return received_instances(self.output_dir)

    def files(self) -> list[Path]:
        """The files written so far, in name order."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def clear(self) -> None:
        """Forget what arrived so far (delete the files), keeping the process running."""
        for path in self.files():
            path.unlink()

    def log(self) -> str:
        """storescp's verbose output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop it now, e.g. to make the destination go down in the middle of a test."""
        stop_process(self.process)


_LOGS = pytest.StashKey[list[StoreSCP]]()


@pytest.fixture
def storescp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory: ``storescp(aet="STORESCP", *extra_args, port=None) -> StoreSCP``.

    Starts `/usr/bin/storescp -v -aet AET -od DIR +uf [extra_args] PORT` on 127.0.0.1 with
    TCP_NODELAY=1, waits until the port accepts, and stops it at teardown. `extra_args`
    are storescp options such as ``"--refuse"``, ``"--sleep-after", "3"`` or ``"+xi"``.
    Pass `port` to restart a peer on the port of one that was stopped (a destination
    coming back); otherwise a free port is chosen. Each call gets its own output dir.
    A failing test shows the logs of its storescp instances.
    """
    if not os.access(STORESCP, os.X_OK):
        pytest.fail(f"{STORESCP} not found: {INSTALL_HINT}")
    started: list[StoreSCP] = []
    request.node.stash[_LOGS] = started

    def start(aet: str = "STORESCP", *extra_args: str, port: int | None = None) -> StoreSCP:
        n = len(started) + 1
        out = tmp_path / f"storescp{n}-{aet}"
        out.mkdir()
        log_path = tmp_path / f"storescp{n}-{aet}.log"
        # A free port can be taken between choosing and binding: retry unless it was given.
        for attempt in range(1 if port is not None else 3):
            chosen = port if port is not None else free_port()
            cmd = [STORESCP, "-v", "-aet", aet, "-od", str(out), "+uf", *extra_args, str(chosen)]
            with log_path.open("w") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(
                    cmd,
                    env=peer_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            scp = StoreSCP(aet, chosen, out, log_path, tuple(extra_args), proc)
            started.append(scp)
            try:
                wait_for_port(chosen, proc, _STARTUP_TIMEOUT, scp.log)
            except RuntimeError as exc:
                scp.stop()
                if port is None and attempt < 2 and "Address already in use" in scp.log():
                    continue
                pytest.fail(f"storescp {aet} did not start: {exc}")
            return scp
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for scp in started:
            scp.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach each storescp log to the report of a failing test, where pytest shows it."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for scp in item.stash.get(_LOGS, []):
            report.sections.append((f"storescp {scp.aet} :{scp.port} log", scp.log()))
