"""The `sweep-unrouted` flow: route every job that has a proc.json and no successful routing.

Scheduled every few minutes, it is the safety net behind the triggers: a job whose trigger
was lost, whose destination was down, or whose proc.json was fixed gets routed here. Failed
jobs are tried again after a backoff that grows with each failure, up to a limit after
which the job is marked as given up. Waiting and invalid jobs are listed, never touched.

Each due job is routed as its own `route-job` run: in this process (`dispatch="inline"`,
what `dicom-router sweep` does), or through the `route-job/route-job` deployment, so that
the work pool's workers on any host do the sending (`dispatch="deployment"`).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import cancel
from flows.alerts import announce_given_up
from flows.route_job import JobRunName, RoutingFailed, local_result_storage, route_job_flow
from router import observe
from router.job import under_roots
from router.overview import render, site_overview
from router.record import read_status
from router.settings import Settings
from router.sweep import SweepPlan, mark_given_up, plan_sweep
from router.text import printable, printable_data

ROUTE_DEPLOYMENT = "route-job/route-job"
MAX_PARALLEL_CAP = 32
"""Threads the sweep's task runner has; `max_parallel` bounds how many are used."""

Outcome = Literal["routed", "failed", "invalid", "waiting", "locked", "refused", "error"]
NOT_A_FAILURE = ("routed", "locked", "waiting")
"""Outcomes that do not make a sweep fail: a job another run routes right now, or one
whose computation is still running, is no failure of routing."""


@task(name="plan-sweep", cache_policy=NO_CACHE)
def plan_task(root: Path, settings: Settings) -> SweepPlan:
    plan = plan_sweep(root, settings.backoff())
    logger = get_run_logger()
    logger.info("sweep of %s: %s", root, plan.summary())
    for job in plan.waiting[:20]:
        logger.info("waiting (no proc.json yet): %s", job)
    for _job, reason in plan.invalid[:20]:
        logger.warning("invalid, not routed until fixed: %s", reason)
    for job, when in plan.backing_off[:20]:
        logger.info("failed, next try after %s: %s", when.isoformat(timespec="seconds"), job)
    for job, reason in plan.given_up:
        before = read_status(job)
        after = mark_given_up(job, settings.backoff())
        if after is not None and after.given_up and not (before and before.given_up):
            announce_given_up(str(job), reason, after.consecutive_failures)  # alerts
    for job, reason in plan.given_up[:20]:
        logger.warning("given up after repeated failures: %s: %s", job, reason)
    return plan


def classify(state: State | None) -> tuple[Outcome, str | None]:
    """How a `route-job` run ended, from its state alone: the same for a run in this
    process and one a worker ran from the deployment."""
    if state is None:
        return "error", "no state"
    if state.is_completed():
        return "routed", None
    outcome = _BY_NAME.get(state.name or "")
    if outcome is not None:
        return outcome, state.message
    if state.is_failed() or state.is_crashed():
        return "failed", state.message
    return "error", f"{state.name}: {state.message}"


_BY_NAME: dict[str, Outcome] = {
    "Invalid": "invalid",
    "Waiting": "waiting",
    "Locked": "locked",
    "Refused": "refused",
}


@task(name="route", task_run_name="route {job_dir.name}", cache_policy=NO_CACHE)
def route_one(
    job_dir: Path, parameters: dict[str, Any], dispatch: str
) -> tuple[Outcome, str | None]:
    """Route one job as its own flow run and classify how it ended."""
    cancel.check()  # a cancelled sweep starts no further job
    if dispatch == "deployment":
        from prefect.deployments import run_deployment

        run = run_deployment(
            ROUTE_DEPLOYMENT,
            parameters={"job_dir": str(job_dir), **parameters},
            flow_run_name=JobRunName.of({"job_dir": job_dir}),
            timeout=None,
            poll_interval=1,  # its default, 5 s, would add up to 5 s to every job of a sweep
        )
        return classify(run.state)
    state = route_job_flow(job_dir=str(job_dir), **parameters, return_state=True)
    outcome, message = classify(state)
    error = state.result(raise_on_failure=False) if not state.is_completed() else None
    if isinstance(error, RoutingFailed):
        message = error.report.reason()
    elif isinstance(error, Exception) and outcome in ("invalid", "waiting", "locked", "refused"):
        message = str(error)
    return outcome, message


