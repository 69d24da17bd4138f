"""`dicom-router worker`: a Prefect worker that runs the router's flow runs in its own process.

Prefect's process worker starts a new interpreter for every flow run (Prefect's import,
the router's, a client), which cost five seconds and five CPU-seconds per small job. This
worker type (`dicom-router`) is a `prefect.workers.base.BaseWorker`, the extension point
Prefect documents for worker types: it serves a work pool, heartbeats, shows in the UI
with its runs, and takes the pool's scheduled runs as every worker does. Its `run()`
executes the flow run in this process instead, in one of `limit` threads that stay warm
(each keeps one API client), with Prefect's own engine
(`prefect.flow_engine.run_flow(flow, flow_run=...)`), so the run's states, task runs,
logs, artifacts and retries are those of any run.

What a shared process needs on top:

- **Pickup.** Besides the base poll (`PREFECT_WORKER_QUERY_SECONDS`), the worker
  subscribes to the pool's flow-run events: the moment a run becomes Scheduled (a
  trigger, the UI's Run or Retry, a sweep's run) it reads that run and submits it, as a
  poll would have; with no thread free, or a run not due yet, it polls instead, and again
  when a run ends while runs were waiting for a free thread. A poll asks for no more runs
  than there are free threads.
- **Cancellation.** A Cancelling event for a run in flight sets its stop event; the run
  stops between two C-STOREs (`flows.cancel`) and is reported Cancelled.
- **Heartbeats.** Prefect's per-run heartbeat thread is off (a sync run joins it for up to
  1 s at its end, `prefect/flow_engine.py`, `_send_heartbeats`); the worker emits the same
  `prefect.flow-run.heartbeat` events for all its runs every `heartbeat` seconds. The
  automation `dicom-router setup` creates marks a run Crashed when they stop: a killed
  worker's runs end Crashed, and a UI Retry or the next sweep completes them.
- **Isolation.** A run that raises fails alone; only the router's own flows (modules of
  the `flows` package) run here, others are refused with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect import Flow, __version__
from prefect.client.schemas.objects import Flow as APIFlow
from prefect.context import SyncClientContext
from prefect.events import RelatedResource, emit_event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Cancelled, Crashed
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)

from flows import cancel
from flows.concurrency import LocalGates, gated
from router.observe import Observer, observing

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse, WorkerFlowRunResponse

WORKER_TYPE = "dicom-router"
DEFAULT_LIMIT = 8
"""Runs at once: each a thread; a big job's senders are processes of their own."""
DEFAULT_HEARTBEAT_SECONDS = 10.0
WAKE_EVENTS = ["prefect.flow-run.Scheduled", "prefect.flow-run.AwaitingRetry"]
CANCEL_EVENT = "prefect.flow-run.Cancelling"

NO_TEMPLATE: dict[str, Any] = {"job_configuration": {}, "variables": {}}
"""What a pool with no job template (`RouterWorker.get_default_base_job_template`) means."""

log = logging.getLogger(__name__)


class NotARouterFlow(Exception):
    """A run of a flow this worker does not run in its process (not in `flows/`)."""


class RouterJobConfiguration(BaseJobConfiguration):
    """Nothing to configure per run: the run uses this process and its environment."""

    @classmethod
    async def resolve_for_flow_run(
        cls,
        flow_run: FlowRun,
        *,
        client: PrefectClient,
        work_pool: WorkPool,
        worker_name: str,
        worker_id: UUID | None = None,
        deployment: DeploymentResponse | None = None,
    ) -> RouterJobConfiguration:
        """As the base, without asking the server for the flow: a router flow's name is
        that of the flow the deployment's entrypoint names here (Prefect's own ad-hoc
        submission skips that call the same way). One call, ~8 ms of server CPU, per run."""
        if deployment is None and flow_run.deployment_id:
            deployment = await client.read_deployment(flow_run.deployment_id)
        try:
            name = flow_for(getattr(deployment, "entrypoint", None)).name
            flow = APIFlow(id=flow_run.flow_id, name=name, labels={})
        except NotARouterFlow:  # run() refuses it with the reason
            flow = await client.read_flow(flow_run.flow_id)
        variables = dict(getattr(deployment, "job_variables", None) or {})
        run_variables = dict(flow_run.job_variables or {})
        if isinstance(variables.get("env"), dict):
            variables["env"] = {**variables["env"], **run_variables.pop("env", {})}
        variables.update(run_variables)
        configuration = await cls.from_template_and_values(
            base_job_template=work_pool.base_job_template or NO_TEMPLATE,
            values=variables,
            client=client,
        )
        configuration.prepare_for_flow_run(
            flow_run=flow_run,
            deployment=deployment,
            flow=flow,
            work_pool=work_pool,
            worker_name=worker_name,
            worker_id=worker_id,
        )
        return configuration


