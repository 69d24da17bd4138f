"""One job's files over several associations at once: one sending process per association.

Why processes: sending from Python is CPU-bound (pynetdicom's DUL thread, our framing,
~1-1.5 ms of CPU per 0.5 MB image), and threads in one process share the GIL: two or four
threads gave no gain, two or four processes 0.47 / 0.62x dcmtk's storescu (PERF-NOTES).

Each child runs the single-association sender (`router.send._Sender`) on a consecutive
share of the files and streams every answer back to this process, where `on_result` is
called, one answer at a time, in the calling thread: the caller keeps writing the record.
A child waits for that to be done before it sends its next file, so a kill of the router
loses at most the instance in flight on each association, as with one association.

Why not `multiprocessing`: its 'spawn' and 'forkserver' re-import the parent's `__main__`
in every child (under a Prefect process worker that is `prefect.engine`, ~1.5 s of CPU
each) and start a resource-tracker process; 'fork' is unsafe once threads run (Prefect,
pynetdicom). A child here is a plain `python -c` through `subprocess` (fork + exec, no
Python code in between), talking over a socket pair with `multiprocessing.connection`'s
pickled messages. It asks Linux to kill it when this process dies (PR_SET_PDEATHSIG), so a
kill of the router leaves no sender behind, and ignores Ctrl-C, which its parent handles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from router.model import DicomFile, Endpoint, SendError, StoreResult, Timeouts

log = logging.getLogger(__name__)

MIN_SHARE_FILES = 200
"""Files an association must get for a further one to be worth starting."""

MIN_SHARE_BYTES = 100 << 20
"""Bytes an association must get for a further one to be worth starting (big files).

A child takes ~0.3-0.6 s to start (the interpreter, pydicom, pynetdicom) on two cores, in
which one association sends ~150 images of 0.5 MB: smaller jobs go faster on one."""

MARKER = "dicom-router-sender"
"""In every child's command line (`ps`, /proc/PID/cmdline): which processes are senders."""

_STOP_GRACE = 5.0
"""Seconds a child that has reported its end gets to exit before it is killed."""

_LOGGERS = ("router", "pynetdicom", "pydicom")
"""Loggers whose records a child forwards, at the levels they have in the parent."""

_BOOT = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[3]):
    sys.exit(1)  # the parent died before the line above
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[2]))
sys.path[:] = conn.recv()
from router.parallel import child_main
child_main(conn)
"""
"""The child's whole program before it imports the router: die with the parent first."""


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
class _Child:
    """One sending process and the share of files it was given."""

    number: int
    files: Sequence[DicomFile]
    proc: subprocess.Popen[bytes]
    conn: Connection
    ended: bool = False
    """It sent its last message ("done")."""
    error: tuple[str, str, bool] | None = None
    """("send", reason, transient) for a SendError, ("bug", traceback, False) otherwise."""


def send_parallel(
    endpoint: Endpoint,
    files: Sequence[DicomFile],
    timeouts: Timeouts,
    on_result: Callable[[StoreResult], None],
    count: int,
) -> None:
    """`router.send.send_files` over `count` associations, one process each (see module).

    Files are split into `count` consecutive runs, each sent in order. Each run goes on to
    its end whatever happens to the others. Once all children have ended: the SendError of
    those that failed (reasons joined; transient only if all were), or RuntimeError for an
    unexpected error in a child. A child that dies without a word (killed, out of memory)
    is a transient SendError; what it had reported stays reported.
    """
    size, extra = divmod(len(files), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    children: list[_Child] = []
    try:
        for i in range(count):
            children.append(_start(i + 1, files[bounds[i] : bounds[i + 1]]))
        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS}
        for child in children:  # all started first: their imports overlap
            wire = [_wire(f) for f in child.files]
            with contextlib.suppress(OSError):  # it died at start: reported once all end
                child.conn.send((endpoint, timeouts, wire, levels, child.number))
        _serve(children, on_result)
    finally:
        for child in children:
            _stop(child, grace=_STOP_GRACE if child.ended else 0.0)
    _raise_errors(endpoint, children)


def _start(number: int, files: Sequence[DicomFile]) -> _Child:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        fd = theirs.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, MARKER, str(fd), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
        conn = Connection(ours.detach())
    conn.send(list(sys.path))
    return _Child(number, files, proc, conn)


def _wire(f: DicomFile) -> tuple[str, str, str, str, str]:
    """What a child needs of a file (its filter `values` are neither needed nor picklable)."""
    return f.root, f.relpath, f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid


def _serve(children: list[_Child], on_result: Callable[[StoreResult], None]) -> None:
    """Hand each child's answers to `on_result` (acknowledged), its logs to ours, until EOF."""
    live = {child.conn: child for child in children}
    while live:
        for conn in wait(list(live)):
            child = live[conn]  # type: ignore[index]
            try:
                message = conn.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                del live[conn]  # type: ignore[arg-type]
                continue
            kind = message[0]
            if kind == "result":
                _, index, fields = message
                on_result(StoreResult(child.files[index], **fields))
                with contextlib.suppress(OSError):  # if it died meanwhile, EOF comes next
                    child.conn.send_bytes(b"")  # recorded: it may send its next file
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            elif kind == "done":
                child.ended = True
                child.error = message[1]


def _stop(child: _Child, grace: float) -> None:
    """Close the child's connection and make sure it has exited (reaped, no zombie)."""
    child.conn.close()
    proc = child.proc
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    if proc.poll() is None:
        log.warning("stopping sending process %d (pid %d)", child.number, proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_errors(endpoint: Endpoint, children: list[_Child]) -> None:
    send_errors: list[SendError] = []
    for child in children:
        if not child.ended:
            code = child.proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            send_errors.append(
                SendError(
                    f"sending process {child.number} for {endpoint.key} ended unexpectedly ({how})",
                    transient=True,
                )
            )
        elif child.error is not None:
            kind, text, transient = child.error
            if kind == "bug":
                raise RuntimeError(f"sending process {child.number} failed:\n{text}")
            send_errors.append(SendError(text, transient=transient))
    if send_errors:
        reasons = list(dict.fromkeys(exc.reason for exc in send_errors))
        transient = all(exc.transient for exc in send_errors)
        raise SendError("; ".join(reasons), transient=transient) from send_errors[0]


# -- in the child ------------------------------------------------------------------------------


class _ToParent(logging.Handler):
    """Forwards log records, formatted, to the parent, which logs them as its own."""

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


def child_main(conn: Connection) -> None:
    """Send the share received from the parent over one association, reporting each answer."""
    from router.send import _Sender  # here: router.send is the heavy import

    endpoint, timeouts, wire, levels, number = conn.recv()
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_ToParent(conn, lock, number)]
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
        conn.recv_bytes()  # the parent has recorded it

    error: tuple[str, str, bool] | None = None
    try:
        _Sender(endpoint, timeouts, report).run(files)
    except SendError as exc:
        error = ("send", exc.reason, exc.transient)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(1)  # the parent is gone: nobody to report to
    except BaseException:
        error = ("bug", traceback.format_exc(), False)
    with lock:
        conn.send(("done", error))
    conn.close()
