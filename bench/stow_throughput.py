#!/usr/bin/env python3
"""STOW-RS throughput into Orthanc: the router next to dicomweb-client, and next to its own C-STORE.

One Orthanc (Debian's, with its DICOMweb plugin) stores everything it gets and is emptied
before every run; one job folder of N 512x512 CT images (cached under bench/out/, shared
with route_throughput.py); in rounds, each sender sends the same files to it:

1. the router's STOW-RS (`router.route.route_job`, no Prefect), once per `--requests`
   value (parallel requests per job), `--batch` instances per request;
2. dicomweb-client's `DICOMwebClient.store_instances` (pip install '.[bench]'): each file
   read with pydicom's dcmread, `--batch` data sets per call, as its users do;
3. the router's C-STORE into the same Orthanc (its default associations).

Figures are send rates measured in the same invocation, as ratios to dicomweb-client's
median. After every run Orthanc must hold every instance, or the run is a PROBLEM. Then peak
memory: the router's process for the N-image job, and a job of one multi-frame file of
`--frames` 512x512 frames (800: 419 MB), sent by the router and by dicomweb-client.

Children run in process groups of their own (route_throughput's helpers): nothing is left.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import route_throughput as rt
from big_study import BUILD_FRAMES

DONE_RATIO = 1.0
"""The router's STOW-RS must send at least as fast as dicomweb-client (issue's done-when)."""

GROWTH_MAX_MIB = 64.0
"""Peak RSS above importing the router that the 419 MB file may cost: a sixth of it."""

DICOMWEB_CLIENT = """\
import json, sys, time
from pathlib import Path
from pydicom import dcmread
from dicomweb_client.api import DICOMwebClient
url, folder, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
paths = sorted(p for p in folder.rglob("*") if p.is_file())
client = DICOMwebClient(url)
start = time.perf_counter()
listed = 0
for i in range(0, len(paths), batch):
    answer = client.store_instances([dcmread(p) for p in paths[i : i + batch]])
    listed += len(answer.get("ReferencedSOPSequence", []))
