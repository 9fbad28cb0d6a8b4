"""The variant generator: library videos x audios x hook lines -> a batch of ready-to-post clips.

A batch is one job ("variants"): the plan (which video gets which audio and hook) is fixed when the
request is built, each variant is rendered by engine.media.ffmpeg with its own timeout, progress and
each finished variant are pushed as they complete, one bad input fails only its variant, and the
batch ends with a ZIP of exactly its variants. Batches expire (default 24 h); `cleanup_expired`
(job kind "cleanup") removes their files and asset rows.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from sqlmodel import col, select

from engine.artifacts import atomic_write
from engine.errors import InputError, JobCancelledError, TransientError
from engine.jobs.kinds import RunContext
from engine.media.ffmpeg import VariantSpec, render_variant
from engine.media.library import Library, public_item
from engine.media.motion import MotionSpec, concat_clips, render_motion
from engine.media.text import render_text
from engine.requests import RequestBase
from engine.store.database import Asset, Database, Hook, Job, MediaItem, utcnow

log = logging.getLogger(__name__)

MODES = ("round-robin", "random", "cartesian")
SIZES = ("", "1080x1920", "1920x1080", "1080x1080", "720x1280", "1280x720", "1080x1350")
_SIZE = re.compile(r"^(\d{2,4})x(\d{2,4})$")


class VariantsRequest(RequestBase):
    """What to combine, how, and how each variant looks."""

    videos: list[str] = Field(default_factory=list, description="Library video ids, in order")
    video_collections: list[str] = Field(default_factory=list, description="Video collection ids")
    audios: list[str] = Field(
        default_factory=list, description="Library audio ids (empty = keep the clip's audio)"
    )
    audio_collections: list[str] = Field(default_factory=list, description="Audio collection ids")
    hooks: list[str] = Field(default_factory=list, description="Hook ids")
    hook_categories: list[str] = Field(default_factory=list, description="Hook categories (all their hooks)")
    mode: Literal["round-robin", "random", "cartesian"] = Field(
        default="round-robin", description="round-robin: each video cycles through audios and hooks in order"
    )
    per_video: int = Field(default=1, ge=1, le=50, description="Variants per video (round-robin, random)")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the random mode")
    limit: int = Field(default=100, ge=1, le=2000, description="Most variants one batch may plan")
    audio_mode: Literal["replace", "mix"] = Field(
        default="replace", description="Replace the audio or mix under it"
    )
    audio_volume: float = Field(
        default=1.0, ge=0.0, le=2.0, description="Volume of the new audio in mix mode"
    )
    fade_out_s: float = Field(default=0.5, ge=0.0, le=10.0, description="Audio fade-out at the end, seconds")
    hook_position: Literal["top", "center", "bottom"] = Field(default="bottom")
    hook_start: float = Field(default=0.0, ge=0.0, le=3600.0, description="Hook shown from (seconds)")
    hook_duration: float = Field(
        default=0.0, ge=0.0, le=3600.0, description="Hook shown for (0 = to the end)"
    )
    font_size: int = Field(
        default=0, ge=0, le=400, description="Hook font size in px (0 = 5.5% of frame width)"
    )
    color: str = Field(default="#ffffff", description="Hook text colour (#rrggbb)")
    outline_color: str = Field(default="#000000", description="Hook outline colour (#rrggbb)")
    outline_width: int = Field(default=3, ge=0, le=30)
    margin: float = Field(
        default=0.08, ge=0.0, le=0.3, description="Safe margin, fraction of the frame height"
    )
    output_size: str = Field(
        default="", description="WxH, e.g. 1080x1920 (9:16); empty = keep the clip's size"
    )
    fit: Literal["crop", "pad"] = Field(default="crop", description="How to reach output_size")
    expire_hours: float = Field(
        default=24.0, ge=0.01, le=24 * 365, description="Batch files are removed after"
    )

    @field_validator(
        "videos",
        "video_collections",
        "audios",
        "audio_collections",
        "hooks",
        "hook_categories",
        mode="before",
    )
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("color", "outline_color")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", v or ""):
            raise ValueError("must be a colour like #ffcc00")
        return v.lower()

    @field_validator("output_size")
    @classmethod
    def _size(cls, v: str) -> str:
        return check_size(v)

    def size(self) -> tuple[int, int] | None:
        return tuple(int(x) for x in self.output_size.split("x")) if self.output_size else None  # type: ignore[return-value]


def check_size(v: str) -> str:
    """ "" or "WxH" with even sides, 64-3840."""
    v = (v or "").strip().lower()
    if v and not _SIZE.match(v):
        raise ValueError(f"must be WxH like 1080x1920 (presets: {', '.join(s for s in SIZES if s)})")
    if v:
        w, h = (int(x) for x in v.split("x"))
        if w % 2 or h % 2 or not (64 <= w <= 3840 and 64 <= h <= 3840):
            raise ValueError("width and height must be even, 64-3840")
    return v


@dataclass(frozen=True)
class Assignment:
    index: int
    video: MediaItem
    audio: MediaItem | None
    hook: Hook | None

    def describe(self) -> dict:
        return {
            "index": self.index,
            "video": self.video.name,
            "video_id": self.video.id,
            "audio": self.audio.name if self.audio else "",
            "audio_id": self.audio.id if self.audio else "",
            "hook": self.hook.text if self.hook else "",
            "hook_id": self.hook.id if self.hook else "",
        }


def _ordered_unique(items: list) -> list:
    seen: set[str] = set()
    return [i for i in items if not (i.id in seen or seen.add(i.id))]


def _media(lib: Library, ids: list[str], collections: list[str], kind: str) -> list[MediaItem]:
    out: list[MediaItem] = []
    for item_id in ids:
        item = lib.item(item_id)
        if item.kind != kind:
            raise InputError(f"{item.name!r} is a {item.kind}, not a {kind}")
        out.append(item)
    for cid in collections:
        lib.collection(cid, kind=kind)
        out += sorted(lib.items(kind=kind, collection_id=cid), key=lambda i: (i.created_at, i.name))
    return _ordered_unique(out)


def plan(req: VariantsRequest, lib: Library) -> list[Assignment]:
    """The exact list of variants the request makes, or an InputError (nothing selected, over the limit)."""
    videos = _media(lib, req.videos, req.video_collections, "video")
    audios = _media(lib, req.audios, req.audio_collections, "audio")
    known = {h.id: h for h in lib.hooks()}
    missing = [h for h in req.hooks if h not in known]
    if missing:
        raise InputError(f"hooks not found: {', '.join(missing)}")
    hooks = [known[h] for h in req.hooks]
    for category in req.hook_categories:
        found = lib.hooks(category=category)
        if not found:
            raise InputError(
                f"hook category {category!r} has no hooks; categories: {', '.join(lib.hook_categories())}"
            )
        hooks += found
    hooks = _ordered_unique(hooks)
    if not videos:
        raise InputError("no videos selected: pick library videos or a video collection")
    a_or_none: list = audios or [None]
    h_or_none: list = hooks or [None]
    if req.mode == "cartesian":
        combos = list(itertools.product(videos, a_or_none, h_or_none))
    else:
        n = len(videos) * req.per_video
        rng = random.Random(req.seed)
        combos = []
        for k in range(n):
            video = videos[k // req.per_video]
            if req.mode == "round-robin":
                combos.append((video, a_or_none[k % len(a_or_none)], h_or_none[k % len(h_or_none)]))
            else:
                combos.append((video, rng.choice(a_or_none), rng.choice(h_or_none)))
    if len(combos) > req.limit:
        raise InputError(
            f"this selection makes {len(combos)} variants ({req.mode}); the limit is {req.limit}: "
            "raise the limit or pick fewer videos, audios or hooks"
        )
    return [Assignment(i, v, a, h) for i, (v, a, h) in enumerate(combos)]


def batch_dir(outputs_dir: Path, job_id: str) -> Path:
    return Path(outputs_dir) / "variants" / job_id


def _render_one(a: Assignment, req: VariantsRequest, folder: Path, ctx: RunContext) -> Path:
    video = Path(a.video.path)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", a.video.name).strip("-")[:40] or "video"
    out = folder / f"{a.index + 1:03d}-{stem}.mp4"
    overlay = None
    if a.hook is not None:
        width = req.size()[0] if req.size() else (a.video.width or 1080)
        image = render_text(
            a.hook.text,
            frame_width=width,
            font_size=req.font_size or max(12, round(width * 0.055)),
            color=req.color,
            outline_color=req.outline_color,
            outline_width=req.outline_width,
        )
        overlay = folder / f".hook-{a.index + 1:03d}.png"
        with atomic_write(overlay) as f:
            image.save(f, format="PNG")
    try:
        spec = VariantSpec(
            video=video,
            audio=Path(a.audio.path) if a.audio else None,
            audio_mode=req.audio_mode,
            audio_volume=req.audio_volume,
            fade_out_s=req.fade_out_s,
            overlay=overlay,
            overlay_position=req.hook_position,
            overlay_margin=req.margin,
            overlay_start=req.hook_start,
            overlay_duration=req.hook_duration or None,
            output_size=req.size(),
            fit=req.fit,
        )
        timeout = max(120.0, (a.video.duration or 60.0) * 20)
        render_variant(spec, out, timeout=timeout, cancelled=ctx.is_cancelled)
    finally:
        if overlay is not None:
            overlay.unlink(missing_ok=True)
    return out


def ffmpeg_parallel(settings) -> int:
    """How many variants render at once: one ffmpeg leaves part of the cores idle (x264 at veryfast, the
    decoder and the overlay filter do not fill two cores), so two overlap; the setting overrides."""
    import os

    chosen = getattr(settings, "ffmpeg_parallel", 0) or 0
    return chosen if chosen > 0 else (2 if (os.cpu_count() or 1) >= 2 else 1)


def _render_row(a: Assignment, req: VariantsRequest, folder: Path, ctx: RunContext) -> dict:
    """Render one variant and record its asset; its failure (bad input, ffmpeg error) is its row's error."""
    rt = ctx.runtime
    row = a.describe()
    try:
        out = _render_one(a, req, folder, ctx)
        # "file" (relative to outputs/), never "path": API clients read a dict with a path as a file to fetch
        row.update(ok=True, file=out.relative_to(ctx.outputs).as_posix(), size=out.stat().st_size, error="")
        with rt.db.session() as s:
            s.add(Asset(kind="video", path=str(out), sha256="", size=out.stat().st_size, job_id=ctx.job_id))
            s.commit()
    except JobCancelledError:
        raise
    except (InputError, TransientError, OSError) as e:  # this variant fails; the batch goes on
        log.warning("variant %d of job %s failed: %s", a.index + 1, ctx.job_id, e)
        row.update(ok=False, file="", size=0, error=str(e))
    return row


