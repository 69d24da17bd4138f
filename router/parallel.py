"""One job's files over several associations at once: one sending process per association.

Why processes: sending from Python is CPU-bound (pynetdicom's DUL thread, our framing,
~1-1.5 ms of CPU per 0.5 MB image), and threads in one process share the GIL: two or four
threads gave no gain, two or four processes 0.47 / 0.62x dcmtk's storescu (PERF-NOTES).

Each sender runs the single-association sender (`router.send._Sender`) on a consecutive
share of the files and streams every answer back to this process, where `on_result` is
called, one answer at a time, in the calling thread: the caller keeps writing the record.
A sender waits for that to be done before it sends its next file, so a kill of the router
loses at most the instance in flight on each association, as with one association.

How they start: sender 1 is a plain `python -c` started through `subprocess` (fork + exec:
safe in a router that runs threads, as under Prefect). Once it has imported the router, and
before it starts any thread, it forks senders 2..N: importing pydicom and pynetdicom costs
~0.5 s of CPU per process, paid once instead of N times on a two-core box. Each talks to
this process over its own socket pair with `multiprocessing.connection`'s messages.
`multiprocessing` itself is not used: its 'spawn' and 'forkserver' re-import the parent's
`__main__` in every child (under a Prefect process worker that is `prefect.engine`, ~1.5 s
of CPU each) and leave helper processes behind; its 'fork' forks this threaded process.

Nothing outlives the router: sender 1 dies with it and senders 2..N with sender 1
(PR_SET_PDEATHSIG), sender 1 reaps the others before it exits, and Ctrl-C reaches the
router only (the senders ignore SIGINT; the router stops them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from router.model import DicomFile, Endpoint, SendError, StoreResult, Timeouts

log = logging.getLogger(__name__)

MIN_SHARE_FILES = 200
"""Files an association must get for a further one to be worth starting."""

MIN_SHARE_BYTES = 100 << 20
"""Bytes an association must get for a further one to be worth starting (big files).

Senders take ~0.5 s to start on two cores (the interpreter, pydicom, pynetdicom), in which
one association sends ~250 images of 0.5 MB: smaller jobs go as fast on one."""

MARKER = "dicom-router-sender"
"""In every sender's command line (`ps`, /proc/PID/cmdline): which processes are senders."""

_STOP_GRACE = 5.0
"""Seconds the senders get to exit once they have reported their end."""

_LOGGERS = ("router", "pynetdicom", "pydicom")
"""Loggers whose records a sender forwards, at the levels they have in the router."""

_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""numpy's BLAS would start a thread pool at import, before the fork: a sender needs none."""

_BOOT = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[2]):
    sys.exit(1)  # the router died before the line above
from multiprocessing.connection import Connection
conns = [Connection(int(fd)) for fd in sys.argv[3:]]
sys.path[:] = conns[0].recv()
from router.parallel import first_sender
first_sender(conns)
"""
"""Sender 1's program up to the router import: die with the router first."""


