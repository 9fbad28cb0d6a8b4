"""Text drawn with Pillow into an RGBA image: hooks and captions for `render_variant`'s overlay.

User text only ever becomes pixels here; it never reaches an ffmpeg filter string. We ship no font
files: the main font and per-character fallbacks come from the fonts installed on the machine
(DejaVu, Noto, Liberation, matplotlib's bundled DejaVu), else Pillow's built-in font.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from engine.errors import InputError, NotFoundError

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
# Preferred main fonts, best first (file names). Bold reads better over video.
MAIN_FONTS = (
    "DejaVuSans-Bold.ttf",
    "NotoSans-Bold.ttf",
    "LiberationSans-Bold.ttf",
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "LiberationSans-Regular.ttf",
)
# Fallback order for glyphs the main font lacks: broad-coverage families first, emoji last.
FALLBACK_ORDER = ("DejaVuSans", "NotoSans", "Noto", "Liberation", "DejaVu", "Emoji")
BITMAP_EMOJI_SIZE = 109  # the only size Noto Color Emoji's CBDT bitmaps load at
LINE_SPACING = 0.15  # extra space between lines, fraction of the font size
SHADOW_ALPHA = 160


@functools.cache
def installed_fonts() -> tuple[Path, ...]:
    """Font files on this machine (system folders and matplotlib's, if installed), sorted by name."""
    dirs = [Path(d).expanduser() for d in FONT_DIRS]
    spec = find_spec("matplotlib")  # its data folder, found without importing matplotlib
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf")
    found = {
        p.name: p
        for d in dirs
        if d.is_dir()
        for p in sorted(d.rglob("*"))
        if p.suffix.lower() in FONT_SUFFIXES and p.is_file()
    }
    return tuple(found[name] for name in sorted(found))


def _find_font(font: str) -> Path:
    path = Path(font).expanduser()
    if path.is_file():
        return path
    wanted = font.lower().replace(" ", "")
    for candidate in installed_fonts():
        if wanted in (candidate.name.lower(), candidate.stem.lower()):
            return candidate
    names = ", ".join(p.stem for p in installed_fonts()[:12]) or "none installed"
    raise NotFoundError(f"font {font!r} is neither a font file nor an installed font; installed: {names}")


@dataclass
class _Face:
    """A loaded font; `scale` != 1 for bitmap fonts (colour emoji) that load at one size only."""

    font: object
    scale: float = 1.0
    color: bool = False


@functools.cache
def _load(path: str | None, size: int) -> _Face:
    from PIL import ImageFont

    if path is None:
        return _Face(ImageFont.load_default(size))
    try:
        return _Face(ImageFont.truetype(path, size))
    except OSError:
        # Colour bitmap fonts refuse any size but their own: load that and scale the glyphs.
        return _Face(ImageFont.truetype(path, BITMAP_EMOJI_SIZE), size / BITMAP_EMOJI_SIZE, color=True)


def _fallback_paths(main: str | None) -> tuple[str | None, ...]:
    fonts = installed_fonts()
    ranked = sorted(
        (p for p in fonts if str(p) != main),
        key=lambda p: next((i for i, key in enumerate(FALLBACK_ORDER) if key.lower() in p.stem.lower()), 99),
    )
    return (main, *(str(p) for p in ranked))


@functools.cache
def _has_glyph(path: str | None, size: int, char: str) -> bool:
    """Pillow has no cmap query: a glyph is missing when it draws the same as a surely-unassigned
    code point (the font's .notdef box)."""
    face = _load(path, size)
    try:
        mask = face.font.getmask(char, mode="RGBA" if face.color else "")
        notdef = face.font.getmask("\U0010fffd", mode="RGBA" if face.color else "")
    except (OSError, ValueError, UnicodeEncodeError):
        return False
    if mask.size == (0, 0) or not mask.getbbox():
        return False
    return mask.size != notdef.size or bytes(mask) != bytes(notdef)


def _runs(text: str, fonts: tuple[str | None, ...], size: int) -> list[tuple[str, str | None]]:
    """Split a line into (characters, font) runs; characters no installed font has are skipped."""
    runs: list[tuple[str, str | None]] = []
    for char in text:
        if char.isspace():
            chosen = fonts[0]
        else:
            chosen = next((f for f in fonts if _has_glyph(f, size, char)), "")
            if chosen == "":
                continue
        if runs and runs[-1][1] == chosen:
            runs[-1] = (runs[-1][0] + char, chosen)
        else:
            runs.append((char, chosen))
    return runs


def _run_width(run: str, path: str | None, size: int) -> float:
    face = _load(path, size)
    return face.font.getlength(run) * face.scale


def _line_width(line: str, fonts: tuple[str | None, ...], size: int) -> float:
    return sum(_run_width(run, path, size) for run, path in _runs(line, fonts, size))


def _wrap(text: str, fonts: tuple[str | None, ...], size: int, budget: float) -> list[str]:
    """Greedy word wrap to `budget` pixels; a word wider than the budget is broken by characters.
    Explicit newlines start new lines."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}" if line else word
            if _line_width(trial, fonts, size) <= budget:
                line = trial
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and _line_width(line + char, fonts, size) > budget:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _validate(text, frame_width, font_size, outline_width, max_width_fraction) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text must be a non-empty string, got {text!r}")
    if not isinstance(frame_width, int) or not 16 <= frame_width <= 16384:
        raise InputError(f"frame_width must be an integer in [16, 16384], got {frame_width!r}")
    if not isinstance(font_size, int) or not 4 <= font_size <= 1024:
        raise InputError(f"font_size must be an integer in [4, 1024], got {font_size!r}")
    if not isinstance(outline_width, int) or not 0 <= outline_width <= max(1, font_size // 4):
        raise InputError(
            f"outline_width must be an integer in [0, {max(1, font_size // 4)}], got {outline_width!r}"
        )
    if not isinstance(max_width_fraction, int | float) or not 0.1 <= max_width_fraction <= 1.0:
        raise InputError(f"max_width_fraction must be in [0.1, 1.0], got {max_width_fraction!r}")


def _rgba(name: str, value: str) -> tuple[int, int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getcolor(value, "RGBA")
    except (ValueError, AttributeError):
        raise InputError(f"{name} must be a colour such as '#ffffff' or 'white', got {value!r}") from None


def render_text(
    text: str,
    frame_width: int,
    font_size: int = 48,
    color: str = "#ffffff",
    outline_color: str = "#000000",
    outline_width: int = 3,
    shadow: bool = True,
    max_width_fraction: float = 0.9,
    font: str | None = None,
):
    """Draw `text` centred, word-wrapped to `frame_width * max_width_fraction` pixels (outline and
    shadow included), with an outline (Pillow's stroke) and an optional drop shadow.

    Returns an RGBA PIL.Image cropped to the drawn pixels (1x1 transparent when no character could
    be drawn). `font` is a font file or an installed font's file name; None picks a bold sans.
    Glyphs the font lacks come from other installed fonts; those no font has are skipped.
    """
    from PIL import Image, ImageDraw

    _validate(text, frame_width, font_size, outline_width, max_width_fraction)
    fill, stroke = _rgba("color", color), _rgba("outline_color", outline_color)
    if font is not None:
        main: str | None = str(_find_font(font))
    else:
        main = next((str(p) for name in MAIN_FONTS for p in installed_fonts() if p.name == name), None)
    fonts = _fallback_paths(main)
    shadow_offset = max(1, font_size // 16) if shadow else 0
    max_w = int(frame_width * max_width_fraction)
    budget = max(1.0, max_w - 2 * outline_width - shadow_offset)
    lines = _wrap(text, fonts, font_size, budget)

    ascent, descent = _load(main, font_size).font.getmetrics()
    line_h = ascent + descent + round(LINE_SPACING * font_size)
    pad = outline_width + shadow_offset + 2
    canvas_w = int(budget) + 2 * pad + font_size  # slack for ink beyond the advance widths
    canvas = Image.new("RGBA", (canvas_w, line_h * len(lines) + 2 * pad), (0, 0, 0, 0))
    dark = (0, 0, 0, SHADOW_ALPHA)
    passes = [(shadow_offset, dark, dark)] if shadow else []  # (offset, fill, outline)
    passes.append((0, fill, stroke))
    for offset, colour, outline in passes:
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for i, line in enumerate(lines):
            runs = _runs(line, fonts, font_size)
            x = (canvas_w - sum(_run_width(r, p, font_size) for r, p in runs)) / 2 + offset
            baseline = pad + i * line_h + ascent + offset
            for run, path in runs:
                face = _load(path, font_size)
                if face.color:
                    _paste_bitmap_run(layer, run, face, x, baseline, ascent)
                else:
                    draw.text(
                        (x, baseline),
                        run,
                        font=face.font,
                        fill=colour,
                        anchor="ls",
                        stroke_width=outline_width,
                        stroke_fill=outline,
                    )
                x += _run_width(run, path, font_size)
        canvas = Image.alpha_composite(canvas, layer)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    image = canvas.crop(box)
    if image.width > max_w:  # ink overhanging the advance widths; never exceed the promised width
        image = image.resize((max_w, max(1, round(image.height * max_w / image.width))), Image.LANCZOS)
    return image


def _paste_bitmap_run(layer, run: str, face: _Face, x: float, baseline: float, ascent: int) -> None:
    """Colour emoji: draw at the font's bitmap size with its own colours, scale, and paste."""
    from PIL import Image, ImageDraw

    big_ascent, big_descent = face.font.getmetrics()
    width = max(1, int(face.font.getlength(run)))
    tile = Image.new("RGBA", (width, big_ascent + big_descent), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((0, big_ascent), run, font=face.font, anchor="ls", embedded_color=True)
    small = tile.resize((max(1, round(width * face.scale)), max(1, round(tile.height * face.scale))))
    top = int(baseline - big_ascent * face.scale)
    layer.alpha_composite(small, (max(0, int(x)), max(0, top)))
