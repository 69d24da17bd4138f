"""Shared fixtures: real DICOM peers on 127.0.0.1 and sample DICOM data."""

pytest_plugins = [
    "tests.fixtures_data",
    "tests.fixtures_scp",
    "tests.fixtures_tls",
    "tests.fixtures_dcmtk",
    "tests.fixtures_orthanc",
    "tests.fixtures_stow",
    "tests.fixtures_harness",
    "tests.fixtures_prefect",
]


def pytest_configure(config: object) -> None:
    """Children start with SIGINT at its default, as from a terminal or systemd.

    A shell starts a background job (`./scripts/test &`, nohup) with SIGINT ignored, and
    every process the tests start inherits that: Prefect's process worker turns SIGTERM
    into a SIGINT to itself, which it then ignores, so each stop waited out its 10 s
    time-out before the SIGKILL.
    """
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
