"""The Gallery tab's engine: filtered pages of generations, thumbnails, trash, metadata.

`gallery_page(db, GalleryQuery(...)) -> GalleryPage` reads only indexed columns and never opens an
image: items carry the thumbnail's path when it exists (`fill_thumbnails` makes missing ones, once).
Trash is a timestamp on the Generation row; `empty_trash` deletes files first and rows after, one
generation per transaction, so an interruption leaves trashed rows whose files may be gone, and
running it again finishes the job. Every query here is plain SQLAlchemy: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update

from engine.artifacts import atomic_write_with, sha256_file
from engine.errors import InputError, NotFoundError
from engine.paths import within
from engine.store.database import Asset, Database, Generation, GenerationLora, utcnow

# Values of `Generation.mode`, as `GenerateRequest.mode` names them.
MODES = ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "img2video", "txt2video", "camera")
SORTS = ("newest", "oldest")
MAX_PAGE_SIZE = 200
MAX_TEXT = 500
MAX_NAME = 200
THUMB_SIZE = 256  # long side, px
THUMB_DIR = "thumbs"
_ID_CHUNK = 500  # ids per IN (...) clause, well under every dialect's parameter limit


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InputError(f"{name}={value!r} must be a whole number")
    return int(value)


def _as_utc(name: str, value: Any) -> date | datetime | None:
    """None, a date, or a datetime (naive = UTC); ISO strings ('2024-05-01', '2024-05-01T12:00') too."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
        except ValueError:
            raise InputError(f"{name}={value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return value
    raise InputError(f"{name}={value!r} must be a date, a datetime or an ISO date string")


@dataclass
class GalleryQuery:
    """One page of the gallery. Empty strings mean "any"; names match exactly, text as a substring."""

    page: int = field(default=1, metadata={"help": "page number, from 1"})
    page_size: int = field(default=50, metadata={"help": f"items per page, 1 to {MAX_PAGE_SIZE}"})
    text: str = field(
        default="", metadata={"help": "case-insensitive substring of prompt or negative prompt"}
    )
    model: str = field(default="", metadata={"help": "model name, exactly"})
    lora: str = field(default="", metadata={"help": "LoRA name used by the image, exactly"})
    character: str = field(default="", metadata={"help": "character name, exactly"})
    date_from: date | datetime | str | None = field(
        default=None,
        metadata={"help": "made on or after: a date (a whole UTC day) or a datetime (naive = UTC)"},
    )
    date_to: date | datetime | str | None = field(
        default=None, metadata={"help": "made on or before: a date (the whole UTC day) or a datetime"}
    )
    mode: str = field(default="", metadata={"help": f"one of {', '.join(MODES)}; empty = any"})
    include_trashed: bool = field(default=False, metadata={"help": "show trashed items too"})
    only_trashed: bool = field(default=False, metadata={"help": "show only trashed items (the trash view)"})
    sort: str = field(default="newest", metadata={"help": "newest or oldest first"})

    def __post_init__(self) -> None:
        self.page = _as_int("page", self.page)
        self.page_size = _as_int("page_size", self.page_size)
        if self.page < 1:
            raise InputError(f"page={self.page} must be at least 1")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise InputError(f"page_size={self.page_size} is out of range; allowed: 1 to {MAX_PAGE_SIZE}")
        for name, limit in (
            ("text", MAX_TEXT),
            ("model", MAX_NAME),
            ("lora", MAX_NAME),
            ("character", MAX_NAME),
            ("mode", MAX_NAME),
            ("sort", MAX_NAME),
        ):
            value = getattr(self, name)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InputError(f"{name}={value!r} must be a string")
            if len(value) > limit:
                raise InputError(f"{name} is {len(value)} characters long; at most {limit}")
            setattr(self, name, value)
        if self.mode and self.mode not in MODES:
            raise InputError(f"mode={self.mode!r} is unknown; allowed: {', '.join(MODES)} or empty for any")
        if self.sort not in SORTS:
            raise InputError(f"sort={self.sort!r} is unknown; allowed: {', '.join(SORTS)}")
        for name in ("include_trashed", "only_trashed"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.include_trashed and self.only_trashed:
            raise InputError("include_trashed and only_trashed are both true; set one of them")
        self.date_from = _as_utc("date_from", self.date_from)
        self.date_to = _as_utc("date_to", self.date_to)
        start, end = self.created_range()
        if start is not None and end is not None and start >= end:
            raise InputError(f"date_from={self.date_from} is after date_to={self.date_to}")

    def created_range(self) -> tuple[datetime | None, datetime | None]:
        """[start, end) in UTC: a date_to date covers its whole day, a datetime is inclusive."""
        start = end = None
        if isinstance(self.date_from, datetime):
            start = self.date_from
        elif isinstance(self.date_from, date):
            start = datetime.combine(self.date_from, time(), UTC)
        if isinstance(self.date_to, datetime):
            end = self.date_to + timedelta(microseconds=1)
        elif isinstance(self.date_to, date):
            end = datetime.combine(self.date_to + timedelta(days=1), time(), UTC)
        return start, end


@dataclass(frozen=True)
class GalleryItem:
    generation_id: str
    asset_id: str
    image_path: str
    thumbnail_path: str | None  # None until a thumbnail exists: see fill_thumbnails / ensure_thumbnail
    prompt: str
    negative_prompt: str
    model: str
    loras: tuple[str, ...]
    seed: int | None  # None where no sampling happened (an upscaled upload, a camera clip)
    width: int  # of the saved image
    height: int
    created_at: datetime
    mode: str
    character: str | None
    trashed_at: datetime | None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class GalleryPage:
    items: list[GalleryItem]
    total: int  # items matching the filters, all pages
    page: int  # as asked; past the last page, items is empty
    pages: int  # at least 1, so "page 1 of 1" reads right for an empty gallery
    page_size: int


@dataclass(frozen=True)
class GenerationDetail:
    """Everything the metadata view shows about one generation."""

    generation_id: str
    asset_id: str
    job_id: str
    image_path: str | None  # None when the Asset row is gone
    thumbnail_path: str | None
    file_exists: bool
    file_size: int | None  # bytes, as recorded
    sha256: str | None
    width: int  # of the saved image
    height: int
    mode: str
    model: str
    model_hash: str
    prompt: str
    negative_prompt: str
    seed: int | None  # seed, steps, cfg_scale, sampler: None where no sampling happened
    steps: int | None
    cfg_scale: float | None
    sampler: str | None
    denoising_strength: float | None
    clip_skip: int
    loras: list[dict]  # [{"name", "weight", "hash"}]
    character: str | None
    created_at: datetime
    trashed_at: datetime | None
    infotext: str
    recipe: dict


@dataclass(frozen=True)
class DeleteResult:
    deleted: int  # generations whose files and rows are gone
    failed: dict[str, str] = field(default_factory=dict)  # generation id -> why (still in the trash)

    @property
    def complete(self) -> bool:
        return not self.failed


# --- writing: called from save_generated ------------------------------------------------------------
def lora_names(loras: Iterable[Any]) -> tuple[str, ...]:
    """Distinct LoRA names of a `Generation.loras` value ([{"name": ...}] or plain names), in order."""
    names = (item.get("name") if isinstance(item, dict) else item for item in loras or ())
    return tuple(dict.fromkeys(str(n) for n in names if n))


def index_generation(session, generation: Generation) -> None:
    """Add the gallery's index rows for `generation` to `session`; call before the commit that adds the
    Generation, so both land in one transaction."""
    for name in lora_names(generation.loras):
        session.add(GenerationLora(generation_id=generation.id, name=name))


def file_asset(path: Path, kind: str, width: int, height: int, job_id: str, **extra: Any) -> Asset:
    """The Asset row of a file a job just wrote (not yet saved): its hash, size and pixel size."""
    path = Path(path)
    return Asset(
        kind=kind,
        path=str(path),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        width=width,
        height=height,
        job_id=job_id,
        **extra,
    )


def add_generation(db: Database, asset: Asset, generation: Generation) -> None:
    """Record a saved output: its Asset, its Generation and the gallery's index rows, in one transaction."""
    with db.session() as s:
        s.add(asset)
        s.add(generation)
        index_generation(s, generation)
        s.commit()


def backfill_lora_index(db: Database, batch: int = 1000) -> int:
    """Index rows for generations saved before GenerationLora existed; returns how many were indexed.
    Cheap when there is nothing to do; safe to run at every start."""
    indexed = select(GenerationLora.generation_id)
    done = 0
    last = ""
    while True:
        with db.session() as s:
            rows = s.exec(
                select(Generation.id, Generation.loras)
                .where(Generation.id > last, Generation.id.not_in(indexed))
                .order_by(Generation.id)
                .limit(batch)
            ).all()
            if not rows:
                return done
            for gid, loras in rows:
                for name in lora_names(loras):
                    s.add(GenerationLora(generation_id=gid, name=name))
                    done += 1
            s.commit()
            last = rows[-1][0]


# --- reading ------------------------------------------------------------------------------------------
def _like_any(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _conditions(q: GalleryQuery) -> list:
    where = []
    if q.only_trashed:
        where.append(Generation.trashed_at.is_not(None))
    elif not q.include_trashed:
        where.append(Generation.trashed_at.is_(None))
    if q.text:
        pattern = _like_any(q.text)
        where.append(
            or_(
                Generation.prompt.ilike(pattern, escape="\\"),
                Generation.negative_prompt.ilike(pattern, escape="\\"),
            )
        )
    if q.model:
        where.append(Generation.model == q.model)
    if q.lora:
        where.append(
            Generation.id.in_(select(GenerationLora.generation_id).where(GenerationLora.name == q.lora))
        )
    if q.character:
        where.append(Generation.character == q.character)
    if q.mode:
        where.append(Generation.mode == q.mode)
    start, end = q.created_range()
    if start is not None:
        where.append(Generation.created_at >= start)
    if end is not None:
        where.append(Generation.created_at < end)
    return where


_ITEM_COLUMNS = (
    Generation.id,
    Generation.asset_id,
    Asset.path,
    Generation.prompt,
    Generation.negative_prompt,
    Generation.model,
    Generation.loras,
    Generation.seed,
    Generation.width,
    Generation.height,
    Asset.width,
    Asset.height,
    Generation.created_at,
    Generation.mode,
    Generation.character,
    Generation.trashed_at,
)


def page_statement(q: GalleryQuery):
    """The SELECT of one page (also compiled by the tests for PostgreSQL). The page's ids are found
    first, from the indexes alone where the filters allow, so a deep OFFSET skips index entries, not rows."""
    if q.sort == "newest":
        order = (Generation.created_at.desc(), Generation.id.desc())
    else:
        order = (Generation.created_at.asc(), Generation.id.asc())
    page_ids = (
        select(Generation.id)
        .where(*_conditions(q))
        .order_by(*order)
        .offset((q.page - 1) * q.page_size)
        .limit(q.page_size)
        .subquery("page_ids")
    )
    return (
        select(*_ITEM_COLUMNS)
        .select_from(Generation)
        .join(page_ids, page_ids.c.id == Generation.id)
        .outerjoin(Asset, Asset.id == Generation.asset_id)
        .order_by(*order)
    )


def count_statement(q: GalleryQuery):
    return select(func.count()).select_from(Generation).where(*_conditions(q))


def gallery_page(db: Database, query: GalleryQuery) -> GalleryPage:
    """One page of generations matching `query`, and how many match in all. Opens no image."""
    with db.session() as s:
        total = s.exec(count_statement(query)).one()[0]
        rows = s.exec(page_statement(query)).all() if (query.page - 1) * query.page_size < total else []
    items = []
    for (
        gid,
        asset_id,
        path,
        prompt,
        negative,
        model,
        loras,
        seed,
        gen_w,
        gen_h,
        img_w,
        img_h,
        created,
        mode,
        character,
        trashed_at,
    ) in rows:
        thumb = _thumbnail_of(path) if path else None
        items.append(
            GalleryItem(
                generation_id=gid,
                asset_id=asset_id,
                image_path=path or "",
                thumbnail_path=thumb if thumb is not None and os.path.isfile(thumb) else None,
                prompt=prompt,
                negative_prompt=negative,
                model=model,
                loras=lora_names(loras),
                seed=seed,
                width=img_w or gen_w,
                height=img_h or gen_h,
                created_at=created,
                mode=mode,
                character=character,
                trashed_at=trashed_at,
            )
        )
    pages = max(1, math.ceil(total / query.page_size))
    return GalleryPage(items=items, total=total, page=query.page, pages=pages, page_size=query.page_size)


def generation_detail(db: Database, generation_id: str) -> GenerationDetail:
    """The full record of one generation for the metadata view; NotFoundError names a missing id."""
    with db.session() as s:
        gen = s.get(Generation, generation_id) if isinstance(generation_id, str) else None
        if gen is None:
            raise NotFoundError(f"generation {generation_id!r} not found")
        asset = s.get(Asset, gen.asset_id)
    path = Path(asset.path) if asset is not None else None
    thumb = thumbnail_path(path) if path is not None else None
    return GenerationDetail(
        generation_id=gen.id,
        asset_id=gen.asset_id,
        job_id=gen.job_id,
        image_path=str(path) if path is not None else None,
        thumbnail_path=str(thumb) if thumb is not None and thumb.is_file() else None,
        file_exists=path is not None and path.is_file(),
        file_size=asset.size if asset else None,
        sha256=asset.sha256 if asset else None,
        width=(asset.width if asset and asset.width else gen.width),
        height=(asset.height if asset and asset.height else gen.height),
        mode=gen.mode,
        model=gen.model,
        model_hash=gen.model_hash,
        prompt=gen.prompt,
        negative_prompt=gen.negative_prompt,
        seed=gen.seed,
        steps=gen.steps,
        cfg_scale=gen.cfg_scale,
        sampler=gen.sampler,
        denoising_strength=gen.denoising_strength,
        clip_skip=gen.clip_skip,
        loras=list(gen.loras or []),
        character=gen.character,
        created_at=gen.created_at,
        trashed_at=gen.trashed_at,
        infotext=gen.infotext,
        recipe=dict(gen.recipe or {}),
    )


# --- thumbnails ---------------------------------------------------------------------------------------
def _thumbnail_of(image: str) -> str:
    head, name = os.path.split(image)  # os.path, not pathlib: this runs for every item of every page
    return os.path.join(head, THUMB_DIR, f"{name}.webp")


def thumbnail_path(image: str | Path) -> Path:
    """Where the thumbnail of `image` lives: a thumbs/ folder next to it (so under outputs/ too)."""
    return Path(_thumbnail_of(os.fspath(image)))


def ensure_thumbnail(asset: Asset | str | Path, size: int = THUMB_SIZE) -> Path:
    """The WebP thumbnail (long side <= `size`) of an image asset, made atomically the first time and
    again only if the image is newer than it."""
    image = Path(asset.path if isinstance(asset, Asset) else asset)
    thumb = thumbnail_path(image)
    try:
        image_mtime = image.stat().st_mtime_ns
    except FileNotFoundError:
        raise NotFoundError(f"image {str(image)!r} does not exist; no thumbnail can be made") from None
    try:
        if thumb.stat().st_mtime_ns >= image_mtime:
            return thumb
    except FileNotFoundError:
        pass
    from PIL import Image

    with Image.open(image) as img:
        img.draft("RGB", (size, size))  # JPEG decodes at a reduced scale; a no-op for PNG
        img.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
        small = img.convert(
            "RGBA" if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info else "RGB"
        )
    return atomic_write_with(thumb, lambda f: small.save(f, format="WEBP", quality=80, method=4))


def fill_thumbnails(page: GalleryPage) -> GalleryPage:
    """`page` with a thumbnail for every item whose image exists: opens only images without one.
    An item whose image is missing or unreadable keeps thumbnail_path None (the UI shows a placeholder)."""
    from PIL import UnidentifiedImageError

    items = []
    for item in page.items:
        if item.thumbnail_path is None and item.image_path:
            # One missing or broken file must not blank the whole page.
            with contextlib.suppress(NotFoundError, UnidentifiedImageError, OSError):
                item = replace(item, thumbnail_path=str(ensure_thumbnail(item.image_path)))
        items.append(item)
    return replace(page, items=items)


# --- trash --------------------------------------------------------------------------------------------
def _check_ids(generation_ids: Iterable[str]) -> list[str]:
    if isinstance(generation_ids, str):
        generation_ids = [generation_ids]
    ids = list(dict.fromkeys(generation_ids))
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise InputError(f"generation_ids must be non-empty strings; got {bad[0]!r}")
    return ids


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), _ID_CHUNK):
        yield ids[i : i + _ID_CHUNK]


def _require_existing(s, ids: Sequence[str]) -> None:
    found: set[str] = set()
    for chunk in _chunks(ids):
        found.update(s.exec(select(Generation.id).where(Generation.id.in_(chunk))).scalars())
    missing = [i for i in ids if i not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFoundError(f"generation(s) not found: {', '.join(map(repr, missing[:5]))}{more}")


def _set_trashed(db: Database, generation_ids: Iterable[str], trashed: bool) -> int:
    ids = _check_ids(generation_ids)
    changed = 0
    with db.session() as s:
        _require_existing(s, ids)  # all or nothing: one unknown id changes no row
        for chunk in _chunks(ids):
            stmt = update(Generation).where(Generation.id.in_(chunk))
            if trashed:
                stmt = stmt.where(Generation.trashed_at.is_(None)).values(trashed_at=utcnow())
            else:
                stmt = stmt.where(Generation.trashed_at.is_not(None)).values(trashed_at=None)
            changed += s.exec(stmt).rowcount
        s.commit()
    return changed


def trash(db: Database, generation_ids: Iterable[str]) -> int:
    """Move generations to the trash (hidden from normal pages); returns how many were not already there.
    An unknown id raises NotFoundError and trashes nothing."""
    return _set_trashed(db, generation_ids, True)


def restore(db: Database, generation_ids: Iterable[str]) -> int:
    """Take generations out of the trash; returns how many were in it."""
    return _set_trashed(db, generation_ids, False)


def _files_of(image_path: str, outputs_dir: Path, generation_id: str) -> list[Path]:
    """The image and its thumbnail, refusing any path that is not inside outputs_dir."""
    image = Path(image_path)
    files = [thumbnail_path(image), image]
    for f in files:
        if not within(outputs_dir, f) or Path(f).resolve() == Path(outputs_dir).resolve():
            raise InputError(
                f"generation {generation_id!r}: {str(f)!r} is outside the outputs folder "
                f"{str(outputs_dir)!r}; StudioNOVA deletes only files it wrote there"
            )
    return files


def _refuse_outside(db: Database, ids: Sequence[str], outputs_dir: Path) -> None:
    """Raise before anything is touched if one of the rows points outside outputs/."""
    with db.session() as s:
        for chunk in _chunks(ids):
            rows = s.exec(
                select(Generation.id, Asset.path)
                .join(Asset, Asset.id == Generation.asset_id)
                .where(Generation.id.in_(chunk))
            ).all()
            for gid, path in rows:
                _files_of(path, outputs_dir, gid)


def _delete_trashed(db: Database, ids: Sequence[str], outputs_dir: Path) -> DeleteResult:
    outputs_dir = Path(outputs_dir)
    _refuse_outside(db, ids, outputs_dir)
    deleted, failed = 0, {}
    for gid in ids:
        # One transaction per generation, holding its row (BEGIN IMMEDIATE on SQLite, FOR UPDATE elsewhere)
        # while its files go, so a concurrent restore cannot bring back a row whose files were deleted.
        with db.session() as s:
            gen = s.exec(select(Generation).where(Generation.id == gid).with_for_update()).scalars().first()
            if gen is None or gen.trashed_at is None:
                continue  # deleted by a concurrent empty_trash, or restored meanwhile
            asset = s.get(Asset, gen.asset_id)
            shared = s.exec(
                select(func.count())
                .select_from(Generation)
                .where(Generation.asset_id == gen.asset_id, Generation.id != gid)
            ).one()[0]
            files = _files_of(asset.path, outputs_dir, gid) if asset is not None and not shared else []
            try:
                for f in files:
                    f.unlink(missing_ok=True)
            except OSError as e:
                failed[gid] = f"could not delete {str(e.filename or f)!r}: {e.strerror or e}"
                s.rollback()
                continue
            s.exec(delete(GenerationLora).where(GenerationLora.generation_id == gid))
            s.delete(gen)
            if asset is not None and not shared:
                s.delete(asset)
            s.commit()
            deleted += 1
    return DeleteResult(deleted=deleted, failed=failed)


def delete_generations(db: Database, generation_ids: Iterable[str], outputs_dir: Path) -> DeleteResult:
    """Delete generations now: image, thumbnail, Asset and Generation rows. They are trashed first, so an
    interruption leaves them in the trash for `empty_trash` to finish. Refuses (InputError, nothing
    deleted) when a file lies outside `outputs_dir`; a file that cannot be deleted leaves its generation
    in the trash and is reported in `failed`."""
    ids = _check_ids(generation_ids)
    with db.session() as s:
        _require_existing(s, ids)
    _refuse_outside(db, ids, Path(outputs_dir))
    trash(db, ids)
    return _delete_trashed(db, ids, outputs_dir)


def empty_trash(db: Database, outputs_dir: Path) -> DeleteResult:
    """Delete every trashed generation's files, then its rows. Safe to run again after a failure."""
    with db.session() as s:
        ids = list(
            s.exec(
                select(Generation.id)
                .where(Generation.trashed_at.is_not(None))
                .order_by(Generation.trashed_at, Generation.id)
            ).scalars()
        )
    return _delete_trashed(db, ids, outputs_dir)
