"""pytest plugin: a real Orthanc 1.10 (Debian's package) as a PACS-like destination.

Orthanc is what many sites actually route to, and it differs from storescp where it
matters: it checks the called AE title, records the calling AE title and transfer
syntax of every instance, and de-duplicates by SOP Instance UID.

It cannot count duplicates: a second C-STORE of a stored instance answers Success and
keeps one copy (``OverwriteInstances`` false). To assert "sent exactly once", use the
storescp fixture (tests/fixtures_dcmtk.py) or the pynetdicom SCP.

Config keys that Orthanc 1.10.1 honours here (see /etc/orthanc/orthanc.json):
``DicomAlwaysAllowStore`` true and empty ``DicomModalities`` accept C-STORE from any AE;
``UnknownSopClassAccepted`` true accepts any storage SOP class; ``DicomCheckCalledAet``
true rejects a wrong called AE (permanent, "Called AE Title Not Recognized");
``Plugins`` lists only the DICOMweb plugin (Debian's ``orthanc-dicomweb`` 1.7) when it is
installed, for STOW-RS at ``dicomweb_url``; it answers 400 to a request with a part it
cannot read, listing the other instances as stored. Its DICOM side is dcmtk and leaves Nagle on
unless ``TCP_NODELAY=1`` is in its environment: 45 ms per image without, ~3 ms with.
It takes ~2 s to stop, and a second Orthanc on the same index directory fails with
"database is locked", so each instance gets its own directory.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_dcmtk import (
    HOST,
    INSTALL_HINT,
    die_with_parent,
    free_port,
    peer_env,
    stop_process,
    wait_for_port,
)

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web"
_STARTUP_TIMEOUT = 60.0  # first start creates the SQLite index; slow disks take a while
_STOP_TIMEOUT = 15.0


@dataclass
class Orthanc:
    """A running Orthanc with REST helpers (urllib only) for what tests assert on."""

    aet: str
    port: int
    """DICOM port."""
    http_port: int
    workdir: Path
    process: subprocess.Popen = field(repr=False)
    host: str = HOST
    user: tuple[str, str] | None = None
    """(name, password) when HTTP basic authentication is on."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root: what a destination's URL is."""
        return self.url + DICOMWEB_ROOT

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One REST call; returns the decoded JSON answer (None if empty)."""
        raw = self.request_bytes(method, path, None if body is None else json.dumps(body).encode())
        return json.loads(raw) if raw.strip() else None

    def request_bytes(self, method: str, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.user:
            token = base64.b64encode(":".join(self.user).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def files(self) -> dict[str, bytes]:
        """SOPInstanceUID -> the stored file's bytes (as Orthanc received them)."""
        return {
            i["MainDicomTags"]["SOPInstanceUID"]: self.request_bytes(
                "GET", f"/instances/{i['ID']}/file"
            )
            for i in self.get("/instances?expand")
        }

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def instances(self) -> Counter[str]:
        """SOPInstanceUID -> 1 for every stored instance (never more: Orthanc de-duplicates)."""
        found = self.get("/instances?expand")
        return Counter(i["MainDicomTags"]["SOPInstanceUID"] for i in found)

    def metadata(self) -> dict[str, dict[str, str]]:
        """SOPInstanceUID -> Orthanc's metadata of that instance.

        Keys include ``RemoteAET`` (the calling AE title the sender used), ``CalledAET``,
        ``RemoteIP``, ``TransferSyntax`` (as stored, i.e. as sent) and ``SopClassUid``.
        """
        result = {}
        for inst in self.get("/instances?expand"):
            meta = self.get(f"/instances/{inst['ID']}/metadata?expand")
            result[inst["MainDicomTags"]["SOPInstanceUID"]] = meta
        return result

    def reset(self) -> None:
        """Delete every stored instance, so the next test starts from an empty archive."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")
        left = self.get("/instances")
        for instance in left:
            self.request("DELETE", f"/instances/{instance}")
        assert not self.get("/instances"), "Orthanc still holds instances after reset"

    def log(self) -> str:
        try:
            return (self.workdir / "orthanc.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process, _STOP_TIMEOUT)


def orthanc_config(workdir: Path, aet: str, port: int, http_port: int) -> dict[str, Any]:
    """The configuration tests run against: loopback only, no auth, no plugin but DICOMweb,
    any sender."""
    storage = workdir / "storage"
    return {
        "Name": "dicom-router-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [DICOMWEB_PLUGIN] if os.path.exists(DICOMWEB_PLUGIN) else [],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT + "/", "EnableWado": False},
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "HttpThreadsCount": 4,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {},
        "UnknownSopClassAccepted": True,
        "OverwriteInstances": False,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "MetricsEnabled": False,
        "DeidentifyLogs": False,
    }


def start_orthanc(
    workdir: Path,
    aet: str = "ORTHANC",
    *,
    user: tuple[str, str] | None = None,
    **overrides: Any,
) -> Orthanc:
    """Start an Orthanc on free ports with `orthanc_config`, `overrides` applied on top.

    For tests that need another configuration (say a restricted AcceptedTransferSyntaxes);
    the caller must `stop()` it. `workdir` must be a fresh directory. `user`: HTTP basic
    authentication with that (name, password).

    No HTTPS: Debian's Orthanc 1.10.1 (civetweb on OpenSSL 3) dies of a segmentation fault
    on its first TLS handshake (`SslEnabled`, RSA or EC certificate alike). For STOW-RS over
    TLS, tests put `tests.fixtures_tls.TlsTerminator` in front of it, as sites put nginx.
    """
    if not os.access(ORTHANC, os.X_OK):
        pytest.fail(f"{ORTHANC} not found: {INSTALL_HINT}")
    if user is not None:
        overrides = {
            "AuthenticationEnabled": True,
            "RegisteredUsers": {user[0]: user[1]},
            **overrides,
        }
    workdir.mkdir(parents=True, exist_ok=True)
    last_error = None
    for _attempt in range(3):  # a free port can be taken before Orthanc binds it
        port, http_port = free_port(), free_port()
        config = orthanc_config(workdir, aet, port, http_port) | overrides
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        with (workdir / "orthanc.log").open("w") as log:
            proc = subprocess.Popen(
                [ORTHANC, "--no-jobs", "--verbose-dicom", str(config_path)],
                cwd=workdir,
                env=peer_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        orthanc = Orthanc(
            aet,
            port,
            http_port,
            workdir,
            proc,
            user=user,
        )
        try:
            _wait_until_up(orthanc)
            return orthanc
        except RuntimeError as exc:
            orthanc.stop()
            last_error = exc
            if "already in use" not in orthanc.log():
                break
    pytest.fail(f"Orthanc did not start: {last_error}")


def _wait_until_up(orthanc: Orthanc) -> None:
    """Wait for GET /system to answer and the DICOM port to accept."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while True:
        if not orthanc.running:
            raise RuntimeError(f"exited with code {orthanc.process.returncode}\n{orthanc.log()}")
        try:
            system = orthanc.get("/system")
            if system.get("DicomPort") == orthanc.port:
                break
        except (urllib.error.URLError, OSError, ValueError):
            pass  # not up yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer on {orthanc.url}/system\n{orthanc.log()}")
        time.sleep(0.1)
    wait_for_port(orthanc.port, orthanc.process, max(1.0, deadline - time.monotonic()), orthanc.log)


