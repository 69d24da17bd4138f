"""Alerts when routing fails, the Prefect way: events from the runs, automations on the server.

The runs announce what an administrator must hear about as Prefect events:

- `dicom-router.delivery.failed`: a send entry failed and nothing covered it; the event's
  resource is the destination (`dicom-router.destination.KEY`), so that an automation can
  keep to one alert per destination per interval however many jobs fail there;
- `dicom-router.job.failed`: a run failed outside a delivery (invalid, refused, a full
  disk, a bug); its resource is the job folder;
- `dicom-router.job.given-up`: a sweep gave a job up after repeated failures.

Prefect itself emits `prefect.flow-run.Crashed` for a run whose worker died.

`dicom-router setup --alert-webhook URL` stores URL in a Prefect Webhook block and creates
(or updates) automations that POST one JSON message per alert to it (CallWebhook).
`--alert-notification SLUG/NAME` sends the same alerts through an existing notification
block instead (Slack, Microsoft Teams, e-mail through SendGrid, ...: SendNotification).
The messages carry the job folder, rule, destination, reason and the run's page in the UI;
never a secret (the webhook's URL and headers stay in the block, as SecretStr).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from prefect.automations import Automation
from prefect.events import emit_event
from prefect.events.actions import CallWebhook, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.runtime import flow_run

from router.report import JobReport
from router.text import printable_data

DELIVERY_FAILED = "dicom-router.delivery.failed"
JOB_FAILED = "dicom-router.job.failed"
GIVEN_UP = "dicom-router.job.given-up"
WEBHOOK_BLOCK = "dicom-router-alerts"


def _run_related() -> list[dict[str, str]]:
    run_id = flow_run.id
    if not run_id:
        return []
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": str(flow_run.name or ""),
        }
    ]


def _job_resource(job_dir: str) -> dict[str, str]:
    digest = hashlib.sha256(job_dir.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return {"prefect.resource.id": f"dicom-router.job.{digest}", "prefect.resource.name": job_dir}


def _emit(
    event: str,
    resource: dict[str, str],
    related: list[dict[str, str]],
    payload: dict[str, object],
) -> None:
    """Emit with printable text: an event is strict UTF-8 JSON (router.text)."""
    emit_event(
        event,
        resource=printable_data(resource),
        related=printable_data(related),
        payload=printable_data(payload),
    )


def announce_report(report: JobReport) -> None:
    """One event per uncovered failed entry of a failed job."""
    for rule in report.failed_rules:
        for entry in rule.entries:
            if entry.state != "failed" or entry.covered:
                continue
            key = entry.delivery.key if entry.delivery and entry.delivery.key else entry.destination
            _emit(
                DELIVERY_FAILED,
                resource={
                    "prefect.resource.id": f"dicom-router.destination.{key}",
                    "prefect.resource.name": key,
                },
                related=_run_related(),
                payload={
                    "job_dir": report.job,
                    "rule": f"{rule.index} {rule.name}",
                    "destination": entry.destination,
                    "reason": entry.reason or "",
                    "flow_run_id": str(flow_run.id or ""),
                },
            )


def announce_job_failed(job_dir: str, state: str, reason: str) -> None:
    _emit(
        JOB_FAILED,
        resource=_job_resource(job_dir),
        related=_run_related(),
        payload={
            "job_dir": job_dir,
            "state": state,
            "reason": reason,
            "flow_run_id": str(flow_run.id or ""),
        },
    )


def announce_given_up(job_dir: str, reason: str, failures: int) -> None:
    _emit(
        GIVEN_UP,
        resource=_job_resource(job_dir),
        related=_run_related(),
        payload={"job_dir": job_dir, "reason": reason, "failures": failures},
    )


# --- the automations -----------------------------------------------------------------------

_FIELDS = """
  "job_dir": {{ event.payload.job_dir | tojson }},
  "rule": {{ (event.payload.rule or "") | tojson }},
  "destination": {{ (event.payload.destination or "") | tojson }},
  "reason": {{ event.payload.reason | tojson }},
  "occurred": {{ event.occurred.isoformat() | tojson }},
  "flow_run_id": {{ (event.payload.flow_run_id or "") | tojson }},
  "run_url": {{ (flow_run | ui_url) | tojson if flow_run else "null" }}"""

ALERTS: dict[str, tuple[str, str, str]] = {
    "delivery": (
        "routing to a destination failed",
        DELIVERY_FAILED,
        "dicom-router.destination.*",
    ),
    "job": ("a routing run failed", JOB_FAILED, "dicom-router.job.*"),
    "given-up": ("a sweep gave a job up", GIVEN_UP, "dicom-router.job.*"),
}
"""kind -> (what happened, event, resource pattern)."""

_CRASHED_PAYLOAD = """{
  "alert": "a routing run crashed",
  "job_dir": {{ (flow_run.parameters.job_dir if flow_run else "") | tojson }},
  "rule": "",
  "destination": "",
  "reason": {{ ("the run crashed: " ~ (event.payload.validated_state.message
                or "its worker died")) | tojson }},
  "occurred": {{ event.occurred.isoformat() | tojson }},
  "flow_run_id": {{ (flow_run.id | string if flow_run else "") | tojson }},
  "run_url": {{ (flow_run | ui_url) | tojson if flow_run else "null" }}
}"""


def _payload(what: str) -> str:
    return "{\n" + f'  "alert": "{what}",' + _FIELDS + "\n}"


def _subject(what: str) -> str:
    return f"dicom-router: {what}: {{{{ event.payload.job_dir or flow_run.parameters.job_dir }}}}"


def _body() -> str:
    return (
        "Job: {{ event.payload.job_dir or (flow_run.parameters.job_dir if flow_run else '') }}\n"
        "Rule: {{ event.payload.rule or '-' }}\n"
        "Destination: {{ event.payload.destination or '-' }}\n"
        "Reason: {{ event.payload.reason or 'the run crashed' }}\n"
        "Run: {{ flow_run | ui_url if flow_run else '-' }}\n"
    )


def automation_name(kind: str) -> str:
    return f"dicom-router: alert: {kind}"


def _triggers(interval: float) -> dict[str, tuple[str, EventTrigger]]:
    window = timedelta(seconds=interval)
    triggers = {
        kind: (
            what,
            EventTrigger(
                posture=Posture.Reactive,
                expect={event},
                match=ResourceSpecification({"prefect.resource.id": pattern}),
                for_each={"prefect.resource.id"},
                threshold=1,
                # one alert per destination (or job) per interval: a reactive trigger fires
                # on the first event, then waits out the rest of its window
                within=window if kind == "delivery" else timedelta(0),
            ),
        )
        for kind, (what, event, pattern) in ALERTS.items()
    }
    triggers["crashed"] = (
        "a routing run crashed",
        EventTrigger(
            posture=Posture.Reactive,
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": "route-job"}
            ),
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(0),
        ),
    )
    return triggers


def ensure_webhook_block(url: str) -> Any:
    """The Webhook block that holds the alert URL (created or replaced); its id."""
    from prefect.blocks.webhook import Webhook

    block = Webhook(
        method="POST",
        url=url,
        headers={"Content-Type": "application/json"},
        allow_private_urls=True,  # hospital receivers live on private networks
    )
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def ensure_alert_automations(
    interval: float, *, webhook_url: str | None = None, notification: str | None = None
) -> list[str]:
    """Create or update the alert automations; what was done, a line each."""
    if webhook_url:
        block_id = ensure_webhook_block(webhook_url)
        target = "the webhook"
    elif notification:
        from prefect.blocks.core import Block

        slug, _, name = notification.partition("/")
        block_id = Block.load(f"{slug}/{name}")._block_document_id
        target = f"the notification block {notification}"
    else:
        raise ValueError("an alert webhook URL or a notification block is needed")
    done = []
    for kind, (what, trigger) in _triggers(interval).items():
        if webhook_url:
            payload = _CRASHED_PAYLOAD if kind == "crashed" else _payload(what)
            action: Any = CallWebhook(block_document_id=block_id, payload=payload)
        else:
            action = SendNotification(
                block_document_id=block_id, subject=_subject(what), body=_body()
            )
        name = automation_name(kind)
        automation = Automation(
            name=name,
            description=f"dicom-router: {what}; sends one message to {target}. "
            "Created by `dicom-router setup`.",
            trigger=trigger,
            actions=[action],
        )
        try:
            existing = Automation.read(name=name)
        except ValueError:
            automation.create()
            done.append(f"automation {name!r}: created")
            continue
        automation.id = existing.id
        automation.update()
        done.append(f"automation {name!r}: updated")
    return done
