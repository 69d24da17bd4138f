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
