"""The "upscale" job: images (uploads or gallery generations) and videos through an upscaler.

Upscalers: "Lanczos" (always there), any Real-ESRGAN family model spandrel loads from models/upscale_models
(tiled, see engine.upscale.upscalers), and the SD x4 upscaler (a diffusers StableDiffusionUpscalePipeline folder in
models/diffusers, generative: prompt and noise level). Results keep the source's metadata: the PNG's A1111
`parameters` chunk as it was, a `postprocessing` chunk as A1111's Extras tab writes it ("Postprocess upscale
by: 4, Postprocess upscaler: ..."), and the recipe with an `upscale` step added to its `postprocess` list.
Each result is an Asset + a Generation row (mode "upscale") so the gallery shows it beside its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from engine.artifacts import save_png
from engine.errors import InputError, NotFoundError
from engine.gallery.pnginfo import PARAMETERS_CHUNK, RECIPE_CHUNK, read_image_metadata, recipe_of
from engine.gallery.records import add_generation, ensure_thumbnail, file_asset, thumbnail_path
from engine.jobs.kinds import RunContext
from engine.media.clips import read_metadata, video_thumbnail
from engine.media.ffmpeg import VIDEO_SUFFIXES, probe, tag_video
from engine.requests import MAX_SEED, RequestBase
from engine.store.database import Asset, Generation, utcnow
from engine.upscale.upscalers import (
    LANCZOS,
    check_output_size,
    inspect_upscaler,
    load_sd_x4,
    sd_x4_upscale,
    upscale_image,
    upscale_video,
)

SD_X4_PREFIX = "SD x4: "
SD_X4_CLASS = "StableDiffusionUpscalePipeline"
POSTPROCESSING_CHUNK = "postprocessing"  # A1111's Extras tab writes its infotext into this PNG text chunk


class UpscaleRequest(RequestBase):
    """What to upscale (any mix of images, gallery generations and one video) and how."""

    images: list[str] = Field(default_factory=list, description="Uploaded image files")
    generation_ids: list[str] = Field(
        default_factory=list, description="Gallery generations (images or videos)"
    )
    video: str | None = Field(
        default=None, description="An uploaded video: upscaled frame by frame, audio kept"
    )
    upscaler: str = Field(
        default="Lanczos", description="Lanczos, a model in models/upscale_models, or 'SD x4: <model>'"
    )
    scale: float = Field(default=4.0, ge=0.0, le=16.0, description="Output scale (0 = use width/height)")
    width: int = Field(default=0, ge=0, le=16384, description="Target width (with height, instead of scale)")
    height: int = Field(default=0, ge=0, le=16384, description="Target height (with width, instead of scale)")
    tile: int = Field(default=0, ge=0, le=4096, description="Tile size in input px (0 = by free memory)")
    prompt: str = Field(default="", max_length=4000, description="SD x4: what the image shows")
    negative_prompt: str = Field(default="", max_length=4000, description="SD x4: negative prompt")
    noise_level: int = Field(default=20, ge=0, le=350, description="SD x4: noise added to the input (0-350)")
    steps: int = Field(default=20, ge=1, le=150, description="SD x4: denoising steps")
    cfg_scale: float = Field(default=9.0, ge=0.0, le=30.0, description="SD x4: guidance scale")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="SD x4: seed")

    @field_validator("images", "generation_ids", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.replace("\n", ",").split(",") if p.strip()]
        return [p for p in v if p] if isinstance(v, list) else v

    @field_validator("tile")
    @classmethod
    def _tile(cls, v: int) -> int:
        if v and v < 64:
            raise ValueError("must be 0 (chosen from free memory) or 64-4096 input px")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not (self.images or self.generation_ids or self.video):
            raise ValueError("nothing to upscale: give images, generation_ids or a video")
        if bool(self.width) != bool(self.height):
            raise ValueError(f"width={self.width} height={self.height}: give both (a target size) or neither")
        if not self.width and not self.scale:
            raise ValueError("scale=0 needs width and height (a target size); or give a scale of 1-16")
        if self.scale and not self.width and self.scale < 1:
            raise ValueError(f"scale={self.scale:g}: must be 1-16 (or 0 with a target width and height)")
        return self

    def target(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width else None

    def describe_scale(self) -> dict[str, str]:
        if self.width:
            return {"Postprocess upscale to": f"{self.width}x{self.height}"}
        return {"Postprocess upscale by": f"{self.scale:g}"}


# --- upscalers ---------------------------------------------------------------------------------------
def sd_x4_folders(roots) -> dict[str, Path]:
    """Diffusers folders holding the SD x4 upscaler (by their model_index.json)."""
    out = {}
    for name, path in roots.list_diffusers_folders().items():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError):
            continue
        if index.get("_class_name") == SD_X4_CLASS:
            out[name] = path
    return out


def list_upscalers(roots) -> list[dict]:
    """Every upscaler with its kind, architecture and scale (a file spandrel cannot read is listed with
    its error, so the user sees why it does not work)."""
    rows: list[dict] = [
        {"name": LANCZOS, "kind": "lanczos", "architecture": "Lanczos (Pillow)", "scale": 0, "error": ""}
    ]
    for name, path in roots.list_files("upscale_models").items():
        try:
            info = inspect_upscaler(path, name)
            rows.append(
                {
                    "name": name,
                    "kind": "model",
                    "architecture": info.architecture,
                    "scale": info.scale,
                    "error": "",
                }
            )
        except InputError as e:
            rows.append({"name": name, "kind": "model", "architecture": "?", "scale": 0, "error": str(e)})
    for name in sd_x4_folders(roots):
        rows.append(
            {
                "name": SD_X4_PREFIX + name,
                "kind": "sd_x4",
                "architecture": "Stable Diffusion x4 upscaler",
                "scale": 4,
                "error": "",
            }
        )
    return rows


def resolve_upscaler(roots, name: str) -> tuple[str, Path | None]:
    """(kind, path): kind "lanczos" (no path), "model" (a spandrel file) or "sd_x4" (a diffusers folder)."""
    name = (name or "").strip()
    if not name or name.lower() == LANCZOS.lower():
        return "lanczos", None
    if name.startswith(SD_X4_PREFIX):
        folders = sd_x4_folders(roots)
        key = name.removeprefix(SD_X4_PREFIX)
        if key not in folders:
            raise NotFoundError(
                f"upscaler {name!r}: no SD x4 upscaler folder {key!r} in models/diffusers; "
                f"available: {', '.join(SD_X4_PREFIX + n for n in folders) or 'none'}"
            )
        return "sd_x4", folders[key]
    files = roots.list_files("upscale_models")
    if name not in files:
        choices = [LANCZOS, *files, *(SD_X4_PREFIX + n for n in sd_x4_folders(roots))]
        raise NotFoundError(
            f"upscaler {name!r} is not in models/upscale_models; available: {', '.join(choices)}"
        )
    return "model", files[name]


# --- sources -----------------------------------------------------------------------------------------
def _sources(req: UpscaleRequest, db) -> list[dict]:
    """Each input as {"path", "kind" (image|video), "generation" (the source row or None), "label"}."""
    out = [{"path": Path(p), "kind": "image", "generation": None, "label": Path(p).name} for p in req.images]
    with db.session() as s:
        for gid in req.generation_ids:
            gen = s.get(Generation, gid)
            if gen is None:
                raise NotFoundError(f"generation {gid!r} does not exist (pick one in the gallery)")
            asset = s.get(Asset, gen.asset_id)
            if asset is None or not Path(asset.path).is_file():
                raise NotFoundError(f"generation {gid!r}: its file is gone")
            kind = "video" if asset.kind == "video" else "image"
            out.append(
                {
                    "path": Path(asset.path),
                    "kind": kind,
                    "generation": gen.model_dump(),
                    "label": Path(asset.path).name,
                }
            )
    if req.video:
        out.append(
            {"path": Path(req.video), "kind": "video", "generation": None, "label": Path(req.video).name}
        )
    return out


def _open_image(path: Path):
    """(upright PIL image, its metadata): PNG text chunks as they are; A1111 infotext and the recipe of a
    JPEG/WebP (EXIF UserComment, XMP) under the PNG names, so the upscaled PNG carries them; the ICC profile."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            info = {k: v for k, v in im.info.items() if isinstance(v, str)}
            icc = im.info.get("icc_profile")
            image = ImageOps.exif_transpose(im)  # a phone photo is upscaled the way it is shown
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path.name}: not a readable image ({e}); allowed: PNG, JPEG, WebP") from None
    if PARAMETERS_CHUNK not in info or RECIPE_CHUNK not in info:
        meta = read_image_metadata(path)
        if meta.infotext and PARAMETERS_CHUNK not in info:
            info[PARAMETERS_CHUNK] = meta.infotext
        recipe = recipe_of(meta.raw)
        if recipe and RECIPE_CHUNK not in info:
            info[RECIPE_CHUNK] = json.dumps(recipe, ensure_ascii=False)
    return image, info, icc


