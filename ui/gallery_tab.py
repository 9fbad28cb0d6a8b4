"""Gallery tab: paged thumbnails of every output, filters, full metadata, trash, reuse and send-to."""

from __future__ import annotations

import dataclasses
import json

import gradio as gr

from engine.gallery.records import MODES
from engine.media.ffmpeg import VIDEO_SUFFIXES
from ui.common import PRIVATE, UIContext, engine_errors
from ui.send import form_targets, form_updates

PAGE_SIZE = 50


def build(ctx: UIContext) -> dict:
    studio = ctx.studio
    with gr.Row():
        text = gr.Textbox(label="Prompt contains", value="", scale=3, elem_id="gallery_text")
        model = gr.Dropdown(
            ["", *[n for _, n in studio.model_choices()]], value="", label="Model", allow_custom_value=True
        )
        lora = gr.Dropdown(["", *studio.lora_names()], value="", label="LoRA", allow_custom_value=True)
        character = gr.Textbox(label="Character", value="")
        mode = gr.Dropdown(["", *MODES], value="", label="Mode")
    with gr.Row():
        date_from = gr.Textbox(label="From (YYYY-MM-DD)", value="")
        date_to = gr.Textbox(label="To (YYYY-MM-DD)", value="")
        trash_view = gr.Checkbox(value=False, label="Show the trash")
        page = gr.Number(value=1, precision=0, minimum=1, label="Page", elem_id="gallery_page")
        search = gr.Button("Search", variant="primary", elem_id="gallery_search")
        prev_btn = gr.Button("◀ Prev", size="sm")
        next_btn = gr.Button("Next ▶", size="sm")
    summary = gr.Markdown(elem_id="gallery_summary")
    with gr.Row():
        with gr.Column(scale=3):
            grid = gr.Gallery(
                label="History",
                columns=6,
                height=520,
                allow_preview=False,
                format="webp",
                elem_id="history_gallery",
                interactive=False,
            )
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Generation id", interactive=False, elem_id="gallery_selected")
            image = gr.Image(label="Image", type="filepath", interactive=False, height=256)
            video = gr.Video(
                label="Video", interactive=False, height=256, visible=False, elem_id="gallery_video"
            )
            infotext = gr.Textbox(label="Infotext", lines=4, buttons=["copy"])
            with gr.Row():
                reuse = gr.Button("Reuse parameters", size="sm", elem_id="gallery_reuse")
                to_img2img = gr.Button("Send to img2img", size="sm")
                to_inpaint = gr.Button("Send to inpaint", size="sm")
            with gr.Row():
                send_upscale = gr.Button("Send to upscale", size="sm", elem_id="gallery_send_upscale")
                send_page_upscale = gr.Button("Send page to upscale", size="sm")
                send_video = gr.Button("Send to video", size="sm", elem_id="gallery_send_video")
            with gr.Row():
                trash_btn = gr.Button("Move to trash", size="sm", variant="stop", elem_id="gallery_trash")
                restore_btn = gr.Button("Restore", size="sm")
                empty_btn = gr.Button("Empty trash", size="sm", variant="stop")
            with gr.Row():
                export_format = gr.Radio(["png", "jpeg", "webp"], value="jpeg", label="Export as")
                export_btn = gr.Button("Export with metadata", size="sm")
            exported = gr.File(label="Exported file", interactive=False)
            detail = gr.JSON(label="Metadata")
    ids = gr.JSON([], visible=False)  # not gr.State: that keeps a heartbeat stream open (no networkidle)
    filters = [text, model, lora, character, mode, date_from, date_to, trash_view, page]

    def gallery(
        text: str = "",
        model: str = "",
        lora: str = "",
        character: str = "",
        mode: str = "",
        date_from: str = "",
        date_to: str = "",
        only_trashed: bool = False,
        page: float = 1,
        page_size: float = PAGE_SIZE,
    ) -> dict:
        """One page of the history, newest first, filtered by prompt text, model, LoRA, character, mode and
        date range (YYYY-MM-DD). Returns items (generation id, image path, prompt, model, LoRAs, seed, size,
        date, mode), total, page and pages."""
        with engine_errors():
            result = studio.gallery(
                text=text or "",
                model=model or "",
                lora=lora or "",
                character=character or "",
                mode=mode or "",
                date_from=date_from or None,
                date_to=date_to or None,
                only_trashed=bool(only_trashed),
                page=int(page or 1),
                page_size=int(page_size or PAGE_SIZE),
            )
        return json.loads(json.dumps(dataclasses.asdict(result), default=str))

    def show(*values):
        result = gallery(*values)
        items = result["items"]
        pictures = [
            (
                it["thumbnail_path"] or it["image_path"],
                it["model"] if it["seed"] is None else f"{it['seed']} · {it['model']}",  # None: no sampling
            )
            for it in items
        ]
        text_ = f"{result['total']} image(s) · page {result['page']} of {result['pages']}"
        return pictures, [it["generation_id"] for it in items], text_, result["page"]

    hidden = gr.JSON(visible=False)
    search.click(gallery, filters, [hidden], api_name="gallery")
    search.click(show, filters, [grid, ids, summary, page], **PRIVATE)

    def step(delta: int):
        def go(*values):
            values = list(values)
            values[-1] = max(1, int(values[-1] or 1) + delta)
            return show(*values)

        return go

    prev_btn.click(step(-1), filters, [grid, ids, summary, page], **PRIVATE)
    next_btn.click(step(+1), filters, [grid, ids, summary, page], **PRIVATE)

    def pick(id_list: list, evt: gr.SelectData):
        if evt.index is None or evt.index >= len(id_list):
            return "", None, gr.update(value=None, visible=False), "", None
        with engine_errors():
            d = studio.generation(id_list[evt.index])
        record = json.loads(json.dumps(dataclasses.asdict(d), default=str))
        path = d.image_path if d.file_exists else None
        if path and path.lower().endswith(VIDEO_SUFFIXES):  # a clip: the player instead of the image view
            return d.generation_id, None, gr.update(value=path, visible=True), d.infotext, record
        return d.generation_id, path, gr.update(value=None, visible=False), d.infotext, record

    grid.select(pick, [ids], [selected, image, video, infotext, detail], **PRIVATE)

    def trash(generation_id: str):
        with engine_errors():
            n = studio.trash([generation_id])
        return f"moved {n} image(s) to the trash"

    def restore(generation_id: str):
        with engine_errors():
            n = studio.restore([generation_id])
        return f"restored {n} image(s)"

    def empty():
        with engine_errors():
            res = studio.empty_trash()
        failed = f"; {len(res.failed)} could not be deleted: {res.failed}" if res.failed else ""
        return f"deleted {res.deleted} image(s) and their files{failed}"

    trash_btn.click(trash, [selected], [summary], **PRIVATE).then(
        show, filters, [grid, ids, summary, page], **PRIVATE
    )
    restore_btn.click(restore, [selected], [summary], **PRIVATE).then(
        show, filters, [grid, ids, summary, page], **PRIVATE
    )
    empty_btn.click(empty, None, [summary], **PRIVATE)

    def export_image(generation_id: str, format: str = "jpeg") -> str:
        """A copy of a generated image as png, jpeg or webp with its A1111 infotext (EXIF for JPEG/WebP)."""
        if not generation_id:
            raise gr.Error("select an image first", title="Nothing selected")
        with engine_errors():
            d = studio.generation(generation_id)
            if str(d.image_path or "").lower().endswith(VIDEO_SUFFIXES):
                raise gr.Error(
                    f"generation {generation_id} is a clip; export converts images (png, jpeg, webp)",
                    title="Not an image",
                )
            return str(studio.export_image(generation_id, format))

    export_btn.click(export_image, [selected, export_format], [exported], api_name="export_image")

    if ctx.form is not None:
        targets = [*form_targets(ctx.form), *ctx.switch_outputs("generate")]

        def params_of(record: dict | None) -> dict:
            if not record:
                raise gr.Error("select an image first", title="Nothing selected")
            if str(record.get("image_path") or "").lower().endswith(VIDEO_SUFFIXES):
                raise gr.Error(
                    f"this is a clip (mode {record.get('mode')}); its settings are not an image's: open "
                    "it in the Video tab or send it to upscale",
                    title="Not an image",
                )
            params = dict((record.get("recipe") or {}).get("request") or {})
            if record.get("seed") is not None:  # an upscaled upload has no seed
                params["seed"] = record["seed"]
            return params

        def reuse_params(record: dict | None):
            return [*form_updates(ctx.form, params_of(record)), *ctx.switch_to("generate")]

        def send_img2img(record: dict | None, path: str | None):
            params = params_of(record)
            return [
                *form_updates(
                    ctx.form, {"width": params.get("width"), "height": params.get("height")}, init_image=path
                ),
                *ctx.switch_to("generate"),
            ]

        reuse.click(reuse_params, [detail], targets, **PRIVATE)
        to_img2img.click(send_img2img, [detail, image], targets, **PRIVATE)
        to_inpaint.click(
            send_img2img,
            [detail, image],
            targets,
            **PRIVATE,
        ).then(
            lambda path: (
                gr.update(value={"background": path, "layers": [], "composite": path}) if path else gr.skip()
            ),
            [image],
            [ctx.form["_editor"]],
            **PRIVATE,
        )
    return {
        "selected": selected,
        "ids": ids,
        "send_upscale": send_upscale,
        "send_page_upscale": send_page_upscale,
        "send_video": send_video,
        "detail": detail,
    }