def run_variants_job(req: VariantsRequest, ctx: RunContext) -> dict:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    rt = ctx.runtime
    lib = ctx.library
    assignments = plan(req, lib)
    folder = batch_dir(ctx.outputs, ctx.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    total = len(assignments)
    pending_assignments = list(assignments)
    # Variants render `parallel` at a time, started in plan order; each is reported as soon as it is done.
    parallel = ffmpeg_parallel(rt.settings)
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="variant") as pool:
        running = set()
        try:
            while pending_assignments or running:
                while pending_assignments and len(running) < parallel:
                    ctx.check_cancelled()
                    running.add(pool.submit(_render_row, pending_assignments.pop(0), req, folder, ctx))
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(
                    finished, key=lambda f: f.result()["index"] if not f.exception() else -1
                ):
                    row = future.result()  # JobCancelledError (or a bug) propagates, after the others stop
                    results.append(row)
                    ctx.emit(
                        {
                            "step": len(results),
                            "total": total,
                            "desc": f"variant {len(results)}/{total}",
                            "variant": row,
                        }
                    )
        except BaseException:
            for future in running:
                future.cancel()
            raise
    results.sort(key=lambda r: r["index"])
    done = [r for r in results if r["ok"]]
    if not done:
        raise InputError(f"all {total} variants failed; first error: {results[0]['error']}")
    archive = folder / f"batch-{ctx.job_id[:8]}.zip"
    with atomic_write(archive) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for r in done:  # mp4 is already compressed: stored, so zipping is a copy
            z.write(ctx.outputs / r["file"], arcname=Path(r["file"]).name)
    expires = utcnow() + timedelta(hours=req.expire_hours)
    return {
        "batch_id": ctx.job_id,
        "variants": results,
        "ok": len(done),
        "failed": total - len(done),
        "zip": archive.relative_to(ctx.outputs).as_posix(),
        "expires_at": expires.isoformat(),
    }


