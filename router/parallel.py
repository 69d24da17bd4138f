"""One job's files over several lanes at once: associations in processes, requests in threads.

Why several: a PACS that stores what it gets (Orthanc, most archives) serves each
association or request at its own pace, and takes more per second over several at once;
into Orthanc 1,500 CT images went at 0.85-1.1x storescu's rate over one association and
1.2-1.9x over four (bench/README.md).

The files are split into consecutive shares, one per lane, and each lane runs a link of
`router.transport` (built by the factory it is given) on its share, reporting every answer
back to the caller's thread, where `on_result` is called, one answer at a time: the caller
keeps writing the record. A lane waits for that before it sends on, so a kill of the
router loses at most what is in flight on each lane, as with one. What a link does with a
file that makes the destination abort is its own affair, within its share.

Two kinds of lane:

- **Processes** (`in_processes`, for C-STORE): sending from Python costs ~0.5 ms of CPU per
  0.5 MB image (`router.dimse`), and threads in one process share the GIL: two or four
  threads gave no gain where two or four processes did (PERF-NOTES).
- **Threads** (`in_threads`, for STOW-RS): an HTTP request body is the files' bytes read
  and written in large chunks, with the GIL released for both; the work is the peer's.

Processes, in detail. A peer may take fewer associations at once than asked (dcmtk's
storescp serves one at a time unless started with --fork; PACS often cap them per AE
title). A share whose association is rejected, or kept waiting past the ACSE time-out, for
a transient reason goes to a sender that has finished its own share instead of failing
the job.

How they start: sender 1 is a plain `python -c` started through `subprocess` (fork + exec:
safe in a router that runs threads, as under Prefect). Once it has imported the link's
module, and before it starts any thread, it forks senders 2..N: importing pydicom and
pynetdicom costs ~0.5 s of CPU per process, paid once instead of N times on a two-core box.
Each talks to this process over its own socket pair with `multiprocessing.connection`'s
messages; the link factory travels pickled (a class and its arguments, by reference).
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
import importlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from router.model import AnyEndpoint, DicomFile, SendError, StoreResult, WebEndpoint

OnResult = Callable[[StoreResult], None]


class Link(Protocol):
    """One run of files to one destination (`router.transport` states the contract)."""

    def run(self, files: Sequence[DicomFile]) -> None: ...


LinkFactory = Callable[..., Link]
"""`factory(on_result, label=...)` builds a link whose answers carry ids `label` + n."""

log = logging.getLogger(__name__)

MIN_SHARE_FILES = 300
"""Files an association must get for a further one to be worth starting.

Senders take ~0.5 s to start (the interpreter, pydicom, pynetdicom), in which one
association sends 80 (into Orthanc) to 700 (into storescp, which discards) images of
0.5 MB: smaller jobs gain nothing from more. Measured on two cores with 1,500 CT images,
more associations gained 40-70% into Orthanc and cost up to 15% into storescp."""

MIN_SHARE_BYTES = 512 << 20
"""Bytes an association must get for a further one to be worth starting (big files).

One association streams big files at ~1 GB/s over loopback: 840 MB of multi-frame images
took 0.84 s on one and 1.42 s on two (measured on two cores)."""

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
sys.path[:], preload = conns[0].recv()
from router.parallel import first_sender
first_sender(conns, preload)
"""
"""Sender 1's program up to the router import: die with the router first."""

MIN_WEB_SHARE_FILES = 100
"""Files a further STOW-RS request lane must get to be worth starting: two requests' worth
at the default of 50 instances each (a lane is a thread: cheap, but it holds a slot)."""

MIN_WEB_SHARE_BYTES = 128 << 20
"""Bytes a further STOW-RS request lane must get to be worth starting (big files)."""


