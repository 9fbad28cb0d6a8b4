"""Character reference sheets: grid geometry, untouched cell pixels, labels that fit."""

from __future__ import annotations

import pytest
from PIL import Image

from engine.characters.sheets import SHEET_EXPRESSIONS, SHEET_VIEWS, compose_sheet
from engine.errors import InputError

WHITE = (255, 255, 255)


def coloured_views(count: int, size: int = 64) -> list[tuple[str, Image.Image]]:
    labels = [*SHEET_VIEWS, *SHEET_EXPRESSIONS]
    return [
        (labels[i % len(labels)], Image.new("RGB", (size, size), (20 * i % 256, 200 - 15 * i, 40 + 20 * i)))
        for i in range(count)
    ]


def non_white(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    strip = sheet.crop(box).convert("RGB")
    return sum(1 for pixel in strip.getdata() if pixel != WHITE)


def check_grid(sheet, views, columns, cell, label_height, title_height):
    rows = -(-len(views) // columns)
    assert sheet.size == (columns * cell, title_height + rows * (cell + label_height))
    for index, (_, image) in enumerate(views):
        row, column = divmod(index, columns)
        x0, y0 = column * cell, title_height + row * (cell + label_height)
        centre = (x0 + cell // 2, y0 + cell // 2)
        assert sheet.getpixel(centre) == image.getpixel((cell // 2, cell // 2))
        assert sheet.getpixel((x0, y0)) == image.getpixel((0, 0))
        assert sheet.getpixel((x0 + cell - 1, y0 + cell - 1)) == image.getpixel((cell - 1, cell - 1))
        # the label strip under the cell has ink, and none of it spills out of the strip's own cell
        assert non_white(sheet, (x0, y0 + cell, x0 + cell, y0 + cell + label_height)) > 0


def test_four_views_in_one_row_with_labels():
    views = coloured_views(4)
    sheet = compose_sheet(views, label_height=16)
    assert sheet.mode == "RGB"
    check_grid(sheet, views, columns=4, cell=64, label_height=16, title_height=0)


def test_nine_views_make_three_rows_of_four():
    views = coloured_views(9)
    sheet = compose_sheet(views, label_height=16)
    check_grid(sheet, views, columns=4, cell=64, label_height=16, title_height=0)
    assert sheet.size == (256, 3 * 80)
    # the three empty cells of the last row stay white
    assert non_white(sheet, (64, 160, 256, 240)) == 0


def test_title_bar_and_default_label_height():
    views = coloured_views(3)
    sheet = compose_sheet(views, title="Nova reference sheet")
    rows_height = 64 + 14  # default label strip: max(14, cell // 8)
    title_height = sheet.height - rows_height
    assert title_height > 0
    check_grid(sheet, views, columns=3, cell=64, label_height=14, title_height=title_height)
    assert non_white(sheet, (0, 0, sheet.width, title_height)) > 0


def test_explicit_columns():
    views = coloured_views(5)
    sheet = compose_sheet(views, columns=2, label_height=12)
    check_grid(sheet, views, columns=2, cell=64, label_height=12, title_height=0)


def test_a_long_label_is_shrunk_or_ellipsized_inside_its_cell():
    long = "an extremely long label that could never fit under a tiny cell"
    views = [(long, Image.new("RGB", (64, 64), (0, 0, 0))), ("front", Image.new("RGB", (64, 64), (0, 0, 0)))]
    sheet = compose_sheet(views, label_height=16)
    # the first label's strip has ink, and the second cell's strip holds only its own short label
    assert non_white(sheet, (0, 64, 64, 80)) > 0
    first_strip_edges = [sheet.getpixel((0, y)) for y in range(64, 80)] + [
        sheet.getpixel((63, y)) for y in range(64, 80)
    ]
    assert all(pixel == WHITE for pixel in first_strip_edges)
    alone = compose_sheet([views[1]], label_height=16)
    assert list(sheet.crop((64, 64, 128, 80)).getdata()) == list(alone.crop((0, 64, 64, 80)).getdata())


def test_large_cells_scale_the_font():
    views = [("three-quarter", Image.new("RGB", (1024, 1024), (10, 90, 200)))]
    sheet = compose_sheet(views, title="Nova")
    label_height = 1024 // 8
    assert sheet.height - 1024 - label_height > 0  # a title bar
    strip = sheet.crop((0, sheet.height - label_height, 1024, sheet.height))
    bbox = Image.eval(strip.convert("L"), lambda v: 255 - v).getbbox()
    assert bbox is not None
    assert bbox[3] - bbox[1] > 40  # letters sized to the strip, not the 11 px bitmap font


def test_mixed_sizes_and_modes_are_centred_on_white():
    small = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    big = Image.new("L", (64, 64), 0)
    sheet = compose_sheet([("small", small), ("big", big)], label_height=16)
    assert sheet.size == (128, 80)
    assert sheet.getpixel((32, 32)) == (255, 0, 0)
    assert sheet.getpixel((2, 2)) == WHITE
    assert sheet.getpixel((96, 32)) == (0, 0, 0)


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="views is empty"):
        compose_sheet([])
    with pytest.raises(InputError, match="columns=0"):
        compose_sheet(coloured_views(2), columns=0)
    with pytest.raises(InputError, match=r"views\[0\]"):
        compose_sheet([("front", "not an image")])  # type: ignore[list-item]


def test_sheet_prompt_tables():
    assert list(SHEET_VIEWS) == ["front", "three-quarter", "side", "back"]
    assert {"neutral", "smiling", "angry", "surprised", "sad"} <= set(SHEET_EXPRESSIONS)
    assert all(phrase.strip() for phrase in [*SHEET_VIEWS.values(), *SHEET_EXPRESSIONS.values()])
