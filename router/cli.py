"""`dicom-router`: route, explain, validate, echo.

Exit codes of `route`: 0 routed (also when no rule applied), 1 routing failed for some
destination, 2 bad input (configuration, info.json or proc.json; the message names the
file), 3 not ready (no proc.json yet, or another routing holds the job's lock).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from router.config import ConfigError, RoutingConfig, load_config
from router.job import JobFailed, JobInvalid, JobRefused, JobWaiting, load_job
from router.lock import JobLocked
from router.model import Endpoint, SendError
from router.routing_log import LogFileError
from router.settings import Settings

if TYPE_CHECKING:
    from flows.handoff import Ended

EXIT_ROUTED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_READY = 0, 1, 2, 3
_LISTED = 5
"""Failed files listed per entry by `route` (all of them: --json)."""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Route the DICOM results of processing jobs to PACS and other DICOM nodes, by rules.",
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Routing rules (JSON). Env: DICOM_ROUTER_CONFIG."),
]
MeOpt = Annotated[str | None, typer.Option(help="This box's address ($me). Env: DICOM_ROUTER_ME.")]
LogFileOpt = Annotated[Path | None, typer.Option(help="Routing log. Env: DICOM_ROUTER_LOG_FILE.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
PortOpt = Annotated[
    int | None, typer.Option(help="This box's port ($port). Env: DICOM_ROUTER_PORT.")
]


def err(message: str) -> None:
    typer.echo(f"dicom-router: {message}", err=True)


def make_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            err(f"setting {'.'.join(map(str, e['loc']))}: {e['msg']}")
        raise typer.Exit(EXIT_BAD_INPUT) from None


def config_error(exc: ConfigError) -> typer.Exit:
    err(f"{exc.source}: invalid routing configuration")
    for problem in exc.problems:
        typer.echo(f"  {problem}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def read_config(settings: Settings) -> RoutingConfig:
    """The file if given, otherwise the rules block on the Prefect server."""
    try:
        if settings.config is not None:
            return load_config(settings.config)
        from flows.config_source import resolve_config

        return resolve_config(settings)
    except ConfigError as exc:
        raise config_error(exc) from None


@app.command()
def route(
    job_dir: Annotated[Path, typer.Argument(help="The job folder (info.json, proc.json, ...).")],
    config: ConfigOpt = None,
    me: MeOpt = None,
    port: PortOpt = None,
    log_file: LogFileOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Send again what the record says was delivered.")
    ] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Run the flow in this command even when a routing worker is online.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Route one job with the `route-job` flow, on an online routing worker if there is one.

    That is a `dicom-router worker` of the route-job deployment's pool, with PREFECT_API_URL set.
    """
    settings = make_settings(config=config, me=me, port=port, log_file=log_file)
    if settings.config is not None:
        read_config(settings)  # refuse a bad file before starting Prefect
    if not in_process:  # the worker's run checks the job as it would here
        handed = _route_on_worker(job_dir.absolute(), settings, force=force, as_json=as_json)
        if handed is not None:
            raise typer.Exit(handed)
    from router.route import precheck

    try:
        # refused before Prefect starts, recorded as the flow would record it
        job_path = precheck(job_dir, settings)
    except JobWaiting as exc:
        err(f"not ready: {exc}")
        raise typer.Exit(EXIT_NOT_READY) from None
    except (JobInvalid, JobRefused, LogFileError) as exc:
        err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None

    from flows.route_job import RoutingFailed, run_route_job

    code = EXIT_ROUTED
    try:
        with _progress_display():
            report = run_route_job(job_path, settings, force=force, origin="cli")
    except RoutingFailed as exc:
        report, code = exc.report.to_dict(), EXIT_FAILED
    except JobFailed as exc:
        err(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    except (JobWaiting, JobLocked) as exc:
        err(f"not ready: {exc}")
        raise typer.Exit(EXIT_NOT_READY) from None
    except ConfigError as exc:
        raise config_error(exc) from None
    except (JobInvalid, JobRefused, LogFileError) as exc:
        err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    raise typer.Exit(code)


def _route_on_worker(
    job_path: Path, settings: Settings, *, force: bool, as_json: bool
) -> int | None:
    """Hand the job to an online warm worker (`flows.handoff`); its exit code, or None when
    there is no server or no such worker, and the flow is to run here."""
    from flows import handoff

    url = handoff.api_url()
    if url is None:
        return None
    parameters: dict[str, Any] = {"force": force, "origin": "cli"}
    for name in ("config", "me", "port", "log_file"):  # what this command was told
        if name in settings.model_fields_set and getattr(settings, name) is not None:
            value = getattr(settings, name)
            parameters[name] = str(value.absolute()) if isinstance(value, Path) else value

    def created(run_id: str, name: str) -> None:
        if sys.stderr.isatty():
            err(f"routing on {target.worker} (pool {target.pool}): flow run {name} ({run_id})")

    http = handoff.Api(url)
    try:
        target = handoff.online_worker(http)
        if target is None:
            return None
        ended = handoff.run_on_worker(http, target, job_path, parameters, on_created=created)
    except handoff.HandoffError as exc:
        err(str(exc))
        return EXIT_FAILED
    return _worker_outcome(ended, as_json)


def _worker_outcome(ended: Ended, as_json: bool) -> int:
    """The exit code and output of a run a worker made, as if it had run here (the state
    names are those `flows.route_job.ENDING_NAMES` gives the runs that did not route)."""
    run = f"flow run {ended.name} ({ended.flow_run_id})"
    if ended.report is not None and ended.state_type in ("COMPLETED", "FAILED"):
        if as_json:
            typer.echo(json.dumps(ended.report, indent=2))
        else:
            _print_report(ended.report)
        return EXIT_ROUTED if ended.state_type == "COMPLETED" else EXIT_FAILED
    if ended.state_type == "COMPLETED":  # a success with no report of its own: say so
        err(f"{run} completed, but left no report in the job folder")
        return EXIT_ROUTED
    message = ended.message or ended.state_name
    if ended.state_name in ("Invalid", "Refused"):
        err(message)
        return EXIT_BAD_INPUT
    if ended.state_name in ("Waiting", "Locked"):
        err(f"not ready: {message}")
        return EXIT_NOT_READY
    if ended.interrupted:
        err(f"interrupted: {run} ended {ended.state_name}: {message}")
        return 130
    err(f"{run} ended {ended.state_name}: {message}")
    return EXIT_FAILED


@contextmanager
def _progress_display() -> Iterator[None]:
    """A progress bar per destination on a terminal; nothing when output is piped."""
    from router.route import reporting_progress

    if not sys.stderr.isatty():
        yield
        return
    from rich.progress import Progress

    bars: dict[str, Any] = {}
    with Progress(transient=True) as progress:

        def update(dest: str, done: int, total: int) -> None:
            if dest not in bars:
                bars[dest] = progress.add_task(f"→ {dest}", total=total)
            progress.update(bars[dest], completed=done, total=total)

        with reporting_progress(update):
            yield


def _print_report(report: dict[str, Any]) -> None:
    typer.echo(f"{report['state']}: {report['job']} (success {report['success']!r})")
    for rule in report["rules"]:
        head = f'  rule {rule["index"]} "{rule["name"]}"'
        if not rule["applied"]:
            typer.echo(f"{head}: not applied: {rule['why_not']}")
            continue
        typer.echo(f"{head}: {'failed' if rule['failed'] else 'ok'}")
        for e in rule["entries"]:
            d = e["delivery"] or {}
            state = "failed (covered by a later entry)" if e["covered"] else e["state"]
            counts = (
                f"{d.get('stored', 0)} stored, {d.get('already', 0)} already there, "
                f"{d.get('failed', 0)} failed of {e['selected']}"
            )
            typer.echo(f"    {e['pattern']!r} → {e['destination']}: {state}: {counts}")
            if e["reason"]:
                typer.echo(f"      reason: {e['reason']}")
            failures = d.get("failures") or []
            for failure in failures[:_LISTED]:
                status = f" [{failure['status']}]" if failure.get("status") else ""
                typer.echo(f"      ✗ {failure['file']}{status}: {failure['reason']}")
            if d.get("failed", 0) > min(len(failures), _LISTED):
                typer.echo(f"      ✗ ... {d['failed'] - min(len(failures), _LISTED)} more")
    if report["not_evaluated_rules"]:
        typer.echo(f"  rules not evaluated after a break: {report['not_evaluated_rules']}")
    for folder, skipped in report["skipped_files"].items():
        typer.echo(
            f"  {len(skipped)} file(s) in {folder} skipped (not instances, or links not followed)"
        )


@app.command()
def explain(
    job_dir: Annotated[Path, typer.Argument(help="The job folder.")],
    config: ConfigOpt = None,
    me: MeOpt = None,
    port: PortOpt = None,
    success: Annotated[
        str | None, typer.Option(help="Explain for this success string instead of proc.json's.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Files listed per entry.")] = 10,
) -> None:
    """Show what routing would do, rule by rule, entry by entry, without sending."""
    from dataclasses import replace

    from router import explain as explaining
    from router.job import read_info

    settings = make_settings(config=config, me=me, port=port)
    cfg = read_config(settings)
    try:
        try:
            job = load_job(job_dir)
        except JobWaiting:
            if success is None:
                err(f"{job_dir}: no proc.json yet; pass --success STRING to explain anyway")
                raise typer.Exit(EXIT_NOT_READY) from None
            from router.job import Job

            info = read_info(job_dir.absolute())
            job = Job(
                job_dir.absolute(),
                info.AETitleCalled,
                info.AETitleCaller,
                info.CallerIP,
                info.received,
                success,
                "",
                (),
            )
    except JobInvalid as exc:
        err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if success is not None:
        job = replace(job, success=success)
    views, scans = explaining.explain(job, cfg, settings)
    for line in explaining.render(job, views, scans, limit):
        typer.echo(line)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Routing configuration (JSON).")],
    allowlist: Annotated[
        Path | None,
        typer.Option(help="Destination allow-list to check against. Env: DICOM_ROUTER_ALLOWLIST."),
    ] = None,
    me: MeOpt = None,
    port: PortOpt = None,
) -> None:
    """Check a routing configuration: exit 0 and a summary, or 2 and every problem.

    With an allow-list (the option or the setting), every destination must be in it.
    """
    from router.allowlist import config_refusals

    settings = make_settings(allowlist=allowlist, me=me, port=port)
    try:
        cfg = load_config(file)
    except ConfigError as exc:
        err(f"{exc.source}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    refused = config_refusals(cfg, settings.allowlist, settings.me, settings.port)
    if refused:
        err(f"{file}: {len(refused)} destination(s) not allowed")
        for problem in refused:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    active = sum(1 for r in cfg.rules if r.rule.active)
    typer.echo(
        f"{file}: valid, {len(cfg.rules)} rule(s), {active} active, sha256 {cfg.sha256[:16]}"
    )
    if settings.allowlist:
        typer.echo(f"  every destination is in the allow-list {settings.allowlist}")
    for spec in cfg.rules:
        r = spec.rule
        state = "active" if r.active else "inactive"
        typer.echo(
            f"  {spec.label} [{state}] AETitleIn {r.AETitleIn!r} AETitleFrom {r.AETitleFrom!r} "
            f"sends {r.RouteDirectory}/{', break: 1' if r.break_ else ''}"
        )
        for e in spec.entries:
            d = e.destination
            extra = (", break: 1" if d.break_ else "") + (f", which {d.which}" if d.which else "")
            who = d.label if d.is_web else f"{d.label} as {d.AETitleSender}"
            typer.echo(f"    {e.pattern!r} → {who}{extra}")


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="Destination host.")],
    port: Annotated[int, typer.Argument(help="Destination port.")],
    aet: Annotated[str, typer.Argument(help="Destination (called) AE title.")],
    our_aet: Annotated[str, typer.Option("--aet", help="Our (calling) AE title.")] = "DICOM-ROUTER",
) -> None:
    """C-ECHO a destination, to check it while setting it up."""
    from router.send import echo as c_echo

    settings = make_settings()
    endpoint = Endpoint(host=host, port=port, called_aet=aet, calling_aet=our_aet)
    start = time.monotonic()
    try:
        status = c_echo(endpoint, settings.timeouts())
    except SendError as exc:
        err(f"C-ECHO to {endpoint} failed: {exc.reason}")
        raise typer.Exit(EXIT_FAILED) from None
    ms = (time.monotonic() - start) * 1000
    if status != 0:
        err(f"C-ECHO to {endpoint}: status 0x{status:04X}")
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"C-ECHO to {endpoint}: success in {ms:.0f} ms")


