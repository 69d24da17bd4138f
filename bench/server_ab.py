"""What a change does to the Prefect server's CPU per routed job: a base revision against
the working tree, on one server, in turns.

The server's CPU per small job moves by a quarter or more between two invocations on the
same machine (its speed drifts); a change worth a few per cent only shows when both
versions run against the same server at the same time. This bench makes a git worktree of
`--base` (default HEAD) beside the checkout and starts, on one `prefect server` on a
throwaway PostgreSQL (as `route_overhead.py` does, at the unit's settings):

- a work pool per version, as `dicom-router setup` makes it (with the crash automation),
  its `route-job` deployment, and one `dicom-router worker` run from that version's tree;
- an announcer per version (`flows.notify.Announcer` from that tree, in a warm process).

Then rounds of `--batch` small jobs (5 images of 64x64) per version, the versions taking
turns and swapping who goes first every round: announce → every instance stored → the
run's end → 0.5 s, with the CPU-seconds of the server, of that version's worker and of
PostgreSQL over each job's window. Printed: the medians per version, the working tree's
over the base's, and the median of the per-round differences. The worktree is removed at
the end.

    python bench/server_ab.py [--base REV] [--rounds 8] [--batch 5] [--server-python PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from route_overhead import (  # noqa: E402
    AS_UNIT,
    cpu_seconds,
    last_stored,
    postgres_cpu,
    receiver_and_postgres,
    run_ended,
    small_job,
)
from route_throughput import guarded, reset_record, spawn, stop_group  # noqa: E402

from flows.service import ensure_crash_automation  # noqa: E402
from tests.fixtures_prefect import (  # noqa: E402
    PrefectServer,
    WorkPool,
    create_work_pool,
    server_python,
    server_runtime,
    start_prefect_server,
)

IMAGES = 5
ANNOUNCER = """\
import sys, time
from flows.notify import Announcer
with Announcer(sys.argv[1]) as announcer:
    for line in sys.stdin:
        announcer.job_processed(line.strip())
        print(time.time(), flush=True)
"""


class Version:
    """One version's tree, pool, worker and announcer."""

    def __init__(self, label: str, tree: Path) -> None:
        self.label = label
        self.tree = tree
        self.worker_pid = 0
        self.announcer: subprocess.Popen[str] | None = None
        self.job = Path()
        self.figures: dict[str, list[float]] = {"server": [], "worker": [], "postgres": []}
        self.latency: list[float] = []

    def announce(self, job: Path) -> float:
        assert self.announcer and self.announcer.stdin and self.announcer.stdout
        start = time.time()
        self.announcer.stdin.write(f"{job}\n")
        self.announcer.stdin.flush()
        if not self.announcer.stdout.readline():
            raise RuntimeError(f"{self.label}: the announcer exited (see its log)")
        return start


def worktree(stack: contextlib.ExitStack, rev: str, where: Path) -> Path:
    """A detached worktree of `rev` at `where`, removed with `stack`."""
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
        text=True,
    )
    stack.callback(
        subprocess.run,
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
        check=False,
        capture_output=True,
    )
    return where


def start_version(
    stack: contextlib.ExitStack,
    version: Version,
    server: PrefectServer,
    base: Path,
    env: dict[str, str],
) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    pool = WorkPool(
        create_work_pool(server, f"ab-{version.label}", warm=True), server, base, warm=True
    )
    stack.callback(pool.stop)
    name = pool.deploy("flows/route_job.py:route_job_flow", f"route-job-{version.label}")
    with server.settings():
        with get_client(sync_client=True) as client:  # as prefect.yaml deploys route-job
            deployment = client.read_deployment_by_name(name)
            client.update_deployment(
                deployment.id, DeploymentUpdate(enforce_parameter_schema=False)
            )
        ensure_crash_automation(pool.name, 60.0)
    tree = {"PYTHONPATH": str(version.tree)}  # its own `flows` and `router`
    [worker] = pool.start_workers(1, limit=8, env={**env, **tree}, cwd=version.tree)
    version.worker_pid = worker.service.process.pid
    log = (base / "logs" / f"announcer-{version.label}.log").open("ab")
    stack.callback(log.close)
    version.announcer = spawn(
        [sys.executable, "-c", ANNOUNCER, name],
        {**server.env(base / "cli-home"), **env, **tree},
        subprocess.PIPE,
        log,
        stdin=subprocess.PIPE,
        text=True,
        cwd=version.tree,
    )
    stack.callback(_close, version.announcer)
    version.job = small_job(base / f"jobs-{version.label}", "small", IMAGES)


