"""Upscale tab: images, gallery generations and videos through Lanczos, Real-ESRGAN family models or SD x4.

`/upscale` runs one job and returns the upscaled images, the upscaled video (if one was given) and a summary;
`/upscale_models` lists the upscalers with architecture and scale. The gallery's "Send to upscale" buttons and
the Video tab's "Send to upscale" fill this tab (see `wire_send`).
"""

from __future__ import annotations

import inspect

import gradio as gr

from engine.requests import field_spec
from engine.upscale.job import UpscaleRequest
from ui.common import (
    JOBS_CONCURRENCY_ID,
    PRIVATE,
    UIContext,
    engine_errors,
    follow_job,
    name_range_errors,
    username,
    wire_job_controls,
)


def _spec(name: str) -> dict:
    return field_spec(UpscaleRequest, name)


def build(ctx: UIContext) -> dict:
    studio = ctx.studio
    outputs_dir = ctx.settings.outputs_dir

    def upscaler_names() -> list[str]:
        return [row["name"] for row in studio.upscalers() if not row["error"]]

    with gr.Row():
        with gr.Column(scale=3):
            images = gr.File(
                label="Images", file_count="multiple", file_types=["image"], elem_id="upscale_images"
            )
            video = gr.Video(
                label="Video (upscaled frame by frame, audio kept)",
                sources=["upload"],
                elem_id="upscale_video",
            )
            generation_ids = gr.Textbox(
                label="Gallery generations (ids; the gallery's 'Send to upscale' adds them)",
                value="",
                elem_id="upscale_generations",
            )
            with gr.Row():
                upscaler = gr.Dropdown(
                    upscaler_names(),
                    value="Lanczos",
                    label="Upscaler",
                    allow_custom_value=True,
                    elem_id="upscale_upscaler",
                    scale=3,
                )
                refresh = gr.Button("🔄", size="sm", scale=0, min_width=40)
            with gr.Row():
                scale = gr.Number(
                    value=_spec("scale")["default"],
                    minimum=0,
                    maximum=16,
                    label="Scale (0 = size below)",
                    elem_id="upscale_scale",
                )
                width = gr.Number(value=0, precision=0, minimum=0, maximum=16384, label="Target width")
                height = gr.Number(value=0, precision=0, minimum=0, maximum=16384, label="Target height")
                tile = gr.Number(
                    value=0, precision=0, minimum=0, maximum=4096, label="Tile (0 = by free memory)"
                )
            with gr.Accordion("SD x4 upscaler (generative)", open=False):
                prompt = gr.Textbox(label="Prompt", value="", lines=2)
                negative = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    noise_level = gr.Slider(
                        0, 350, value=_spec("noise_level")["default"], step=1, label="Noise level"
                    )
                    steps = gr.Slider(1, 150, value=_spec("steps")["default"], step=1, label="Steps")
                    cfg = gr.Slider(0, 30, value=_spec("cfg_scale")["default"], step=0.5, label="CFG scale")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
            with gr.Row():
                go = gr.Button("Upscale", variant="primary", elem_id="upscale_go")
                stop = gr.Button("Cancel", variant="stop", size="sm")
            status = gr.Markdown(elem_id="upscale_status")
        with gr.Column(scale=2):
            result_images = gr.Gallery(
                label="Upscaled images", format="png", elem_id="upscale_result", height=360
            )
            result_video = gr.Video(label="Upscaled video", elem_id="upscale_result_video", interactive=False)
            summary = gr.JSON(label="Result")
            job_id = gr.Textbox(visible=False)
            cancel_token = gr.Textbox(visible=False)
            with gr.Accordion("Upscale models", open=False):
                table = gr.Dataframe(
                    headers=["name", "kind", "architecture", "scale", "error"],
                    interactive=False,
                    elem_id="upscale_models",
                )
                list_btn = gr.Button("List upscalers", size="sm")

    for component, name in (
        (scale, "scale"),
        (width, "width"),
        (height, "height"),
        (tile, "tile"),
        (noise_level, "noise_level"),
        (steps, "steps"),
        (cfg, "cfg_scale"),
    ):
        name_range_errors(component, name)

    def upscale(
        images: list[str] | None = None,
        video: str | None = None,
        generation_ids: str = "",
        upscaler: str = "Lanczos",
        scale: float = 4.0,
        width: float = 0,
        height: float = 0,
        tile: float = 0,
        prompt: str = "",
        negative_prompt: str = "",
        noise_level: float = 20,
        steps: float = 20,
        cfg_scale: float = 9.0,
        seed: float = -1,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Upscale images (uploads), gallery generations (ids, comma-separated) and/or one video with Lanczos,
        a Real-ESRGAN family model (see /upscale_models) or 'SD x4: <model>' (prompt, noise_level, steps,
        cfg_scale, seed). scale (e.g. 2 from a 4x model) or width+height. Results keep the source's metadata
        and add the upscale step. Returns the images, the video and a summary (job id, items)."""
        ids = ", ".join(generation_ids) if isinstance(generation_ids, list) else (generation_ids or "")
        values = dict(
            images=[str(p) for p in (images or [])],
            video=video or None,
            generation_ids=ids,
            upscaler=upscaler or "Lanczos",
            scale=float(scale or 0),
            width=int(width or 0),
            height=int(height or 0),
            tile=int(tile or 0),
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            noise_level=int(noise_level),
            steps=int(steps),
            cfg_scale=float(cfg_scale),
            seed=int(seed if seed is not None else -1),
        )
        with engine_errors():
            jid, token = studio.submit_upscale(values, owner=username(request))
        yield [], None, {"job_id": jid}, jid, token, f"**queued** · job `{jid}`"
        for event in follow_job(studio, jid, progress, what=f"job {jid}", title="Upscale failed"):
            if event["type"] == "done":
                items = event["result"]["items"]
                pics = [
                    (str(outputs_dir / it["file"]), f"{it['width']}x{it['height']} · {it['source']}")
                    for it in items
                    if it["kind"] == "image"
                ]
                videos = [str(outputs_dir / it["file"]) for it in items if it["kind"] == "video"]
                yield (
                    pics,
                    videos[0] if videos else None,
                    {"job_id": jid, **event["result"]},
                    jid,
                    token,
                    f"**succeeded** · {len(items)} item(s) with {event['result']['upscaler']}",
                )
            elif event["type"] == "cancelled":
                yield [], None, {"job_id": jid, "status": "cancelled"}, jid, token, "**cancelled**"

    fields = dict(
        images=images,
        video=video,
        generation_ids=generation_ids,
        upscaler=upscaler,
        scale=scale,
        width=width,
        height=height,
        tile=tile,
        prompt=prompt,
        negative_prompt=negative,
        noise_level=noise_level,
        steps=steps,
        cfg_scale=cfg,
        seed=seed,
    )
    inputs = [fields[name] for name in inspect.signature(upscale).parameters if name in fields]
    go.click(
        upscale,
        inputs,
        [result_images, result_video, summary, job_id, cancel_token, status],
        api_name="upscale",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    )
    wire_job_controls(ctx, stop, job_id, cancel_token, status)

    def upscale_models() -> list[dict]:
        """Every upscaler: name, kind (lanczos, model, sd_x4), architecture and scale as spandrel reads the
        file, and the error for a file it cannot load."""
        with engine_errors():
            return studio.upscalers()

    hidden = gr.JSON(visible=False)
    list_btn.click(upscale_models, None, [hidden], api_name="upscale_models").success(
        lambda rows: [[r["name"], r["kind"], r["architecture"], r["scale"], r["error"]] for r in rows or []],
        [hidden],
        [table],
        **PRIVATE,
    )
    refresh.click(lambda: gr.update(choices=upscaler_names()), None, [upscaler], **PRIVATE)
    return {"generation_ids": generation_ids, "video": video, "images": images}


def wire_send(ctx: UIContext, targets: dict, gallery: dict | None, video_tab: dict | None) -> None:
    """The gallery's and the Video tab's "Send to upscale": add the selection to this tab and switch to it."""

    def add(current: str, generation_id: str):
        if not generation_id:
            raise gr.Error("select an image or video in the gallery first", title="Nothing selected")
        ids = [p.strip() for p in (current or "").split(",") if p.strip()]
        if generation_id not in ids:
            ids.append(generation_id)
        return ", ".join(ids), *ctx.switch_to("upscale")

    def add_page(current: str, page_ids: list | None):
        ids = [p.strip() for p in (current or "").split(",") if p.strip()]
        ids += [g for g in (page_ids or []) if g not in ids]
        return ", ".join(ids), *ctx.switch_to("upscale")

    if gallery is not None:
        gallery["send_upscale"].click(
            add,
            [targets["generation_ids"], gallery["selected"]],
            [targets["generation_ids"], *ctx.switch_outputs("upscale")],
            **PRIVATE,
        )
        gallery["send_page_upscale"].click(
            add_page,
            [targets["generation_ids"], gallery["ids"]],
            [targets["generation_ids"], *ctx.switch_outputs("upscale")],
            **PRIVATE,
        )
    if video_tab is not None:
        video_tab["send_upscale"].click(
            add,
            [targets["generation_ids"], video_tab["generation_id"]],
            [targets["generation_ids"], *ctx.switch_outputs("upscale")],
            **PRIVATE,
        )