class RouterVariables(BaseVariables):
    """The base variables (name, env, labels, command); the pool's template has none of
    them (`RouterWorker.get_default_base_job_template`)."""


class RouterWorkerResult(BaseWorkerResult):
    """The engine reported the run's state itself; 0 unless the run could not execute."""


def flow_for(entrypoint: str | None) -> Flow[..., Any]:
    """The router flow a deployment's entrypoint names (`flows/route_job.py:route_job_flow`).

    Imported from this installation's `flows` package, whatever checkout the deployment
    was made from: the worker runs the code it has.
    """
    path, _, name = (entrypoint or "").partition(":")
    parts = PurePosixPath(path).parts
    if len(parts) != 2 or parts[0] != "flows" or not parts[1].endswith(".py") or not name:
        raise NotARouterFlow(
            f"entrypoint {entrypoint!r} is not a dicom-router flow (flows/MODULE.py:FLOW); "
            f"a {WORKER_TYPE} worker runs only those: deploy other flows to a process pool"
        )
    module = importlib.import_module(f"flows.{parts[1][:-3]}")
    found = getattr(module, name, None)
    if not isinstance(found, Flow):
        raise NotARouterFlow(f"entrypoint {entrypoint!r}: flows.{parts[1][:-3]} has no flow {name}")
    return found


def named_at_creation(flow: Flow[..., Any], flow_run: FlowRun) -> bool:
    """Whether the run already has the name `flow`'s run-name function would give it.

    The engine names every run of a flow that has one, with a call of its own (~8 ms of
    server CPU per run); the runs the router creates (an announcement, a sweep, the
    command line) are named so at creation. A run-name function that can name from the
    parameters alone has `of(parameters)` (`flows.route_job.JobRunName`); runs named
    otherwise (a trigger's, a UI Run) are still renamed by the engine.
    """
    name_of = getattr(flow.flow_run_name, "of", None)
    return name_of is not None and flow_run.name == name_of(flow_run.parameters or {})


def without_run_name(flow: Flow[..., Any]) -> Flow[..., Any]:
    unnamed = flow.with_options()
    unnamed.flow_run_name = None
    return unnamed


@dataclass
class WarmRun:
    """A flow run this process is executing."""

    flow_run: FlowRun
    related: list[RelatedResource]
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by: str | None = None
    """"ui" (cancelled: reported Cancelled) or "worker" (this worker stopped: Crashed)."""


