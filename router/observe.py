"""Who wants to know how runs end: a hook for metrics, without routing knowing of them.

The warm worker serves Prometheus metrics (`flows.metrics`); routing itself only calls the
observer set for the current context (thread or task), so the plain path, the tests and
the command line run with none and pay nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router.overview import Overview
    from router.report import Delivery


class Observer(Protocol):
    def delivered(self, delivery: Delivery) -> None:
        """One send entry's delivery, once all its attempts are done."""

    def job_ended(self, outcome: str) -> None:
        """routed, failed, invalid, waiting, locked or refused."""

    def site(self, overview: Overview) -> None:
        """A sweep's overview of its site."""


_current: ContextVar[Observer | None] = ContextVar("router_observer", default=None)


def current() -> Observer | None:
    return _current.get()


@contextmanager
def observing(observer: Observer | None) -> Iterator[None]:
    token = _current.set(observer)
    try:
        yield
    finally:
        _current.reset(token)
