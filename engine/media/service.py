"""The media factory's engine side before and around its jobs: checked variant, motion-clip and join-clips
requests, text to speech into the library, a finished batch's ZIP, and the timer that queues the cleanup of
expired batches."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from engine.errors import InputError, NotFoundError
from engine.jobs.service import JobService
from engine.media.library import Library, public_item
from engine.media.tts import SpeechRequest, speak
from engine.media.variants import (
    Assignment,
    CleanupRequest,
    JoinClipsRequest,
    MotionClipRequest,
    VariantsRequest,
    expired_batches,
    plan,
)
from engine.settings import Settings
from engine.store.database import Database
from engine.uploads import checked_upload

log = logging.getLogger(__name__)


def variants_request(values: dict[str, Any], library: Library) -> tuple[VariantsRequest, list[Assignment]]:
    req = VariantsRequest.build(**values)
    return req, plan(req, library)  # nothing selected, unknown ids, over the limit: refused now


def preview_variants(values: dict[str, Any], library: Library) -> dict:
    """How many variants a selection makes and which, without rendering anything."""
    req, assignments = variants_request(values, library)
    return {"count": len(assignments), "mode": req.mode, "variants": [a.describe() for a in assignments]}


def speak_to_library(
    values: dict[str, Any], settings: Settings, library: Library, name: str, tags: str, collection_id: str
) -> dict:
    """Text to speech (built-in espeak-ng voice or an OpenAI-compatible server), saved as a library audio."""
    req = SpeechRequest(**values)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-speech-", dir=settings.cache_dir))
    try:
        result = speak(req, tmp / "speech.wav")
        words = " ".join(req.text.split()[:6])
        item = library.add_file(
            result.path,
            name=name or f"speech: {words}",
            tags=tags,
            collection_id=collection_id or None,
            kind="audio",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **public_item(item, library.root),
        "voice": result.voice,
        "backend": result.backend,
        "sample_rate": result.sample_rate,
        "speech_seconds": round(result.duration, 3),
    }


def motion_clip_request(values: dict[str, Any], library: Library) -> MotionClipRequest:
    req = MotionClipRequest.build(**values)
    if library.item(req.image_id).kind != "image":
        raise InputError(f"image_id={req.image_id!r} is not an image in the library")
    return req


def join_clips_request(values: dict[str, Any], settings: Settings, library: Library) -> JoinClipsRequest:
    values = dict(values)
    if values.get("subtitles"):
        path = Path(checked_upload(settings, values["subtitles"], "subtitles"))
        if path.suffix.lower() != ".srt":
            raise InputError(f"subtitles {path.name!r} must be an .srt file")
        values["subtitles"] = str(path)
    req = JoinClipsRequest.build(**values)
    if not req.clips:
        raise InputError("clips: pick at least one library video to join")
    for item_id in req.clips:
        library.item(item_id)  # unknown ids are refused before a job exists
    return req


def batch_zip(outputs_dir: Path, batch_id: str, job: dict) -> str:
    """The ZIP of a succeeded variants batch (`job`: its status as JobService reports it)."""
    if job["kind"] != "variants":
        raise InputError(f"job {batch_id!r} is a {job['kind']} job, not a variants batch")
    if job["status"] != "succeeded":
        raise InputError(f"batch {batch_id!r} is {job['status']}; a ZIP exists once it has succeeded")
    result = job.get("result") or {}
    if result.get("expired"):
        raise NotFoundError(f"batch {batch_id!r} has expired and its files were removed")
    path = outputs_dir / result["zip"]
    if not path.is_file():
        raise NotFoundError(f"batch {batch_id!r}: its ZIP is gone")
    return str(path)


def start_cleanup_timer(db: Database, jobs: JobService, interval_s: float) -> threading.Event:
    """Expired variant batches are removed by a "cleanup" job now and then every `interval_s`; set the
    returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                if expired_batches(db):
                    jobs.submit("cleanup", CleanupRequest.build(), owner="system")
            except Exception:  # the database may be closing; try again next round
                log.exception("could not queue the cleanup job")
            stop.wait(interval_s)

    threading.Thread(target=loop, name="batch-cleanup", daemon=True).start()
    return stop