def _source_recipe(info: dict, generation: dict | None) -> dict:
    if generation and generation.get("recipe"):
        return dict(generation["recipe"])
    try:
        return dict(json.loads(info.get(RECIPE_CHUNK) or "{}"))
    except ValueError:
        return {}


# --- the job -----------------------------------------------------------------------------------------
class _Upscaler:
    """One upscaler loaded for the job; `image(pil, progress)` and `frame(pil)` run it."""

    def __init__(self, req: UpscaleRequest, ctx: RunContext):
        rt = ctx.runtime
        self.req, self.ctx = req, ctx
        self.kind, self.path = resolve_upscaler(rt.models.roots, req.upscaler)
        self.name = req.upscaler if self.kind != "lanczos" else "Lanczos"
        self.pipe = None
        self.max_pixels = getattr(rt.settings, "max_upscale_pixels", 4096 * 4096)
        if self.kind == "sd_x4":
            rt.make_room("upscale_sd_x4")  # an image pipeline and the x4 upscaler rarely fit one GPU together
            self.pipe = load_sd_x4(self.path, rt.plan)
        elif self.kind == "model":
            rt.make_room("upscale")
            self.info = inspect_upscaler(self.path, req.upscaler)

    def image(self, image, progress=None):
        rt, req = self.ctx.runtime, self.req
        with rt.oom_guard("lower the tile size or the scale, or use --cpu-offload"):
            if self.kind == "sd_x4":
                check_output_size(
                    image.width,
                    image.height,
                    scale=0.0 if req.width else req.scale,
                    target=req.target(),
                    max_pixels=self.max_pixels,
                )
                return sd_x4_upscale(
                    self.pipe,
                    image,
                    prompt=req.prompt,
                    negative_prompt=req.negative_prompt,
                    noise_level=req.noise_level,
                    steps=req.steps,
                    guidance_scale=req.cfg_scale,
                    seed=req.seed,
                    tile=req.tile or 128,
                    scale=req.scale or 4.0,
                    target=req.target(),
                    progress=progress,
                    cancelled=self.ctx.is_cancelled,
                )
            return upscale_image(
                image,
                self.path,
                scale=0.0 if req.width else req.scale,
                target=req.target(),
                plan=rt.plan,
                cache=rt.upscalers,  # the worker's: a model stays loaded between jobs
                tile=req.tile,
                progress=progress,
                cancelled=self.ctx.is_cancelled,
                max_pixels=self.max_pixels,
            )


