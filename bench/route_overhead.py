"""What routing costs around the sending: the plain path, the command line, the workers.

One invocation, one receiver (`storescp --fork --ignore` on 127.0.0.1, TCP_NODELAY), for a
small job (5 images of 64x64, `--small`) and a big one (1,500 CT images of 512x512,
`--files`, the cached job of `route_throughput.py`), K runs each (`--runs`):

1. `plain`: `router.route.route_job` in `python -c`, no Prefect: the reference.
2. `cli ephemeral`: `dicom-router route JOB --json` without PREFECT_API_URL (the command
   starts its own API; the first run, on a new PREFECT_HOME, is left out).
3. `cli server`: the same with PREFECT_API_URL pointing at a running server, the flow run
   in the command (`--in-process`, as without a routing worker online).
4. `cli worker`: the same once a warm worker serves the route-job deployment's pool: the
   command creates the run, the worker routes it, the command prints its report. Each run
   follows a plain-path run, and the median of the differences is printed too: the plain
   runs of row 1 come before PostgreSQL and the server exist, these with both up.
5. `warm worker`: `dicom-router worker` on a pool set up as `dicom-router setup` does it
   (with the automation that crashes the runs of a worker that stopped beating), the job
   announced from a warm process with `flows.notify.Announcer` (it creates the run);
   announce → every instance stored (the last answer's time in the job's record), and the
   CPU-seconds per job of the worker process (with its children) and of the `prefect
   server` process (PostgreSQL separately); beside the server's, what it is above the
   server's idle rate (10 s with nothing to do, measured first: its own loops) over each
   job's measuring window. `warm worker, by event`: the small job
   announced by the event `dicom.job.processed` instead, which the deployment's trigger
   turns into the run (what a shell script's `prefect event emit` does); the two ways take
   turns, run by run.
6. `process worker`: Prefect's `prefect worker start --type process` on a process pool
   of its own, the run created directly (no trigger): created → every instance stored.

Then a burst (`--burst`, 500): that many small jobs (3 images each) announced at once to
one warm worker (`--limit`, 8), received by an in-process pynetdicom SCP that counts every
instance: time to drain, jobs per second, every instance exactly once; run twice, the
warm worker's RSS after 100 runs and after the last is the memory check (two rounds of
`--burst 500`, the default, give 1,000 runs).

The send task's own Prefect cost: the `send seconds` the record's end line gives for
the entry (the send task's wall time: the task's start and end, the destination's slot
taken and given back, its C-STOREs) minus the time in its C-STOREs (`attempt_once`), for
flow runs in one warm process against the server. Also printed: the send seconds of the
warm worker minus the plain path's, which adds what the server and the worker's other
threads take from the send's CPU meanwhile.

Medians, and ratios to the plain path. The server is `prefect server` on a throwaway
PostgreSQL, as the service tests start it, on the interpreter `--server-python` names
(default: the checkout's `.server-venv`, as `deployments/install-server.sh` makes a
site's, when it exists); the first line of the output says which.

    python bench/route_overhead.py [--runs 5] [--files 1500] [--burst 500] [--rounds 2]
                                   [--server-python PATH] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from route_throughput import (  # noqa: E402
    PLAIN_PATH,
    ensure_job,
    guarded,
    reset_record,
    router_cli,
    spawn,
    stop_group,
    storescp,
    write_config,
)

from flows.service import ensure_crash_automation  # noqa: E402
from tests.fixtures_prefect import (  # noqa: E402
    SERVER_SETTINGS,
    Postgres,
    PrefectServer,
    WorkPool,
    create_work_pool,
    server_python,
    server_runtime,
    start_postgres,
    start_prefect_server,
    stop_postgres,
)

SMALL_ROWS = 64
ANNOUNCER = """\
import sys, time
from prefect.events import emit_event
from flows.notify import EVENT, Announcer, job_folder
with Announcer() as announcer:
    for line in sys.stdin:
        how, _, job = line.rstrip("\\n").partition(" ")
        if how == "event":  # as a shell script would: prefect event emit dicom.job.processed
            path = job_folder(job)
            emit_event(
                event=EVENT,
                resource={"prefect.resource.id": f"dicom.job.{path}"},
                payload={"job_dir": str(path)},
            )
        else:
            announcer.job_processed(job)
        print(time.time(), flush=True)