class _Threads:
    """Threads that keep an API client (and heartbeats off) from one run to the next."""

    def __init__(self, size: int) -> None:
        self._local = threading.local()
        self.gates = LocalGates()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="dicom-router-run", initializer=self._warm_up
        )

    def _warm_up(self) -> None:
        # Entered for the thread's lifetime (kept referenced, or the generator's cleanup
        # would undo it): each run starts from a copy of this thread's context.
        self._local.settings = temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        self._local.settings.__enter__()
        self._local.client = SyncClientContext()
        self._local.client.__enter__()
        self._local.gates = gated(self.gates)
        self._local.gates.__enter__()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.pool.submit(lambda: contextvars.copy_context().run(fn, *args))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RouterWorker(BaseWorker[RouterJobConfiguration, RouterVariables, RouterWorkerResult]):
    """Runs `route-job` and `sweep-unrouted` flow runs in threads of this process."""

    type = WORKER_TYPE
    job_configuration = RouterJobConfiguration
    job_configuration_variables = RouterVariables
    _description = (
        "dicom-router's warm worker: runs route-job and sweep-unrouted flow runs in its own "
        "long-lived process (a thread each), without starting an interpreter per run."
    )
    _display_name = "dicom-router"
    _documentation_url = "https://github.com/"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        """None: a run uses this process and its environment, so there is nothing to set
        per deployment or run. With a template's variables schema the server checked each
        new run's job variables against it, and the schema itself against JSON Schema's
        meta-schema, twice (`prefect/server/api/validation.py`): 17 ms of its CPU per run,
        a thirtieth of what a routing run costs it."""
        return {}

    def __init__(
        self,
        work_pool_name: str,
        *,
        limit: int = DEFAULT_LIMIT,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        observer: Observer | None = None,
        **kwargs: Any,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        super().__init__(work_pool_name, limit=limit, **kwargs)
        self.heartbeat_seconds = heartbeat_seconds
        self.observer = observer
        """Told how each run ended (the metrics, `--metrics-port`)."""
        self.identifier = f"{socket.gethostname()}:{os.getpid()}"
        self._threads = _Threads(limit)
        self._in_flight: dict[UUID, WarmRun] = {}
        self._unnamed: dict[str, Flow[..., Any]] = {}
        """Flow name -> the flow without its run-name function (`named_at_creation`)."""
        self._wake = asyncio.Event()
        self._draining = False
        self._backlog = False

    # --- taking runs ---------------------------------------------------------------------

    async def setup(self) -> None:
        await super().setup()
        assert self._runs_task_group is not None
        self._runs_task_group.start_soon(self._watch_events)
        self._runs_task_group.start_soon(self._poll_on_wake)
        self._runs_task_group.start_soon(self._beat)

    async def teardown(self, *exc_info: Any) -> None:
        self._threads.shutdown()
        await super().teardown(*exc_info)

    def drain(self) -> None:
        """Take no more runs; the ones in flight go on to their end."""
        self._draining = True

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        if self._draining:
            return []
        return await super().get_and_submit_flow_runs()

    async def _get_scheduled_flow_runs(self) -> list[WorkerFlowRunResponse]:
        """At most as many runs as there are free threads (the server's default is 200)."""
        from prefect.client.schemas.responses import WorkerFlowRunResponse

        free = int(self.limiter.available_tokens)
        if free <= 0:
            self._backlog = True
            return []
        before = datetime.now(timezone.utc) + timedelta(seconds=self._prefetch_seconds)
        body: dict[str, Any] = {"scheduled_before": before.isoformat(), "limit": free}
        if self._work_queues:
            body["work_queue_names"] = sorted(self._work_queues)
        response = await self.client.request(
            "POST",
            "/work_pools/{name}/get_scheduled_flow_runs",
            path_params={"name": self._work_pool_name},
            json=body,
        )
        runs = [WorkerFlowRunResponse.model_validate(r) for r in response.json()]
        self._backlog = len(runs) >= free
        return runs

    def wake(self) -> None:
        """Poll for scheduled runs now."""
        self._wake.set()

    async def _poll_on_wake(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.get_and_submit_flow_runs()
            except Exception as exc:  # the base poll goes on; the next event wakes us again
                self._logger.warning("poll for scheduled flow runs failed: %s", exc)
                await anyio.sleep(1)

    async def _watch_events(self) -> None:
        """Wake on the pool's newly scheduled runs; stop the runs cancelled in the UI."""
        while self._work_pool is None:
            await anyio.sleep(0.2)
        pool = f"prefect.work-pool.{self._work_pool.id}"
        flt = EventFilter(
            event=EventNameFilter(name=[*WAKE_EVENTS, CANCEL_EVENT]),
            any_resource=EventAnyResourceFilter(id=[pool]),
        )
        while True:
            try:
                async with get_events_subscriber(filter=flt) as events:
                    self.wake()  # whatever was scheduled while we were not listening
                    async for event in events:
                        run_id = event.resource.id.rsplit(".", 1)[-1]
                        if event.event == CANCEL_EVENT:
                            self._cancel_in_flight(run_id)
                        else:
                            try:
                                await self._take(run_id)
                            except Exception as exc:  # the poll takes it instead
                                self._logger.warning("taking run %s failed: %s", run_id, exc)
                                self.wake()
            except Exception as exc:  # the base poll covers the gap
                self._logger.warning("event subscription lost (%s); resubscribing in 5 s", exc)
                await anyio.sleep(5)

    async def _take(self, flow_run_id: str) -> None:
        """Submit the run an event names, read by its id, as a poll would have.

        A poll costs the server its query and two background jobs (the pool's queues
        and deployments marked as polled, `prefect/server/api/workers.py`): about 20 ms
        of its CPU (py-spy), two to three times what reading one run costs. The base poll
        still runs every `PREFECT_WORKER_QUERY_SECONDS`, keeps them marked ready, and
        takes a run that is not due yet (a retry's delay) when it is.
        """
        from prefect.client.schemas.responses import WorkerFlowRunResponse

        if self._draining or not self._has_successfully_synced:
            return
        if int(self.limiter.available_tokens) <= 0 or self._work_pool is None:
            self._backlog = True
            return
        flow_run = await self.client.read_flow_run(UUID(flow_run_id))
        state = flow_run.state
        due = datetime.now(timezone.utc) + timedelta(seconds=self._prefetch_seconds)
        scheduled = state.state_details.scheduled_time if state is not None else None
        if (
            state is None
            or not state.is_scheduled()
            or flow_run.work_pool_id != self._work_pool.id
            or flow_run.work_queue_id is None
            or (self._work_queues and flow_run.work_queue_name not in self._work_queues)
            or (scheduled is not None and scheduled > due)
        ):
            return
        await self._submit_scheduled_flow_runs(
            [
                WorkerFlowRunResponse(
                    work_pool_id=self._work_pool.id,
                    work_queue_id=flow_run.work_queue_id,
                    flow_run=flow_run,
                )
            ]
        )

    def _cancel_in_flight(self, flow_run_id: str) -> bool:
        try:
            run = self._in_flight.get(UUID(flow_run_id))
        except ValueError:
            return False
        if run is None:
            return False
        if not run.stop.is_set():
            self.get_flow_run_logger(run.flow_run).info(
                "Cancelling: the run stops after the C-STORE in flight"
            )
            run.stopped_by = "ui"
            run.stop.set()
        return True

    async def stop_in_flight(self) -> None:
        """Report the runs in flight Crashed and stop them between C-STOREs (a hard stop)."""
        message = (
            f"worker {self.name} stopped while routing: the record holds every answer; "
            "Retry (or the next sweep) sends what is missing"
        )
        for run in list(self._in_flight.values()):
            if run.stop.is_set():
                continue
            run.stopped_by = "worker"
            try:
                await self.client.set_flow_run_state(
                    run.flow_run.id, Crashed(message=message), force=True
                )
            finally:
                run.stop.set()

    async def _propose_submitting_state(self, flow_run: FlowRun) -> None:
        """No Submitting state: it stands for infrastructure being provisioned, and the
        run goes from Pending to Running in this process at once. One state change less
        per run (~35 ms of server CPU: orchestration rules and an event)."""

    async def _cancel_run(self, flow_run_id: UUID) -> None:
        if not self._cancel_in_flight(str(flow_run_id)):
            await super()._cancel_run(flow_run_id)

    # --- heartbeats --------------------------------------------------------------------

    async def _beat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_seconds)
            for run in list(self._in_flight.values()):
                self._heartbeat(run)
            if self._in_flight:
                await self._check_cancelling()

    def _heartbeat(self, run: WarmRun) -> None:
        emit_event(
            event="prefect.flow-run.heartbeat",
            resource={
                "prefect.resource.id": f"prefect.flow-run.{run.flow_run.id}",
                "prefect.resource.name": run.flow_run.name or "",
                "prefect.version": __version__,
            },
            related=run.related,
        )

    async def _check_cancelling(self) -> None:
        """The fallback for a Cancelling event missed while the subscription was down."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        ids = [i for i, r in self._in_flight.items() if not r.stop.is_set()]
        if not ids:
            return
        try:
            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=ids),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.CANCELLING])
                    ),
                )
            )
        except Exception as exc:
            self._logger.debug("cancellation check failed: %s", exc)
            return
        for found in runs:
            self._cancel_in_flight(str(found.id))

    def _related(self, flow_run: FlowRun) -> list[RelatedResource]:
        """What a heartbeat names besides the run: its flow, deployment, pool (with its type,
        which the crash automation matches on) and this worker."""
        pool = self.work_pool
        labels = [
            {
                "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                "prefect.resource.role": "flow",
            },
            {
                "prefect.resource.id": f"prefect.work-pool.{pool.id}",
                "prefect.resource.role": "work-pool",
                "prefect.resource.name": pool.name,
                "prefect.work-pool.type": pool.type,
            },
            {**self._event_resource(), "prefect.resource.role": "worker"},
        ]
        if flow_run.deployment_id:
            labels.append(
                {
                    "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                    "prefect.resource.role": "deployment",
                }
            )
        return [RelatedResource.model_validate(r) for r in labels]

    # --- running -----------------------------------------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: RouterJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> RouterWorkerResult:
        deployment = configuration._related_objects.get("deployment")
        flow = flow_for(getattr(deployment, "entrypoint", None))  # raises: the run Crashes
        if named_at_creation(flow, flow_run):  # built once per flow: ~15 ms
            unnamed = self._unnamed.get(flow.name)
            if unnamed is None or unnamed.fn is not flow.fn:
                unnamed = self._unnamed[flow.name] = without_run_name(flow)
            flow = unnamed
        run = WarmRun(flow_run, self._related(flow_run))
        self._in_flight[flow_run.id] = run
        self._heartbeat(run)
        if task_status is not None:
            task_status.started(self.identifier)
        try:
            future = self._threads.submit(self._execute, flow, run)
            error = await asyncio.wrap_future(future)
        finally:
            del self._in_flight[flow_run.id]
            if self._backlog:
                self.wake()
        if run.stopped_by == "ui":
            await self._report_cancelled(run)
        elif error is not None:
            message = f"the flow run could not execute: {type(error).__name__}: {error}"
            await self._propose_crashed_state(flow_run, message)
        return RouterWorkerResult(identifier=self.identifier, status_code=0)

    def _execute(self, flow: Flow[..., Any], run: WarmRun) -> BaseException | None:
        """Run the flow in this thread; what the engine could not report, for the worker."""
        if run.stop.is_set():
            return None
        # For a deployment's run, Prefect's engine watches for a "suspension" with a thread
        # of its own running an event loop, a client and an events subscription, waited
        # for before the flow starts and joined at its end (prefect/flow_engine.py,
        # setup_flow_run_suspension_request -> prefect/_flow_run_suspension.py,
        # observe_flow_run_suspension): ~0.1-0.3 s and a websocket per run. Routing is
        # never suspended; the engine keys that on the run's deployment_id, and reads the
        # run back from the server (deployment and all) before the flow itself starts.
        flow_run = run.flow_run.model_copy(update={"deployment_id": None})
        try:
            with cancel.stoppable(run.stop), observing(self.observer):
                run_flow(flow, flow_run=flow_run, return_type="state")
        except cancel.RunCancelled:
            return None
        except BaseException as exc:  # the engine reported the state it could
            return exc
        return None

    async def _report_cancelled(self, run: WarmRun) -> None:
        state = Cancelled(message="Cancelled: stopped between C-STOREs; the record is complete")
        try:
            await self.client.set_flow_run_state(run.flow_run.id, state, force=True)
        except Exception:
            self.get_flow_run_logger(run.flow_run).exception("could not report the cancellation")


def default_name() -> str:
    return f"dicom-router@{socket.gethostname()}"


async def serve(worker: RouterWorker, printer: Callable[..., None]) -> None:
    """Run `worker` until SIGTERM or SIGINT.

    The first signal stops taking runs and waits for the runs in flight to end (systemd's
    TimeoutStopSec bounds the wait); a second one reports them Crashed, stops them between
    C-STOREs and exits.
    """
    import signal

    from flows.logs import quiet_expected_failures

    quiet_expected_failures()
    loop = asyncio.get_running_loop()
    draining = asyncio.Event()
    hard = asyncio.Event()

    def on_signal() -> None:
        if not draining.is_set():
            printer(
                f"stopping: no new runs; waiting for {worker.in_flight} in flight "
                "(signal again to stop them now)"
            )
            worker.drain()
            draining.set()
        else:
            hard.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    started = asyncio.create_task(worker.start(printer=printer))
    waiting = asyncio.create_task(draining.wait())
    done, _ = await asyncio.wait({started, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if started in done:  # it could not start (or stopped by itself): say why
        waiting.cancel()
        started.result()
        return
    while worker.in_flight and not hard.is_set():
        await asyncio.sleep(0.1)
    if worker.in_flight:
        await worker.stop_in_flight()
        deadline = loop.time() + 10
        while worker.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.1)
    started.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await started
