"""The "generate_video" job: image-to-video, text-to-video and camera-motion clips, saved as MP4.

Families come from engine.video.generate's registry (Stable Video Diffusion, LTX-Video, AnimateDiff on an SD1.5 model
with its LoRAs). Camera motion (engine.media.motion) is always there and needs no weights. A clip that needs a
first frame (img2video, camera) takes an uploaded image, a gallery generation, or generates one first from
`first_frame` (a GenerateRequest, saved to the gallery like any generation).

The MP4 is H.264 yuv420p with +faststart; the recipe JSON is in the container's `comment` tag and an
A1111-style parameter line in `description`. Optional frame interpolation (ffmpeg minterpolate) raises the fps.
Each clip is an Asset (kind video) + a Generation row (mode img2video / txt2video / camera) with an animated
WebP thumbnail, so the gallery lists it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError, NotFoundError
from engine.gallery.records import add_generation, file_asset, thumbnail_path
from engine.generation.generate import generate_images
from engine.generation.request import GenerateRequest
from engine.jobs.kinds import RunContext
from engine.media.clips import interpolate_fps, video_thumbnail, write_mp4
from engine.media.ffmpeg import probe, tag_video
from engine.media.motion import MotionSpec, render_motion
from engine.requests import MAX_SEED, LoraSpec, RequestBase, parse_loras
from engine.store.database import Asset, Generation, utcnow
from engine.video.generate import (
    VIDEO_FAMILIES,
    VideoSpec,
    check_video_spec,
    list_video_models,
    render_video,
)

VIDEO_MODES = ("img2video", "txt2video", "camera")


class VideoRequest(RequestBase):
    """One clip. 0 means "the family's default" for frames, fps, size, steps and guidance."""

    mode: Literal["img2video", "txt2video", "camera"] = Field(
        default="camera",
        description="img2video, txt2video, or camera (a camera move over a still; no weights)",
    )
    model: str = Field(default="", description="Video model (Video tab list); not used by camera")
    base_model: str = Field(
        default="", description="AnimateDiff: the SD1.5 model the motion adapter animates"
    )
    prompt: str = Field(default="", max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    image: str | None = Field(default=None, description="First frame (img2video, camera): an uploaded image")
    generation_id: str = Field(default="", description="First frame from the gallery (instead of image)")
    first_frame: GenerateRequest | None = Field(
        default=None, description="Generate the first frame first (when no image or generation is given)"
    )
    frames: int = Field(default=0, ge=0, le=1000, description="Frames (0 = the family's default)")
    fps: int = Field(default=0, ge=0, le=60, description="Frames per second (0 = the family's default)")
    width: int = Field(default=0, ge=0, le=4096, description="Width (0 = default / the image's)")
    height: int = Field(default=0, ge=0, le=4096, description="Height (0 = default / the image's)")
    steps: int = Field(default=0, ge=0, le=150, description="Denoising steps (0 = the family's default)")
    cfg_scale: float = Field(default=0.0, ge=0.0, le=30.0, description="Guidance (0 = the family's default)")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    motion_strength: float = Field(default=0.5, ge=0.0, le=1.0, description="SVD: how much the scene moves")
    decode_chunk_size: int = Field(
        default=0, ge=0, le=64, description="SVD: frames decoded at once (0 = auto)"
    )
    loras: list[LoraSpec] = Field(default_factory=list, description="AnimateDiff: SD1.5 LoRAs, name:weight")
    camera_moves: str = Field(
        default="zoom_in", description="Camera: static, zoom_in/out, pan_*; combine with +"
    )
    camera_strength: float = Field(default=0.25, ge=0.05, le=1.0, description="Camera: how far it travels")
    duration: float = Field(default=4.0, ge=0.5, le=120.0, description="Camera: seconds")
    interpolate_fps: int = Field(
        default=0, ge=0, le=120, description="Raise the fps by motion interpolation (0 = off)"
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, v: Any) -> Any:
        return parse_loras(v) if isinstance(v, str | type(None)) else v

    def needs_first_frame(self) -> bool:
        return self.mode in ("img2video", "camera")


def check_video_request(req: VideoRequest, family_key: str | None, image=None) -> None:
    """Refuse what the family cannot do before a job exists: frames, sizes, fps, modes (engine.video.generate)."""
    if req.needs_first_frame() and not (req.image or req.generation_id or req.first_frame):
        raise InputError(
            f"mode={req.mode!r} needs a first frame: upload an image, pick a gallery generation "
            "or give a prompt to generate one"
        )
    if req.mode == "camera":
        try:
            MotionSpec(
                Path("first-frame.png"),
                moves=req.camera_moves,
                strength=req.camera_strength,
                duration=req.duration,
                fps=req.fps or 24,
                size=(req.width, req.height) if req.width and req.height else None,
            )
        except InputError as e:  # name the request's fields, not MotionSpec's
            text = str(e).replace("moves=", "camera_moves=").replace("strength=", "camera_strength=")
            raise InputError(text.replace("size=", "width x height=")) from None
        _check_interpolation(req, req.fps or 24)
        return
    from PIL import Image

    stand_in = image
    if req.mode == "img2video" and stand_in is None:  # the first frame is generated later: check its size
        w = req.width or (req.first_frame.width if req.first_frame else 0) or 64
        h = req.height or (req.first_frame.height if req.first_frame else 0) or 64
        stand_in = Image.new("RGB", (w, h))
    spec = check_video_spec(_spec(req, family_key or "", stand_in if req.mode == "img2video" else None))
    _check_interpolation(req, spec.fps)


def _check_interpolation(req: VideoRequest, fps: int) -> None:
    if req.interpolate_fps and not fps < req.interpolate_fps <= 120:
        raise InputError(
            f"interpolate_fps={req.interpolate_fps}: must be above the clip's {fps} fps and at most 120 "
            "(0 = off)"
        )


def _spec(req: VideoRequest, family: str, image):
    return VideoSpec(
        family=family,
        mode=req.mode,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        image=image,
        frames=req.frames,
        fps=req.fps,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance=req.cfg_scale,
        seed=req.seed,
        motion_strength=req.motion_strength,
        decode_chunk_size=req.decode_chunk_size,
    )


def find_video_model(models_dir: Path, name: str):
    models = list_video_models(models_dir)
    for m in models:
        if m.name == name:
            return m
    raise NotFoundError(
        f"video model {name!r} not found; available: "
        f"{', '.join(m.name for m in models) or 'none (put SVD/LTX-Video folders in models/diffusers, '}"
        f"{'' if models else 'AnimateDiff motion adapters in models/animatediff_models)'}"
    )


# --- the job -----------------------------------------------------------------------------------------
def _first_frame(req: VideoRequest, ctx: RunContext) -> tuple[Any, dict]:
    """(PIL image, where it came from) for img2video and camera."""
    from PIL import Image

    rt = ctx.runtime
    if req.image:
        path, source = Path(req.image), {"image": Path(req.image).name}
    elif req.generation_id:
        with rt.db.session() as s:
            gen = s.get(Generation, req.generation_id)
            asset = s.get(Asset, gen.asset_id) if gen else None
        if asset is None or asset.kind != "image" or not Path(asset.path).is_file():
            raise NotFoundError(f"generation_id={req.generation_id!r} is not an image in the gallery")
        path, source = Path(asset.path), {"generation_id": req.generation_id}
    else:
        result = generate_images(req.first_frame, ctx.part(0, 2, "first frame"), previews=False)
        first = result.images[0]
        path, source = Path(first.path), {"generated": first.generation_id, "seed": first.seed}
    try:
        with Image.open(path) as im:
            return im.convert("RGB"), {**source, "name": path.name}
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path.name}: not a readable image ({e})") from None


def _video_ctx(req: VideoRequest, ctx: RunContext) -> RunContext:
    return ctx.part(1, 2, "video") if req.first_frame and not (req.image or req.generation_id) else ctx


def _render_camera(req: VideoRequest, ctx: RunContext, image, out: Path) -> dict:
    tmp = out.with_name(f".tmp-first-{out.stem}.png")
    image.save(tmp)
    try:
        size = (req.width, req.height) if req.width and req.height else None
        spec = MotionSpec(
            tmp,
            moves=req.camera_moves,
            strength=req.camera_strength,
            duration=req.duration,
            fps=req.fps or 24,
            size=size,
        )
        vctx = _video_ctx(req, ctx)
        vctx.emit({"step": 0, "total": 1, "desc": "camera move"})
        render_motion(spec, out, timeout=max(120.0, req.duration * 60), cancelled=ctx.is_cancelled)
        vctx.emit({"step": 1, "total": 1, "desc": "camera move"})
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "family": "camera",
        "moves": spec.moves,
        "strength": spec.strength,
        "duration": spec.duration,
        "fps": spec.fps,
    }


def _apply_loras(pipe, req: VideoRequest, rt) -> dict[str, str]:
    """AnimateDiff's SD1.5 LoRAs as PEFT adapters on its UNet/text encoder; name -> A1111 short hash."""
    loras = rt.models.loras()
    hashes = {}
    if hasattr(pipe, "unload_lora_weights"):
        pipe.unload_lora_weights()
    names, weights = [], []
    for i, spec in enumerate(req.loras):
        path = rt.models.roots.resolve("loras", spec.name, loras)
        adapter = f"lora{i}"
        pipe.load_lora_weights(str(path), adapter_name=adapter)
        names.append(adapter)
        weights.append(spec.weight)
        hashes[spec.name] = rt.models.lora_hash(path)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return hashes


