"""Job kinds: how one kind of job runs (JobKind; each room registers its own), and the context a runner gets."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import JobCancelledError

if TYPE_CHECKING:  # a type only: the runtime sits above the rooms, and the rooms import this module
    from engine.characters.characters import Characters
    from engine.characters.datasets import Datasets
    from engine.media.library import Library
    from engine.runtime import WorkerRuntime


@dataclass(frozen=True)
class JobKind:
    """How to run one kind of job. `runner` is "module:function" so the UI never imports torch."""

    runner: str
    request_type: str  # "module:Class"
    uses_gpu: bool = True
    resumable: bool = False
    queue: str = ""  # its own worker queue (e.g. "comfyui": remote renders); "" = the device's or media's

    def load_runner(self) -> Callable[[Any, RunContext], dict]:
        module, _, fn = self.runner.partition(":")
        return getattr(importlib.import_module(module), fn)

    def parse_request(self, data: dict):
        module, _, cls = self.request_type.partition(":")
        return getattr(importlib.import_module(module), cls).build(**data)


COMFY_QUEUE = "comfyui"
JobKinds = Mapping[str, JobKind]
"""A job kind registry: name -> JobKind. Each room declares its own (`engine.<room>.JOB_KINDS`); the facade
merges them (engine.registry) and hands the result to the job service and the executor."""


@dataclass
class RunContext:
    """What a runner gets: its job, a way to report progress, a way to learn of cancel, and the worker's
    runtime (warm-model caches, make_room, oom_guard) with the services it shares (`characters`,
    `datasets`, `library`, `outputs`), built once per runtime."""

    job_id: str
    device: str
    emit: Callable[[dict], None]
    is_cancelled: Callable[[], bool]
    runtime: WorkerRuntime
    attempt: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def outputs(self) -> Path:
        """The outputs folder: every file a job writes for the user goes under it."""
        return self.runtime.outputs_dir

    @property
    def characters(self) -> Characters:
        return self.runtime.characters

    @property
    def datasets(self) -> Datasets:
        return self.runtime.datasets

    @property
    def library(self) -> Library:
        return self.runtime.library

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise JobCancelledError(f"job {self.job_id} was cancelled")

    def part(self, n: int, count: int, label: str) -> RunContext:
        """The context for part n of count (an X/Y/Z cell, a sheet view): its step events are rescaled
        onto the whole job's progress and described as "<label> n+1/count, ..."."""

        def emit(event: dict) -> None:
            if "step" in event:
                event = {
                    **event,
                    "step": n * event["total"] + event["step"],
                    "total": event["total"] * count,
                    "desc": f"{label} {n + 1}/{count}, {event.get('desc', '')}",
                }
            self.emit(event)

        return RunContext(
            self.job_id, self.device, emit, self.is_cancelled, self.runtime, self.attempt, self.extra
        )


MEDIA_QUEUE = "media"
