"""How long a sweep takes over many job folders, almost all of them routed already.

Builds (or reuses, under bench/out/) ROOT with N job folders: N - P routed (an info.json,
a proc.json, a routing-status.json and a record, as routing leaves them) and P pending
with a few small DICOM files each. Then measures, in one invocation:

- the plan alone (`router.sweep.plan_sweep`: what the sweep reads per job), warm cache;
- `dicom-router sweep ROOT` end to end, routing the P pending jobs to a dcmtk storescp on
  127.0.0.1 (the first of them pays Prefect's start-up), then the same sweep again with
  nothing left to route.

    python bench/sweep_time.py [--jobs 10000] [--pending 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from router.record import Status, write_status  # noqa: E402
from router.sweep import Backoff, plan_sweep  # noqa: E402
from tests.factory import write_job  # noqa: E402

OUT = REPO / "bench" / "out"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, jobs: int, pending: int) -> None:
    """Routed jobs as routing leaves them, and `pending` jobs never routed."""
    stamp = "2026-01-01T00:00:00+00:00"
    for i in range(jobs - pending):
        job = root / f"site{i % 10}" / f"job{i:06d}"
        job.mkdir(parents=True)
        (job / "info.json").write_text('{"AETitleCalled": "PROCRSI", "AETitleCaller": "PACS"}')
        (job / "proc.json").write_text('[{"success": "success", "message": "done"}]')
        (job / "routing-record.jsonl").write_text('{"event": "run"}\n' * 50)
        write_status(job, Status("routed", 1, 0, stamp))
    for i in range(pending):
        write_job(root / "pending" / f"job{i:04d}", n_output=3, n_input=0)


def run_sweep(root: Path, config: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "router", "sweep", str(root), "--config", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--pending", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sweep-", dir=OUT))
    receiver = None
    try:
        root = work / "jobs"
        t0 = time.perf_counter()
        build(root, args.jobs, args.pending)
        build_s = time.perf_counter() - t0

        plan_sweep(root, Backoff())  # warm the page cache and dentries
        t0 = time.perf_counter()
        plan = plan_sweep(root, Backoff())
        plan_s = time.perf_counter() - t0

        port = free_port()
        env = {**os.environ, "TCP_NODELAY": "1"}
        receiver = subprocess.Popen(
            [STORESCP, "--ignore", "-aet", "PACS", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = work / "routing.json"
        dest = {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": "PACS"}
        config.write_text(json.dumps({"routing": [{"send": [{".*": dest}]}]}))
        env = {
            **os.environ,
            "DICOM_ROUTER_LOG_FILE": str(work / "routing.log"),
            "PREFECT_HOME": str(OUT / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        time.sleep(0.3)
        first_s, first = run_sweep(root, config, env)
        second_s, second = run_sweep(root, config, env)
    finally:
        if receiver:
            receiver.terminate()
            receiver.wait()
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "jobs": args.jobs,
        "pending": args.pending,
        "build_seconds": round(build_s, 2),
        "plan_seconds": round(plan_s, 3),
        "plan_us_per_job": round(plan_s / args.jobs * 1e6, 1),
        "plan_counts": plan.summary(),
        "sweep_routing_pending_seconds": round(first_s, 2),
        "sweep_routing_pending_counts": first["counts"],
        "sweep_nothing_due_seconds": round(second_s, 2),
        "sweep_nothing_due_counts": second["counts"],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{args.jobs} job folders ({args.pending} pending), built in {build_s:.1f} s")
    print(f"  plan (what a sweep reads):   {plan_s:.3f} s  ({figures['plan_us_per_job']} µs/job)")
    print(f"  dicom-router sweep, routing {args.pending}: {first_s:.1f} s  {first['counts']}")
    print(f"  dicom-router sweep, none due:  {second_s:.1f} s  {second['counts']}")
    print("  (each sweep includes starting Prefect's ephemeral API: see PERF-NOTES)")


if __name__ == "__main__":
    main()
