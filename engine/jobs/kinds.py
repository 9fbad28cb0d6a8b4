"""Job kinds: how each kind of job runs (the registry), and the context a runner gets."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import JobCancelledError


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
JOB_KINDS: dict[str, JobKind] = {
    "generate": JobKind(
        "engine.generation.generate:run_generate_job", "engine.generation.request:GenerateRequest"
    ),
    "xyz_plot": JobKind("engine.generation.xyz:run_xyz_job", "engine.generation.xyz:XYZPlotRequest"),
    "download": JobKind(
        "engine.model_manager.downloads:run_download_job",
        "engine.model_manager.downloads:DownloadRequest",
        uses_gpu=False,
        resumable=True,
    ),
    "variants": JobKind(
        "engine.media.variants:run_variants_job", "engine.media.variants:VariantsRequest", uses_gpu=False
    ),
    "cleanup": JobKind(
        "engine.media.variants:run_cleanup_job", "engine.media.variants:CleanupRequest", uses_gpu=False
    ),
    "motion_clip": JobKind(
        "engine.media.variants:run_motion_job", "engine.media.variants:MotionClipRequest", uses_gpu=False
    ),
    "join_clips": JobKind(
        "engine.media.variants:run_join_job", "engine.media.variants:JoinClipsRequest", uses_gpu=False
    ),
    "ingest": JobKind(
        "engine.characters.datasets:run_ingest_job",
        "engine.characters.datasets:IngestRequest",
        uses_gpu=False,
    ),
    "caption": JobKind(
        "engine.characters.datasets:run_caption_job",
        "engine.characters.datasets:CaptionRequest",
        uses_gpu=False,
    ),
    # rendered by ComfyUI servers: its own workers (as many as the pool takes at once), never a local GPU slot
    "comfy_generate": JobKind(
        "engine.comfyui.generate:run_comfy_generate_job",
        "engine.generation.request:GenerateRequest",
        uses_gpu=False,
        queue=COMFY_QUEUE,
    ),
    "train_lora": JobKind(
        "engine.training.job:run_train_job", "engine.training.job:TrainJobRequest", resumable=True
    ),
    "train_lora_kohya": JobKind(
        "engine.training.kohya:run_kohya_job", "engine.training.job:TrainJobRequest", resumable=True
    ),
    "upscale": JobKind("engine.upscale.job:run_upscale_job", "engine.upscale.job:UpscaleRequest"),
    "generate_video": JobKind("engine.video.job:run_video_job", "engine.video.job:VideoRequest"),
    "reference_sheet": JobKind(
        "engine.characters.reference_sheet:run_reference_sheet_job",
        "engine.characters.reference_sheet:ReferenceSheetRequest",
    ),
}


@dataclass
class RunContext:
    """What a runner gets: its job, a way to report progress, and a way to learn of cancel."""

    job_id: str
    device: str
    emit: Callable[[dict], None]
    is_cancelled: Callable[[], bool]
    runtime: Any  # engine.runtime.WorkerRuntime
    attempt: int = 1
    extra: dict = field(default_factory=dict)

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