def associations_for(endpoint: Endpoint, files: Sequence[DicomFile]) -> int:
    """How many associations `files` get: `endpoint.associations` when the job is big enough.

    Each association must get at least `MIN_SHARE_FILES` files or `MIN_SHARE_BYTES`.
    """
    wanted = min(endpoint.associations, len(files))
    if wanted <= 1:
        return 1
    by_count = len(files) // MIN_SHARE_FILES
    if by_count >= wanted:
        return wanted
    total = 0
    for f in files:
        with contextlib.suppress(OSError):  # the sender reports it
            total += os.stat(f.path).st_size
    return max(1, min(wanted, max(by_count, total // MIN_SHARE_BYTES)))


@dataclass
class _Share:
    """One sender's run of files, its connection, and how it ended."""

    number: int
    files: Sequence[DicomFile]
    conn: Connection
    ended: bool = False
    """It sent its last message ("done")."""
    error: tuple[str, str, bool] | None = None
    """("send", reason, transient) for a SendError, ("bug", traceback, False) otherwise."""
    exit_code: int | None = None
    """As sender 1 saw it reap this sender (sender 1's own: from `subprocess`)."""


def send_parallel(
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    timeouts: Timeouts,
    on_result: Callable[[StoreResult], None],
    count: int,
) -> None:
    """`router.send.send_files` over `count` associations, one process each (see module).

    Files are split into `count` consecutive runs, each sent in order. Each run goes on to
    its end whatever happens to the others. Once all senders have ended: the SendError of
    those that failed (reasons joined; transient only if all were), or RuntimeError for an
    unexpected error in a sender. A sender that dies without a word (killed, out of memory)
    is a transient SendError; what it had reported stays reported.
    """
    size, extra = divmod(len(files), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        theirs = [b.fileno() for _, b in pairs]
        env = {**os.environ, **{k: os.environ.get(k, "1") for k in _ONE_THREAD}}
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, MARKER, str(os.getpid()), *map(str, theirs)],
            stdin=subprocess.DEVNULL,
            pass_fds=theirs,
            env=env,
        )
        shares = [
            _Share(i + 1, files[bounds[i] : bounds[i + 1]], Connection(a.detach()))
            for i, (a, _) in enumerate(pairs)
        ]
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    ended = False
    try:
        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS}
        with contextlib.suppress(OSError):  # it died at start: reported once all end
            shares[0].conn.send(list(sys.path))
            for share in shares:
                wire = [_wire(f) for f in share.files]
                share.conn.send((endpoint, timeouts, wire, levels, share.number))
        _serve(shares, on_result)
        ended = True
    finally:
        for share in shares:
            share.conn.close()
        _stop(proc, grace=_STOP_GRACE if ended else 0.0)
    shares[0].exit_code = proc.returncode
    _raise_errors(endpoint, shares, proc.returncode)


def _wire(f: DicomFile) -> tuple[str, str, str, str, str]:
    """What a sender needs of a file (its filter `values` are neither needed nor picklable)."""
    return f.root, f.relpath, f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid


def _serve(shares: list[_Share], on_result: Callable[[StoreResult], None]) -> None:
    """Hand each sender's answers to `on_result` (acknowledged), its logs to ours, until EOF."""
    live: dict[Any, _Share] = {share.conn: share for share in shares}
    while live:
        for conn in wait(list(live)):
            share = live[conn]
            try:
                message = share.conn.recv()
            except (EOFError, OSError):
                del live[conn]
                continue
            kind = message[0]
            if kind == "result":
                _, index, fields = message
                on_result(StoreResult(share.files[index], **fields))
                with contextlib.suppress(OSError):  # if it died meanwhile, EOF comes next
                    share.conn.send_bytes(b"")  # recorded: it may send its next file
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            elif kind == "done":
                share.ended = True
                share.error = message[1]
            elif kind == "exits":  # sender 1, last: how the senders it forked ended
                for number, code in message[1].items():
                    shares[number - 1].exit_code = code


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to `grace` for sender 1 (which reaps the others), then kill it (and them)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    if proc.poll() is None:
        if grace:
            log.warning("sending processes still running after %g s: killed", grace)
        proc.kill()  # the others die with it (PR_SET_PDEATHSIG)
        proc.wait()


def _raise_errors(endpoint: Endpoint, shares: list[_Share], first_exit: int | None) -> None:
    send_errors: list[SendError] = []
    for share in shares:
        if not share.ended:
            code = share.exit_code if share.exit_code is not None else first_exit
            how = (
                "no exit status"
                if code is None
                else f"killed by signal {-code}"
                if code < 0
                else f"exit code {code}"
            )
            text = f"sending process {share.number} for {endpoint.key} ended unexpectedly ({how})"
            send_errors.append(SendError(text, transient=True))
        elif share.error is not None:
            kind, text, transient = share.error
            if kind == "bug":
                raise RuntimeError(f"sending process {share.number} failed:\n{text}")
            send_errors.append(SendError(text, transient=transient))
    if send_errors:
        reasons = list(dict.fromkeys(exc.reason for exc in send_errors))
        transient = all(exc.transient for exc in send_errors)
        raise SendError("; ".join(reasons), transient=transient) from send_errors[0]


# -- in the senders ----------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` ends; exit now if it already has."""
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def first_sender(conns: list[Connection]) -> None:
    """Sender 1: fork senders 2..N while single-threaded, send share 1, reap, report exits."""
    import router.send  # noqa: F401  (the heavy import, once for all senders)

    me = os.getpid()
    forked: dict[int, int] = {}
    for number, conn in enumerate(conns[1:], start=2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent(me)
                for other in conns:
                    if other is not conn:
                        other.close()
                sender(conn)
                code = 0
            finally:
                os._exit(code)
        forked[pid] = number
    for conn in conns[1:]:
        conn.close()
    sender(conns[0], close=False)
    exits = {}
    for pid, number in forked.items():
        _, status = os.waitpid(pid, 0)
        exits[number] = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        conns[0].send(("exits", exits))
    conns[0].close()


class _ToRouter(logging.Handler):
    """Forwards log records, formatted, to the router, which logs them as its own."""

    def __init__(self, conn: Connection, lock: threading.Lock, number: int) -> None:
        super().__init__()
        self.conn = conn
        self.send_lock = lock  # not `lock`: logging.Handler holds its own there around emit
        self.number = number

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"] = record.getMessage()
            data["args"] = None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            data["processName"] = f"sender {self.number}"
            with self.send_lock:
                self.conn.send(("log", data))
        except Exception:
            self.handleError(record)


def sender(conn: Connection, *, close: bool = True) -> None:
    """Send the share received from the router over one association, reporting each answer."""
    from router.send import _Sender

    endpoint, timeouts, wire, levels, number = conn.recv()
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_ToRouter(conn, lock, number)]
    root.setLevel(min(levels.values()))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)

    files = [DicomFile(*w) for w in wire]
    index = {(f.root, f.relpath): i for i, f in enumerate(files)}

    def report(result: StoreResult) -> None:
        fields = {
            field.name: getattr(result, field.name)
            for field in dataclasses.fields(result)
            if field.name != "file"
        }
        with lock:
            conn.send(("result", index[(result.file.root, result.file.relpath)], fields))
        conn.recv_bytes()  # the router has recorded it

    error: tuple[str, str, bool] | None = None
    try:
        _Sender(endpoint, timeouts, report).run(files)
    except SendError as exc:
        error = ("send", exc.reason, exc.transient)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(1)  # the router is gone: nobody to report to
    except BaseException:
        error = ("bug", traceback.format_exc(), False)
    with lock:
        conn.send(("done", error))
    if close:
        conn.close()
