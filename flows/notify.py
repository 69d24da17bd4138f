"""What processing code calls when a job's computation has finished.

Three ways to start routing, for the shapes a processing pipeline takes:

- a Prefect flow named `process-job` with a `job_dir` parameter needs nothing: the
  `route-job` deployment's trigger (prefect.yaml) starts routing when its run completes;
- Python code (a script, another flow, a service) calls `job_processed(job_dir)`, or keeps
  one `Announcer` for many jobs: it creates the job's `route-job` run at once and returns
  it, or raises when it could not;
- anything else (a shell script, another language) emits the event `dicom.job.processed`
  with the payload `{"job_dir": ...}` (`prefect event emit`, or the REST API), which the
  deployment's other trigger turns into a run.

The run is created directly rather than through the event and the trigger so that the
caller learns that the server took the job: an event is sent from a background thread
that only logs a failure, so an unreachable server or a missing deployment went unnoticed
until the next sweep. The server also does less: no trigger evaluation, automation action
or their four events, and the run is named after its job folder at creation, where the
engine renames a trigger's run when it starts (0.235 against 0.28 CPU-s per small job, the
two ways taking turns: `bench/route_overhead.py`, "warm worker" and "by event").

All need a Prefect server (`PREFECT_API_URL`).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

EVENT = "dicom.job.processed"
DEPLOYMENT = "route-job/route-job"


class AnnounceError(Exception):
    """The server did not take the job: no run was created for it."""


def job_folder(job_dir: str | Path) -> Path:
    """The absolute job folder, once it holds its proc.json.

    Routing starts at once, and a job without proc.json is *waiting*: it would be left
    for a later sweep.
    """
    path = Path(job_dir).absolute()
    if not (path / "proc.json").is_file():
        raise FileNotFoundError(f"{path}: write proc.json before announcing the job")
    return path


class Announcer:
    """Announces finished jobs over one API client: one call to the server per job.

    For a pipeline that announces many jobs from one process; `job_processed` is one
    announcement with a client of its own.
    """

    def __init__(self, deployment: str = DEPLOYMENT) -> None:
        self.deployment = deployment
        self._client: SyncPrefectClient | None = None
        self._deployment_id: UUID | None = None

    def __enter__(self) -> Announcer:
        client = get_client(sync_client=True)
        client.__enter__()
        self._client = client
        try:
            self._deployment_id = client.read_deployment_by_name(self.deployment).id
        except ObjectNotFound:
            self.close()
            raise AnnounceError(
                f"deployment {self.deployment!r} not found on {client.api_url}: "
                "`prefect deploy --all` from the router's checkout creates it"
            ) from None
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.__exit__(None, None, None)

    def job_processed(self, job_dir: str | Path) -> FlowRun:
        """Create the job's routing run, scheduled now; returns it (`.id`, `.name`)."""
        path = job_folder(job_dir)
        if self._client is None or self._deployment_id is None:
            raise RuntimeError("Announcer used outside `with Announcer() as announcer:`")
        try:
            return self._client.create_flow_run_from_deployment(
                self._deployment_id,
                parameters={"job_dir": str(path)},
                name=path.name,  # the name route-job gives its runs (JobRunName)
            )
        except ObjectNotFound:
            raise AnnounceError(
                f"{path}: deployment {self.deployment!r} was deleted; "
                "`prefect deploy --all` creates it again"
            ) from None


def job_processed(job_dir: str | Path, deployment: str = DEPLOYMENT) -> FlowRun:
    """Announce a finished job: its `route-job` run is created now. Returns the run.

    Raises FileNotFoundError when the folder has no proc.json yet, AnnounceError when the
    deployment does not exist, and the client's errors when the server cannot be reached:
    in each case nothing was created, and the sweep routes the job later.
    """
    path = job_folder(job_dir)
    with Announcer(deployment) as announcer:
        return announcer.job_processed(path)
