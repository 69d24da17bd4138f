"""Prometheus metrics of a routing worker (`dicom-router worker --metrics-port N`).

The worker observes every run it executes (`router.observe`) and serves what it saw as
Prometheus text at http://HOST:N/metrics, with prometheus-client. Labels are destination
keys (`AET@host:port`) and outcomes only: never a job path or anything of a patient.
Counters count since the worker started, as Prometheus expects; the oldest unrouted job's
age is the last sweep's.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from router.overview import Overview
from router.report import Delivery

OUTCOMES = ("routed", "failed", "invalid", "waiting", "locked", "refused")


class WorkerMetrics:
    """The worker's counters, in a registry of their own (not prometheus-client's global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["destination"]
        self.stored = Counter(
            "dicom_router_instances_stored",
            "Instances stored at a destination.",
            labels,
            registry=self.registry,
        )
        self.refused = Counter(
            "dicom_router_instances_not_stored",
            "Instances a send entry did not store (refused, not answered, or could not go).",
            labels,
            registry=self.registry,
        )
        self.seconds = Counter(
            "dicom_router_send_seconds",
            "Seconds spent sending to a destination (all attempts of each entry).",
            labels,
            registry=self.registry,
        )
        self.bytes = Counter(
            "dicom_router_sent_bytes",
            "Bytes of the instances stored at a destination.",
            labels,
            registry=self.registry,
        )
        self.retries = Counter(
            "dicom_router_send_retries",
            "Attempts after the first, to a destination.",
            labels,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "dicom_router_deliveries",
            "Send entries that ended, by destination and outcome.",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "dicom_router_jobs",
            "Routing runs that ended, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        self.oldest = Gauge(
            "dicom_router_oldest_unrouted_seconds",
            "Age of the oldest job not yet routed, at the last sweep (0: none).",
            registry=self.registry,
        )

    # router.observe.Observer

    def delivered(self, delivery: Delivery) -> None:
        key = delivery.key or delivery.destination
        self.stored.labels(key).inc(delivery.stored)
        self.refused.labels(key).inc(delivery.failed)
        self.seconds.labels(key).inc(delivery.seconds)
        self.bytes.labels(key).inc(delivery.bytes)
        self.retries.labels(key).inc(max(0, delivery.attempts - 1))
        self.deliveries.labels(key, "succeeded" if delivery.ok else "failed").inc()

    def job_ended(self, outcome: str) -> None:
        self.jobs.labels(outcome).inc()

    def site(self, overview: Overview) -> None:
        self.oldest.set(overview.oldest_unrouted_age_seconds or 0)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve /metrics in a thread of this process; returns the server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
