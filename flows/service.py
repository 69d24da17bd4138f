"""What `dicom-router setup` creates on the server for the warm worker: its pool, crash detection.

- The work pool, of the `dicom-router` worker type (`flows.worker`). A pool of another
  type (a `process` pool from an older set-up) is served by the warm worker all the same,
  and left as it is.
- An automation that marks a run of the pool Crashed when its heartbeats stop: the warm
  worker heartbeats its runs every few seconds, so a run whose worker was killed (or
  whose host went down) ends Crashed within `crash_after` seconds, where a UI Retry or the
  next sweep picks it up. Prefect's own recipe for "zombie" runs ("Detect zombie flows"),
  scoped to the pool so that runs elsewhere, with Prefect's 180 s heartbeats, are left
  alone.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import get_client
from prefect.automations import Automation
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectAlreadyExists

from flows.worker import WORKER_TYPE, RouterWorker

TERMINAL = [
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
]


def ensure_work_pool(name: str) -> str:
    """Create the pool (type dicom-router) if it does not exist; what was done, as a line."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=WORKER_TYPE,
                    base_job_template=RouterWorker.get_default_base_job_template(),
                )
            )
            return f"work pool {name}: created (type {WORKER_TYPE})"
        except ObjectAlreadyExists:
            pool = client.read_work_pool(name)
    if pool.type != WORKER_TYPE:
        return (
            f"work pool {name}: exists, of type {pool.type}; `dicom-router worker` serves "
            f"it all the same (to show it as {WORKER_TYPE}, delete it and run setup again)"
        )
    template = RouterWorker.get_default_base_job_template()
    if pool.base_job_template != template:  # a pool made by an earlier version
        with get_client(sync_client=True) as client:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        return f"work pool {name}: exists; its job template updated"
    return f"work pool {name}: exists"


def crash_automation_name(pool: str) -> str:
    return f"dicom-router: crash runs of {pool} whose worker died"


def ensure_crash_automation(pool: str, crash_after: float) -> str:
    """Create or update the pool's automation; what was done, as a line."""
    with get_client(sync_client=True) as client:
        pool_id = client.read_work_pool(pool).id
    name = crash_automation_name(pool)
    automation = Automation(
        name=name,
        description=(
            "Marks a flow run of the pool Crashed when the dicom-router worker running it "
            f"sent no heartbeat for {crash_after:g} s (killed, or its host went down). "
            "Created by `dicom-router setup`."
        ),
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *TERMINAL},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "work-pool",
                    "prefect.resource.id": f"prefect.work-pool.{pool_id}",
                }
            ),
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=crash_after),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat from its worker for {crash_after:g} s: the worker died; "
                    "Retry (or the next sweep) sends what the job's record is missing"
                ),
            )
        ],
    )
    try:
        existing = Automation.read(name=name)
    except ValueError:
        automation.create()
        return f"automation {name!r}: created (after {crash_after:g} s without heartbeat)"
    automation.id = existing.id
    automation.update()
    return f"automation {name!r}: updated (after {crash_after:g} s without heartbeat)"
