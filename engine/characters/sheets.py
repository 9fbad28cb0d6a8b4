"""Character reference sheets: the views and expressions to render, and the labelled grid they go in.

SHEET_VIEWS (the turnaround) and SHEET_EXPRESSIONS map a view name, which is also its label on the
sheet, to the prompt phrase that asks for it. `compose_sheet` lays rendered views out as a grid on
white: each cell holds its image unscaled (centred when the views differ in size) with its label in
a strip under it, and an optional title bar spans the top.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engine.errors import InputError

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

SHEET_VIEWS: dict[str, str] = {
    "front": "front view, facing the viewer, full body",
    "three-quarter": "three-quarter view, full body",
    "side": "side view, profile, full body",
    "back": "back view, from behind, full body",
}
SHEET_EXPRESSIONS: dict[str, str] = {
    "neutral": "neutral expression, portrait, close-up",
    "smiling": "smiling, happy expression, portrait, close-up",
    "angry": "angry expression, frowning, portrait, close-up",
    "surprised": "surprised expression, open mouth, wide eyes, portrait, close-up",
    "sad": "sad expression, downcast eyes, portrait, close-up",
}

MAX_COLUMNS = 4
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MIN_FONT_PX = 6
ELLIPSIS = "\u2026"


def compose_sheet(
    views: list[tuple[str, Image.Image]],
    title: str = "",
    columns: int | None = None,
    label_height: int | None = None,
) -> Image.Image:
    """A labelled grid of (label, image) views, `columns` wide (default min(len(views), 4)).

    Size: columns * cell width by title bar + rows * (cell height + label_height), where a cell is as
    large as the largest view. label_height defaults to an eighth of the cell height (at least 14 px);
    0 leaves labels out. Labels shrink, then get an ellipsis, to fit their cell.
    """
    from PIL import Image, ImageDraw

    if not views:
        raise InputError("views is empty; give at least one (label, image) to put on the sheet")
    for index, view in enumerate(views):
        if not (isinstance(view, tuple) and len(view) == 2 and isinstance(view[1], Image.Image)):
            raise InputError(f"views[{index}] is {type(view).__name__}; each view is (label, PIL image)")
    if columns is None:
        columns = min(len(views), MAX_COLUMNS)
    if columns < 1:
        raise InputError(f"columns={columns!r} must be >= 1")
    rows = math.ceil(len(views) / columns)
    cell_w = max(image.width for _, image in views)
    cell_h = max(image.height for _, image in views)
    if label_height is None:
        label_height = max(14, cell_h // 8)
    if label_height < 0:
        raise InputError(f"label_height={label_height!r} must be >= 0 (0 leaves the labels out)")
    title_height = round(max(18, label_height, cell_h // 8) * 1.4) if title.strip() else 0
    row_h = cell_h + label_height

    sheet = Image.new("RGB", (columns * cell_w, title_height + rows * row_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title_height:
        _draw_fitted(draw, title.strip(), (0, 0, sheet.width, title_height - 1))
        draw.line([(0, title_height - 1), (sheet.width - 1, title_height - 1)], fill=INK)  # rule under it
    for index, (label, image) in enumerate(views):
        row, column = divmod(index, columns)
        x0, y0 = column * cell_w, title_height + row * row_h
        sheet.paste(_on_white(image), (x0 + (cell_w - image.width) // 2, y0 + (cell_h - image.height) // 2))
        if label_height and label.strip():
            _draw_fitted(draw, label.strip(), (x0, y0 + cell_h, x0 + cell_w, y0 + row_h))
    return sheet


def _on_white(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_fitted(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int]) -> None:
    """Draw `text` centred in `box`, shrinking the font and then ellipsizing so it stays inside."""
    x0, y0, x1, y1 = box
    pad = max(1, (y1 - y0) // 8)
    max_w, max_h = (x1 - x0) - 2 * pad, (y1 - y0) - 2 * pad
    if max_w <= 0 or max_h <= 0:
        return
    size = max(MIN_FONT_PX, round((y1 - y0) * 0.7))
    font = _font(size)
    while size > MIN_FONT_PX and _exceeds(draw, text, font, max_w, max_h):
        size -= 1
        font = _font(size)
    shown = text
    if _exceeds(draw, shown, font, max_w, max_h):
        while shown and _exceeds(draw, shown + ELLIPSIS, font, max_w, max_h):
            shown = shown[:-1]
        shown = shown.rstrip() + ELLIPSIS if shown else ""
    if not shown or _exceeds(draw, shown, font, max_w, max_h):  # not even one letter fits: leave it out
        return
    left, top, right, bottom = draw.textbbox((0, 0), shown, font=font)
    # centre on the line's extent with "Ag" in it, so labels in one row share a baseline
    _, ref_top, _, ref_bottom = draw.textbbox((0, 0), "Ag", font=font)
    top, bottom = min(top, ref_top), max(bottom, ref_bottom)
    x = x0 + ((x1 - x0) - (right - left)) // 2 - left
    y = y0 + max(0, ((y1 - y0) - (bottom - top)) // 2) - top
    draw.text((x, y), shown, fill=INK, font=font)


def _exceeds(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    max_w: int,
    max_h: int,
) -> bool:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    _, ref_top, _, ref_bottom = draw.textbbox((0, 0), "Ag", font=font)
    return right - left > max_w or max(bottom, ref_bottom) - min(top, ref_top) > max_h
