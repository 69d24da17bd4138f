"""One faulty file in a job: what it costs the job, with the router's default retries.

A job of N small CT images is routed on the plain path (`router.route.route_job`) to a
pynetdicom Storage SCP in this process (`tests.fixtures_scp`) that fails on one instance,
k (the middle one unless told), each time it comes: it aborts the association (as Orthanc
did on a file whose data set is not in its declared transfer syntax), resets the
connection, never answers, or refuses it with 0xA700 (or nothing fails: `none`).
Settings are the router's defaults (3 retries after 5, 10 and 20 s; DIMSE time-out 60 s)
unless given. Reported: instances that arrived (of N) and how many twice, association
set-ups, attempts, seconds, outcome.

    python bench/fault_isolation.py [--files 200] [--fault abort] [--associations 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import router.parallel  # noqa: E402
from router.config import parse_config  # noqa: E402
from router.route import route_job  # noqa: E402
from router.settings import Settings  # noqa: E402
from tests.factory import dicom_file, write_job  # noqa: E402
from tests.fixtures_scp import StorageSCP  # noqa: E402

FAULTS = ("none", "abort", "reset", "stall", "a700")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--k", type=int, default=0, help="the faulty file (1-based; 0: middle)")
    parser.add_argument("--fault", choices=FAULTS, default="abort")
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--dimse", type=float, default=60.0, help="DIMSE time-out, s")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("router.routing").propagate = False  # its lines go to the log file
    router.parallel.MIN_SHARE_FILES = 1  # as many associations as asked, even for few files

    base = Path(tempfile.mkdtemp(prefix="fault-isolation-"))
    job = base / "job"
    paths = write_job(job, n_output=args.files, n_input=0, rows=64, cols=64)
    k = args.k or (args.files + 1) // 2
    uid = dicom_file(paths[k - 1]).sop_instance_uid
    server = StorageSCP(stall_seconds=args.dimse + 5).start()
    try:
        if args.fault == "abort":
            server.abort_instances.add(uid)
        elif args.fault == "reset":
            server.reset_instances.add(uid)
        elif args.fault == "stall":
            server.stall_instances.add(uid)
        elif args.fault == "a700":
            server.refuse_instances[uid] = 0xA700
        destination = {
            "IP": "127.0.0.1",
            "PORT": server.port,
            "AETitleSender": "ROUTER",
            "AETitleTo": server.ae_title,
        }
        config = parse_config({"routing": [{"send": [{".*": destination}]}]})
        settings = Settings(
            log_file=base / "routing.log",
            associations=args.associations,
            dimse_timeout=args.dimse,
        )
        begun = time.monotonic()
        report = route_job(job, config, settings)
        seconds = time.monotonic() - begun
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    delivery = report.rules[0].entries[0].delivery
    assert delivery is not None
    figures = {
        "files": args.files,
        "k": k,
        "fault": args.fault,
        "associations": args.associations,
        "arrived": len(server.counts),
        "arrived twice": sum(1 for n in server.counts.values() if n > 1),
        "association set-ups": server.associations,
        "attempts": delivery.attempts,
        "seconds": round(seconds, 2),
        "outcome": report.state,
        "reason": delivery.error,
        "retry delays": settings.retry_delays(),
    }
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        print(f"{name:>20}: {value}")


if __name__ == "__main__":
    main()