"""

TASK_COST = """\
import collections, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import prefect.task_engine as engine
from prefect.tasks import Task
import flows.route_job as steps
from flows.route_job import run_route_job
from route_throughput import reset_record
from router.settings import Settings
job, runs = Path(sys.argv[1]), int(sys.argv[2])
inside, calls, outer, body = [], [], collections.Counter(), collections.Counter()
attempt, call, run_fn = steps.attempt_once, Task.__call__, engine.call_with_parameters
def timed(*args, **kw):
    start = time.perf_counter()
    try:
        return attempt(*args, **kw)
    finally:
        inside.append(time.perf_counter() - start)
def task_call(self, *args, **kw):
    calls.append(self.name)
    start = time.perf_counter()
    try:
        return call(self, *args, **kw)
    finally:
        outer[self.name] += time.perf_counter() - start
def task_body(fn, parameters):
    start = time.perf_counter()
    try:
        return run_fn(fn, parameters)
    finally:
        body[calls[-1]] += time.perf_counter() - start
steps.attempt_once, Task.__call__, engine.call_with_parameters = timed, task_call, task_body
settings, out, per_task = Settings(), [], collections.defaultdict(list)
for i in range(runs + 1):  # the first warms the process
    reset_record(job)
    for kept in (inside, calls, outer, body):
        kept.clear()
    run_route_job(job, settings, origin="bench")
    lines = (job / "routing-record.jsonl").read_text().splitlines()
    end = next(json.loads(x) for x in reversed(lines) if '"event":"end"' in x)
    if i:
        out.append(sum(e["send seconds"] for e in end["entries"]) - sum(inside))
        for name, n in collections.Counter(calls).items():
            per_task[name].append((outer[name] - body[name]) / n)
print(json.dumps({"send": out, "engine": per_task}))
"""
"""Prefect's cost of the tasks, flow runs in one warm process against the server:

- `send`: the send task's wall time (the record's `send seconds`) minus the time in its
  C-STOREs (`attempt_once`): the engine, the destination's concurrency slot and the
  cancellation checks;
- `engine`, per task name: the task call's wall time minus its function's (the engine
  alone: its task run's states and events, its context, the parameters' walk), per call.
