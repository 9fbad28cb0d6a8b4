"""Character reference sheets: one generation per view (turnaround + expressions) with the character's
prompt and one fixed seed, composed into a labelled grid saved as the character's asset.

From text (txt2img), or from a source image: img2img by default, or through IP-Adapter when the
user has its weights (models/ipadapter + models/clip_vision; refused with what to put where when not).
Every view is an ordinary generation (recipe, infotext, gallery) and joins the character's dataset
as `pending`, so good views can be approved into the training set.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator, model_validator

from engine.artifacts import save_png
from engine.characters.sheets import SHEET_EXPRESSIONS, SHEET_VIEWS, compose_sheet
from engine.gallery.records import file_asset
from engine.generation.generate import generate_images
from engine.generation.request import GenerateRequest
from engine.requests import RequestBase
from engine.store.database import utcnow


class ReferenceSheetRequest(RequestBase):
    base: GenerateRequest = Field(
        description="The recipe every view shares: character, model, style, fixed seed"
    )
    views: list[str] = Field(default_factory=lambda: list(SHEET_VIEWS), max_length=len(SHEET_VIEWS))
    expressions: list[str] = Field(
        default_factory=lambda: list(SHEET_EXPRESSIONS), max_length=len(SHEET_EXPRESSIONS)
    )
    add_to_dataset: bool = Field(default=True, description="Queue every view for review in the dataset")

    @field_validator("views", "expressions", mode="before")
    @classmethod
    def _split(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> ReferenceSheetRequest:
        for name in self.views:
            if name not in SHEET_VIEWS:
                raise ValueError(f"view {name!r} is unknown; allowed: {', '.join(SHEET_VIEWS)}")
        for name in self.expressions:
            if name not in SHEET_EXPRESSIONS:
                raise ValueError(f"expression {name!r} is unknown; allowed: {', '.join(SHEET_EXPRESSIONS)}")
        if not self.views and not self.expressions:
            raise ValueError("pick at least one view or expression")
        if self.base.character is None:
            raise ValueError("a reference sheet needs a character")
        if self.base.seed < 0:
            raise ValueError("the sheet's seed must be fixed (resolve -1 before submitting)")
        return self

    def cells(self) -> list[tuple[str, GenerateRequest]]:
        """(label, request) per view: the view's phrase joins the user's prompt; one seed for all."""
        phrases = [(v, SHEET_VIEWS[v]) for v in self.views] + [
            (e, SHEET_EXPRESSIONS[e]) for e in self.expressions
        ]
        out = []
        for name, phrase in phrases:
            prompt = ", ".join(p for p in (phrase, self.base.prompt.strip()) if p)
            out.append(
                (
                    name,
                    self.base.model_copy(
                        update={"prompt": prompt, "batch_size": 1, "batch_count": 1, "dataset_review": False}
                    ),
                )
            )
        return out


def run_reference_sheet_job(req: ReferenceSheetRequest, ctx) -> dict:
    from PIL import Image

    rt = ctx.runtime
    character = req.base.character
    cells = req.cells()
    views = []
    for n, (name, cell) in enumerate(cells):
        ctx.check_cancelled()
        res = generate_images(cell, ctx.part(n, len(cells), name))
        views.append({"view": name, **res.images[0].model_dump()})
    images = []
    for v in views:
        with Image.open(v["path"]) as im:
            images.append((v["view"], im.convert("RGB")))
    sheet = compose_sheet(images, title=f"{character.name} · seed {req.base.seed}")
    recipe = {
        "app": "StudioNOVA",
        "kind": "reference_sheet",
        "job_id": ctx.job_id,
        "character": character.model_dump(mode="json"),
        "seed": req.base.seed,
        "views": [{"view": v["view"], "generation_id": v["generation_id"]} for v in views],
        "base": req.base.model_dump(mode="json"),
    }
    path = ctx.outputs / utcnow().strftime("%Y-%m-%d") / f"{ctx.job_id[:12]}-sheet-{character.slug}.png"
    save_png(sheet, path, {"studionova": json.dumps(recipe, ensure_ascii=False, default=str)})
    asset = file_asset(path, "sheet", sheet.width, sheet.height, ctx.job_id, character_id=character.id)
    with rt.db.session() as s:
        s.add(asset)
        s.commit()
    queued = []
    if req.add_to_dataset:
        for v in views:
            item = ctx.datasets.add_generated(
                character.id, v["path"], v["generation_id"], f"sheet:{ctx.job_id}#{v['view']}"
            )
            if item is not None:
                queued.append(item.id)
    return {
        "sheet": str(path),
        "asset_id": asset.id,
        "character": character.slug,
        "views": views,
        "dataset_items": queued,
    }