def associations_for(endpoint: AnyEndpoint, files: Sequence[DicomFile]) -> int:
    """How many lanes `files` get: `endpoint.associations` when the job is big enough.

    Each association must get at least `MIN_SHARE_FILES` files or `MIN_SHARE_BYTES`; each
    STOW-RS request lane `MIN_WEB_SHARE_FILES` or `MIN_WEB_SHARE_BYTES`.
    """
    wanted = min(endpoint.associations, len(files))
    if wanted <= 1:
        return 1
    web = isinstance(endpoint, WebEndpoint)
    min_files = MIN_WEB_SHARE_FILES if web else MIN_SHARE_FILES
    min_bytes = MIN_WEB_SHARE_BYTES if web else MIN_SHARE_BYTES
    by_count = len(files) // min_files
    if by_count >= wanted:
        return wanted
    total = 0
    for f in files:
        with contextlib.suppress(OSError):  # the sender reports it
            total += os.stat(f.path).st_size
    return max(1, min(wanted, max(by_count, total // min_bytes)))


def _split(files: Sequence[DicomFile], count: int) -> list[Sequence[DicomFile]]:
    """`count` consecutive runs of `files`, as equal as can be."""
    size, extra = divmod(len(files), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [files[bounds[i] : bounds[i + 1]] for i in range(count)]


def _joined(errors: Sequence[SendError]) -> SendError:
    """One SendError for several lanes: reasons joined, transient only if all were."""
    reasons = list(dict.fromkeys(exc.reason for exc in errors))
    transient = all(exc.transient for exc in errors)
    return SendError("; ".join(reasons), transient=transient)


# -- threads -------------------------------------------------------------------------------------

_DRAIN_GRACE = 5.0
"""Seconds the lanes get to end once the caller stopped taking answers (an error, Ctrl-C)."""


class _Stopped(Exception):
    """Raised in a lane whose answers the caller no longer takes."""


def in_threads(
    factory: LinkFactory,
    key: str,
    files: Sequence[DicomFile],
    on_result: OnResult,
    count: int,
) -> None:
    """Send `files` in `count` consecutive shares, one link in a thread of its own each.

    Each share goes on to its end whatever happens to the others; once all have ended, the
    SendError of those that failed is raised (reasons joined; transient only if all were),
    or the first unexpected error. If `on_result` raises, the lanes are stopped at their
    next answer and the error goes on.
    """
    answers: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    stopping = threading.Event()

    def lane(number: int, share: Sequence[DicomFile]) -> None:
        def report(result: StoreResult) -> None:
            if stopping.is_set():
                raise _Stopped
            recorded = threading.Event()
            answers.put(("result", result, recorded))
            recorded.wait()  # the caller has recorded it: send on
            if stopping.is_set():
                raise _Stopped

        error: BaseException | None = None
        try:
            factory(report, label=f"{number}.").run(share)
        except _Stopped:
            pass
        except BaseException as exc:
            error = exc
        answers.put(("done", number, error))

    threads = [
        threading.Thread(
            target=lane, args=(n, share), name=f"dicom-router-lane-{key}-{n}", daemon=True
        )
        for n, share in enumerate(_split(files, count), start=1)
    ]
    for thread in threads:
        thread.start()
    errors: dict[int, BaseException] = {}
    live = len(threads)
    try:
        while live:
            message = answers.get()
            if message[0] == "result":
                try:
                    on_result(message[1])
                finally:
                    message[2].set()
            else:
                live -= 1
                if message[2] is not None:
                    errors[message[1]] = message[2]
    finally:
        if live:  # the caller stopped taking answers: let the lanes end
            stopping.set()
            deadline = time.monotonic() + _DRAIN_GRACE
            while live and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    message = answers.get(timeout=max(0.01, deadline - time.monotonic()))
                    if message[0] == "result":
                        message[2].set()
                    else:
                        live -= 1
            if live:
                log.warning(
                    "%s: %d request lane(s) still running after %g s", key, live, _DRAIN_GRACE
                )
    for exc in errors.values():
        if not isinstance(exc, SendError):
            raise exc
    if errors:
        raise _joined([errors[n] for n in sorted(errors)])  # type: ignore[misc]


# -- processes -----------------------------------------------------------------------------------


@dataclass
class _Share:
    """A consecutive run of the job's files, sent over one association by one sender."""

    number: int
    files: Sequence[DicomFile]
    sender: _Proc | None = None
    """The sender it was last given to (None: waiting for one)."""
    reported: int = 0
    ended: bool = False
    """Its sender said it is done with it ("done")."""
    error: tuple[str, str, bool] | None = None
    """("send", reason, transient) for a SendError, ("bug", traceback, False) otherwise."""
    unsent: SendError | None = None
    """Why its association could not be made, when it went back to wait for another sender."""


@dataclass
class _Proc:
    """One sending process: its connection and what it is doing."""

    number: int
    conn: Connection
    share: _Share | None = None
    stopped: bool = False
    """Told to stop (or gave up on an association): it takes no more shares."""
    gone: bool = False
    """Its connection is closed: it has ended."""
    exit_code: int | None = None
    """As sender 1 saw it reap this sender (sender 1's own: from `subprocess`)."""

    def give(self, share: _Share, wire: list[tuple[str, ...]]) -> None:
        self.share, share.sender = share, self
        with contextlib.suppress(OSError):  # if it died, its EOF comes next
            self.conn.send((share.number, wire))

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.conn.send(None)


def in_processes(
    factory: LinkFactory,
    key: str,
    files: Sequence[DicomFile],
    on_result: OnResult,
    count: int,
) -> None:
    """Send `files` in `count` consecutive shares, one link in a process of its own each.

    `factory` must pickle (a class or function of a module, and picklable arguments): each
    sender builds its link from it. Each share goes on to its end whatever happens to the
    others. A run whose
    association cannot be made for a transient reason (a peer that takes fewer associations
    at once: rejected, or kept waiting past the ACSE time-out, as dcmtk's storescp does
    without --fork) waits for a sender that has finished its own run. Once all senders
    have ended: the SendError of the runs that failed (reasons joined; transient only if all
    were), or RuntimeError for an unexpected error in a sender. A sender that dies without
    a word (killed, out of memory) is a transient SendError; what it reported stays.
    """
    shares = [_Share(i + 1, share) for i, share in enumerate(_split(files, count))]
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        theirs = [b.fileno() for _, b in pairs]
        env = {**os.environ, **{k: os.environ.get(k, "1") for k in _ONE_THREAD}}
        first = subprocess.Popen(
            [sys.executable, "-c", _BOOT, MARKER, str(os.getpid()), *map(str, theirs)],
            stdin=subprocess.DEVNULL,
            pass_fds=theirs,
            env=env,
        )
        procs = [_Proc(i + 1, Connection(a.detach())) for i, (a, _) in enumerate(pairs)]
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    finished = False
    try:
        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS}
        preload = getattr(factory, "func", factory).__module__
        with contextlib.suppress(OSError):  # it died at start: reported once all end
            procs[0].conn.send((list(sys.path), preload))
        for proc, share in zip(procs, shares, strict=True):
            with contextlib.suppress(OSError):
                proc.conn.send((factory, levels, proc.number))
            proc.give(share, [_wire(f) for f in share.files])
        _serve(key, procs, shares, on_result)
        finished = True
    finally:
        for proc in procs:
            proc.conn.close()
        _stop(first, grace=_STOP_GRACE if finished else 0.0)
    procs[0].exit_code = first.returncode
    _raise_errors(key, shares, first.returncode)


def _wire(f: DicomFile) -> tuple[str, str, str, str, str]:
    """What a sender needs of a file (its filter `values` are neither needed nor picklable)."""
    return f.root, f.relpath, f.sop_class_uid, f.sop_instance_uid, f.transfer_syntax_uid


def _serve(
    key: str,
    procs: list[_Proc],
    shares: list[_Share],
    on_result: OnResult,
) -> None:
    """Hand the senders' answers to `on_result` (acknowledged), their logs to ours, and runs
    that could not start to senders done with theirs; until every sender has ended."""
    live: dict[Any, _Proc] = {proc.conn: proc for proc in procs}
    waiting: deque[_Share] = deque()
    while live:
        for conn in wait(list(live)):
            proc = live[conn]
            try:
                message = proc.conn.recv()
            except (EOFError, OSError):
                del live[conn]
                proc.gone = True
                continue
            kind = message[0]
            if kind == "result":
                _, number, index, fields = message
                share = shares[number - 1]
                share.reported += 1
                on_result(StoreResult(share.files[index], **fields))
                with contextlib.suppress(OSError):  # if it died meanwhile, EOF comes next
                    proc.conn.send_bytes(b"")  # recorded: it may send its next file
            elif kind == "log":
                record = logging.makeLogRecord(message[1])
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            elif kind == "done":
                _, number, error = message
                share, proc.share = shares[number - 1], None
                if error and error[0] == "send" and error[2] and not share.reported:
                    # Its association could not be made but others were: the peer takes
                    # fewer at once. Another sender sends it after its own run.
                    log.warning(
                        "%s: association %d of %d not made (%s); its %d file(s) wait for another",
                        key,
                        proc.number,
                        len(procs),
                        error[1],
                        len(share.files),
                    )
                    share.unsent, share.sender = SendError(error[1], transient=True), None
                    waiting.append(share)
                    proc.stop()
                else:
                    share.ended, share.error = True, error
            elif kind == "exits":  # sender 1, last: how the senders it forked ended
                for number, code in message[1].items():
                    procs[number - 1].exit_code = code
        _dispatch(procs, waiting)


def _dispatch(procs: list[_Proc], waiting: deque[_Share]) -> None:
    """Give waiting runs to idle senders; stop the idle ones once no run can come back."""
    idle = [p for p in procs if not (p.gone or p.stopped) and p.share is None]
    while waiting and idle:
        share = waiting.popleft()
        idle.pop(0).give(share, [_wire(f) for f in share.files])
    if not any(p.share is not None and not p.gone for p in procs):
        for proc in idle:
            proc.stop()


def _stop(first: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to `grace` for sender 1 (which reaps the others), then kill it (and them)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        first.wait(timeout=grace)
    if first.poll() is None:
        if grace:
            log.warning("sending processes still running after %g s: killed", grace)
        first.kill()  # the others die with it (PR_SET_PDEATHSIG)
        first.wait()


def _raise_errors(key: str, shares: list[_Share], first_exit: int | None) -> None:
    """Raise what the runs ended with; `first_exit`: sender 1's, which the others die with."""
    send_errors: list[SendError] = []
    for share in shares:
        if share.ended and share.error is not None:
            kind, text, transient = share.error
            if kind == "bug":
                raise RuntimeError(f"sending run {share.number} failed:\n{text}")
            send_errors.append(SendError(text, transient=transient))
        elif not share.ended and share.sender is None and share.unsent is not None:
            send_errors.append(share.unsent)  # no sender was left to take it
        elif not share.ended:
            proc = share.sender
            code = first_exit if proc is None or proc.exit_code is None else proc.exit_code
            how = (
                "no exit status"
                if code is None
                else f"killed by signal {-code}"
                if code < 0
                else f"exit code {code}"
            )
            number = share.number if proc is None else proc.number
            text = f"sending process {number} for {key} ended unexpectedly ({how})"
            send_errors.append(SendError(text, transient=True))
    if send_errors:
        raise _joined(send_errors) from send_errors[0]


# -- in the senders ----------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` ends; exit now if it already has."""
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def first_sender(conns: list[Connection], preload: str) -> None:
    """Sender 1: fork senders 2..N while single-threaded, send share 1, reap, report exits.

    `preload`: the link's module, the heavy import, done once for all senders.
    """
    importlib.import_module(preload)

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
    """Send the shares the router gives, each with a link of its own, reporting each answer."""
    try:
        factory, levels, number = conn.recv()
    except (EOFError, OSError):
        os._exit(1)  # the router is gone
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_ToRouter(conn, lock, number)]
    root.setLevel(min(levels.values()))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            os._exit(1)
        if job is None:
            break
        share, wire = job
        files = [DicomFile(*w) for w in wire]
        index = {(f.root, f.relpath): i for i, f in enumerate(files)}

        def report(result: StoreResult, share: int = share, index: dict = index) -> None:
            fields = {
                field.name: getattr(result, field.name)
                for field in dataclasses.fields(result)
                if field.name != "file"
            }
            position = index[(result.file.root, result.file.relpath)]
            with lock:
                conn.send(("result", share, position, fields))
            conn.recv_bytes()  # the router has recorded it

        error: tuple[str, str, bool] | None = None
        try:
            factory(report, label=f"{share}.").run(files)
        except SendError as exc:
            error = ("send", exc.reason, exc.transient)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            os._exit(1)  # the router is gone: nobody to report to
        except BaseException:
            error = ("bug", traceback.format_exc(), False)
        with lock:
            conn.send(("done", share, error))
    if close:
        conn.close()
