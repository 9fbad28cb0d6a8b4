"""A generated image exported as PNG, JPEG or WebP with its infotext and recipe."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InputError, NotFoundError
from engine.gallery.pnginfo import save_image
from engine.gallery.records import generation_detail
from engine.store.database import Database

EXPORT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def export_image(
    db: Database, outputs_dir: Path, generation_id: str, format: str = "jpeg", quality: int = 90
) -> Path:
    """A copy of a generated image as PNG, JPEG or WebP, carrying its infotext (EXIF UserComment for
    JPEG/WebP, as A1111 writes it) and recipe, under outputs/exports/."""
    from PIL import Image

    d = generation_detail(db, generation_id)
    if not d.file_exists:
        raise NotFoundError(f"generation {generation_id!r} has no image file any more")
    suffix = EXPORT_SUFFIXES.get(format)
    if suffix is None:
        raise InputError(f"format={format!r}; allowed: {', '.join(EXPORT_SUFFIXES)}")
    target = outputs_dir / "exports" / f"{Path(d.image_path).stem}{suffix}"
    with Image.open(d.image_path) as img:
        save_image(
            img.convert("RGB"), target, d.infotext, d.recipe or None, format=format, quality=int(quality)
        )
    return target
