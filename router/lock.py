"""One routing of a job at a time (SPEC section 5).

An advisory `flock` on a file in the job folder: the kernel drops it when the holder
dies, so a killed run never leaves a stale lock behind, and it holds across processes
(and across hosts on a shared file system that supports locks, such as NFSv4).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK = ".routing.lock"


class JobLocked(Exception):
    """Another routing of the job holds its lock."""


@contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    path = job_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise JobLocked(
                f"{job_dir}: another routing of this job is running ({holder})"
            ) from None
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
