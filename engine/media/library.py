"""The media library: videos, audios, images and hook lines, with collections, tags and search.

Files are copied into `<data>/library/<kind>/` under a new id (the user's file name is kept only as
the item's display name), probed (duration, size, fps, streams), and given a thumbnail: a poster
frame for videos and images, a waveform for audio. Rows and files change together: a file is in
place before its row is written, and deleting removes the row and then the files.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from sqlmodel import col, select

from engine.artifacts import atomic_write, sha256_file
from engine.errors import InputError, NotFoundError
from engine.media.ffmpeg import VIDEO_SUFFIXES, probe
from engine.store.database import Database, Hook, MediaCollection, MediaItem, new_id

log = logging.getLogger(__name__)

SUFFIXES = {
    "video": VIDEO_SUFFIXES,
    "audio": (".mp3", ".wav", ".m4a", ".aac", ".ogg", ".flac", ".opus"),
    "image": (".png", ".jpg", ".jpeg", ".webp"),
}
COLLECTION_KINDS = ("video", "audio")
MAX_NAME = 200
MAX_HOOK = 500
THUMB_SIZE = (320, 180)


def kind_of(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    for kind, suffixes in SUFFIXES.items():
        if suffix in suffixes:
            return kind
    allowed = ", ".join(s for group in SUFFIXES.values() for s in group)
    raise InputError(f"{Path(path).name}: file type {suffix or '(none)'!r} is not media; allowed: {allowed}")


def _clean_name(name: str, what: str = "name") -> str:
    name = " ".join(str(name or "").split())
    if not name or len(name) > MAX_NAME:
        raise InputError(f"{what}={name!r} must be 1-{MAX_NAME} characters")
    return name


def _clean_tags(tags: Iterable[str] | str | None) -> list[str]:
    if isinstance(tags, str):
        tags = tags.split(",")
    out: list[str] = []
    for t in tags or []:
        t = " ".join(str(t).split()).lower()
        if t and t not in out:
            if len(t) > 40:
                raise InputError(f"tag {t!r} is longer than 40 characters")
            out.append(t)
    return out


class Library:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = Path(root)

    # --- items -----------------------------------------------------------------------------
    def add_file(
        self,
        source: Path,
        name: str = "",
        tags: Iterable[str] | str | None = None,
        collection_id: str | None = None,
        kind: str = "",
    ) -> MediaItem:
        """Copy `source` into the library, probe it, make its thumbnail, write its row."""
        source = Path(source)
        if not source.is_file():
            raise InputError(f"{source.name}: no such file to add")
        kind = kind or kind_of(source)
        if kind not in SUFFIXES:
            raise InputError(f"kind={kind!r}; allowed: {', '.join(SUFFIXES)}")
        item = MediaItem(
            id=new_id(), kind=kind, name=_clean_name(name or source.stem), path="", tags=_clean_tags(tags)
        )
        if collection_id:
            item.collection_id = self.collection(collection_id, kind=kind).id
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{item.id}{source.suffix.lower()}"
        with atomic_write(target) as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
        try:
            self._describe(item, target)
            item.path = str(target)
            item.size = target.stat().st_size
            item.sha256 = sha256_file(target)
            with self.db.session() as s:
                s.add(item)
                s.commit()
                s.refresh(item)
        except BaseException:
            for p in (target, self._thumb_path(target)):
                p.unlink(missing_ok=True)
            raise
        return item

    def _thumb_path(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}.thumb.png")

    def _describe(self, item: MediaItem, path: Path) -> None:
        from PIL import Image

        thumb = self._thumb_path(path)
        if item.kind == "image":
            try:
                with Image.open(path) as im:
                    im.load()
                    item.width, item.height = im.size
                    im = im.convert("RGB")
                    im.thumbnail(THUMB_SIZE)
                    with atomic_write(thumb) as f:
                        im.save(f, format="PNG")
            except OSError as e:
                raise InputError(f"{item.name}: not a readable image ({e})") from None
        else:
            info = probe(path)
            if item.kind == "video" and not info.has_video:
                raise InputError(f"{item.name}: has no video stream; add it as audio")
            if item.kind == "audio" and not info.has_audio:
                raise InputError(f"{item.name}: has no audio stream")
            item.duration = info.duration
            item.width, item.height, item.fps = (
                (info.width or None),
                (info.height or None),
                (info.fps or None),
            )
            item.has_audio = info.has_audio
            image = poster_frame(path) if item.kind == "video" else waveform(path)
            if image is not None:
                with atomic_write(thumb) as f:
                    image.save(f, format="PNG")
        item.thumbnail = str(thumb) if thumb.exists() else ""

    def item(self, item_id: str) -> MediaItem:
        with self.db.session() as s:
            item = s.get(MediaItem, item_id) if isinstance(item_id, str) else None
        if item is None:
            raise NotFoundError(f"library item {item_id!r} not found")
        return item

    def items(
        self, kind: str = "", text: str = "", tag: str = "", collection_id: str = "", limit: int = 500
    ) -> list[MediaItem]:
        if kind and kind not in SUFFIXES:
            raise InputError(f"kind={kind!r}; allowed: {', '.join(SUFFIXES)} or empty for all")
        stmt = select(MediaItem)
        if kind:
            stmt = stmt.where(MediaItem.kind == kind)
        if text:
            stmt = stmt.where(col(MediaItem.name).icontains(text.strip()))
        if collection_id:
            stmt = stmt.where(MediaItem.collection_id == collection_id)
        with self.db.session() as s:
            rows = list(s.exec(stmt.order_by(col(MediaItem.created_at).desc()).limit(limit)))
        tag = tag.strip().lower()
        return [r for r in rows if not tag or tag in (r.tags or [])]

    def update(
        self,
        item_id: str,
        name: str | None = None,
        tags: Iterable[str] | str | None = None,
        collection_id: str | None = None,
    ) -> MediaItem:
        """Rename, re-tag, or move to a collection ("" = out of any collection)."""
        with self.db.session() as s:
            item = s.get(MediaItem, item_id)
            if item is None:
                raise NotFoundError(f"library item {item_id!r} not found")
            if name is not None:
                item.name = _clean_name(name)
            if tags is not None:
                item.tags = _clean_tags(tags)
            if collection_id is not None:
                item.collection_id = (
                    self.collection(collection_id, kind=item.kind).id if collection_id else None
                )
            s.add(item)
            s.commit()
            s.refresh(item)
            return item

    def delete(self, item_ids: Iterable[str]) -> int:
        """Rows first (one transaction), then their files; a file that cannot be removed is logged."""
        ids = [i for i in item_ids if isinstance(i, str) and i]
        with self.db.session() as s:
            items = list(s.exec(select(MediaItem).where(col(MediaItem.id).in_(ids))))
            missing = set(ids) - {i.id for i in items}
            if missing:
                raise NotFoundError(f"library items not found: {', '.join(sorted(missing))}")
            for item in items:
                s.delete(item)
            s.commit()
        for item in items:
            for p in (Path(item.path), Path(item.thumbnail) if item.thumbnail else None):
                if p is not None:
                    try:
                        p.unlink(missing_ok=True)
                    except OSError as e:
                        log.warning("could not remove %s: %s", p, e)
        return len(items)

    # --- collections ------------------------------------------------------------------------
    def create_collection(self, kind: str, name: str) -> MediaCollection:
        if kind not in COLLECTION_KINDS:
            raise InputError(f"collection kind={kind!r}; allowed: {', '.join(COLLECTION_KINDS)}")
        name = _clean_name(name, "collection name")
        with self.db.session() as s:
            if s.exec(
                select(MediaCollection).where(MediaCollection.kind == kind, MediaCollection.name == name)
            ).first():
                raise InputError(f"a {kind} collection named {name!r} already exists")
            c = MediaCollection(kind=kind, name=name)
            s.add(c)
            s.commit()
            s.refresh(c)
            return c

    def collection(self, collection_id: str, kind: str = "") -> MediaCollection:
        with self.db.session() as s:
            c = s.get(MediaCollection, collection_id) if isinstance(collection_id, str) else None
        if c is None:
            raise NotFoundError(f"collection {collection_id!r} not found")
        if kind and c.kind != kind:
            raise InputError(f"collection {c.name!r} holds {c.kind}s, not {kind}s")
        return c

    def collections(self, kind: str = "") -> list[MediaCollection]:
        stmt = select(MediaCollection)
        if kind:
            stmt = stmt.where(MediaCollection.kind == kind)
        with self.db.session() as s:
            return list(s.exec(stmt.order_by(MediaCollection.name)))

    # --- hooks --------------------------------------------------------------------------------
    def add_hooks(self, text: str, category: str = "general") -> list[Hook]:
        """One hook per non-empty line, or a CSV with `text` (and optional `category`) columns."""
        category = _clean_name(category or "general", "category")
        rows: list[tuple[str, str]] = []
        stripped = text.strip()
        first = stripped.splitlines()[0].strip().lower() if stripped else ""
        if first.replace(" ", "").startswith("text") and ("," in first or first == "text"):
            for rec in csv.DictReader(io.StringIO(stripped)):
                line = (rec.get("text") or "").strip()
                if line:
                    rows.append((line, (rec.get("category") or "").strip() or category))
        else:
            rows = [(line.strip(), category) for line in stripped.splitlines() if line.strip()]
        if not rows:
            raise InputError("no hooks given: paste one hook per line, or a CSV with a 'text' column")
        for line, _ in rows:
            if len(line) > MAX_HOOK:
                raise InputError(f"hook {line[:40]!r}... is longer than {MAX_HOOK} characters")
        hooks = [Hook(text=line, category=_clean_name(cat, "category")) for line, cat in rows]
        with self.db.session() as s:
            s.add_all(hooks)
            s.commit()
            for h in hooks:
                s.refresh(h)
        return hooks

    def hooks(self, category: str = "", text: str = "") -> list[Hook]:
        stmt = select(Hook)
        if category:
            stmt = stmt.where(Hook.category == category)
        if text:
            stmt = stmt.where(col(Hook.text).icontains(text))
        with self.db.session() as s:
            return list(s.exec(stmt.order_by(Hook.category, Hook.created_at)))

    def hook_categories(self) -> list[str]:
        with self.db.session() as s:
            return sorted(set(s.exec(select(Hook.category))))

    def delete_hooks(self, hook_ids: Iterable[str]) -> int:
        ids = list(hook_ids)
        with self.db.session() as s:
            hooks = list(s.exec(select(Hook).where(col(Hook.id).in_(ids))))
            for h in hooks:
                s.delete(h)
            s.commit()
        return len(hooks)


def public_item(item: MediaItem, root: Path) -> dict:
    """An item as the API returns it: no server paths (a dict with "path" reads as a file to fetch in
    gradio_client); `file` and `thumbnail_file` are relative to the library folder."""
    data = item.model_dump(mode="json")
    data.pop("path", None)
    thumb = data.pop("thumbnail", "")
    data["file"] = Path(item.path).relative_to(root).as_posix() if item.path else ""
    data["thumbnail_file"] = Path(thumb).relative_to(root).as_posix() if thumb else ""
    return data


def poster_frame(path: Path):
    """A frame from 10% into the video, as a PIL thumbnail (None if nothing decodes)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                container.seek(int(stream.duration * 0.1), stream=stream, any_frame=False)
            for frame in container.decode(stream):
                image = frame.to_image()
                image.thumbnail(THUMB_SIZE)
                return image
    except (av.FFmpegError, IndexError, OSError) as e:
        log.warning("no poster frame for %s: %s", path, e)
    return None


def waveform(path: Path, size: tuple[int, int] = THUMB_SIZE):
    """A peak waveform of the first minutes of an audio file, drawn with Pillow."""
    import av
    import numpy as np
    from PIL import Image, ImageDraw

    chunks: list = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                if sum(len(c) for c in chunks) > 8000 * 300:
                    break
    except (av.FFmpegError, IndexError, OSError) as e:
        log.warning("no waveform for %s: %s", path, e)
        return None
    w, h = size
    image = Image.new("RGB", size, (24, 24, 32))
    if chunks:
        samples = np.abs(np.concatenate(chunks).astype(np.float32)) / 32768.0
        bins = np.array_split(samples, w)
        draw = ImageDraw.Draw(image)
        for x, b in enumerate(bins):
            peak = float(b.max()) if len(b) else 0.0
            half = max(1, int(peak * (h / 2 - 2)))
            draw.line([(x, h // 2 - half), (x, h // 2 + half)], fill=(90, 200, 255))
    return image
