#!/usr/bin/env python3
"""Big studies with flat memory: the router's peak RSS on many files and on huge files.

Routes (plain path, `router.route.route_job`, no Prefect) three cached jobs to one
`/usr/bin/storescp --ignore` and samples the peak RSS (VmHWM) of the router process and of
its sending processes, next to a process that only imports them:

- `count-500` and `count-5000`: 500 and 5,000 small CT images (128x128): what memory does
  with the number of files;
- `frames`: three multi-frame images (Multi-frame Grayscale Word SC, 512x512, 16 bits) of
  300, 500 and 800 frames, ~157, 262 and 419 MB: what it does with the size of a file.

Files are streamed from disk, so neither should grow: a file held in memory would show as
hundreds of MiB. Every job is routed once per `--associations` value (default: 1 and the
router's default). Children, process groups and peak sampling are route_throughput.py's.

    python bench/big_study.py [--associations 1 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import route_throughput as rt

FRAMES = (300, 500, 800)
COUNTS = (500, 5000)
COUNT_SIZE = 128
GROWTH_MAX_MIB = 64.0
"""Peak RSS above the import-only figure a run may reach: a sixth of the largest file, so a
file held in memory cannot pass, and more than 5,000 files' descriptors and record need."""

SENDER_IMPORTS = "import router.parallel, router.send"

BUILD_COUNT = """\
import sys
from tests.factory import write_job
write_job(sys.argv[1], n_output=int(sys.argv[2]), n_input=0, rows=int(sys.argv[3]),
          cols=int(sys.argv[3]))
"""

BUILD_FRAMES = """\
import sys
import numpy as np
from pathlib import Path
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, UID, generate_uid
from tests.factory import write_job

MF_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")  # Multi-frame Grayscale Word SC
job = Path(sys.argv[1])
write_job(job, n_output=0, n_input=0)
study, series = generate_uid(), generate_uid()
y, x = np.indices((512, 512), dtype=np.uint32)
frame = ((x * 7 + y * 13) % 4096).astype("<u2").tobytes()
for number, frames in enumerate(map(int, sys.argv[2:]), start=1):
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MF_WORD_SC
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MF_WORD_SC, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "PAT001", "Big^Study", "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 512, 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = frame * frames
    ds.save_as(job / "OUTPUT" / f"MF{number:06d}.dcm", enforce_file_format=True)
    del ds
"""


def jobs(out: Path) -> dict[str, Path]:
    made = {}
    for n in COUNTS:
        made[f"count-{n}"] = rt.build_job(
            out / "jobs" / f"ct{COUNT_SIZE}-{n}",
            BUILD_COUNT,
            [str(n), str(COUNT_SIZE)],
            f"{n} CT images of {COUNT_SIZE}x{COUNT_SIZE}",
        )
    made["frames"] = rt.build_job(
        out / "jobs" / ("mf512-" + "-".join(map(str, FRAMES))),
        BUILD_FRAMES,
        [str(f) for f in FRAMES],
        f"multi-frame 512x512 images of {', '.join(map(str, FRAMES))} frames",
    )
    return made


def big_study(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    built = jobs(out)
    env = rt.router_env(out / "prefect-home")
    counts = args.associations or sorted({1, rt.default_associations(env)})
    routing_log = logs / "routing.log"
    runs: list[dict[str, Any]] = []
    with rt.storescp(args.max_pdu, logs) as port:
        config = rt.write_config(out / "big-study.json", port)
        for name, job in built.items():
            files = rt.output_files(job)
            nbytes = rt.warm_page_cache(files)
            for a in counts:
                log = logs / f"big-{name}-a{a}.log"
                plain = rt.plain_args(job, config, routing_log)
                envs = rt.router_env(out / "prefect-home", a)
                run = rt.router_run("plain", 1, a, plain, envs, job, len(files), nbytes, log)
                rt.reset_record(job)
                runs.append(
                    {
                        "job": name,
                        "files": len(files),
                        "bytes": nbytes,
                        "largest_file_bytes": max(f.stat().st_size for f in files),
                        **asdict(run),
                    }
                )
        router_import = rt.baseline_rss(env, logs)
        sender = rt.run_child([sys.executable, "-c", SENDER_IMPORTS], env, logs / "sender.log")
    for run in runs:
        run["router_growth_mib"] = run["peak_rss_mib"] - router_import
        senders = run["children_peak_rss_mib"]
        run["sender_growth_mib"] = senders - sender.own_peak_mib if senders else None
        worst = max(run["router_growth_mib"], run["sender_growth_mib"] or 0.0)
        run["met"] = worst <= GROWTH_MAX_MIB and not run["problems"]
    by_name = {(r["job"], r["associations"]): r for r in runs}
    per_1000 = {
        a: (by_name[("count-5000", a)]["peak_rss_mib"] - by_name[("count-500", a)]["peak_rss_mib"])
        / 4.5
        for a in counts
    }
    return {
        "runs": runs,
        "import_only_peak_rss_mib": {"router": router_import, "sender": sender.own_peak_mib},
        "router_growth_mib_per_1000_files": per_1000,
        "target_growth_max_mib": GROWTH_MAX_MIB,
        "met": all(r["met"] for r in runs),
        "receiver": f"{rt.STORESCP} --fork --ignore --max-pdu {args.max_pdu}",
        "logs": str(logs),
    }


def print_big_study(r: dict[str, Any]) -> None:
    base = r["import_only_peak_rss_mib"]
    print(f"plain path (router.route.route_job) → {r['receiver']}; peak RSS in MiB")
    print(
        f"{'job':12}{'files':>7}{'MB':>7}{'largest':>9}{'assoc':>6}{'send s':>8}{'MB/s':>7}"
        f"{'router':>8}{'+':>6}{'sender':>8}{'+':>6}"
    )
    for run in r["runs"]:
        sender, growth = run["children_peak_rss_mib"], run["sender_growth_mib"]
        print(
            f"{run['job']:12}{run['files']:7}{run['bytes'] / 1e6:7.0f}"
            f"{run['largest_file_bytes'] / 1e6:9.2f}{run['associations']:6}"
            f"{run['send_seconds']:8.2f}{run['mb_per_s']:7.0f}"
            f"{run['peak_rss_mib']:8.1f}{run['router_growth_mib']:+6.1f}"
            f"{rt._f(sender, '8.1f')}{'     -' if growth is None else format(growth, '+6.1f')}"
        )
        for problem in run["problems"]:
            print(f"    PROBLEM: {problem}")
    print(f"import only: router {base['router']:.1f} MiB, sender {base['sender']:.1f} MiB")
    for a, growth in r["router_growth_mib_per_1000_files"].items():
        print(f"router growth with the number of files ({a} assoc.): {growth:+.2f} MiB per 1000")
    verdict = "met" if r["met"] else "NOT met"
    print(f"target: peak − import only ≤ {r['target_growth_max_mib']:.0f} MiB → {verdict}")
    print(f"logs: {r['logs']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--associations",
        type=int,
        nargs="+",
        metavar="N",
        help="DICOM_ROUTER_ASSOCIATIONS values to route each job with "
        "(default: 1 and the router's default)",
    )
    parser.add_argument("--max-pdu", type=int, default=131072, help="receiver max PDU (131072)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=rt.OUT, help="cache and logs (bench/out)")
    args = parser.parse_args(argv)
    args.out = args.out.absolute()
    result = rt.guarded(lambda: big_study(args))
    if isinstance(result, int):
        return result
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_big_study(result)
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
