"""What the Prefect server spends on a routing run: CPU per API call and per task run.

The warm worker routes a small job in well under a second, and the server's CPU per job
is then what limits a site (a burst of jobs drains at the server's pace). This bench
starts `prefect server` on a throwaway PostgreSQL twice, once with Prefect's defaults and
once with the services' tuning of `deployments/systemd/prefect-server.service`, and
measures the server process's CPU-seconds (utime + stime from /proc) for each kind of call
a route-job run makes, `--calls` of each, from a client in this process:

- reads and small writes (a flow, a flow run, a rename), each state change of a flow run,
  an event over the events websocket;
- whole flow runs made in this process: no task, and as many tasks as the route-job flow
  has for one destination (load, match, select, send: `--tasks`, 4), so that the
  difference is the cost of a task run (three state events and a row).

The server's idle CPU (measured before the calls, per second) is subtracted. Printed: ms
of server CPU per call for both servers, and the ratio tuned / default.

    python bench/server_cost.py [--calls 100] [--flow-runs 30] [--tasks 4] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"  # the bench's own flow runs say nothing

from route_overhead import cpu_seconds  # noqa: E402

from tests.fixtures_prefect import (  # noqa: E402
    SERVER_SETTINGS,
    shipped_server_settings,
    start_postgres,
    start_prefect_server,
    stop_postgres,
)

SETTLE_SECONDS = 7.0
"""Events and task runs are written in batches (up to 5 s later): wait for them."""


def measure(server_env: dict[str, str], args: argparse.Namespace, base: Path) -> dict[str, float]:
    """ms of server CPU per call, by kind, against one server started with `server_env`."""
    with contextlib.ExitStack() as stack:
        (base / "pg").mkdir(parents=True)
        pg = start_postgres(base / "pg")
        stack.callback(stop_postgres, pg)
        server = start_prefect_server(base / "prefect", pg.url(), settings=server_env)
        stack.callback(server.stop)
        with server.settings():
            return _calls(server.service.process.pid, args)


def _calls(pid: int, args: argparse.Namespace) -> dict[str, float]:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.states import Completed, Pending, Running, Scheduled

    time.sleep(SETTLE_SECONDS)  # the services' start-up
    start = cpu_seconds(pid)
    time.sleep(5)
    idle_per_second = (cpu_seconds(pid) - start) / 5
    out: dict[str, float] = {"idle (ms per second)": idle_per_second * 1000}

    def per_call(name: str, fn: Callable[[int], Any], n: int, settle: float = 0.0) -> None:
        c0, t0 = cpu_seconds(pid), time.monotonic()
        for i in range(n):
            fn(i)
        if settle:
            EventsWorker.drain_all(timeout=30)
            time.sleep(settle)
        spent = cpu_seconds(pid) - c0 - idle_per_second * (time.monotonic() - t0)
        out[name] = round(spent / n * 1000, 1)
        print(f"  {name}: {out[name]} ms", file=sys.stderr, flush=True)

    @task
    def step() -> int:
        return 1

    @flow(name="bench-no-task", persist_result=False)
    def no_task() -> None:
        return None

    @flow(name="bench-tasks", persist_result=False)
    def with_tasks() -> None:
        for _ in range(args.tasks):
            step()

    n = args.calls
    with (
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name("bench-calls")
        runs = [client.create_flow_run(no_task, state=Scheduled()).id for _ in range(n)]
        per_call("GET /health", lambda i: client._client.get("/health"), n)
        per_call("read a flow", lambda i: client.read_flow(flow_id), n)
        per_call("read a flow run", lambda i: client.read_flow_run(runs[i]), n)
        per_call("rename a flow run", lambda i: client.set_flow_run_name(runs[i], f"r{i}"), n)
        for state in (Pending, Running, Completed):
            per_call(
                f"flow run state {state.__name__}",
                lambda i, s=state: client.set_flow_run_state(runs[i], s()),
                n,
            )

        def event(i: int) -> None:
            emit_event(
                event="bench.event",
                resource={"prefect.resource.id": f"bench.{i}"},
                related=[
                    {
                        "prefect.resource.id": f"prefect.flow-run.{runs[i]}",
                        "prefect.resource.role": "flow-run",
                    }
                ],
            )

        per_call("an event (one related resource)", event, n, settle=SETTLE_SECONDS)
        no_task()
        with_tasks()  # the first of each registers its flow
        per_call("flow run, no task", lambda i: no_task(), args.flow_runs, SETTLE_SECONDS)
        per_call(
            f"flow run, {args.tasks} tasks", lambda i: with_tasks(), args.flow_runs, SETTLE_SECONDS
        )
    out["a task run"] = round(
        (out[f"flow run, {args.tasks} tasks"] - out["flow run, no task"]) / args.tasks, 1
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls of each kind")
    parser.add_argument("--flow-runs", type=int, default=30, help="flow runs of each kind")
    parser.add_argument("--tasks", type=int, default=4, help="tasks in the flow with tasks")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="server-cost-", dir=args.out))
    base.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    tuning = shipped_server_settings()
    defaults = {k: v for k, v in SERVER_SETTINGS.items() if k not in tuning}
    print("Prefect's defaults:", file=sys.stderr)
    default = measure(defaults, args, base / "default")
    print(f"tuned ({', '.join(f'{k}={v}' for k, v in tuning.items())}):", file=sys.stderr)
    tuned = measure({**defaults, **tuning}, args, base / "tuned")
    figures = {"calls": args.calls, "flow_runs": args.flow_runs, "tuning": tuning}
    figures["ms_server_cpu"] = {k: {"default": default[k], "tuned": tuned[k]} for k in default}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{'server CPU per call (ms)':40s} {'default':>8s} {'tuned':>8s} {'ratio':>6s}")
    for kind, v in figures["ms_server_cpu"].items():
        ratio = f"{v['tuned'] / v['default']:.2f}" if v["default"] > 0 else "-"
        print(f"{kind:40s} {v['default']:8.1f} {v['tuned']:8.1f} {ratio:>6s}")


if __name__ == "__main__":
    main()
