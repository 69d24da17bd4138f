"""Settings from the environment (prefix `DICOM_ROUTER_`), overridable by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from router.config import check_regex
from router.model import Timeouts
from router.sweep import Backoff


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DICOM_ROUTER_", extra="ignore")

    config: Path | None = Field(None, description="Routing configuration file (JSON).")
    me: str = Field("127.0.0.1", description="This box's address: the value of $me.")
    port: int = Field(104, ge=1, le=65535, description="This box's DICOM port: $port.")
    log_file: Path = Field(Path("/data/logs/routing.log"), description="The routing log.")

    connect_timeout: float = Field(10.0, gt=0, description="TCP connect, seconds.")
    acse_timeout: float = Field(30.0, gt=0, description="Association set-up, seconds.")
    dimse_timeout: float = Field(60.0, gt=0, description="Waiting for a C-STORE answer.")
    network_timeout: float = Field(60.0, gt=0, description="Silence on an association.")
    max_pdu: int = Field(0, ge=0, description="Largest PDU we receive; 0: no limit.")

    retries: int = Field(3, ge=0, description="Retries of a transient send failure.")
    retry_delay: float = Field(5.0, ge=0, description="First retry's delay, seconds.")
    retry_backoff: float = Field(2.0, ge=1, description="Each further delay is this × longer.")

    success_pattern: str = Field(
        "success", description="proc.json success values that mean the computation worked."
    )
    associations: int = Field(
        4,
        ge=1,
        le=16,
        description="Associations (sending processes; DICOMweb: requests) one job's files are "
        "spread over, per destination; small jobs use fewer.",
    )
    """4: the best of 1-4 measured on two cores (bench/README.md). Into Orthanc, which
    stores what it gets, 1,500 CT images went at 1.02, 1.24, 1.20 and 1.57x storescu's rate
    over 1, 2, 3 and 4 associations; into storescp, which discards them, all four settings
    reach 1.0-1.3x (one sender already keeps up with the receiver)."""
    stow_instances: int = Field(
        50, ge=1, le=10000, description="STOW-RS: instances in one request, at most."
    )
    stow_bytes: int = Field(
        64 << 20,
        ge=1 << 16,
        description="STOW-RS: bytes of files in one request, at most (a bigger file goes alone).",
    )
    """50 instances and 64 MiB: see bench/README.md (STOW-RS). Memory does not depend on
    them: a request's body is streamed from the files."""
    max_associations: int = Field(
        4, ge=1, description="Associations open at once to one destination, over all jobs."
    )
    """4: as many as one job uses by default, and as many as Orthanc serves at once."""
    allowlist: Path | None = Field(
        None,
        description="File on this host listing the destinations that may receive data "
        "(README, Security); unset: any destination the rules name.",
    )
    jobs_root: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders job folders must lie in (several: separated by ':'); unset: any.",
    )
    allow_open_server: bool = Field(
        False,
        description="Accept a Prefect server that answers without authentication from a "
        "non-loopback address.",
    )
    alert_webhook: str | None = Field(
        None, description="URL that `dicom-router setup` makes the alert automations POST to."
    )
    alert_interval: float = Field(
        900.0, ge=0, description="At most one alert per destination in this many seconds."
    )
    config_block: str = Field(
        "default", description="Name of the routing-rules block used when no file is given."
    )

    sweep_retry_delay: float = Field(300.0, ge=0, description="A failed job's first re-try, s.")
    sweep_retry_backoff: float = Field(2.0, ge=1, description="Growth of the sweep's delay.")
    sweep_max_failures: int = Field(5, ge=1, description="Failed runs before a sweep gives up.")

    @field_validator("jobs_root", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p.strip()]
        if isinstance(value, Path):
            return [value]
        return value

    @field_validator("success_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        return check_regex(value)

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            acse=self.acse_timeout,
            dimse=self.dimse_timeout,
            network=self.network_timeout,
            max_pdu=self.max_pdu,
            instances_per_request=self.stow_instances,
            bytes_per_request=self.stow_bytes,
        )

    def backoff(self) -> Backoff:
        return Backoff(self.sweep_retry_delay, self.sweep_retry_backoff, self.sweep_max_failures)

    def retry_delays(self) -> list[float]:
        """Delay before each retry: 5, 10, 20 s with the defaults."""
        return [self.retry_delay * self.retry_backoff**i for i in range(self.retries)]