"""


AS_UNIT = {**SERVER_SETTINGS, "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
"""The server's settings as the unit leaves them: logging at Prefect's default, WARNING (at
the tests' INFO the server writes a line per request and per event an automation covers)."""


def warm_pool(
    stack: contextlib.ExitStack,
    server: PrefectServer,
    base: Path,
    name: str,
    env: dict[str, str],
    limit: int,
) -> WorkPool:
    """A `dicom-router worker` pool as `dicom-router setup` makes it (with the crash
    automation), the `route-job` deployment on it, and one warm worker serving it; stopped
    with `stack`."""
    pool = WorkPool(create_work_pool(server, name, warm=True), server, base, warm=True)
    stack.callback(pool.stop)
    with server.settings():
        ensure_crash_automation(pool.name, 60.0)
    server.cli("deploy", "--name", "route-job", "--pool", pool.name)
    pool.start_workers(1, limit=limit, env=env)
    return pool


def receiver_and_postgres(
    stack: contextlib.ExitStack, base: Path
) -> tuple[dict[str, str], Postgres]:
    """A storescp on 127.0.0.1, the rules routing to it and a throwaway PostgreSQL, all
    stopped with `stack`: the router's environment (DICOM_ROUTER_*) and the database."""
    port = stack.enter_context(storescp(131072, base / "logs"))
    config = write_config(base / "routing.json", port)
    env = {
        "DICOM_ROUTER_CONFIG": str(config),
        "DICOM_ROUTER_LOG_FILE": str(base / "routing.log"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    (base / "pg").mkdir()
    pg = start_postgres(base / "pg")
    stack.callback(stop_postgres, pg)
    return env, pg


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and of its children that it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"postgres" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                    total += cpu_seconds(int(entry.name))
            except OSError:
                pass
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def last_stored(job: Path, expected: int, timeout: float = 300) -> float:
    """Epoch time of the answer that completed `expected` stored instances in the record."""
    record = job / "routing-record.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.exists():
            text = record.read_text()
            text = text[: text.rfind("\n") + 1]  # a line being written is not read
            if text.count('"stored":true') >= expected:
                last = next(x for x in reversed(text.splitlines()) if '"stored":true' in x)
                return datetime.fromisoformat(json.loads(last)["time"]).timestamp()
        time.sleep(0.05)
    raise TimeoutError(f"{job}: {expected} instances not stored within {timeout} s")


def run_ended(job: Path, timeout: float = 300) -> None:
    record = job / "routing-record.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.exists() and '"event":"end"' in record.read_text():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{job}: the run did not end within {timeout} s")


def small_job(base: Path, name: str, images: int = 5) -> Path:
    from tests.factory import write_job

    job = base / name
    write_job(job, n_output=images, n_input=0, rows=SMALL_ROWS, cols=SMALL_ROWS)
    return job


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall time of `cmd`, a child in a process group of its own, stopped with the bench;
    what it leaves running (its ephemeral API) is a bug, and stops the bench."""
    start = time.perf_counter()
    with log.open("ab") as fh:
        proc = spawn(cmd, env, fh, fh)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if stop_group(proc):
        raise SystemExit(f"{' '.join(cmd[:4])} left processes running: see {log}")
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} exited {code}: see {log}")
    return seconds


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


class Announcer:
    """A warm process that announces jobs (what a processing box that uses Prefect does)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log.open("ab")
        cmd = [sys.executable, "-c", ANNOUNCER]
        self.proc = spawn(cmd, env, subprocess.PIPE, self.log, stdin=subprocess.PIPE, text=True)

    def announce(self, job: Path, how: str = "run") -> float:
        """Announce ("run": `Announcer.job_processed`; "event": the event, for the
        deployment's trigger); the epoch time just before the call."""
        start = time.time()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{how} {job}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        return start

    def many(self, jobs: list[Path]) -> float:
        assert self.proc.stdin and self.proc.stdout
        start = time.time()
        self.proc.stdin.write("".join(f"run {j}\n" for j in jobs))
        self.proc.stdin.flush()
        for _ in jobs:
            self.proc.stdout.readline()
        return start

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        finally:
            stop_group(self.proc)
            self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--small", type=int, default=5, help="images in the small job")
    parser.add_argument("--files", type=int, default=1500, help="images in the big job")
    parser.add_argument("--burst", type=int, default=500, help="jobs announced at once")
    parser.add_argument("--rounds", type=int, default=2, help="bursts, one after the other")
    parser.add_argument("--limit", type=int, default=8, help="the warm worker's --limit")
    parser.add_argument(
        "--server-python",
        default=server_python(),
        help="the interpreter of `prefect server` (default: the checkout's .server-venv, as "
        "deployments/install-server.sh makes it, else this one)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = guarded(lambda: run(args))  # Ctrl-C or SIGTERM: every child stopped
    if isinstance(figures, int):
        sys.exit(figures)
    print(json.dumps(figures, indent=2) if args.json else render(figures))


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    big = ensure_job(args.out, args.files) if args.files else None
    base = Path(tempfile.mkdtemp(prefix="overhead-", dir=args.out))
    base.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    logs = base / "logs"
    logs.mkdir()
    figures: dict[str, Any] = {"runs": args.runs, "small": args.small, "files": args.files}
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(storescp(131072, logs))
        config = write_config(base / "routing.json", port)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        router = {
            "DICOM_ROUTER_CONFIG": str(config),
            "DICOM_ROUTER_LOG_FILE": str(base / "routing.log"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        jobs = {"small": small_job(base / "jobs", "small", args.small)}
        counts = {"small": args.small}
        if big is not None:
            jobs["big"], counts["big"] = big, args.files

        plain_sends: dict[str, list[float]] = {}
        plain = {
            size: plain_runs(job, config, base, logs, args.runs, plain_sends)
            for size, job in jobs.items()
        }
        home = base / "ephemeral-home"
        cli_env = {**clean, **router, "PREFECT_HOME": str(home)}
        ephemeral = {
            size: cli_runs(job, cli_env, logs / "cli-ephemeral.log", args.runs + 1)[1:]
            for size, job in jobs.items()
        }

        (base / "pg").mkdir()
        pg = start_postgres(base / "pg")
        stack.callback(stop_postgres, pg)
        server = start_prefect_server(
            base / "prefect", pg.url(), settings=AS_UNIT, python=args.server_python
        )
        stack.callback(server.stop)
        server_pid = server.service.process.pid
        figures["server"] = str(server_runtime(server_pid))
        served = {**server.env(base / "cli-home"), **router}
        with_server = {
            size: cli_runs(job, served, logs / "cli-server.log", args.runs + 1, "--in-process")[1:]
            for size, job in jobs.items()
        }

        costs = {
            size: task_costs(job, served, logs / "task-cost.log", args.runs)
            for size, job in jobs.items()
        }

        served_pool = warm_pool(stack, server, base, "warm", router, args.limit)
        worker_pid = served_pool.workers[0].service.process.pid
        announcer = Announcer(served, logs / "announcer.log")
        stack.callback(announcer.close)
        time.sleep(2)
        figures["server_idle_cpu_per_s"] = idle_rate(server_pid)
        warm, by_event = {}, {}
        for size, job in jobs.items():
            # the small job also by event, in turns: what the trigger adds is per job
            hows = ("run", "event") if size == "small" else ("run",)
            ways = warm_runs(job, counts[size], announcer, worker_pid, server_pid, args.runs, hows)
            warm[size] = ways["run"]
            if "event" in ways:
                by_event[size] = ways["event"]
        on_worker, paired = {}, {}
        for size, job in jobs.items():
            cli_runs(job, served, logs / "cli-worker.log", 1)  # the first warms the worker
            pairs = [
                (
                    plain_runs(job, config, base, logs, 1, {})[0],
                    cli_runs(job, served, logs / "cli-worker.log", 1)[0],
                )
                for _ in range(args.runs)
            ]
            on_worker[size] = [c for _, c in pairs]
            paired[size] = [round(c - p, 3) for p, c in pairs]

        process_pool = WorkPool(create_work_pool(server, "process"), server, base)
        stack.callback(process_pool.stop)
        name = process_pool.deploy("flows/route_job.py:route_job_flow", "route-job-process")
        process_pool.start_workers(1, env=router)
        process = {
            size: process_runs(job, counts[size], server, name, args.runs)
            for size, job in jobs.items()
        }
        process_pool.stop()

        if args.burst:
            figures["burst"] = burst(args, base, served_pool, announcer, worker_pid, server_pid)
    figures["modes"] = {
        "plain": plain,
        "cli ephemeral": ephemeral,
        "cli server": with_server,
        "cli worker": on_worker,
        "warm worker": {s: w["latency"] for s, w in warm.items()},
        "warm worker, by event": {s: w["latency"] for s, w in by_event.items()},
        "process worker": process,
    }
    idle = figures["server_idle_cpu_per_s"]
    figures["warm_cpu"] = {s: cpu_figures(w, idle) for s, w in warm.items()}
    figures["warm_cpu_by_event"] = {s: cpu_figures(w, idle) for s, w in by_event.items()}
    figures["cli_worker_minus_plain_paired_s"] = {s: median(v) for s, v in paired.items()}
    figures["send_task_prefect_s"] = {s: median(c["send"]) for s, c in costs.items()}
    figures["task_engine_s"] = {
        s: {name: median(v) for name, v in c["engine"].items()} for s, c in costs.items()
    }
    figures["send_warm_minus_plain_s"] = {
        s: round(median(warm[s]["send"]) - median(plain_sends[jobs[s].name]), 3) for s in warm
    }
    figures["logs"] = str(logs)
    shutil.rmtree(base / "jobs", ignore_errors=True)
    return figures


def cpu_figures(warm: dict[str, list[float]], idle: float) -> dict[str, list[float]]:
    """CPU per job, and the server's above what it spends idle over the same time."""
    cpu = {k: warm[k] for k in ("worker", "server", "postgres")}
    pairs = zip(warm["server"], warm["window"], strict=True)
    cpu["server_above_idle"] = [c - idle * t for c, t in pairs]
    return cpu


def plain_runs(
    job: Path, config: Path, base: Path, logs: Path, runs: int, sends: dict[str, list[float]]
) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cmd = [sys.executable, "-c", PLAIN_PATH, str(job), str(config), str(base / "plain.log")]
    out: list[float] = []
    for _ in range(runs):
        reset_record(job)
        out.append(timed(cmd, env, logs / "plain.log"))
        sends.setdefault(job.name, []).append(send_seconds(job))
    return out


def cli_runs(job: Path, env: dict[str, str], log: Path, runs: int, *flags: str) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        reset_record(job)
        out.append(timed([router_cli(), "route", str(job), "--json", *flags], env, log))
    return out


def task_costs(job: Path, env: dict[str, str], log: Path, runs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", TASK_COST, str(job), str(runs), str(REPO / "bench")]
    with log.open("ab") as err, tempfile.TemporaryFile() as out:
        proc = spawn(cmd, env, out, err)
        code = proc.wait()
        stop_group(proc)
        out.seek(0)
        printed = out.read().decode()
    if code:
        raise SystemExit(f"send task cost run exited {code}: see {log}")
    return json.loads(printed.strip().splitlines()[-1])


def send_seconds(job: Path) -> float:
    """The entries' `send seconds` in the record's last end line (one entry here)."""
    lines = (job / "routing-record.jsonl").read_text().splitlines()
    end = next(json.loads(x) for x in reversed(lines) if '"event":"end"' in x)
    return sum(float(e["send seconds"]) for e in end["entries"])


WARM_FIGURES = ("latency", "worker", "server", "postgres", "send", "window")


def warm_runs(
    job: Path,
    n: int,
    announcer: Announcer,
    worker: int,
    server: int,
    runs: int,
    hows: tuple[str, ...] = ("run",),
) -> dict[str, dict[str, list[float]]]:
    """`runs` announcements of each way in `hows`, taking turns (so that the machine's
    drift falls on each alike); per way, the figures of WARM_FIGURES per run."""
    out = {how: {k: [] for k in WARM_FIGURES} for how in hows}
    for i in range(runs + 1):  # the first warms the worker's caches
        for how in hows:
            reset_record(job)
            w0, s0, p0 = cpu_seconds(worker), cpu_seconds(server), postgres_cpu()
            t0 = time.monotonic()
            start = announcer.announce(job, how)
            stored = last_stored(job, n)
            run_ended(job)
            time.sleep(0.5)  # the run's final state, logs and events
            if i:
                got = out[how]
                got["latency"].append(stored - start)
                got["worker"].append(cpu_seconds(worker) - w0)
                got["server"].append(cpu_seconds(server) - s0)
                got["postgres"].append(postgres_cpu() - p0)
                got["send"].append(send_seconds(job))
                got["window"].append(time.monotonic() - t0)
    return out


def idle_rate(pid: int, seconds: float = 10.0) -> float:
    """CPU-seconds per second of a process left alone (the server's own loops)."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def process_runs(job: Path, n: int, server: Any, deployment: str, runs: int) -> list[float]:
    out: list[float] = []
    for i in range(runs + 1):
        reset_record(job)
        start = time.time()
        run = server.run_deployment(deployment, {"job_dir": str(job)})
        stored = last_stored(job, n)
        server.wait_for_flow_runs([run.id], timeout=300)
        if i:
            out.append(stored - start)
    return out


def burst(
    args: argparse.Namespace,
    base: Path,
    pool: WorkPool,
    announcer: Announcer,
    worker: int,
    server: int,
) -> dict[str, Any]:
    """Two rounds of `--burst` jobs announced at once; every instance exactly once."""
    from tests.fixtures_scp import StorageSCP

    scp = StorageSCP(ae_title="BENCHSCP")
    scp.start()
    try:
        write_config(base / "routing.json", scp.port)
        rounds, rss = [], {}
        for r in range(args.rounds):
            jobs = [small_job(base / f"burst{r}", f"b{i:04d}", 3) for i in range(args.burst)]
            s0 = cpu_seconds(server)
            start = announcer.many(jobs)
            done = wait_routed(jobs, rss, r * args.burst, worker)
            rounds.append(
                {
                    "jobs": len(jobs),
                    "drain_s": round(done - start, 2),
                    "jobs_per_s": round(len(jobs) / (done - start), 2),
                    "server_cpu_per_job_s": round((cpu_seconds(server) - s0) / len(jobs), 3),
                }
            )
        expected = 3 * args.rounds * args.burst
        counts = scp.counts
        once = len(counts) == expected and set(counts.values()) == {1}
    finally:
        scp.stop()
    ratio = rss["last"] / rss["after_100"] if rss.get("after_100") else None
    return {
        "rounds": rounds,
        "instances": expected,
        "each_exactly_once": once,
        "duplicates": sum(v - 1 for v in counts.values()),
        "missing": expected - len(counts),
        "rss_mib_after_100_runs": round(rss.get("after_100", 0), 1),
        "rss_mib_after_last_run": round(rss["last"], 1),
        "runs_for_rss": args.rounds * args.burst,
        "rss_ratio": round(ratio, 3) if ratio else None,
    }


def wait_routed(jobs: list[Path], rss: dict[str, float], before: int, worker: int) -> float:
    """Epoch time when the last job's status says routed; samples the worker's RSS."""
    pending = set(jobs)
    deadline = time.monotonic() + 3600
    while pending:
        for job in list(pending):
            status = job / "routing-status.json"
            if status.exists() and json.loads(status.read_text())["state"] == "routed":
                pending.discard(job)
        if "after_100" not in rss and before + len(jobs) - len(pending) >= 100:
            rss["after_100"] = rss_mib(worker)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} burst jobs not routed")
        time.sleep(0.2)
    rss["last"] = rss_mib(worker)
    return max((j / "routing-status.json").stat().st_mtime for j in jobs)


def render(f: dict[str, Any]) -> str:
    sizes = [s for s in ("small", "big") if s in f["modes"]["plain"]]
    label = {"small": f"{f['small']} images", "big": f"{f['files']} images"}
    lines = [
        f"prefect server: {f['server']}",
        f"medians of {f['runs']} runs; × plain = median / plain path's median",
    ]
    head = f"{'mode':<44}" + "".join(f"{label[s]:>14}{'× plain':>9}" for s in sizes)
    lines.append(head)
    what = {
        "plain": "plain path (python -c route_job), wall",
        "cli ephemeral": "dicom-router route, ephemeral API, wall",
        "cli server": "dicom-router route, server, in process, wall",
        "cli worker": "dicom-router route, server + warm worker, wall",
        "warm worker": "warm worker, announce → all stored",
        "warm worker, by event": "warm worker, by event → all stored",
        "process worker": "process worker, created → all stored",
    }
    for mode, runs in f["modes"].items():
        row = f"{what[mode]:<44}"
        for s in sizes:
            if s not in runs:
                row += f"{'-':>13}  {'-':>9}"
                continue
            m, ref = median(runs[s]), median(f["modes"]["plain"][s])
            ratio = f"{m / ref:.2f}" if m is not None and ref else "-"
            row += f"{m if m is not None else '-':>13} s{ratio:>9}"
        lines.append(row)
    lines.append(
        f"prefect server idle: {1000 * f['server_idle_cpu_per_s']:.1f} ms of CPU per second "
        "(its own loops, with the warm worker connected)"
    )
    for s in sizes:
        c = f["warm_cpu"][s]
        lines.append(
            f"warm worker CPU per job ({label[s]}): worker {median(c['worker'])} s, "
            f"prefect server {median(c['server'])} s ({median(c['server_above_idle'])} s "
            f"above idle), postgres {median(c['postgres'])} s"
        )
    lines.append(
        "dicom-router route, server + warm worker, minus the plain path run just before it "
        "(the server and the worker up for both): "
        + ", ".join(f"{f['cli_worker_minus_plain_paired_s'][s]:+} s ({label[s]})" for s in sizes)
    )
    for s, c in f["warm_cpu_by_event"].items():
        lines.append(
            f"warm worker CPU per job, by event ({label[s]}): worker {median(c['worker'])} s, "
            f"prefect server {median(c['server'])} s ({median(c['server_above_idle'])} s "
            f"above idle), postgres {median(c['postgres'])} s"
        )
    for s in sizes:
        lines.append(
            f"send task's Prefect cost ({label[s]}): {f['send_task_prefect_s'][s]} s "
            "(the task's send seconds minus its C-STOREs, flow runs in one process); "
            f"send seconds, warm worker minus plain path: {f['send_warm_minus_plain_s'][s]} s"
        )
    for s in sizes:
        engine = ", ".join(f"{k} {v} s" for k, v in f["task_engine_s"][s].items())
        lines.append(
            f"each task's Prefect engine cost ({label[s]}): {engine} (the call's wall time "
            "minus its function's, per call)"
        )
    if b := f.get("burst"):
        for i, r in enumerate(b["rounds"], 1):
            lines.append(
                f"burst {i}: {r['jobs']} jobs of 3 images announced at once, drained in "
                f"{r['drain_s']} s: {r['jobs_per_s']} jobs/s; prefect server "
                f"{r['server_cpu_per_job_s']} CPU-s per job"
            )
        lines.append(
            f"burst: {b['instances']} instances, each exactly once: {b['each_exactly_once']} "
            f"({b['duplicates']} duplicates, {b['missing']} missing)"
        )
        lines.append(
            f"warm worker RSS: {b['rss_mib_after_100_runs']} MiB after 100 runs, "
            f"{b['rss_mib_after_last_run']} MiB after {b['runs_for_rss']} (× {b['rss_ratio']})"
        )
    lines.append(f"logs: {f['logs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
