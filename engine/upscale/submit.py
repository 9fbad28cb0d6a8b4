"""An upscale request, checked before a job exists: uploads only, a known upscaler spandrel can read, and
generations that still have their files."""

from __future__ import annotations

from typing import Any

from engine.paths import ModelRoots
from engine.requests import resolve_seed
from engine.settings import Settings
from engine.store.database import Database
from engine.uploads import checked_upload
from engine.upscale.job import UpscaleRequest, _sources, resolve_upscaler
from engine.upscale.upscalers import inspect_upscaler


def build_upscale_request(values: dict[str, Any], settings: Settings, db: Database) -> UpscaleRequest:
    """values: images (uploads), generation_ids (gallery), video (an upload), upscaler, scale or width+height,
    tile, and the SD x4 options (prompt, negative_prompt, noise_level, steps, cfg_scale, seed)."""
    values = {k: v for k, v in values.items() if v is not None}
    images = values.get("images") or []
    if isinstance(images, str):
        images = [p.strip() for p in images.replace("\n", ",").split(",") if p.strip()]
    values["images"] = [checked_upload(settings, p, "images") for p in images]
    if values.get("video"):
        values["video"] = checked_upload(settings, values["video"], "video")
    if "seed" in values:
        values["seed"] = resolve_seed(values["seed"])
    req = UpscaleRequest.build(**values)
    kind, path = resolve_upscaler(ModelRoots(settings.models_dir), req.upscaler)  # unknown: refused now
    if kind == "model":
        inspect_upscaler(path, req.upscaler)  # a file spandrel cannot read: likewise (cached by size + mtime)
    _sources(req, db)  # unknown or deleted generations: likewise
    return req
