"""What the Prefect server's interpreter costs it per routed job, two servers side by side.

Two `prefect server` processes on one throwaway PostgreSQL (a database each), as the unit
runs them (the services' tuning, logging at WARNING): the reference on `--reference`
(default: this interpreter, the router's) and the candidate on `--candidate` (default:
the checkout's `.server-venv`, as `deployments/install-server.sh` makes a site's). Each
gets what `route_overhead.py`'s warm worker gets: a `dicom-router worker` pool with the
crash automation, the `route-job` deployment, a warm announcer. Small jobs (`--small`
images) are announced one after the other, `--batch` to one server, then `--batch` to
the other, `--rounds` times, so drift of the machine falls on both alike. Printed: each
server's runtime, its CPU-seconds per job per batch (the batch's window: the jobs, a 1 s
pause after each, 5 s for the last writes), the medians and candidate / reference.

    python bench/server_python.py [--rounds 4] [--batch 10] [--small 5]
                                  [--reference PY] [--candidate PY] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from route_overhead import (  # noqa: E402
    AS_UNIT,
    Announcer,
    cpu_seconds,
    last_stored,
    receiver_and_postgres,
    run_ended,
    small_job,
    warm_pool,
)
from route_throughput import guarded, reset_record  # noqa: E402

from tests.fixtures_prefect import (  # noqa: E402
    server_python,
    server_runtime,
    start_prefect_server,
)

PAUSE_S = 1.0
SETTLE_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10, help="jobs per server per round")
    parser.add_argument("--small", type=int, default=5, help="images per job")
    parser.add_argument("--reference", default=sys.executable)
    parser.add_argument("--candidate", default=server_python())
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = guarded(lambda: run(args))
    if isinstance(figures, int):
        sys.exit(figures)
    print(json.dumps(figures, indent=2) if args.json else render(figures))


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="server-python-", dir=args.out))
    base.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    logs = base / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        router, pg = receiver_and_postgres(stack, base)
        sides: dict[str, dict[str, Any]] = {}
        for side, python in (("reference", args.reference), ("candidate", args.candidate)):
            home = base / side
            home.mkdir()
            server = start_prefect_server(
                home / "prefect", pg.create_database(side), settings=AS_UNIT, python=python
            )
            stack.callback(server.stop)
            warm_pool(stack, server, home, f"warm-{side}", router, limit=8)
            announcer = Announcer({**server.env(home / "cli"), **router}, logs / f"{side}.log")
            stack.callback(announcer.close)
            sides[side] = {
                "pid": server.service.process.pid,
                "runtime": str(server_runtime(server.service.process.pid)),
                "announcer": announcer,
                "job": small_job(home / "jobs", "small", args.small),
                "cpu": [],
                "latency": [],
            }
        for side in sides.values():  # the first runs warm the worker's and server's caches
            for _ in range(2):
                announce(side, args.small)
        time.sleep(SETTLE_S)
        for _ in range(args.rounds):
            for side in sides.values():
                before = cpu_seconds(side["pid"])
                for _ in range(args.batch):
                    side["latency"].append(announce(side, args.small))
                time.sleep(SETTLE_S)
                side["cpu"].append(round((cpu_seconds(side["pid"]) - before) / args.batch, 3))
    out: dict[str, Any] = {"rounds": args.rounds, "batch": args.batch, "small": args.small}
    for name, side in sides.items():
        out[name] = {
            "server": side["runtime"],
            "server_cpu_per_job_s": side["cpu"],
            "median_s": round(statistics.median(side["cpu"]), 3),
            "latency_median_s": round(statistics.median(side["latency"]), 3),
        }
    out["ratio"] = round(out["candidate"]["median_s"] / out["reference"]["median_s"], 2)
    out["logs"] = str(logs)
    return out


def announce(side: dict[str, Any], images: int) -> float:
    """One job, its run created by the announcer (`flows.notify.Announcer`) and routed by
    the warm worker: announce → last instance stored."""
    reset_record(side["job"])
    start = side["announcer"].announce(side["job"])
    stored = last_stored(side["job"], images)
    run_ended(side["job"])
    time.sleep(PAUSE_S)
    return stored - start


def render(f: dict[str, Any]) -> str:
    lines = [f"{f['rounds']} rounds of {f['batch']} jobs of {f['small']} images per server"]
    for name in ("reference", "candidate"):
        s = f[name]
        lines.append(
            f"{name}: {s['server']}\n  server CPU-s per job by batch {s['server_cpu_per_job_s']}"
            f", median {s['median_s']} s; announce → stored median {s['latency_median_s']} s"
        )
    lines.append(f"candidate / reference: {f['ratio']}")
    lines.append(f"logs: {f['logs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
