"""X/Y/Z plot (A1111's script): render a base recipe over two or three parameter axes, as one job,
into a labelled grid per Z value. Every cell is an ordinary generation (saved, in the gallery, with
its own infotext), so the grid is "kept with its parts"; the grid image records its cells.

Axis values use A1111's forms: "a, b, c" (CSV, quotes allowed), numeric ranges "1-5", "1-10 (+2)",
"10-20 [3]" (count), and for Prompt S/R the first value is the text searched for in the prompt.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from engine.artifacts import save_png
from engine.errors import InputError
from engine.gallery.records import file_asset
from engine.generation.generate import generate_images
from engine.generation.request import GenerateRequest
from engine.requests import RequestBase
from engine.store.database import utcnow


@dataclass(frozen=True)
class Axis:
    label: str
    field: str  # GenerateRequest field; "" for Prompt S/R
    kind: type  # int, float or str


AXES: dict[str, Axis] = {
    a.label: a
    for a in (
        Axis("Nothing", "", str),
        Axis("Seed", "seed", int),
        Axis("Var. seed", "subseed", int),
        Axis("Var. strength", "subseed_strength", float),
        Axis("Steps", "steps", int),
        Axis("CFG Scale", "cfg_scale", float),
        Axis("Prompt S/R", "", str),
        Axis("Sampler", "sampler", str),
        Axis("Checkpoint name", "model", str),
        Axis("Clip skip", "clip_skip", int),
        Axis("Denoising", "denoising_strength", float),
        Axis("Hires steps", "hr_second_pass_steps", int),
        Axis("Hires upscaler", "hr_upscaler", str),
        Axis("VAE", "vae", str),
        Axis("Width", "width", int),
        Axis("Height", "height", int),
    )
}
MAX_CELLS = 100
RANGE_RE = re.compile(
    r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)(?:\s*\(([+-]?\d+(?:\.\d*)?)\)|\s*\[(\d+)\])?\s*$"
)


def parse_values(axis_label: str, text: str) -> list[Any]:
    """Axis text -> typed values, as A1111 reads them. Errors name the axis and the bad item."""
    axis = AXES.get(axis_label)
    if axis is None:
        raise InputError(f"axis type {axis_label!r} is unknown; allowed: {', '.join(AXES)}")
    if axis.label == "Nothing":
        return [None]
    items = [v.strip() for row in csv.reader([text or ""], skipinitialspace=True) for v in row if v.strip()]
    if not items:
        raise InputError(f"{axis.label} axis has no values; give a comma-separated list such as 1, 2, 3")
    if axis.kind is str:
        return items
    out: list[Any] = []
    for item in items:
        m = RANGE_RE.match(item)
        try:
            if m:
                start, end = axis.kind(float(m[1])), axis.kind(float(m[2]))
                if m[4]:  # [count]
                    n = int(m[4])
                    step = (end - start) / (n - 1) if n > 1 else 0
                    out += [axis.kind(start + step * i) for i in range(n)]
                else:
                    step = axis.kind(float(m[3])) if m[3] else (1 if end >= start else -1)
                    if step == 0:
                        raise ValueError("step 0")
                    v = start
                    while (step > 0 and v <= end + 1e-9) or (step < 0 and v >= end - 1e-9):
                        out.append(round(v, 6) if axis.kind is float else v)
                        v = v + step
            else:
                out.append(axis.kind(float(item)) if axis.kind is int else axis.kind(item))
        except ValueError:
            raise InputError(
                f"{axis.label} axis: {item!r} is not a {axis.kind.__name__} or range "
                "(forms: 1, 2, 3 | 1-5 | 1-10 (+2) | 10-20 [3])"
            ) from None
    return out


class XYZPlotRequest(RequestBase):
    base: GenerateRequest
    x_type: str = Field(default="Seed")
    x_values: str = Field(default="", max_length=4000)
    y_type: str = Field(default="Nothing")
    y_values: str = Field(default="", max_length=4000)
    z_type: str = Field(default="Nothing")
    z_values: str = Field(default="", max_length=4000)
    draw_legend: bool = True

    @field_validator("x_type", "y_type", "z_type")
    @classmethod
    def _known_axis(cls, v: str) -> str:
        if v not in AXES:
            raise ValueError(f"unknown axis type; allowed: {', '.join(AXES)}")
        return v

    @model_validator(mode="after")
    def _cells(self) -> XYZPlotRequest:
        used = [t for t in (self.x_type, self.y_type, self.z_type) if t != "Nothing"]
        if len(set(used)) != len(used):
            raise ValueError(f"each axis type may be used once; got {used}")
        if self.base.batch_size * self.base.batch_count != 1:
            raise ValueError("X/Y/Z plot renders one image per cell: set batch_size and batch_count to 1")
        n = len(self.cells())
        if n > MAX_CELLS:
            raise ValueError(f"{n} cells; at most {MAX_CELLS}")
        return self

    def axes(self) -> list[tuple[str, list[Any]]]:
        return [
            (t, parse_values(t, v))
            for t, v in (
                (self.x_type, self.x_values),
                (self.y_type, self.y_values),
                (self.z_type, self.z_values),
            )
        ]

    def cells(self) -> list[tuple[tuple[int, int, int], GenerateRequest]]:
        """((xi, yi, zi), request) in render order (z, then y, then x), each validated."""
        (xt, xs), (yt, ys), (zt, zs) = self.axes()
        out = []
        for zi, z in enumerate(zs):
            for yi, y in enumerate(ys):
                for xi, x in enumerate(xs):
                    values = self.base.model_dump()
                    for axis_type, value, axis_values in ((xt, x, xs), (yt, y, ys), (zt, z, zs)):
                        apply_axis(values, axis_type, value, axis_values)
                    out.append(((xi, yi, zi), GenerateRequest.build(**values)))
        return out


def apply_axis(values: dict, axis_type: str, value: Any, axis_values: list[Any]) -> None:
    axis = AXES[axis_type]
    if axis.label == "Nothing":
        return
    if axis.label == "Prompt S/R":
        search = axis_values[0]
        if search not in values["prompt"] and search not in values["negative_prompt"]:
            raise InputError(
                f"Prompt S/R: {search!r} (the first value) is not in the prompt or negative prompt"
            )
        values["prompt"] = values["prompt"].replace(search, value)
        values["negative_prompt"] = values["negative_prompt"].replace(search, value)
        return
    values[axis.field] = value


def label(axis_type: str, value: Any) -> str:
    if axis_type == "Nothing":
        return ""
    return f"{value}" if axis_type == "Prompt S/R" else f"{axis_type}: {value}"


def draw_grid(images: list, xs: list[str], ys: list[str], title: str = ""):
    """A labelled grid (rows = Y, columns = X) like A1111's, with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    cols, rows = max(1, len(xs)), max(1, len(ys))
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, w // 16))
    left = max((int(font.getlength(t)) for t in ys), default=0) + 16 if any(ys) else 0
    top = (font.size + 16 if any(xs) else 0) + (font.size + 12 if title else 0)
    grid = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left + cols * w // 2, 6), title, fill="black", font=font, anchor="ma")
    for i, text in enumerate(xs):
        if text:
            draw.text((left + i * w + w // 2, top - 8), text, fill="black", font=font, anchor="md")
    for j, text in enumerate(ys):
        if text:
            draw.text((left - 8, top + j * h + h // 2), text, fill="black", font=font, anchor="rm")
    for k, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), (left + (k % cols) * w, top + (k // cols) * h))
    return grid


def run_xyz_job(req: XYZPlotRequest, ctx) -> dict:
    from PIL import Image

    (xt, xs), (yt, ys), (zt, zs) = req.axes()
    cells = req.cells()
    results: dict[tuple[int, int, int], dict] = {}
    for n, (pos, cell) in enumerate(cells):
        ctx.check_cancelled()
        res = generate_images(cell, ctx.part(n, len(cells), "cell"))
        results[pos] = res.images[0].model_dump()
    grids = []
    rt = ctx.runtime
    for zi, z in enumerate(zs):
        imgs = [Image.open(results[(xi, yi, zi)]["path"]) for yi in range(len(ys)) for xi in range(len(xs))]
        xl = [label(xt, x) for x in xs] if req.draw_legend else []
        yl = [label(yt, y) for y in ys] if req.draw_legend else []
        grid = draw_grid(imgs, xl, yl, label(zt, z) if req.draw_legend else "")
        parts = [
            {
                "x": xi,
                "y": yi,
                "generation_id": results[(xi, yi, zi)]["generation_id"],
                "path": results[(xi, yi, zi)]["path"],
            }
            for yi in range(len(ys))
            for xi in range(len(xs))
        ]
        recipe = {
            "app": "StudioNOVA",
            "kind": "xyz_plot",
            "job_id": ctx.job_id,
            "x": [xt, xs],
            "y": [yt, ys],
            "z": [zt, z],
            "cells": parts,
            "base": req.base.model_dump(mode="json"),
        }
        path = ctx.outputs / utcnow().strftime("%Y-%m-%d") / f"{ctx.job_id[:12]}-grid-{zi:02d}.png"
        save_png(grid, path, {"studionova": json.dumps(recipe, ensure_ascii=False, default=str)})
        asset = file_asset(path, "grid", grid.width, grid.height, ctx.job_id)
        with rt.db.session() as s:
            s.add(asset)
            s.commit()
        grids.append({"path": str(path), "asset_id": asset.id, "z": label(zt, z), "cells": parts})
    return {"grids": grids, "images": [results[pos] for pos, _ in cells]}
