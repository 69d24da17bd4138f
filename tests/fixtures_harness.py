"""One Prefect test server for the session (`prefect_test_harness`).

Flow tests run their flows in-process against it; CLI tests point their subprocesses at
it through PREFECT_API_URL, as a worker on another host would be.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())