print(json.dumps({"seconds": time.perf_counter() - start, "listed": listed}))
"""

CLIENT_IMPORT = "import pydicom, dicomweb_client.api"


def write_config(path: Path, url: str | None, port: int | None, batch: int) -> Path:
    if url is not None:
        destination: dict[str, Any] = {"URL": url, "instances_per_request": batch}
    else:
        destination = {
            "IP": rt.HOST,
            "PORT": port,
            "AETitleSender": "DICOM-ROUTER",
            "AETitleTo": rt.RECEIVER_AET,
        }
    config = {"routing": [{"name": "bench", "send": [{".*": destination}]}]}
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass
class Run:
    sender: str
    round: int
    lanes: int | None
    seconds: float
    img_per_s: float
    mb_per_s: float
    peak_rss_mib: float
    stored_in_orthanc: int
    ratio: float | None = None
    problems: list[str] | None = None


def router(
    label: str,
    lanes: int,
    job: Path,
    config: Path,
    rec: rt.Receiver,
    n: int,
    nbytes: int,
    out: Path,
    k: int,
    logs: Path,
) -> Run:
    env = rt.router_env(out / "prefect-home", lanes, lanes)
    log = logs / f"stow-{label}-{k}-l{lanes}.log"
    rec.reset()
    run = rt.router_run(
        "plain",
        k,
        lanes,
        rt.plain_args(job, config, logs / "routing.log"),
        env,
        job,
        n,
        nbytes,
        log,
    )
    rt.reset_record(job)
    held = rec.count()
    problems = list(run.problems)
    if held != n:
        problems.append(f"Orthanc holds {held} of {n}")
    return Run(
        label,
        k,
        lanes,
        run.send_seconds,
        run.img_per_s,
        run.mb_per_s,
        run.peak_rss_mib,
        held,
        problems=problems,
    )


def client(job: Path, rec: rt.Receiver, batch: int, n: int, nbytes: int, k: int, logs: Path) -> Run:
    rec.reset()
    args = [sys.executable, "-c", DICOMWEB_CLIENT, rec.http_url + "/dicom-web"]
    args += [str(job / "OUTPUT"), str(batch)]
    log = logs / f"stow-dicomweb-client-{k}.log"
    result = rt.run_child(args, dict(os.environ), log)
    problems = []
    seconds = 0.0
    try:
        seconds = json.loads(result.stdout)["seconds"]
    except (ValueError, KeyError):
        problems.append(f"no result (exit {result.exit_code}); see {log}")
    held = rec.count()
    if held != n:
        problems.append(f"Orthanc holds {held} of {n}")
    rate = rt.Rate.of(seconds, n, nbytes) if seconds else rt.Rate(0.0, 0.0, 0.0)
    return Run(
        "dicomweb-client",
        k,
        None,
        seconds,
        rate.img_per_s,
        rate.mb_per_s,
        result.own_peak_mib,
        held,
        problems=problems,
    )


def bench(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    job = rt.ensure_job(out, args.files)
    frames = rt.build_job(
        out / "jobs" / f"mf512-{args.frames}",
        BUILD_FRAMES,
        [str(args.frames)],
        f"one multi-frame 512x512 image of {args.frames} frames",
    )
    files = rt.output_files(job)
    nbytes = rt.warm_page_cache(files)
    n = len(files)
    env = rt.router_env(out / "prefect-home")
    lanes: list[int] = args.requests or sorted({1, rt.default_associations(env)})
    busy = rt.cpu_busy()
    runs: list[Run] = []
    with rt.orthanc(args.max_pdu, logs, out, dicomweb=True) as rec:
        stow = write_config(out / "stow-bench.json", rec.http_url + "/dicom-web", None, args.batch)
        dimse = write_config(out / "stow-bench-dimse.json", None, rec.port, args.batch)
        for k in range(1, args.repeat + 1):
            runs.append(client(job, rec, args.batch, n, nbytes, k, logs))
            for a in lanes:
                runs.append(router("router STOW-RS", a, job, stow, rec, n, nbytes, out, k, logs))
            default = rt.default_associations(env)
            runs.append(router("router C-STORE", default, job, dimse, rec, n, nbytes, out, k, logs))
        runs.append(client(job, rec, args.batch, n, nbytes, args.repeat + 1, logs))
        # memory: one file of --frames frames
        big = rt.output_files(frames)
        big_bytes = rt.warm_page_cache(big)
        big_runs = [
            router("router STOW-RS", 1, frames, stow, rec, 1, big_bytes, out, 1, logs),
            client(frames, rec, 1, 1, big_bytes, 0, logs),
        ]
        router_import = rt.baseline_rss(env, logs)
        client_import = rt.run_child(
            [sys.executable, "-c", CLIENT_IMPORT], dict(os.environ), logs / "client-import.log"
        ).own_peak_mib
    reference = statistics.median(r.img_per_s for r in runs if r.sender == "dicomweb-client")
    for r in runs:
        r.ratio = r.img_per_s / reference if reference else None
    stow_ratios = {
        a: statistics.median(
            r.ratio or 0.0 for r in runs if r.sender == "router STOW-RS" and r.lanes == a
        )
        for a in lanes
    }
    stow_runs = [r for r in runs if r.sender == "router STOW-RS"]
    growth_job = max(r.peak_rss_mib for r in stow_runs) - router_import
    growth_big = big_runs[0].peak_rss_mib - router_import
    clean = not any(r.problems for r in runs + big_runs)
    return {
        "files": n,
        "bytes": nbytes,
        "batch": args.batch,
        "receiver": f"{rt.ORTHANC} with {rt.ORTHANC_DICOMWEB}",
        "cpu_busy_before": busy,
        "cpus": os.cpu_count(),
        "runs": [asdict(r) for r in runs],
        "reference_img_per_s": reference,
        "stow_ratio_median": stow_ratios,
        "big_file_bytes": big_bytes,
        "big_runs": [asdict(r) for r in big_runs],
        "import_only_peak_rss_mib": {"router": router_import, "dicomweb-client": client_import},
        "router_growth_mib": {"job": growth_job, "big file": growth_big},
        "met": clean and max(stow_ratios.values()) >= DONE_RATIO and growth_big <= GROWTH_MAX_MIB,
        "logs": str(logs),
    }


def _f(value: float | None, spec: str) -> str:
    return rt._f(value, spec)


def show(r: dict[str, Any]) -> None:
    print(
        f"{r['files']} files, {r['bytes'] / 1e6:.0f} MB (CT 512x512) → {r['receiver']}; "
        f"{r['batch']} instances per request"
    )
    print(f"{'':30}{'lanes':>6}{'send s':>8}{'img/s':>8}{'MB/s':>8}{'× dwc':>7}{'RSS MiB':>9}")
    for run in r["runs"]:
        label = f"{run['sender']} {run['round']}"
        print(
            f"{label:30}{_f(run['lanes'], '6.0f')}{run['seconds']:8.2f}{run['img_per_s']:8.0f}"
            f"{run['mb_per_s']:8.0f}{_f(run['ratio'], '7.2f')}{run['peak_rss_mib']:9.0f}"
        )
        for problem in run["problems"] or []:
            print(f"    PROBLEM: {problem}")
    print(f"dicomweb-client median: {r['reference_img_per_s']:.0f} img/s")
    for lanes, ratio in r["stow_ratio_median"].items():
        print(f"router STOW-RS, {lanes} request(s) at once: median {ratio:.2f}× dicomweb-client")
    base = r["import_only_peak_rss_mib"]
    print(
        f"peak RSS, import only: router {base['router']:.0f} MiB, "
        f"dicomweb-client {base['dicomweb-client']:.0f} MiB"
    )
    print(f"one file of {r['big_file_bytes'] / 1e6:.0f} MB:")
    for run in r["big_runs"]:
        print(f"  {run['sender']:28}{run['seconds']:8.2f} s {run['peak_rss_mib']:9.0f} MiB peak")
        for problem in run["problems"] or []:
            print(f"    PROBLEM: {problem}")
    g = r["router_growth_mib"]
    print(
        f"router growth over import: {g['job']:.0f} MiB for the job, {g['big file']:.0f} MiB for "
        f"the big file (target ≤ {GROWTH_MAX_MIB:.0f}); STOW-RS ≥ {DONE_RATIO:.1f}× "
        f"dicomweb-client → {'met' if r['met'] else 'NOT met'}"
    )
    if r["cpu_busy_before"] > rt.BUSY_WARNING:
        print(f"WARNING: {r['cpu_busy_before']:.0%} of the cores were busy before the runs")
    print(f"logs: {r['logs']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1500, help="images in the job (1500)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (3)")
    parser.add_argument("--batch", type=int, default=50, help="instances per request (50)")
    parser.add_argument(
        "--requests",
        type=int,
        nargs="+",
        metavar="N",
        help="the router's parallel requests per job; each value run every round "
        "(default: 1 and the router's default)",
    )
    parser.add_argument("--frames", type=int, default=800, help="frames of the big file (800)")
    parser.add_argument("--max-pdu", type=int, default=131072, help="Orthanc's max PDU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=rt.OUT, help="cache and logs (bench/out)")
    args = parser.parse_args(argv)
    for binary in (rt.ORTHANC, rt.ORTHANC_DICOMWEB):
        if not os.path.exists(binary):
            parser.error(f"{binary} missing: run scripts/install-system-deps (as root)")
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        parser.error("dicomweb-client is not installed: pip install -e '.[bench]'")
    args.out = args.out.absolute()
    result = rt.guarded(lambda: bench(args))
    if isinstance(result, int):
        return result
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
