"""Waiting for a short job's result where a caller has nothing to show meanwhile."""

from __future__ import annotations

from engine.errors import StudioError
from engine.jobs.service import JobService


def wait_for_result(jobs: JobService, job_id: str) -> dict:
    """Wait for a short (media) job; its result, or a StudioError saying how it ended."""
    for event in jobs.watch(job_id):
        if event["type"] == "done":
            return event["result"]
        if event["type"] in ("failed", "cancelled", "interrupted"):
            raise StudioError(f"job {job_id} {event['type']}: {event.get('error', '')}")
    raise StudioError(f"job {job_id} ended without a result")