@app.command()
def sweep(
    root: Annotated[Path, typer.Argument(help="Folder holding job folders (at any depth).")],
    config: ConfigOpt = None,
    me: MeOpt = None,
    port: PortOpt = None,
    log_file: LogFileOpt = None,
    max_parallel: Annotated[int, typer.Option(help="Jobs routed at once.", min=1, max=32)] = 4,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the sweep report as JSON.")
    ] = False,
) -> None:
    """Route every job under ROOT that has a proc.json and no successful routing yet.

    Exit 0 when every job it tried was routed, 1 when some were not.
    """
    settings = make_settings(config=config, me=me, port=port, log_file=log_file)
    if settings.config is not None:
        read_config(settings)
    if not root.is_dir():
        err(f"{root}: no such folder to sweep")
        raise typer.Exit(EXIT_BAD_INPUT)

    from flows.route_job import in_process
    from flows.sweep import SweepFailed, sweep_unrouted_flow

    code = EXIT_ROUTED
    try:
        with in_process():
            report = sweep_unrouted_flow(
                root=str(root.absolute()),
                config=str(settings.config) if settings.config else None,
                max_parallel=max_parallel,
                me=settings.me,
                port=settings.port,
                log_file=str(settings.log_file),
            )
    except SweepFailed as exc:
        report, code = exc.report, EXIT_FAILED
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"sweep of {report['root']}: {report['counts']}")
        for job in report["jobs"]:
            reason = f": {job['reason']}" if job["reason"] else ""
            typer.echo(f"  {job['outcome']}: {job['job']}{reason}")
        for label in ("waiting", "invalid", "backing_off", "given_up"):
            if report[label]:
                typer.echo(f"  {len(report[label])} {label.replace('_', ' ')}")
    raise typer.Exit(code)