def _save_image(ctx: RunContext, up: _Upscaler, src: dict, result, n: int) -> dict:
    rt, req = ctx.runtime, up.req
    image, info, icc, source_size = result
    gen = src["generation"]
    recipe = _source_recipe(info, gen)
    step = {
        "op": "upscale",
        "upscaler": up.name,
        "kind": up.kind,
        "scale": req.scale if not req.width else None,
        "target": list(req.target()) if req.target() else None,
        "tile": req.tile,
        "source": src["label"],
        "source_size": list(source_size),
        "size": [image.width, image.height],
        "source_generation": gen["id"] if gen else None,
        "job_id": ctx.job_id,
        "app_version": rt.version,
    }
    if up.kind == "sd_x4":
        step.update(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            noise_level=req.noise_level,
            steps=req.steps,
            cfg_scale=req.cfg_scale,
            seed=req.seed,
        )
    recipe = {**recipe, "postprocess": [*recipe.get("postprocess", []), step]}
    pp = {**req.describe_scale(), "Postprocess upscaler": up.name}
    chunks = {
        k: v for k, v in info.items() if isinstance(v, str) and k not in (RECIPE_CHUNK, POSTPROCESSING_CHUNK)
    }
    parameters = chunks.get(PARAMETERS_CHUNK) or (gen or {}).get("infotext") or ""
    if parameters:
        chunks[PARAMETERS_CHUNK] = parameters
    chunks[POSTPROCESSING_CHUNK] = ", ".join(f"{k}: {v}" for k, v in pp.items())
    chunks[RECIPE_CHUNK] = json.dumps(recipe, ensure_ascii=False)
    day = utcnow().strftime("%Y-%m-%d")
    path = ctx.outputs / day / f"{ctx.job_id[:12]}-{n:03d}-upscaled.png"
    save_png(image, path, chunks, icc_profile=icc)
    asset = file_asset(path, "image", image.width, image.height, ctx.job_id)
    row = _generation_row(asset, ctx, gen, recipe, parameters, image.width, image.height, up.name)
    ensure_thumbnail(path)
    add_generation(rt.db, asset, row)
    return _item(rt, asset, row, src["label"], up)