_ORTHANC = pytest.StashKey[Orthanc]()
_LOG_OFFSET = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def orthanc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orthanc]:
    """One Orthanc for the whole session (start ~1 s, stop ~2 s), AE title ``ORTHANC``.

    Offers ``port``, ``aet``, ``host``, ``http_port``, ``url``, ``instances()``,
    ``metadata()``, ``reset()``, ``get()``/``request()``, ``log()``. Shared state: use
    ``orthanc_clean`` in tests that assert on what arrived.
    """
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    request.config.stash[_ORTHANC] = server
    try:
        yield server
    finally:
        del request.config.stash[_ORTHANC]
        server.stop()


@pytest.fixture
def orthanc_clean(orthanc: Orthanc) -> Orthanc:
    """The session's Orthanc, emptied before the test."""
    orthanc.reset()
    return orthanc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Show the Orthanc log lines written during a failing test that used Orthanc."""
    outcome = yield
    report = outcome.get_result()
    server = item.config.stash.get(_ORTHANC, None)
    if server is None or "orthanc" not in getattr(item, "fixturenames", ()):
        return
    if report.when == "setup":
        item.stash[_LOG_OFFSET] = len(server.log())
    elif report.failed:
        text = server.log()[item.stash.get(_LOG_OFFSET, 0) :]
        report.sections.append((f"Orthanc {server.aet} :{server.port} log", text))