@flow(
    name="sweep-unrouted",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_CAP),
    validate_parameters=False,
    persist_result=False,
    result_storage=local_result_storage(),
)
def sweep_unrouted_flow(
    root: str,
    config: str | None = None,
    max_parallel: int = 4,
    dispatch: Literal["inline", "deployment"] = "inline",
    me: str | None = None,
    port: int | None = None,
    log_file: str | None = None,
) -> dict[str, Any]:
    """Route the pending jobs under `root`, at most `max_parallel` at a time.

    Fails when a job it tried was not routed, so the run shows red in the UI.
    """
    if not 1 <= max_parallel <= MAX_PARALLEL_CAP:
        raise ValueError(f"max_parallel must be 1 to {MAX_PARALLEL_CAP}, got {max_parallel}")
    overrides = {"config": config, "me": me, "port": port, "log_file": log_file}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = Settings(**given)
    root_path = Path(root).absolute()
    if settings.jobs_root and not under_roots(root_path, settings.jobs_root, root_itself=True):
        roots = ", ".join(map(str, settings.jobs_root))
        raise PermissionError(
            f"{root_path}: refused: not under the jobs root ({roots}; DICOM_ROUTER_JOBS_ROOT)"
        )
    if not root_path.is_dir():
        raise NotADirectoryError(f"{root_path}: no such folder to sweep")
    plan = plan_task(root_path, settings)

    parameters = {**given, "origin": "sweep"}
    outcomes: dict[Path, tuple[Outcome, str | None]] = {}
    pending = list(plan.due)
    running: dict[Any, Path] = {}
    while pending or running:
        while pending and len(running) < max_parallel:
            job = pending.pop(0)
            running[route_one.submit(job, parameters, dispatch)] = job
        done, _ = concurrent.futures.wait(
            [f.wrapped_future for f in running], return_when=concurrent.futures.FIRST_COMPLETED
        )
        for future in [f for f in running if f.wrapped_future in done]:
            job = running.pop(future)
            try:
                outcomes[job] = future.result()
            except Exception as exc:
                outcomes[job] = ("error", f"{type(exc).__name__}: {exc}")

    report = sweep_report(root_path, plan, outcomes)
    create_table_artifact(
        key="sweep-unrouted",
        table=printable_data(report["jobs"]) or [{"job": "", "outcome": "nothing to route"}],
        description=printable(f"sweep of `{root_path}`: {report['counts']}"),
    )
    publish_overview(root_path, settings)
    tried_not_routed = [j for j in report["jobs"] if j["outcome"] not in NOT_A_FAILURE]
    if tried_not_routed:
        raise SweepFailed(report)
    return report


OVERVIEW_KEY = "site-overview"


def publish_overview(root: Path, settings: Settings) -> None:
    """The site's state after this sweep, as `dicom-router status` shows it: one artifact
    with a stable key, so that the UI's Artifacts page always has the current overview."""
    view = site_overview(root, settings.backoff())
    watcher = observe.current()
    if watcher is not None:
        watcher.site(view)
    rows = [
        {
            "destination": key,
            "stored today": dest.stored_today,
            "last success": dest.last_success or "",
            "last failure": dest.last_failure or "",
            "reason": dest.failure or "",
        }
        for key, dest in view.destinations.items()
    ]
    create_table_artifact(
        key=OVERVIEW_KEY,
        table=rows or [{"destination": "", "stored today": 0}],
        description="\n\n".join(render(view)[:3]),
    )


class SweepFailed(Exception):
    """Some job the sweep tried was not routed."""

    def __init__(self, report: dict[str, Any]) -> None:
        failed = [j for j in report["jobs"] if j["outcome"] not in NOT_A_FAILURE]
        super().__init__(
            f"{len(failed)} job(s) not routed: "
            + "; ".join(f"{j['job']}: {j['outcome']}: {j['reason']}" for j in failed[:5])
        )
        self.report = report


def sweep_report(
    root: Path, plan: SweepPlan, outcomes: dict[Path, tuple[Outcome, str | None]]
) -> dict[str, Any]:
    counts: dict[str, int] = {"already routed": plan.routed}
    jobs = []
    for job, (outcome, reason) in sorted(outcomes.items()):
        counts[outcome] = counts.get(outcome, 0) + 1
        jobs.append({"job": str(job), "outcome": outcome, "reason": reason or ""})
    return {
        "root": str(root),
        "counts": counts,
        "jobs": jobs,
        "waiting": [str(j) for j in plan.waiting],
        "invalid": [{"job": str(j), "reason": r} for j, r in plan.invalid],
        "backing_off": [{"job": str(j), "next_try": t.isoformat()} for j, t in plan.backing_off],
        "given_up": [{"job": str(j), "reason": r} for j, r in plan.given_up],
    }