def _generation_row(
    asset,
    ctx: RunContext,
    gen: dict | None,
    recipe: dict,
    infotext: str,
    width: int,
    height: int,
    upscaler: str,
):

    base = (
        {
            k: gen[k]
            for k in (
                "model",
                "model_hash",
                "prompt",
                "negative_prompt",
                "seed",
                "steps",
                "cfg_scale",
                "sampler",
                "clip_skip",
                "loras",
                "character",
            )
        }
        if gen
        else {}
    )
    if not gen:  # an upload: no sampling to record, unless SD x4 sampled it (its step holds how)
        step = (recipe.get("postprocess") or [{}])[-1]
        sampled = step.get("kind") == "sd_x4" and "steps" in step
        base = {
            "model": upscaler,
            "model_hash": "",
            "prompt": step.get("prompt", "") if sampled else "",
            "negative_prompt": step.get("negative_prompt", "") if sampled else "",
            "seed": step["seed"] if sampled else None,
            "steps": step["steps"] if sampled else None,
            "cfg_scale": step["cfg_scale"] if sampled else None,
            "sampler": None,
            "clip_skip": 1,
            "loras": [],
            "character": None,
        }
    return Generation(
        asset_id=asset.id,
        job_id=ctx.job_id,
        mode="upscale",
        width=width,
        height=height,
        infotext=infotext,
        recipe=recipe,
        **base,
    )


def _item(rt, asset, row, label: str, up: _Upscaler) -> dict:
    """One result as the job returns it ("file" relative to outputs/, never a server path)."""
    item = {
        "kind": asset.kind,
        "file": Path(asset.path).relative_to(rt.outputs_dir).as_posix(),
        "asset_id": asset.id,
        "generation_id": row.id,
        "width": asset.width,
        "height": asset.height,
        "source": label,
    }
    if up.kind == "sd_x4":
        item["seed"] = up.req.seed
    return item


def _already_done(rt, ctx: RunContext, n: int, label: str, up: _Upscaler) -> dict | None:
    """A retried job (same id) keeps the items its earlier attempt finished: no second row for one file."""
    from sqlmodel import select

    if ctx.attempt <= 1:
        return None
    marker = f"{ctx.job_id[:12]}-{n:03d}-upscaled."
    with rt.db.session() as s:
        for asset in s.exec(select(Asset).where(Asset.job_id == ctx.job_id)):
            if Path(asset.path).name.startswith(marker) and Path(asset.path).is_file():
                row = s.exec(select(Generation).where(Generation.asset_id == asset.id)).first()
                if row is not None:
                    return _item(rt, asset, row, label, up)
    return None


