"""A character's dataset: ingest (a job), the review queue with undo, captions and readiness.

Every ingested image lands as `pending` for one character, in `outputs/datasets/<character id>/`
(a file in place before its row; a row removed before its file). Exact duplicates are caught by
content hash (per character); video frames are also checked against the dataset's perceptual
hashes. A review action (approve, reject with structured reasons, back to pending) records the
items' state before it, so it can be undone. Captions start with the character's trigger word.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from engine.artifacts import atomic_write, sha256_file
from engine.characters import ingest
from engine.characters.captioning import VisionConfig, caption_image
from engine.characters.characters import REJECTION_REASONS, Characters, dataset_dir, reason_key
from engine.errors import InputError, NotFoundError
from engine.media.ffmpeg import VIDEO_SUFFIXES
from engine.requests import RequestBase
from engine.store.database import Character, Database, DatasetItem, Generation, ReviewAction, new_id, utcnow

log = logging.getLogger(__name__)

REVIEW_ACTIONS = ("approve", "reject", "pending")


def normalise_caption(caption: str, trigger_word: str) -> str:
    """One line; the trigger word first and only once (kohya's keep_tokens counts on it)."""
    caption = " ".join(str(caption or "").split())
    if not trigger_word:
        return caption
    terms = [t.strip() for t in caption.split(",") if t.strip()]
    rest = [t for t in terms if t.lower() != trigger_word.lower()]
    return ", ".join([trigger_word, *rest])


class IngestRequest(RequestBase):
    """Bring images into a character's dataset: uploaded files/ZIPs, videos, a server folder or a URL."""

    character_id: str = Field(min_length=1, max_length=32)
    files: list[str] = Field(
        default_factory=list, max_length=500, description="Uploaded images, ZIPs or videos"
    )
    folder: str = Field(
        default="", max_length=1000, description="A server folder inside an allowed ingest root"
    )
    url: str = Field(default="", max_length=2000, description="A page or media URL (yt-dlp); needs network")
    video_mode: Literal["scene", "rate"] = Field(
        default="scene", description="Video frames: one per scene, or a fixed rate"
    )
    fps: float = Field(default=1.0, gt=0, le=30, description="Video frames per second in 'rate' mode")
    scene_threshold: float = Field(
        default=27.0, ge=1, le=100, description="Scene-cut sensitivity (lower = more cuts)"
    )
    min_sharpness: float = Field(
        default=40.0,
        ge=0,
        le=10000,
        description="Drop video frames blurrier than this (variance of the Laplacian)",
    )
    max_phash_distance: int = Field(
        default=6, ge=0, le=32, description="Near-duplicate threshold (perceptual hash bits)"
    )

    @model_validator(mode="after")
    def _something(self) -> IngestRequest:
        if not (self.files or self.folder or self.url):
            raise ValueError("give files, a folder or a url to ingest")
        return self


class CaptionRequest(RequestBase):
    """Auto-caption approved images through the configured OpenAI-compatible vision endpoint."""

    character_id: str = Field(min_length=1, max_length=32)
    item_ids: list[str] = Field(
        default_factory=list, max_length=5000, description="Empty = every approved image"
    )
    overwrite: bool = Field(
        default=False, description="Replace captions that hold more than the trigger word"
    )
    style: Literal["tags", "sentence"] = "tags"


@dataclass
class Datasets:
    db: Database
    outputs_dir: Path
    characters: Characters

    # --- adding items ---------------------------------------------------------------------------
    def add_file(
        self,
        character_id: str,
        path: Path,
        sha256: str,
        source: str,
        width: int,
        height: int,
        phash: str = "",
        generation_id: str | None = None,
        move: bool = True,
    ) -> DatasetItem | None:
        """Put one validated image into the dataset as pending; None when the same bytes are already there."""
        path = Path(path)
        with self.db.session() as s:
            if s.exec(
                select(DatasetItem.id).where(
                    DatasetItem.character_id == character_id, DatasetItem.sha256 == sha256
                )
            ).first():
                return None
        folder = dataset_dir(self.outputs_dir, character_id)
        folder.mkdir(parents=True, exist_ok=True)
        item = DatasetItem(
            id=new_id(),
            character_id=character_id,
            path="",
            sha256=sha256,
            phash=phash,
            width=width,
            height=height,
            source=source[:1000],
            generation_id=generation_id,
        )
        target = folder / f"{item.id}{path.suffix.lower() or '.png'}"
        _place(path, target, move)
        item.path = str(target)
        try:
            with self.db.session() as s:
                s.add(item)
                s.commit()
        except IntegrityError:  # the same bytes arrived at the same time through another ingest
            target.unlink(missing_ok=True)
            return None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return item

    def add_generated(self, character_id: str, image_path: Path, generation_id: str | None, source: str):
        """A generated image (reference sheet view, "regenerate rejected") as a pending item: a copy."""
        from PIL import Image

        with Image.open(image_path) as im:
            width, height = im.size
            phash = _phash(im)
        return self.add_file(
            character_id,
            Path(image_path),
            sha256_file(Path(image_path)),
            source,
            width,
            height,
            phash=phash,
            generation_id=generation_id,
            move=False,
        )

    def known_phashes(self, character_id: str) -> dict[str, str]:
        with self.db.session() as s:
            rows = s.exec(
                select(DatasetItem.phash, DatasetItem.source).where(
                    DatasetItem.character_id == character_id, DatasetItem.phash != ""
                )
            )
            return {p: src for p, src in rows}

    def known_sources(self, character_id: str, prefix: str) -> set[str]:
        with self.db.session() as s:
            rows = s.exec(
                select(DatasetItem.source).where(
                    DatasetItem.character_id == character_id, col(DatasetItem.source).startswith(prefix)
                )
            )
            return set(rows)

    # --- review ---------------------------------------------------------------------------------
    def queue(self, character_id: str, status: str = "pending", page: int = 1, page_size: int = 50) -> dict:
        if status not in (*REVIEW_ACTIONS[:0], "pending", "approved", "rejected", "all"):
            raise InputError(f"status={status!r}; allowed: pending, approved, rejected, all")
        if not 1 <= int(page_size) <= 500:
            raise InputError(f"page_size={page_size!r}; allowed: 1 to 500")
        page = max(1, int(page))
        with self.db.session() as s:
            where = [DatasetItem.character_id == character_id]
            if status != "all":
                where.append(DatasetItem.status == status)
            total = s.exec(select(func.count()).select_from(DatasetItem).where(*where)).one()
            rows = list(
                s.exec(
                    select(DatasetItem)
                    .where(*where)
                    .order_by(col(DatasetItem.created_at), col(DatasetItem.id))
                    .offset((page - 1) * page_size)
                    .limit(page_size)
                )
            )
            gens = {}
            ids = [r.generation_id for r in rows if r.generation_id]
            if ids:
                gens = {g.id: g for g in s.exec(select(Generation).where(col(Generation.id).in_(ids)))}
        return {
            "total": int(total),
            "page": page,
            "page_size": page_size,
            "items": [self.public(r, gens.get(r.generation_id)) for r in rows],
        }

    def public(self, item: DatasetItem, gen: Generation | None = None) -> dict:
        out = {
            "id": item.id,
            "file": Path(item.path).relative_to(self.outputs_dir).as_posix(),
            "status": item.status,
            "source": item.source,
            "width": item.width,
            "height": item.height,
            "reasons": [REJECTION_REASONS.get(r, r) for r in item.reasons],
            "reason_text": item.reason_text,
            "caption": item.caption,
            "sha256": item.sha256,
            "generation_id": item.generation_id,
            "created_at": item.created_at.isoformat(),
            "regenerated_by": item.regenerated_by,
        }
        if gen is not None:
            out["infotext"] = gen.infotext
        return out

    def item(self, item_id: str) -> DatasetItem:
        with self.db.session() as s:
            row = s.get(DatasetItem, item_id)
        if row is None:
            raise NotFoundError(f"dataset item {item_id!r} not found")
        return row

    def review(
        self,
        character_id: str,
        item_ids: list[str],
        action: str,
        reasons: list[str] | str | None = None,
        reason_text: str = "",
    ) -> dict:
        """Approve, reject (with one or more reasons) or reset items of one character, as one undoable action."""
        if action not in REVIEW_ACTIONS:
            raise InputError(f"action={action!r}; allowed: {', '.join(REVIEW_ACTIONS)}")
        ids = list(dict.fromkeys(i for i in item_ids if i))
        if not ids:
            raise InputError("item_ids: select at least one image to review")
        if isinstance(reasons, str):
            reasons = [r for r in re.split(r"[,\n]", reasons) if r.strip()]
        keys = list(dict.fromkeys(reason_key(r) for r in reasons or []))
        reason_text = " ".join(str(reason_text or "").split())[:1000]
        if action == "reject" and not keys:
            raise InputError(
                f"a rejection needs at least one reason; allowed: {', '.join(REJECTION_REASONS.values())}"
            )
        if "other" in keys and not reason_text:
            raise InputError("reason 'other' needs a few words in reason_text saying what was wrong")
        if action != "reject" and keys:
            raise InputError(f"reasons go with action 'reject', not {action!r}")
        character = self.characters.get(character_id)
        with self.db.session() as s:
            rows = list(s.exec(select(DatasetItem).where(col(DatasetItem.id).in_(ids))))
            found = {r.id for r in rows if r.character_id == character.id}
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(
                    f"dataset items {', '.join(missing[:5])} are not in {character.slug!r}'s dataset"
                )
            before = [
                {
                    "id": r.id,
                    "status": r.status,
                    "reasons": list(r.reasons),
                    "reason_text": r.reason_text,
                    "caption": r.caption,
                    "reviewed_at": r.reviewed_at.isoformat() if r.reviewed_at else None,
                }
                for r in rows
            ]
            now = utcnow()
            for r in rows:
                r.status = {"approve": "approved", "reject": "rejected", "pending": "pending"}[action]
                r.reasons = keys if action == "reject" else []
                r.reason_text = reason_text if action == "reject" else ""
                r.reviewed_at = now if action != "pending" else None
                if action == "approve":
                    r.caption = normalise_caption(r.caption, character.trigger_word)
                s.add(r)
            record = ReviewAction(character_id=character.id, action=action, before=before)
            s.add(record)
            s.commit()
        return {
            "action_id": record.id,
            "action": action,
            "changed": len(rows),
            **self.readiness(character.id),
        }

    def undo(self, character_id: str, action_id: str = "") -> dict:
        """Put the items of a review action (default: the character's latest one not undone) back as they were."""
        from datetime import datetime

        with self.db.session() as s:
            q = select(ReviewAction).where(
                ReviewAction.character_id == character_id, col(ReviewAction.undone_at).is_(None)
            )
            if action_id:
                q = q.where(ReviewAction.id == action_id)
            record = s.exec(q.order_by(col(ReviewAction.created_at).desc()).limit(1)).first()
            latest = s.exec(
                select(ReviewAction.id)
                .where(ReviewAction.character_id == character_id, col(ReviewAction.undone_at).is_(None))
                .order_by(col(ReviewAction.created_at).desc())
                .limit(1)
            ).first()
            if record is not None and record.id != latest:
                raise InputError(
                    f"review action {action_id!r} is not the latest; undo the newer ones first "
                    "(undo goes back in order, so later reviews are never overwritten)"
                )
            if record is None:
                raise InputError(
                    "nothing to undo"
                    if not action_id
                    else f"review action {action_id!r} cannot be "
                    "undone (unknown, another character's, or already undone)"
                )
            for prev in record.before:
                row = s.get(DatasetItem, prev["id"])
                if row is None:
                    continue  # deleted since
                row.status, row.reasons, row.reason_text = (
                    prev["status"],
                    prev["reasons"],
                    prev["reason_text"],
                )
                row.caption = prev["caption"]
                row.reviewed_at = datetime.fromisoformat(prev["reviewed_at"]) if prev["reviewed_at"] else None
                s.add(row)
            record.undone_at = utcnow()
            s.add(record)
            s.commit()
        return {
            "undone": record.id,
            "action": record.action,
            "items": len(record.before),
            **self.readiness(character_id),
        }

    # --- captions -------------------------------------------------------------------------------
    def set_caption(self, item_id: str, caption: str) -> dict:
        with self.db.session() as s:
            row = s.get(DatasetItem, item_id)
            if row is None:
                raise NotFoundError(f"dataset item {item_id!r} not found")
            if row.status != "approved":
                raise InputError(
                    f"dataset item {item_id!r} is {row.status}; only approved images have captions"
                )
            character = s.get(Character, row.character_id)
            text = normalise_caption(caption, character.trigger_word)
            if len(text) > 4000:
                raise InputError(f"caption is {len(text)} characters long; at most 4000")
            row.caption = text
            s.add(row)
            s.commit()
            return self.public(row)

    def replace_captions(self, character_id: str, find: str, replace: str, regex: bool = False) -> dict:
        """Find/replace over every approved caption of a character (literal text, or a regular expression)."""
        if not find:
            raise InputError("find: give the text to look for")
        try:
            pattern = re.compile(find if regex else re.escape(find))
            if regex:
                pattern.sub(replace, "")  # a bad group reference such as \1 fails here, not halfway
        except re.error as e:
            raise InputError(
                f"find={find!r} / replace={replace!r} is not a valid regular expression: {e}"
            ) from None
        repl = replace if regex else (lambda _m: replace)
        character = self.characters.get(character_id)
        with (
            self.db.session() as s
        ):  # read, compute outside any write transaction, then write in one short one
            rows = list(
                s.exec(
                    select(DatasetItem.id, DatasetItem.caption).where(
                        DatasetItem.character_id == character.id, DatasetItem.status == "approved"
                    )
                )
            )
        changes = {}
        for item_id, caption in rows:
            new = normalise_caption(pattern.sub(repl, caption), character.trigger_word)
            if len(new) > 4000:
                raise InputError(
                    f"the replacement makes item {item_id}'s caption {len(new)} characters; at most 4000"
                )
            if new != caption:
                changes[item_id] = new
        if changes:
            with self.db.session() as s:
                for item_id, new in changes.items():
                    row = s.get(DatasetItem, item_id)
                    if row is not None:
                        row.caption = new
                        s.add(row)
                s.commit()
        return {"changed": len(changes)}

    def readiness(self, character_id: str, minimum: int | None = None) -> dict:
        with self.db.session() as s:
            rows = s.exec(
                select(DatasetItem.status, func.count())
                .where(DatasetItem.character_id == character_id)
                .group_by(DatasetItem.status)
            )
            counts = {"pending": 0, "approved": 0, "rejected": 0} | {k: int(n) for k, n in rows}
        out = dict(counts)
        if minimum is not None:
            out.update(min_approved=minimum, trainable=counts["approved"] >= minimum)
        return out

    def rejected_generations(self, character_id: str) -> list[DatasetItem]:
        """Rejected items that came from a generation and have not been re-rendered yet."""
        with self.db.session() as s:
            return list(
                s.exec(
                    select(DatasetItem).where(
                        DatasetItem.character_id == character_id,
                        DatasetItem.status == "rejected",
                        col(DatasetItem.generation_id).is_not(None),
                        col(DatasetItem.regenerated_by).is_(None),
                    )
                )
            )

    def mark_regenerated(self, item_id: str, job_id: str) -> None:
        with self.db.session() as s:
            row = s.get(DatasetItem, item_id)
            row.regenerated_by = job_id
            s.add(row)
            s.commit()


def _place(source: Path, target: Path, move: bool) -> None:
    """source -> target with no partial target: copy/move to a temp name beside it, then os.replace."""
    if move:
        try:
            source.replace(target)  # same filesystem: atomic
            return
        except OSError:
            pass
    with atomic_write(target) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f, 1 << 20)
    if move:
        source.unlink(missing_ok=True)


