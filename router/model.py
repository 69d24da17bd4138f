"""Plain data passed between the routing steps.

The edges (configuration, job files, settings) are pydantic models; once validated,
everything inside the router travels as these small frozen dataclasses so that each step
can be tested on its own and results can be serialised into the record and the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

# C-STORE statuses that count as stored (SPEC section 4).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


NO_VALUES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DicomFile:
    """One DICOM Part 10 file of a job, with what sending and filtering need.

    A job keeps one per file for its whole routing, so it is small: slots, the folder as
    one string shared by all files of a job, and (from the scanner) shared strings for SOP
    class and transfer syntax. Memory then stays flat from hundreds to thousands of files.
    """

    root: str
    """The folder `relpath` is relative to: the job folder."""
    relpath: str
    """Path relative to the job folder, POSIX separators: the name used in the record."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    values: Mapping[str, str] = field(default_factory=lambda: NO_VALUES)  # shared, read-only
    """Values of the tags that `which` filters ask for, keyed by 8-digit upper-case hex tag."""

    @property
    def path(self) -> Path:
        return Path(self.root, self.relpath)


@dataclass(frozen=True)
class TlsOptions:
    """DICOM TLS for one destination (PS3.15 B.1); the peer is verified unless told not to."""

    ca_file: str | None = None
    """CA bundle that signs the destination's certificate; None: the system's."""
    cert_file: str | None = None
    """Our certificate, for destinations that require client authentication."""
    key_file: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class Endpoint:
    """A destination with `$me`/`$port` resolved: where one association goes."""

    host: str
    port: int
    called_aet: str
    calling_aet: str
    tls: TlsOptions | None = None
    associations: int = 1
    """Associations used in parallel for one job's files."""
    convert: bool = True
    """Decompress (losslessly) what the destination does not accept as it is."""

    @property
    def key(self) -> str:
        """Stable identity of a destination in the record and the concurrency limits."""
        return f"{self.called_aet}@{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port} (as {self.calling_aet})"


@dataclass(frozen=True)
class WebAuth:
    """How to authenticate to a DICOMweb service: where its secret is, never the secret.

    The secret (a password, a token, an OAuth2 client secret) is read from the environment
    variable `secret_env` or the file `secret_file` when a request needs it, so that no
    endpoint, task parameter, record or report ever holds it.
    """

    kind: Literal["basic", "bearer", "oauth2"]
    secret_env: str | None = None
    secret_file: str | None = None
    username: str | None = None
    """HTTP basic: the user name."""
    token_url: str | None = None
    """OAuth2 client credentials: where the access token is fetched."""
    client_id: str | None = None
    scope: str | None = None

    @property
    def secret_source(self) -> str:
        """Where the secret comes from, in words for messages (never its value)."""
        if self.secret_env:
            return f"environment variable {self.secret_env}"
        return f"file {self.secret_file}"


@dataclass(frozen=True)
class WebEndpoint:
    """A DICOMweb destination: STOW-RS posts to `url` + `/studies`."""

    url: str
    """The service root, without a trailing slash (e.g. http://pacs:8042/dicom-web)."""
    auth: WebAuth | None = None
    tls: TlsOptions | None = None
    associations: int = 1
    """Requests in parallel for one job's files (the name is the DIMSE one, so that
    concurrency limits and the flow treat both kinds alike)."""
    instances_per_request: int | None = None
    """At most this many instances in one request; None: the setting."""
    bytes_per_request: int | None = None
    """At most this many bytes of files in one request (a bigger file goes alone)."""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def key(self) -> str:
        """Stable identity of a destination in the record and the concurrency limits."""
        return self.url

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"


AnyEndpoint = Endpoint | WebEndpoint
"""Either kind of destination, `$me`/`$port` resolved."""


@dataclass(frozen=True)
class Timeouts:
    """Network time-outs in seconds (`None` waits forever, never the default), and the
    other settings of how files are sent."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0
    max_pdu: int = 0
    """Largest PDU we accept; 0 for no limit (it only bounds what the peer sends us)."""
    instances_per_request: int = 50
    """STOW-RS: instances in one request, unless the destination says otherwise."""
    bytes_per_request: int = 64 << 20
    """STOW-RS: bytes of files in one request (a bigger file goes alone)."""


@dataclass(frozen=True)
class StoreResult:
    """What happened to one file on one attempt at one destination."""

    file: DicomFile
    status: int | None
    """DIMSE status of the C-STORE response; None when no response came."""
    error: str | None = None
    """Why it was not stored, in words, when it was not."""
    converted_from: str | None = None
    """The file's transfer syntax UID, when it was sent converted (to `converted_to`)."""
    converted_to: str | None = None
    permanent: bool = False
    """Not stored for a reason that no retry changes (no context, cannot be converted, it
    ended the association twice, refused again and again while others were stored)."""
    association: str | None = None
    """Which association carried it, unique within one `send_files` call; None if none."""

    @property
    def final(self) -> bool:
        """Not stored, and no further attempt in this routing run would change that."""
        if self.stored:
            return False
        return self.permanent or (self.status is not None and not status_is_transient(self.status))

    @property
    def stored(self) -> bool:
        return self.status is not None and self.status in STORED_STATUSES


class SendError(Exception):
    """An association could not be made, or broke, before every file had an answer.

    Files answered before the failure have already been reported through the result
    callback; the caller retries only what is missing.
    """

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class StopRun(Exception):
    """Raised by a step to stop the whole run where it stands (a cancellation), not to fail
    the entry it was in: routing neither fails the entry nor goes on with the others."""


def status_is_transient(status: int) -> bool:
    """0xA7xx (out of resources) is worth retrying; 0xA9xx, 0xCxxx and others are not."""
    return (status & 0xFF00) == 0xA700