@app.command()
def status(
    root: Annotated[Path, typer.Argument(help="Folder holding job folders (at any depth).")],
    as_json: JsonOpt = False,
) -> None:
    """The site at a glance: jobs by state, the oldest not routed, each destination's
    last success and failure and instances stored today. Reads only status files."""
    from router.overview import render, site_overview

    if not root.is_dir():
        err(f"{root}: no such folder")
        raise typer.Exit(EXIT_BAD_INPUT)
    settings = make_settings()
    view = site_overview(root.absolute(), settings.backoff())
    if as_json:
        typer.echo(json.dumps(view.to_dict(), indent=2))
    else:
        for line in render(view):
            typer.echo(line)


config_app = typer.Typer(
    no_args_is_help=True, help="Move the routing rules between a file and the Prefect server."
)
app.add_typer(config_app, name="config")

NameOpt = Annotated[
    str | None, typer.Option("--name", help="Block name. Env: DICOM_ROUTER_CONFIG_BLOCK.")
]


@config_app.command("push")
def config_push(
    file: Annotated[Path, typer.Argument(help="Routing configuration (JSON) to store.")],
    name: NameOpt = None,
) -> None:
    """Validate FILE and store it as the rules block that runs use without --config."""
    from router import jsonc

    settings = make_settings(config_block=name)
    cfg = read_config(settings.model_copy(update={"config": file}))
    raw = jsonc.loads(file.read_text(encoding="utf-8"))

    from flows.config_source import BLOCK_TYPE, push_config

    push_config(cfg, raw, settings.config_block)
    typer.echo(f"stored {len(cfg.rules)} rule(s) as {BLOCK_TYPE}/{settings.config_block}")


