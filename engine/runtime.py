"""WorkerRuntime: what a device worker needs to run any job kind.

A pipeline cache (the ModelManager), the step callback that turns diffusers steps into progress
events with a cheap latent preview and honours cancel within one step, and out-of-memory
handling (free, report what to lower, stay alive).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.device import DevicePlan, free_memory, is_out_of_memory
from engine.errors import JobCancelledError, OutOfMemoryError
from engine.model_manager.pipelines import ModelManager
from engine.store.database import Database
from engine.store.hashing import HashCache

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


@dataclass
class WorkerRuntime:
    plan: DevicePlan
    models: ModelManager
    db: Database
    outputs_dir: Path
    version: str
    styles_path: Path | None = None  # A1111-compatible styles.csv
    settings: Any = None  # engine.settings.Settings: ingest roots, vision endpoint, cache folder

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

    def out_of_memory(self, exc: BaseException, advice: str) -> OutOfMemoryError:
        """Free what we can and turn the exception into one that says what to lower."""
        free_memory(self.plan.device)
        return OutOfMemoryError(f"out of memory on {self.plan.device} ({self.plan.dtype}): {advice}")

    is_out_of_memory = staticmethod(is_out_of_memory)
