"""WorkerRuntime: what a device worker needs to run any job kind.

Every warm-model cache a worker keeps (image pipelines, upscale models, the video pipeline; training keeps
none: each run loads its own copy), the one memory policy that decides which of them a job of each kind
empties first (`make_room`), out-of-memory handling (`oom_guard`: free, report what to lower, stay alive),
the services runners share (characters, datasets, library), and the step callback that turns diffusers
steps into progress events with a cheap latent preview and honours cancel within one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.characters.characters import Characters
from engine.characters.datasets import Datasets
from engine.device import DevicePlan, oom_guard
from engine.errors import JobCancelledError
from engine.generation.request import GENERATION_STYLE
from engine.media.library import Library
from engine.media.variants import library_root
from engine.model_manager.pipelines import ModelManager
from engine.store.database import Database
from engine.store.hashing import HashCache
from engine.upscale.upscalers import UpscalerCache
from engine.video.generate import VideoPipelines

# A1111's "Approx cheap" latent -> RGB factors for SD 1.x/2.x latents.
SD1_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
# Like A1111's live previews: a cheap approximation now and then, never on short jobs (a preview of a
# job that ends within the interval costs the caller more than it shows).
PREVIEW_INTERVAL_S = 1.0


def latent_preview(latents):
    """First image of a latent batch as a small PIL image, without touching the VAE."""
    import torch
    from PIL import Image

    factors = torch.tensor(SD1_LATENT_RGB, dtype=torch.float32)
    lat = latents[0].detach().float().cpu()[:4]
    rgb = torch.einsum("chw,cr->hwr", lat, factors)
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(rgb)


# The memory policy, in one place: the warm caches a job of each kind empties before it runs (its own
# cache stays warm). On a GPU the big ones do not share the device: image pipelines, the video pipeline,
# the SD x4 upscaler (loaded per job) and a training run each want it to themselves, and training empties
# everything; upscale models (a few MB to ~70 MB) and image pipelines fit together. On the CPU, RAM is
# plentiful and warm pipelines save minutes, so only training (which loads its own copy of the model)
# empties the image pipelines.
CACHES = ("models", "upscalers", "video_pipes")
ROOM_ON_GPU: dict[str, tuple[str, ...]] = {
    "image": ("video_pipes",),
    "upscale": ("video_pipes",),
    "upscale_sd_x4": ("models", "video_pipes"),
    "video": ("models", "upscalers"),
    "train": ("models", "upscalers", "video_pipes"),
}
ROOM_ON_CPU: dict[str, tuple[str, ...]] = {kind: () for kind in ROOM_ON_GPU} | {"train": ("models",)}


@dataclass
class WorkerRuntime:
    plan: DevicePlan
    models: ModelManager  # image pipelines (+ refiner, ControlNets, LoRAs), keyed by model hash
    db: Database
    outputs_dir: Path
    version: str
    styles_path: Path | None = None  # A1111-compatible styles.csv
    settings: Any = None  # engine.settings.Settings: ingest roots, vision endpoint, cache folder
    # the other warm caches: created empty here, filled by the jobs that use them
    upscalers: UpscalerCache = field(default_factory=UpscalerCache)  # spandrel upscale models (LRU)
    video_pipes: VideoPipelines = field(init=False)  # the one loaded video pipeline

    def __post_init__(self) -> None:
        self.video_pipes = VideoPipelines(self.plan)

    @classmethod
    def create(
        cls,
        plan: DevicePlan,
        models_dir: Path,
        db: Database,
        outputs_dir: Path,
        version: str,
        styles_path: Path | None = None,
        configs_dir: Path | None = None,
        cache_dir: Path | None = None,
        settings: Any = None,
    ):
        # diffusers' lazy module is not safe to import from two threads at once: import what the
        # workers use here, once, before any of them runs (the executor calls this under a lock).
        import diffusers  # noqa: F401
        from diffusers import (  # noqa: F401
            AutoencoderKL,
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            AutoPipelineForText2Image,
            ControlNetModel,
            StableDiffusionImg2ImgPipeline,
            StableDiffusionPipeline,
        )

        models = ModelManager(models_dir, plan, HashCache(db), configs_dir=configs_dir, cache_dir=cache_dir)
        return cls(plan, models, db, outputs_dir, version, styles_path, settings)

    # --- the services runners share, built once per runtime ------------------------------------
    @cached_property
    def characters(self) -> Characters:
        return Characters(self.db, self.models.roots.models_dir, GENERATION_STYLE)

    @cached_property
    def datasets(self) -> Datasets:
        return Datasets(self.db, self.outputs_dir, self.characters)

    @cached_property
    def library(self) -> Library:
        return Library(self.db, library_root(self.outputs_dir))

    # --- memory -------------------------------------------------------------------------------
    def make_room(self, kind: str) -> None:
        """Before a job of `kind` runs: empty the warm caches it does not share the device with (ROOM_ON_GPU,
        ROOM_ON_CPU). An empty cache costs nothing to empty again."""
        rules = ROOM_ON_GPU if self.plan.is_gpu else ROOM_ON_CPU
        if kind not in rules:
            raise ValueError(f"make_room: kind={kind!r} is unknown; allowed: {', '.join(rules)}")
        for name in rules[kind]:
            self.empty(name)

    def unload_all(self) -> None:
        """Empty every warm cache (the Models tab's "Unload"); the next job of each kind loads again."""
        for name in CACHES:
            self.empty(name)

    def empty(self, cache: str) -> None:
        """Drop what one warm cache holds and return its memory ("models", "upscalers" or "video_pipes")."""
        if cache == "models":
            self.models.unload()
        elif cache == "upscalers":
            self.upscalers.clear()
        elif cache == "video_pipes":
            self.video_pipes.unload()
        else:
            raise ValueError(f"cache={cache!r} is unknown; allowed: {', '.join(CACHES)}")

    def oom_guard(self, advice: str) -> oom_guard:
        """`with rt.oom_guard("lower X or Y"):` an out-of-memory error inside becomes OutOfMemoryError naming
        the device and the advice, after the device's memory is freed; other errors pass unchanged."""
        return oom_guard(
            self.plan.device, f"out of memory on {self.plan.device} ({self.plan.dtype}): {advice}"
        )

    def step_callback(
        self,
        emit: Callable[[dict], None],
        is_cancelled: Callable[[], bool],
        step_offset: int,
        total: int,
        started: float,
        previews: bool = True,
    ):
        """A diffusers `callback_on_step_end` that reports progress and stops on cancel."""
        last_preview = [started]

        def callback(pipe, step: int, timestep, kwargs: dict):
            if is_cancelled():
                raise JobCancelledError("cancelled")
            done = step_offset + step + 1
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done) if done else None
            event = {
                "step": done,
                "total": total,
                "eta": round(eta, 2) if eta is not None else None,
                "desc": f"step {done}/{total}",
            }
            now = time.monotonic()
            # read at call time, so tests and settings can change the cadence
            if (
                previews
                and "latents" in kwargs
                and done < total
                and now - last_preview[0] >= PREVIEW_INTERVAL_S
            ):
                last_preview[0] = now
                event["preview"] = latent_preview(kwargs["latents"])
            emit(event)
            return {}

        return callback
