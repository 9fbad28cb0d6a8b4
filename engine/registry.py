"""The job kind registry, assembled from the rooms: each capability package declares its own kinds
(`engine.<room>.JOB_KINDS`, next to its runners) and this module only merges them. The facade hands the
result to the job service and the executor, so engine/jobs/ never imports a room.

Only the rooms' package `__init__` modules are imported here (light: "module:attr" strings), never a runner.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine import characters, comfyui, generation, media, model_manager, training, upscale, video
from engine.jobs.kinds import JobKind

ROOMS = (generation, model_manager, media, characters, comfyui, training, upscale, video)


def merge_job_kinds(*tables: Mapping[str, JobKind]) -> dict[str, JobKind]:
    """One registry from many; a name declared twice is refused (two rooms cannot both own a kind)."""
    merged: dict[str, JobKind] = {}
    for table in tables:
        for name, kind in table.items():
            if name in merged:
                raise ValueError(
                    f"job kind {name!r} is declared twice: {merged[name].runner} and {kind.runner}"
                )
            merged[name] = kind
    return merged


def job_kinds() -> dict[str, JobKind]:
    """Every room's job kinds, as a new dict (a test may add its own kind to it)."""
    return merge_job_kinds(*(room.JOB_KINDS for room in ROOMS))