def library_root(outputs_dir: Path) -> Path:
    """The library lives under outputs/ (served to the UI like every output; never listed by the gallery)."""
    return Path(outputs_dir) / "library"


# --- expiry -------------------------------------------------------------------------------------
class CleanupRequest(RequestBase):
    """Remove expired variant batches (files and asset rows)."""


def expired_batches(db: Database, now=None) -> list[Job]:
    """Finished variants jobs past their expiry whose files are still there."""
    from datetime import datetime

    now = now or utcnow()
    done = ("succeeded", "failed", "cancelled")
    with db.session() as s:
        jobs = list(s.exec(select(Job).where(Job.kind == "variants", col(Job.status).in_(done))))
    out = []
    for job in jobs:
        result = job.result or {}
        if result.get("expired"):
            continue
        if result.get("expires_at"):
            expires_at = datetime.fromisoformat(result["expires_at"])
        elif job.finished_at is not None:  # failed/cancelled: partial files, the default expiry
            expires_at = job.finished_at + timedelta(hours=24)
        else:
            continue
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=now.tzinfo)
        if expires_at <= now:
            out.append(job)
    return out


def cleanup_expired(db: Database, outputs_dir: Path, now=None) -> int:
    """Every expired batch: its folder and asset rows go; the job row stays (history, usage) with
    `result.expired` set. Returns how many batches were removed."""
    jobs = expired_batches(db, now)
    for job in jobs:
        with db.session() as s:
            for asset in s.exec(select(Asset).where(Asset.job_id == job.id)):
                s.delete(asset)
            row = s.get(Job, job.id)
            row.result = {**(row.result or {}), "expired": True}
            s.add(row)
            s.commit()
        shutil.rmtree(batch_dir(outputs_dir, job.id), ignore_errors=True)
    return len(jobs)


