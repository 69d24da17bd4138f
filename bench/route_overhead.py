"""Per-job overhead of a `route-job` run: on a process worker, and in a warm process.

A small job (3 CT images of 64x64) is routed to a dcmtk `storescp --ignore` on 127.0.0.1,
so that what is measured is the cost around the sending, not the sending. Against a real
`prefect server` on PostgreSQL (started here, as in the service tests):

1. `worker`: K runs of the `route-job` deployment on one process worker, one after the
   other. Prefect's process worker starts a new Python process per run, so each run pays
   interpreter start-up and imports. Reported: created → Completed, and the run's own
   Running → Completed, medians.
2. `warm`: K runs of the flow in one already-warm process against the same server (what a
   sweep's routing of many jobs does, or a long-lived process calling the flow), with the
   flow-run heartbeat off as the CLI runs it. Reported: wall time per run, median.

    python bench/route_overhead.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.factory import write_job  # noqa: E402
from tests.fixtures_dcmtk import free_port  # noqa: E402
from tests.fixtures_prefect import (  # noqa: E402
    WorkPool,
    create_work_pool,
    start_postgres,
    start_prefect_server,
    stop_postgres,
)


def fresh_job(base: Path, name: str) -> Path:
    job = base / name
    write_job(job, n_output=3, n_input=0, rows=64, cols=64)
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="overhead-"))
    base.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    receiver = pg = server = pool = None
    try:
        port = free_port()
        receiver = subprocess.Popen(
            ["/usr/bin/storescp", "--ignore", "-aet", "PACS", str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = base / "routing.json"
        dest = {"IP": "127.0.0.1", "PORT": port, "AETitleSender": "ROUTER", "AETitleTo": "PACS"}
        config.write_text(json.dumps({"routing": [{"send": [{".*": dest}]}]}))
        router_env = {
            "DICOM_ROUTER_CONFIG": str(config),
            "DICOM_ROUTER_LOG_FILE": str(base / "routing.log"),
        }

        (base / "pg").mkdir()
        pg = start_postgres(base / "pg")
        server = start_prefect_server(base / "prefect", pg.url())
        pool = WorkPool(create_work_pool(server, "bench"), server, base)
        pool.start_workers(1, env=router_env)
        server.cli("deploy", "--name", "route-job", "--pool", pool.name)

        worker_total, worker_own = [], []
        for i in range(args.runs + 1):  # the first run warms the worker's caches
            job = fresh_job(base / "jobs", f"w{i}")
            run = server.run_deployment("route-job/route-job", {"job_dir": str(job)})
            final = server.wait_for_flow_runs([run.id], timeout=300, pool=pool)[run.id]
            if not final.state.is_completed():
                raise SystemExit(f"route-job run failed: {final.state.message}")
            if i:
                times = server.timeline(run.id)
                worker_total.append(times["Completed"])
                worker_own.append(times["Completed"] - times["Running"])

        warm: list[float] = []
        code = (
            "import json, sys, time\n"
            "from flows.route_job import in_process, route_job_flow\n"
            "out = []\n"
            "for job in sys.argv[1:]:\n"
            "    t = time.perf_counter()\n"
            "    with in_process():\n"
            "        route_job_flow(job_dir=job)\n"
            "    out.append(time.perf_counter() - t)\n"
            "print(json.dumps(out))\n"
        )
        jobs = [str(fresh_job(base / "jobs", f"p{i}")) for i in range(args.runs + 1)]
        done = subprocess.run(
            [sys.executable, "-c", code, *jobs],
            env={**server.env(), **router_env},
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        warm = json.loads(done.stdout.strip().splitlines()[-1])[1:]
    finally:
        if pool:
            pool.stop()
        if server:
            server.stop()
        if pg:
            stop_postgres(pg)
        if receiver:
            receiver.terminate()
            receiver.wait()
        shutil.rmtree(base, ignore_errors=True)

    figures: dict[str, Any] = {
        "runs": args.runs,
        "worker_created_to_completed_s": round(statistics.median(worker_total), 2),
        "worker_running_to_completed_s": round(statistics.median(worker_own), 2),
        "warm_process_per_run_s": round(statistics.median(warm), 3),
        "warm_process_runs_s": [round(x, 3) for x in warm],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"route-job overhead per job (3 small images), medians of {args.runs} runs:")
    print(f"  process worker, created -> Completed: {figures['worker_created_to_completed_s']} s")
    print(f"  process worker, Running -> Completed: {figures['worker_running_to_completed_s']} s")
    print(f"  warm process (flow called in-process): {figures['warm_process_per_run_s']} s")


if __name__ == "__main__":
    main()
