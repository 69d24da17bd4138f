"""What processing code calls when a job's computation has finished.

Two ways to start routing, for the two shapes a processing pipeline takes:

- a Prefect flow named `process-job` with a `job_dir` parameter needs nothing: the
  `route-job` deployment's trigger (prefect.yaml) starts routing when its run completes;
- anything else (a script, another flow, a container) calls `job_processed(job_dir)`,
  which emits the `dicom.job.processed` event that the other trigger listens for.

Both need a Prefect server (`PREFECT_API_URL`): events are how the server learns of it.
"""

from __future__ import annotations

from pathlib import Path

from prefect.events import Event, emit_event

EVENT = "dicom.job.processed"


def job_processed(job_dir: str | Path) -> Event | None:
    """Announce a finished job; `route-job` routes it. Returns the event sent.

    The job folder must already hold its proc.json: routing starts at once, and a job
    without one is *waiting* and is left for a later sweep.
    """
    path = Path(job_dir).absolute()
    if not (path / "proc.json").is_file():
        raise FileNotFoundError(f"{path}: write proc.json before announcing the job")
    return emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"dicom.job.{path}", "prefect.resource.name": path.name},
        payload={"job_dir": str(path)},
    )