def run_cleanup_job(req: CleanupRequest, ctx: RunContext) -> dict:
    return {"removed": cleanup_expired(ctx.runtime.db, ctx.outputs)}


# --- camera motion clips (image -> video) ----------------------------------------------------------
class MotionClipRequest(RequestBase):
    """A library image -> a video clip with a camera move, saved into the video library."""

    image_id: str = Field(description="Library image id")
    moves: str = Field(
        default="zoom_in", description="static, zoom_in, zoom_out, pan_left/right/up/down; combine with +"
    )
    strength: float = Field(default=0.25, ge=0.05, le=1.0, description="How far the camera travels")
    duration: float = Field(default=4.0, ge=0.5, le=120.0, description="Seconds")
    fps: int = Field(default=30, ge=1, le=60)
    output_size: str = Field(default="", description="WxH (even), e.g. 1080x1920; empty = the image's size")
    ease: bool = Field(default=True, description="Ease in and out")
    name: str = Field(
        default="", max_length=200, description="Name of the new clip (empty = image name + move)"
    )

    @field_validator("output_size")
    @classmethod
    def _size(cls, v: str) -> str:
        return check_size(v)


def _clip_into_library(ctx: RunContext, lib: Library, render, name: str, tags: list[str]) -> dict:
    """Run `render(target_path) -> MediaInfo` into a temp folder in the library, add the result as a
    video item and return it as the API shows it; progress: 0/1 while rendering, 1/1 when saved."""
    import tempfile

    ctx.emit({"step": 0, "total": 1, "desc": "rendering"})
    with tempfile.TemporaryDirectory(prefix=".tmp-clip-", dir=lib.root) as tmp:
        info = render(Path(tmp) / "clip.mp4")
        item = lib.add_file(info.path, name=name, tags=tags)
    ctx.emit({"step": 1, "total": 1, "desc": "saved"})
    return public_item(item, lib.root)


def _size_tuple(output_size: str) -> tuple[int, int] | None:
    return tuple(int(x) for x in output_size.split("x")) if output_size else None  # type: ignore[return-value]


def run_motion_job(req: MotionClipRequest, ctx: RunContext) -> dict:
    lib = ctx.library
    image = lib.item(req.image_id)
    if image.kind != "image":
        raise InputError(f"{image.name!r} is a {image.kind}; camera motion starts from an image")
    spec = MotionSpec(
        Path(image.path),
        moves=req.moves,
        strength=req.strength,
        duration=req.duration,
        fps=req.fps,
        size=_size_tuple(req.output_size),
        ease=req.ease,
    )
    return _clip_into_library(
        ctx,
        lib,
        lambda target: render_motion(
            spec, target, timeout=max(120.0, req.duration * 60), cancelled=ctx.is_cancelled
        ),
        name=req.name or f"{image.name} · {req.moves}",
        tags=["motion"],
    )


class JoinClipsRequest(RequestBase):
    """Library clips joined in order, optionally under a library audio and with subtitles burned in."""

    clips: list[str] = Field(description="Library video ids, in order")
    audio: str = Field(default="", description="Library audio id laid under the whole (empty = silent)")
    subtitles: str | None = Field(default=None, description="An uploaded .srt file to burn in")
    output_size: str = Field(default="", description="WxH (even); empty = the first clip's size")
    fps: int = Field(default=30, ge=1, le=60)
    name: str = Field(default="", max_length=200, description="Name of the new clip")

    @field_validator("clips", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("output_size")
    @classmethod
    def _size(cls, v: str) -> str:
        return check_size(v)


def run_join_job(req: JoinClipsRequest, ctx: RunContext) -> dict:
    lib = ctx.library
    clips = [lib.item(i) for i in req.clips]
    for c in clips:
        if c.kind != "video":
            raise InputError(f"{c.name!r} is a {c.kind}; only videos can be joined")
    audio = lib.item(req.audio) if req.audio else None
    if audio is not None and audio.kind != "audio":
        raise InputError(f"audio={audio.name!r} is a {audio.kind}, not an audio")
    return _clip_into_library(
        ctx,
        lib,
        lambda target: concat_clips(
            [Path(c.path) for c in clips],
            target,
            audio=Path(audio.path) if audio else None,
            subtitles=Path(req.subtitles) if req.subtitles else None,
            size=_size_tuple(req.output_size),
            fps=req.fps,
            timeout=max(300.0, sum(c.duration or 60 for c in clips) * 20),
            cancelled=ctx.is_cancelled,
        ),
        name=req.name or f"joined: {', '.join(c.name for c in clips)[:150]}",
        tags=["joined"],
    )
