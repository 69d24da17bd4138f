"""An example processing flow, to show how processing hands a job over to routing.

`process-job` stands for the computation: it reads the job's INPUT/, writes OUTPUT/ and
finally proc.json. When the run completes, the `route-job` deployment's trigger (see
prefect.yaml) starts routing with the same `job_dir`. With `announce=True` it also calls
`flows.notify.job_processed`, the way code that is not a Prefect flow would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from flows.notify import job_processed


@flow(name="process-job")
def process_job(job_dir: str, announce: bool = False) -> str:
    """Copy INPUT/ to OUTPUT/ (the "computation") and write proc.json."""
    job = Path(job_dir)
    output = job / "OUTPUT"
    output.mkdir(exist_ok=True)
    for source in sorted((job / "INPUT").rglob("*")):
        if source.is_file():
            target = output / source.relative_to(job / "INPUT")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    result = [{"success": "success", "message": "example computation: inputs copied"}]
    (job / "proc.json").write_text(json.dumps(result), encoding="utf-8")
    get_run_logger().info("processed %s", job)
    if announce:
        job_processed(job)
    return str(job)
