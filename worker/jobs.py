"""The functions RQ runs, by dotted path (`worker.jobs.run_generation`).

RQ imports this module by name and calls the function with the job's JSON arguments; the warm
runtime it needs is installed by `worker.main` before the work loop starts.
"""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from worker.runtime import Runtime

_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make `runtime` the one these job functions use (called once per worker process)."""
    global _runtime
    _runtime = runtime


def run_generation(job_id: str) -> dict[str, Any]:
    """Run generation job `job_id` on this process's warm pipeline."""
    if _runtime is None:
        raise RuntimeError("no warm pipeline in this process: start it with `imagegen worker`")
    job = get_current_job()
    return _runtime.run_job(job_id, timeout_s=job.timeout if job is not None else None)