def _close(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(30)
    finally:
        stop_group(proc)


def one_job(version: Version, server_pid: int, keep: bool) -> None:
    job = version.job
    reset_record(job)
    s0, w0, p0 = cpu_seconds(server_pid), cpu_seconds(version.worker_pid), postgres_cpu()
    start = version.announce(job)
    stored = last_stored(job, IMAGES)
    run_ended(job)
    time.sleep(0.5)  # the run's final state, logs and events
    if keep:
        version.figures["server"].append(cpu_seconds(server_pid) - s0)
        version.figures["worker"].append(cpu_seconds(version.worker_pid) - w0)
        version.figures["postgres"].append(postgres_cpu() - p0)
        version.latency.append(stored - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="server-ab-", dir=args.out))
    base.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    (base / "logs").mkdir()
    with contextlib.ExitStack() as stack:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.base],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        versions = [
            Version("base", worktree(stack, rev, base / "base-tree")),
            Version("tree", REPO),
        ]
        env, pg = receiver_and_postgres(stack, base)
        server = start_prefect_server(
            base / "prefect", pg.url(), settings=AS_UNIT, python=args.server_python
        )
        stack.callback(server.stop)
        server_pid = server.service.process.pid
        for version in versions:
            start_version(stack, version, server, base, env)
        for version in versions:  # warms each worker's caches
            for _ in range(2):
                one_job(version, server_pid, keep=False)
        time.sleep(5)
        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            for version in versions if r % 2 == 0 else versions[::-1]:
                for _ in range(args.batch):
                    one_job(version, server_pid, keep=True)
            rounds.append(
                {v.label: statistics.median(v.figures["server"][-args.batch :]) for v in versions}
            )
        return {
            "base": rev,
            "server": str(server_runtime(server_pid)),
            "rounds": args.rounds,
            "batch": args.batch,
            "medians": {
                v.label: {
                    **{k: round(statistics.median(x), 4) for k, x in v.figures.items()},
                    "latency": round(statistics.median(v.latency), 4),
                }
                for v in versions
            },
            "round_differences": [round(x["tree"] - x["base"], 4) for x in rounds],
        }


def render(f: dict[str, Any]) -> str:
    base, tree = f["medians"]["base"], f["medians"]["tree"]
    lines = [
        f"prefect server: {f['server']}",
        f"base {f['base']} against the working tree: {f['rounds']} rounds of {f['batch']} "
        f"small jobs ({IMAGES} images) each, in turns; medians per job",
        f"{'':28}{'base':>10}{'tree':>10}{'tree/base':>11}",
    ]
    for key, label in (
        ("server", "prefect server CPU-s"),
        ("worker", "worker CPU-s"),
        ("postgres", "postgres CPU-s"),
        ("latency", "announce → stored, s"),
    ):
        ratio = tree[key] / base[key] if base[key] else float("nan")
        lines.append(f"{label:28}{base[key]:>10.3f}{tree[key]:>10.3f}{ratio:>11.2f}")
    diffs = f["round_differences"]
    lines.append(
        f"server CPU-s per job, tree minus base, per round: {diffs}; "
        f"median {statistics.median(diffs):+.3f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=5, help="jobs per version per round")
    parser.add_argument("--server-python", default=server_python())
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = guarded(lambda: run(args))
    if isinstance(figures, int):
        sys.exit(figures)
    print(json.dumps(figures, indent=2) if args.json else render(figures))


if __name__ == "__main__":
    main()