def _render_diffusion(req: VideoRequest, ctx: RunContext, image, model, started: float) -> tuple[list, dict]:
    rt = ctx.runtime
    family = VIDEO_FAMILIES[model.family]
    spec = _spec(req, model.family, image)

    spec = check_video_spec(spec)
    base = None
    if model.family == "animatediff":
        name = req.base_model
        path = rt.models.roots.resolve("diffusers", name, rt.models.roots.list_models())
        base = path if path.is_dir() else rt.models.diffusers_folder(path)
    rt.make_room("video")  # a video pipeline needs the GPU to itself
    pipe = rt.video_pipes.get(model, req.mode, base_model=base)
    lora_hashes = _apply_loras(pipe, req, rt) if model.family == "animatediff" else {}
    vctx = _video_ctx(req, ctx)
    callback = rt.step_callback(vctx.emit, ctx.is_cancelled, 0, spec.steps, started, previews=False)
    frames = render_video(  # out of memory: it frees the device and says what to lower
        pipe, spec, plan=rt.plan, callback_on_step_end=callback, cancelled=ctx.is_cancelled
    )
    detail = {
        "family": model.family,
        "family_label": family.label,
        "model": model.name,
        "base_model": req.base_model or None,
        "frames": spec.frames,
        "fps": spec.fps,
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "cfg_scale": spec.guidance,
        "motion_strength": spec.motion_strength if family.uses_motion_strength else None,
        "decode_chunk_size": spec.decode_chunk_size or None,
        "scheduler": type(pipe.scheduler).__name__,
        "loras": [{"name": s.name, "weight": s.weight, "hash": lora_hashes.get(s.name)} for s in req.loras],
    }
    return frames, detail


