"""How long `dicom-router status` takes over a large site, against reading the same files.

Builds N job folders (default 10,000) as a site holds them: most routed, some failed,
given up, waiting, invalid, never tried, each with its INPUT/ and OUTPUT/ folders, a
proc.json and a routing-status.json with per-destination figures. Then, in one
invocation, times (median of --repeat runs, cold-ish page cache not forced):

- reference: `find ROOT -name routing-status.json -exec cat {} +` (the same files read by
  standard tools, nothing parsed);
- `site_overview` in this process (the library call the sweep makes);
- `dicom-router status ROOT --json` as a command (interpreter start and imports included).

    python bench/status_time.py [--jobs 10000] [--repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from router.overview import site_overview  # noqa: E402
from router.sweep import Backoff  # noqa: E402

INFO = {"AETitleCalled": "PROCRSI", "AETitleCaller": "PACS"}


def build(root: Path, jobs: int) -> None:
    for i in range(jobs):
        job = root / f"site-{i % 10}" / f"job-{i:06d}"
        (job / "INPUT").mkdir(parents=True)
        (job / "OUTPUT").mkdir()
        (job / "info.json").write_text(json.dumps(INFO))
        kind = i % 20
        if kind == 0:
            continue  # waiting: no proc.json
        (job / "proc.json").write_text('[{"success": "success"}]')
        if kind == 1:
            continue  # never tried
        state, failures = (
            ("failed", 1) if kind == 2 else ("failed", 5) if kind == 3 else ("routed", 0)
        )
        if kind == 4:
            state = "invalid"
        stamp = "2026-12-01T10:00:00+00:00"
        good = {"last_success": stamp, "stored": {"2026-12-01": 12}}
        bad = {"last_failure": stamp, "failure": "connection refused by 10.0.0.9:104"}
        status = {
            "state": state,
            "runs": failures + 1,
            "consecutive_failures": failures,
            "updated": stamp,
            "reason": None,
            "given_up": False,
            "destinations": {"PACS@10.0.0.20:104": good, "ARCHIVE@10.0.0.9:104": bad},
        }
        (job / "routing-status.json").write_text(json.dumps(status, indent=1))


def timed(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="Keep the site folder.")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="status-bench-"))
    try:
        start = time.perf_counter()
        build(base / "jobs", args.jobs)
        print(f"built {args.jobs} job folders in {time.perf_counter() - start:.1f} s")
        root = base / "jobs"
        reference = timed(
            lambda: subprocess.run(
                ["find", str(root), "-name", "routing-status.json", "-exec", "cat", "{}", "+"],
                stdout=subprocess.DEVNULL,
                check=True,
            ),
            args.repeat,
        )
        library = timed(lambda: site_overview(root, Backoff()), args.repeat)
        command = timed(
            lambda: subprocess.run(
                [sys.executable, "-m", "router", "status", str(root), "--json"],
                stdout=subprocess.DEVNULL,
                check=True,
                cwd=REPO,
            ),
            args.repeat,
        )
        counts = site_overview(root, Backoff()).counts
        print(f"counts: {counts}")
        print(f"{'what':<42} {'seconds':>8} {'x find+cat':>11}")
        for what, seconds in (
            ("find -name routing-status.json | cat", reference),
            ("site_overview (in process)", library),
            ("dicom-router status --json (command)", command),
        ):
            print(f"{what:<42} {seconds:8.2f} {seconds / reference:11.2f}")
    finally:
        if args.keep:
            print(f"site kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
