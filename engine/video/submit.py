"""A video request, checked before a job exists: every limit of the model's family, the AnimateDiff base
model and LoRAs, and the first frame (an upload, a gallery image, or a generation built here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.gallery.records import generation_detail
from engine.generation.submit import GenerationService
from engine.media.ffmpeg import VIDEO_SUFFIXES
from engine.model_manager.inventory import ModelInventory
from engine.model_manager.pipelines import lora_format
from engine.requests import resolve_seed
from engine.settings import Settings
from engine.store.database import Database
from engine.uploads import checked_upload
from engine.video.generate import VIDEO_FAMILIES, list_video_models
from engine.video.job import VideoRequest, check_video_request, find_video_model


def video_models(models_dir: Path) -> list[dict]:
    return [
        {
            "name": m.name,
            "family": m.family,
            "label": VIDEO_FAMILIES[m.family].label,
            "modes": list(VIDEO_FAMILIES[m.family].modes),
        }
        for m in list_video_models(models_dir)
    ]


def video_families() -> list[dict]:
    """The registry as the Video tab and API show it: modes, frame rule, sizes and defaults per family."""
    return [dataclasses.asdict(f) for f in VIDEO_FAMILIES.values()]


def build_video_request(
    values: dict[str, Any], *, settings: Settings, db: Database, generation: GenerationService
) -> VideoRequest:
    """values: mode (img2video, txt2video, camera), model, base_model (AnimateDiff), prompt, negative_prompt,
    image (upload) or generation_id (gallery) or first_frame_prompt (+ first_frame_model: generate it),
    frames, fps, width, height, steps, cfg_scale, seed, motion_strength, decode_chunk_size, loras,
    camera_moves, camera_strength, duration, interpolate_fps. Every limit of the family is checked here,
    before a job exists."""
    values = {k: v for k, v in values.items() if v is not None and k != "first_frame"}  # built here only
    values["seed"] = resolve_seed(values.get("seed"))
    if values.get("image"):
        values["image"] = checked_upload(settings, values["image"], "image")
    first_prompt = str(values.pop("first_frame_prompt", "") or "").strip()
    first_model = str(values.pop("first_frame_model", "") or "")
    req = VideoRequest.build(**values)
    models = generation.models
    family = None
    if req.mode != "camera":
        if not req.model:
            names = [m["name"] for m in video_models(settings.models_dir)]
            raise InputError(
                f"mode={req.mode!r} needs model= a video model; available: {', '.join(names) or 'none'}"
            )
        family = find_video_model(settings.models_dir, req.model).family
        if family == "animatediff":
            values["base_model"] = animatediff_base(models, req.base_model)
            loras = models.roots.list_files("loras")
            for spec in req.loras:
                lora_format(models.roots.resolve("loras", spec.name, loras))
        elif req.loras:
            raise InputError(f"loras: only AnimateDiff (SD1.5) videos take LoRAs; {req.model!r} is {family}")
    if first_prompt and req.needs_first_frame() and not (req.image or req.generation_id):
        default_w, default_h = VIDEO_FAMILIES[family].default_size if family else (512, 512)
        values["first_frame"] = generation.build_generate_request(
            {
                "prompt": first_prompt,
                "negative_prompt": req.negative_prompt,
                "model": first_model,
                "seed": req.seed,
                "width": req.width or default_w,
                "height": req.height or default_h,
            }
        )
    req = VideoRequest.build(**values)
    path = req.image
    if req.generation_id:
        d = generation_detail(db, req.generation_id)
        if not d.file_exists or not d.image_path or d.image_path.lower().endswith(VIDEO_SUFFIXES):
            raise InputError(
                f"generation_id={req.generation_id!r} is not an image with its file (a clip "
                "cannot be a first frame)"
            )
        path = d.image_path
    image = None
    if path and req.needs_first_frame():
        from PIL import Image

        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise InputError(f"image: not a readable image ({e}); allowed: PNG, JPEG, WebP") from None
    check_video_request(req, family, image)
    return req


def _is_sd15(path: Path) -> bool:
    try:
        return (
            json.loads((path / "model_index.json").read_text()).get("_class_name")
            == "StableDiffusionPipeline"
        )
    except (OSError, ValueError):
        return False


def animatediff_base(models: ModelInventory, name: str) -> str:
    """The SD1.5 model AnimateDiff animates: the one named, or the first SD1.5 diffusers folder."""
    available = models.roots.list_models()
    if name:
        base = models.match_model(name) or name
        path = models.roots.resolve("diffusers", base, available)
        if path.is_dir() and not _is_sd15(path):
            raise InputError(
                f"base_model={name!r} is not an SD1.5 model; AnimateDiff motion adapters animate "
                "SD1.5 models (StableDiffusionPipeline folders or SD1 checkpoints)"
            )
        return base
    for candidate, path in available.items():
        if path.is_dir() and _is_sd15(path):
            return candidate
    raise InputError("AnimateDiff needs base_model= an SD1.5 model, and none is in models/diffusers")