def _phash(image) -> str:
    import imagehash

    return str(imagehash.phash(image.convert("RGB")))


# --- jobs ---------------------------------------------------------------------------------------
def run_ingest_job(req: IngestRequest, ctx) -> dict:
    """Ingest as a media job: per-source progress; a bad file is skipped with its reason, others go on."""
    settings = ctx.runtime.settings
    datasets = ctx.datasets
    character = datasets.characters.get(req.character_id)
    added: list[dict] = []
    duplicates: list[dict] = []
    skipped: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix=".tmp-ingest-", dir=settings.cache_dir))
    try:
        sources: list[tuple[str, Any]] = [("file", Path(p)) for p in req.files]
        if req.folder:
            roots = settings.ingest_root_paths
            folder = Path(req.folder).expanduser()
            root = next((r for r in roots if (folder.resolve()).is_relative_to(r.resolve())), None)
            seen = {s.removeprefix("folder:") for s in datasets.known_sources(character.id, "folder:")}
            for path in ingest.scan_folder(folder, roots, _seen_paths(seen, roots)):
                sources.append(("folder", (path, root)))
        if req.url:
            sources.append(("url", req.url))
        known = datasets.known_phashes(character.id)
        for n, (kind, value) in enumerate(sources):
            ctx.check_cancelled()
            ctx.emit({"step": n, "total": len(sources), "desc": f"source {n + 1}/{len(sources)}"})
            try:
                report = _ingest_one(ingest, kind, value, work, req)
            except InputError as e:
                skipped.append({"source": _label(kind, value), "reason": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - one bad source never stops the others
                log.exception("ingest of %s failed", _label(kind, value))
                skipped.append(
                    {"source": _label(kind, value), "reason": f"could not be read: {type(e).__name__}: {e}"}
                )
                continue
            candidates = report.candidates
            if kind == "video" or any(c.source.startswith(("video:", "url:")) for c in candidates):
                candidates, dropped = ingest.drop_near_duplicates(candidates, known, req.max_phash_distance)
                report.skipped.extend(dropped)
            skipped.extend({"source": s.source, "reason": s.reason} for s in report.skipped)
            for c in candidates:
                item = datasets.add_file(
                    character.id, c.path, c.sha256, c.source, c.width, c.height, phash=c.phash
                )
                if item is None:
                    duplicates.append(
                        {"source": c.source, "reason": "exact duplicate of an image already in the dataset"}
                    )
                else:
                    known[c.phash] = c.source
                    added.append(datasets.public(item))
        ctx.emit({"step": len(sources), "total": len(sources), "desc": "done"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "character": character.slug,
        "added": added,
        "duplicates": duplicates,
        "skipped": skipped,
        **datasets.readiness(character.id, settings.min_approved_images),
    }


def _seen_paths(seen_rel: set[str], roots: list[Path]) -> set[str]:
    """Folder sources are stored relative to their root; scan_folder wants resolved paths."""
    out = set()
    for rel in seen_rel:
        for root in roots:
            out.add(str((root / rel).resolve()))
    return out


def _label(kind: str, value) -> str:
    if kind == "folder":
        return f"folder:{value[0].name}"
    if kind == "url":
        return f"url:{value}"
    return f"upload:{Path(value).name}"


def _ingest_one(ingest, kind: str, value, work: Path, req: IngestRequest):
    video_args = dict(
        mode=req.video_mode,
        fps=req.fps,
        scene_threshold=req.scene_threshold,
        min_sharpness=req.min_sharpness,
        max_phash_distance=req.max_phash_distance,
    )
    if kind == "url":
        sub = Path(tempfile.mkdtemp(dir=work))
        path = ingest.download_url(value, sub)
        if path.suffix.lower() in VIDEO_SUFFIXES or not _is_image(path):
            report = ingest.sample_video(path, work, source_name=f"url:{value}", **video_args)
        else:
            report = ingest.ingest_files([path], work)
            for c in report.candidates:
                c.source = f"url:{value}"
        return report
    if kind == "folder":
        path, root = value
        report = ingest.ingest_files([path], work)
        for c in report.candidates:
            c.source = ingest.folder_source(path, root)
        return report
    path = Path(value)
    if not path.is_file():
        raise InputError(
            f"{path.name}: the uploaded file is gone (uploads are kept for an hour); upload it again"
        )
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return ingest.sample_video(path, work, **video_args)
    return ingest.ingest_files([path], work)


def _is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001
        return False


def run_caption_job(req: CaptionRequest, ctx) -> dict:
    rt = ctx.runtime
    s = rt.settings
    config = VisionConfig.from_settings(s.vision_url, s.vision_model, s.vision_api_key)
    if config is None:
        raise InputError(
            "auto-captioning needs a vision endpoint: start with --vision-url (for example "
            "http://127.0.0.1:11434/v1 for Ollama) and --vision-model"
        )
    datasets = ctx.datasets
    character = datasets.characters.get(req.character_id)
    with rt.db.session() as sess:
        q = select(DatasetItem).where(
            DatasetItem.character_id == character.id, DatasetItem.status == "approved"
        )
        if req.item_ids:
            q = q.where(col(DatasetItem.id).in_(req.item_ids))
        rows = list(sess.exec(q.order_by(col(DatasetItem.created_at))))
    done, kept, failed = [], 0, []
    for n, row in enumerate(rows):
        ctx.check_cancelled()
        ctx.emit({"step": n, "total": len(rows), "desc": f"caption {n + 1}/{len(rows)}"})
        bare = normalise_caption("", character.trigger_word)
        if row.caption and row.caption != bare and not req.overwrite:
            kept += 1
            continue
        try:
            text = caption_image(config, Path(row.path), character.trigger_word, req.style)
        except InputError as e:
            failed.append({"id": row.id, "error": str(e)})
            continue
        done.append(datasets.set_caption(row.id, text))
    return {"captioned": done, "kept": kept, "failed": failed}