def _infotext(req: VideoRequest, detail: dict, version: str) -> str:
    params = {
        "Mode": req.mode,
        "Frames": detail.get("frames"),
        "FPS": detail.get("fps"),
        "Seed": req.seed,
        "Steps": detail.get("steps"),
        "CFG scale": detail.get("cfg_scale"),
        "Size": f"{detail['width']}x{detail['height']}" if detail.get("width") else None,
        "Model": detail.get("model"),
        "Family": detail.get("family_label") or detail.get("family"),
        "Motion strength": detail.get("motion_strength"),
        "Camera": "+".join(detail.get("moves") or ()) or None,
        "Interpolated to": f"{req.interpolate_fps} fps" if req.interpolate_fps else None,
        "Version": f"StudioNOVA {version}",
    }
    line = ", ".join(f"{k}: {v}" for k, v in params.items() if v not in (None, ""))
    prompt = req.prompt or (req.first_frame.prompt if req.first_frame else "")
    negative = req.negative_prompt or (req.first_frame.negative_prompt if req.first_frame else "")
    return f"{prompt}\nNegative prompt: {negative}\n{line}" if negative else f"{prompt}\n{line}"


def run_video_job(req: VideoRequest, ctx: RunContext) -> dict:
    rt = ctx.runtime
    started = time.monotonic()
    image, source = _first_frame(req, ctx) if req.needs_first_frame() else (None, {})
    day = utcnow().strftime("%Y-%m-%d")
    out = ctx.outputs / day / f"{ctx.job_id[:12]}-000-{req.seed}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe: dict[str, Any] = {
        "app": "StudioNOVA",
        "version": rt.version,
        "job_id": ctx.job_id,
        "mode": req.mode,
        "request": req.model_dump(mode="json"),
        "seed": req.seed,
        "first_frame": source,
        "device": rt.plan.device,
        "dtype": rt.plan.dtype,
    }
    if req.interpolate_fps:
        recipe["interpolated_fps"] = req.interpolate_fps
    done = _already_done(rt, ctx, out)
    if done is not None:
        return done
    staged = out.with_name(f"{TMP_PREFIX}{out.stem}-raw.mp4")
    try:
        if req.mode == "camera":
            detail = _render_camera(req, ctx, image, staged)
            info = probe(staged)
            detail.update(
                model="camera", width=info.width, height=info.height, frames=round(info.duration * info.fps)
            )
        else:
            model = find_video_model(rt.models.roots.models_dir, req.model)
            frames, detail = _render_diffusion(req, ctx, image, model, started)
            recipe.update(detail)
            infotext = _infotext(req, detail, rt.version)
            meta = {
                "comment": json.dumps({**recipe, **detail}, ensure_ascii=False),
                "description": infotext,
                "title": (req.prompt or req.mode)[:200],
                "software": f"StudioNOVA {rt.version}",
            }
            write_mp4(frames, detail["fps"], staged, metadata=meta, cancelled=ctx.is_cancelled)
        recipe.update(detail)
        infotext = _infotext(req, detail, rt.version)
        if req.mode == "camera":  # render_motion writes no tags: add them while remuxing (no re-encode)
            tag_video(
                staged,
                {
                    "comment": json.dumps(recipe, ensure_ascii=False),
                    "description": infotext,
                    "title": (req.prompt or "camera")[:200],
                },
                cancelled=ctx.is_cancelled,
            )
        if req.interpolate_fps:
            ctx.check_cancelled()
            interpolate_fps(staged, out, req.interpolate_fps, cancelled=ctx.is_cancelled)
        else:
            staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
    thumb = thumbnail_path(out)
    try:
        info = probe(out)
        video_thumbnail(out, thumb)
        asset = file_asset(out, "video", info.width, info.height, ctx.job_id)
        prompt = req.prompt or (req.first_frame.prompt if req.first_frame else "")
        gen = Generation(
            asset_id=asset.id,
            job_id=ctx.job_id,
            mode=req.mode,
            model=detail.get("model") or req.mode,
            model_hash="",
            prompt=prompt,
            negative_prompt=req.negative_prompt,
            seed=None if req.mode == "camera" else req.seed,  # a camera move draws no noise
            steps=int(detail["steps"]) if detail.get("steps") else None,
            cfg_scale=float(detail["cfg_scale"]) if detail.get("cfg_scale") is not None else None,
            sampler=detail.get("scheduler") or None,
            width=info.width,
            height=info.height,
            loras=detail.get("loras") or [],
            infotext=infotext,
            recipe=recipe,
        )
        add_generation(rt.db, asset, gen)
    except BaseException:  # no MP4 without its rows
        out.unlink(missing_ok=True)
        thumb.unlink(missing_ok=True)
        raise
    return _result(rt, asset, gen, info)


def _result(rt, asset, gen, info) -> dict:
    return {
        "file": Path(asset.path).relative_to(rt.outputs_dir).as_posix(),
        "asset_id": asset.id,
        "generation_id": gen.id,
        "frames": round(info.duration * info.fps),
        "fps": info.fps,
        "duration": round(info.duration, 3),
        "width": info.width,
        "height": info.height,
        "seed": gen.seed,
        "family": (gen.recipe or {}).get("family"),
        "infotext": gen.infotext,
    }


def _already_done(rt, ctx: RunContext, out: Path) -> dict | None:
    """A retried job (same id) whose earlier attempt saved its clip returns it, adding no second row."""
    from sqlmodel import select

    if ctx.attempt <= 1:
        return None
    with rt.db.session() as s:
        for asset in s.exec(select(Asset).where(Asset.job_id == ctx.job_id, Asset.kind == "video")):
            gen = s.exec(select(Generation).where(Generation.asset_id == asset.id)).first()
            if gen is not None and Path(asset.path).is_file():
                return _result(rt, asset, gen, probe(asset.path))
    return None