@config_app.command("pull")
def config_pull(
    name: NameOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Print (or write) the rules block as JSON; warns when it does not validate."""
    from flows.config_source import block_source, pull_config
    from router.config import parse_config

    settings = make_settings(config_block=name)
    try:
        raw = pull_config(settings.config_block)
    except ConfigError as exc:
        raise config_error(exc) from None
    text = json.dumps(raw, indent=2) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)
    try:
        parse_config(raw, block_source(settings.config_block))
    except ConfigError as exc:
        raise config_error(exc) from None


@config_app.command("history")
def config_history(
    name: NameOpt = None,
    diff: Annotated[bool, typer.Option("--diff", help="Show what each version changed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The trail of the rules block: each version's time, sha256 and how it came."""
    import difflib

    from flows.config_source import block_source, history, pull_config
    from router.config import rules_digest

    settings = make_settings(config_block=name)
    versions = history(settings.config_block)
    try:
        current = rules_digest(pull_config(settings.config_block))
    except ConfigError:
        current = None
    if as_json:
        typer.echo(json.dumps({"versions": versions, "current": current}, indent=2))
        return
    typer.echo(f"{block_source(settings.config_block)}: {len(versions)} version(s)")
    previous: Any = None
    previous_sha = ""
    for version in versions:
        mark = " (current)" if version["sha256"] == current else ""
        typer.echo(f"  {version['time']}  {version['sha256'][:16]}  {version['how']}{mark}")
        if diff and previous is not None:
            lines = difflib.unified_diff(
                json.dumps(previous, indent=2).splitlines(),
                json.dumps(version["rules"], indent=2).splitlines(),
                f"sha256 {previous_sha[:16]}",
                f"sha256 {version['sha256'][:16]}",
                lineterm="",
            )
            for line in lines:
                typer.echo(f"      {line}")
        previous, previous_sha = version["rules"], version["sha256"]
    if current is not None and (not versions or versions[-1]["sha256"] != current):
        typer.echo(f"  now       {current[:16]}  changed since, not yet seen by a run")


@app.command()
def setup(
    config: ConfigOpt = None,
    me: MeOpt = None,
    port: PortOpt = None,
    pool: Annotated[str, typer.Option(help="Work pool to create (type dicom-router).")] = (
        "dicom-router"
    ),
    crash_after: Annotated[
        float,
        typer.Option(
            help="Seconds without a heartbeat after which a run of the pool is Crashed.", min=10
        ),
    ] = 60.0,
    alert_webhook: Annotated[
        str | None,
        typer.Option(help="POST a JSON alert here on failures. Env: DICOM_ROUTER_ALERT_WEBHOOK."),
    ] = None,
    alert_notification: Annotated[
        str | None,
        typer.Option(help="Or send alerts through this Prefect notification block (SLUG/NAME)."),
    ] = None,
    alert_interval: Annotated[
        float | None,
        typer.Option(help="At most one alert per destination in this many seconds."),
    ] = None,
) -> None:
    """Create the work pool, crash detection, the rules block type and the destination limits.

    One limit per destination host and port, sized by its max_associations (or the
    max_associations setting); run again after adding destinations or changing sizes.
    """
    from flows.concurrency import set_destination_limit
    from flows.config_source import RoutingRules
    from flows.service import ensure_crash_automation, ensure_work_pool

    settings = make_settings(
        config=config,
        me=me,
        port=port,
        alert_webhook=alert_webhook,
        alert_interval=alert_interval,
    )
    refuse_open_server(settings)
    cfg = read_config(settings)
    typer.echo(ensure_work_pool(pool))
    typer.echo(ensure_crash_automation(pool, crash_after))
    if settings.alert_webhook or alert_notification:
        from flows.alerts import ensure_alert_automations

        for line in ensure_alert_automations(
            settings.alert_interval,
            webhook_url=settings.alert_webhook,
            notification=alert_notification,
        ):
            typer.echo(line)
    RoutingRules.register_type_and_schema()
    typer.echo("block type dicom-routing-rules: registered")
    done: set[str] = set()
    for spec in cfg.rules:
        for entry in spec.entries:
            endpoint = entry.destination.endpoint(settings.me, settings.port)
            size = entry.destination.max_associations or settings.max_associations
            name = set_destination_limit(endpoint, size)
            if name not in done:
                done.add(name)
                typer.echo(f"concurrency limit {name}: {size}")


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Work pool to serve.")] = "dicom-router",
    limit: Annotated[int, typer.Option(help="Flow runs at once (threads).", min=1)] = 8,
    name: Annotated[
        str | None, typer.Option(help="Worker name in the UI (default dicom-router@HOST).")
    ] = None,
    heartbeat: Annotated[
        float, typer.Option(help="Seconds between heartbeats of its runs.", min=1)
    ] = 10.0,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (/metrics).")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
) -> None:
    """Run the pool's route-job and sweep-unrouted flow runs in this process (needs a server).

    One long-lived process, at most LIMIT runs at once; a run starts within a fraction of a
    second of being scheduled. SIGTERM: no new runs, the runs in flight finish; a second
    SIGTERM stops them between C-STOREs (reported Crashed, to be retried).
    """
    # Read by Prefect's settings when it is imported: the base poll, behind the events.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
    if not os.environ.get("PREFECT_API_URL"):
        err("the worker needs a Prefect server: set PREFECT_API_URL (e.g. http://HOST:4200/api)")
        raise typer.Exit(EXIT_BAD_INPUT)
    import asyncio

    from flows.worker import RouterWorker, default_name, serve

    settings = make_settings()
    refuse_open_server(settings)
    if settings.allowlist is None:
        err(
            "warning: no destination allow-list (DICOM_ROUTER_ALLOWLIST): this worker sends "
            "wherever the rules say, and whoever may edit them in the UI decides that "
            "(README, Security)"
        )
    else:
        from router.allowlist import AllowListError, load_allowlist

        try:
            load_allowlist(settings.allowlist)
        except AllowListError as exc:
            err(f"the allow-list cannot be used, every send would be refused: {exc}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
    observer = None
    if metrics_port is not None:
        from flows.metrics import WorkerMetrics

        observer = WorkerMetrics()
        observer.serve(metrics_port, metrics_host)
        typer.echo(f"metrics: http://{metrics_host}:{metrics_port}/metrics")
    runner = RouterWorker(
        pool,
        limit=limit,
        name=name or default_name(),
        heartbeat_seconds=heartbeat,
        observer=observer,
    )
    asyncio.run(serve(runner, typer.echo))


def refuse_open_server(settings: Settings) -> None:
    """Exit unless the Prefect server in use is protected and takes our credentials."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from flows.server_check import OpenServer, check_credentials, check_server_protected

    api_url = PREFECT_API_URL.value()
    secret = PREFECT_API_AUTH_STRING.value()
    auth = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    refused = check_credentials(api_url, auth)
    if refused:
        err(refused)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        note = check_server_protected(api_url, settings)
    except OpenServer as exc:
        err(f"refused: {exc}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if note:
        err(f"warning: {note}")


def main() -> None:
    # Prefect's ephemeral server sends usage telemetry unless told otherwise; a router on a
    # hospital network should not try to reach the internet. A site can still opt in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL each command starts Prefect's ephemeral API server, which on
    # a busy box can take longer than Prefect's 20 s default to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The routing log's lines also go to the flow run's logs, for the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "router")
    app()