def _upscale_video(ctx: RunContext, up: _Upscaler, src: dict, n: int, part: RunContext) -> dict:
    rt, req = ctx.runtime, up.req
    info = probe(src["path"])  # a corrupt or truncated video is refused here, naming the file
    day = utcnow().strftime("%Y-%m-%d")
    out = ctx.outputs / day / f"{ctx.job_id[:12]}-{n:03d}-upscaled.mp4"

    def progress(done: int, frames: int) -> None:
        part.emit({"step": done, "total": max(frames, 1), "desc": f"{src['label']}: frame {done}/{frames}"})

    result = upscale_video(
        src["path"],
        out,
        lambda frame: up.image(frame),
        timeout=max(600.0, info.duration * 600),
        cancelled=ctx.is_cancelled,
        progress=progress,
    )
    thumb = thumbnail_path(out)
    try:
        gen = src["generation"]
        recipe = dict((gen or {}).get("recipe") or {})
        if not recipe:  # an uploaded clip: the recipe its own container carries, if any
            try:
                recipe = json.loads(read_metadata(src["path"]).get("comment") or "{}")
            except ValueError:
                recipe = {}
            recipe = recipe if isinstance(recipe, dict) else {}
        step = {
            "op": "upscale",
            "upscaler": up.name,
            "kind": up.kind,
            "scale": req.scale if not req.width else None,
            "target": list(req.target()) if req.target() else None,
            "source": src["label"],
            "source_size": [info.width, info.height],
            "size": [result.width, result.height],
            "fps": result.fps,
            "source_generation": gen["id"] if gen else None,
            "job_id": ctx.job_id,
        }
        recipe = {**recipe, "postprocess": [*recipe.get("postprocess", []), step]}
        tag_video(out, {"comment": json.dumps(recipe, ensure_ascii=False)}, cancelled=ctx.is_cancelled)
        asset = file_asset(out, "video", result.width, result.height, ctx.job_id)
        row = _generation_row(
            asset, ctx, gen, recipe, (gen or {}).get("infotext", ""), result.width, result.height, up.name
        )
        video_thumbnail(out, thumb)
        add_generation(rt.db, asset, row)
    except BaseException:  # no MP4 without its rows
        out.unlink(missing_ok=True)
        thumb.unlink(missing_ok=True)
        raise
    item = _item(rt, asset, row, src["label"], up)
    item.update(fps=result.fps, duration=result.duration, has_audio=result.has_audio)
    return item


def run_upscale_job(req: UpscaleRequest, ctx: RunContext) -> dict:
    rt = ctx.runtime
    sources = _sources(req, rt.db)
    up = _Upscaler(req, ctx)
    results: list[dict] = []
    total = len(sources)
    for n, src in enumerate(sources):
        ctx.check_cancelled()
        part = ctx.part(n, total, "item")  # tiles or frames of this item, on the whole job's bar
        done = _already_done(rt, ctx, n, src["label"], up)
        if done is not None:
            results.append(done)
        elif src["kind"] == "video" or src["path"].suffix.lower() in VIDEO_SUFFIXES:
            results.append(_upscale_video(ctx, up, src, n, part))
        else:
            image, info, icc = _open_image(src["path"])

            def tiles(count_done: int, count: int, part=part, label=src["label"]) -> None:
                part.emit(
                    {
                        "step": count_done,
                        "total": max(count, 1),
                        "desc": f"{label}: tile {count_done}/{count}",
                    }
                )

            out = up.image(image, progress=tiles)
            results.append(_save_image(ctx, up, src, (out, info, icc, image.size), n))
        ctx.emit({"step": n + 1, "total": total, "desc": f"upscaled {n + 1}/{total}", "item": results[-1]})
    return {"items": results, "upscaler": up.name, "seed": req.seed if up.kind == "sd_x4" else None}
