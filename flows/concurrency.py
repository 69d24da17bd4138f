"""At most N associations to one destination over all jobs: Prefect global concurrency limits.

One limit per destination host and port (`dicom-router-<host>-<port>`), since that is what
a PACS feels, whatever AE title is called. The size is the destination's
`max_associations`, or the `max_associations` setting. A run makes sure the limit exists
before it sends (creating a missing one with the configured size, never changing an
existing one, so a size edited in the UI stands) and then acquires it strictly: routing
never runs unlimited because a limit is absent. `dicom-router setup` creates them all
up front and sets their sizes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from router.model import Endpoint

PREFIX = "dicom-router-"


def limit_name(endpoint: Endpoint) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9.-]+", "-", f"{endpoint.host}-{endpoint.port}")


def ensure_destination_limit(endpoint: Endpoint, size: int) -> tuple[str, int]:
    """The limit's name and size, after creating it with `size` if it does not exist yet.

    The size is the limit's own, which an edit in the UI may have made smaller than
    `size`: a send that asked for more slots than that would fail.
    """
    name = limit_name(endpoint)
    with get_client(sync_client=True) as client:
        try:
            return name, client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            # another run may create it meanwhile: that one will do
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=size)
                )
        return name, client.read_global_concurrency_limit_by_name(name).limit


def set_destination_limit(endpoint: Endpoint, size: int) -> str:
    """Create or resize the limit (the set-up command)."""
    name = limit_name(endpoint)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, size)
    return name


@contextmanager
def destination_slot(name: str | None, occupy: int = 1) -> Iterator[None]:
    """Hold a slot per association; strict, so a missing limit is an error, never a pass."""
    if name is None:
        yield
        return
    with concurrency(name, occupy=occupy, strict=True):
        yield
