"""Generate tab: txt2img / img2img form, live progress with latent preview, cancel.

`generate` backs both the button and the `/generate` API endpoint: it submits a job and yields
its events. Closing the browser stops only this watcher; the job keeps running.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from engine.generation.request import GenerateRequest
from engine.samplers import SAMPLER_NAMES
from ui.common import (
    JOBS_CONCURRENCY_ID,
    PRIVATE,
    UIContext,
    engine_errors,
    follow_job,
    username,
    wire_job_controls,
)
from ui.forms import Form

# API parameter order of /generate: positional callers rely on it, so it is frozen here; a new field needs no
# entry (it follows these, in the order the form builds it).
API_ORDER = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler",
    "model",
    "loras",
    "batch_size",
    "batch_count",
    "clip_skip",
    "init_image",
    "denoising_strength",
    "mask_image",
    "mask_blur",
    "inpaint_only_masked",
    "inpaint_padding",
    "masked_content",
    "outpaint_left",
    "outpaint_right",
    "outpaint_up",
    "outpaint_down",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_denoising_strength",
    "subseed",
    "subseed_strength",
    "vae",
    "controlnet",
    "control_image",
    "control_preprocessor",
    "controlnet_scale",
    "styles",
    "refiner",
    "refiner_switch_at",
    "character",
    "dataset_review",
    "use_character_style",
    "engine",
    "comfy_template",
)
# the recipe fields /xyz_plot takes after its axes, in its parameter order
XYZ_BASE = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler",
    "model",
    "loras",
    "clip_skip",
    "vae",
    "styles",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
)


MASKED_CONTENT = ["original", "fill", "latent noise", "latent nothing"]


def editor_to_inputs(value: dict | None):
    """gr.ImageEditor value -> (source image, mask): painted pixels on any layer are the mask."""
    import numpy as np
    from PIL import Image

    if not value or value.get("background") is None:
        return gr.skip(), gr.skip()
    background = value["background"].convert("RGB")
    alpha = np.zeros((background.height, background.width), dtype=np.uint8)
    for layer in value.get("layers") or []:
        a = np.asarray(layer.convert("RGBA").resize(background.size))[..., 3]
        alpha = np.maximum(alpha, a)
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L")
    return background, (mask if mask.getbbox() else None)


def build(ctx: UIContext) -> dict[str, Any]:
    """Builds the tab; returns its form components by request field name (for "send to" buttons)."""
    studio = ctx.studio
    form = Form(GenerateRequest, extra={"use_character_style": False})
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                from ui.characters_tab import character_choices

                character = form.dropdown(
                    "character",
                    "Character",
                    [("(none)", ""), *character_choices(studio)],
                    value="",
                    elem_id="generate_character",
                    allow_custom_value=True,
                    info="adds its trigger word, design prompt, negatives and LoRA",
                )
                form.checkbox(
                    "dataset_review", "Queue images for review in its dataset", elem_id="dataset_review"
                )
                form.checkbox(
                    "use_character_style",
                    "Use its sampler, steps, CFG and size",
                    elem_id="use_character_style",
                )
            prompt = form.textbox(
                "prompt", "Prompt", lines=3, placeholder="a portrait of ...", elem_id="prompt"
            )
            negative = form.textbox("negative_prompt", "Negative prompt", lines=2, elem_id="negative_prompt")
            with gr.Row():
                model = form.dropdown(
                    "model",
                    "Model",
                    studio.model_choices(),
                    value=studio.default_model(),
                    allow_custom_value=True,
                    info="diffusers folders and .safetensors/.ckpt checkpoints in models/",
                )
                sampler = form.dropdown("sampler", "Sampler", list(SAMPLER_NAMES))
                refresh = gr.Button("Refresh lists", size="sm")
            with gr.Row():
                engine = form.radio(
                    "engine",
                    "Engine",
                    [("local (diffusers)", "local"), ("ComfyUI", "comfyui")],
                    elem_id="engine",
                    info="ComfyUI: the --comfyui-urls pool renders; the model list becomes the server's",
                )
                form.dropdown(
                    "comfy_template",
                    "ComfyUI workflow",
                    ["", *studio.comfy_template_names()],
                    allow_custom_value=True,
                    elem_id="comfy_template",
                    info="empty = by mode (txt2img, img2img, inpaint)",
                )
            with gr.Row():
                steps = form.slider("steps", "Steps")
                cfg = form.slider("cfg_scale", "CFG scale", step=0.5)
            with gr.Row():
                width = form.slider("width", "Width", step=8)
                height = form.slider("height", "Height", step=8)
            with gr.Row():
                form.number("seed", "Seed")
                form.slider("batch_size", "Batch size")
                form.slider("batch_count", "Batch count")
                clip_skip = form.slider("clip_skip", "Clip skip")
            with gr.Accordion("LoRAs", open=False):
                loras = form.textbox(
                    "loras",
                    "LoRAs",
                    value="",
                    placeholder="name:weight, other:0.6",
                    info="files in models/loras; kohya or diffusers format",
                )
                with gr.Row():
                    lora_pick = gr.Dropdown(studio.lora_names(), label="Add LoRA", value=None)
                    lora_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight")
                    lora_add = gr.Button("Add", size="sm")
            with gr.Row():
                styles = form.dropdown(
                    "styles",
                    "Styles",
                    studio.styles().names(),
                    multiselect=True,
                    info="saved prompt/negative pairs (A1111 styles.csv)",
                )
                vae = form.dropdown(
                    "vae",
                    "VAE",
                    ["", *studio.vae_names()],
                    info="empty = the model's own; files in models/vae",
                )
            with gr.Accordion("Save style", open=False), gr.Row():
                style_name = gr.Textbox(label="Style name", value="")
                style_save = gr.Button("Save prompt + negative as style", size="sm")
            with gr.Accordion("img2img / inpaint / outpaint", open=False):
                init_image = form.add(
                    "init_image",
                    gr.Image(
                        label="Source image (leave empty for txt2img)",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        image_mode="RGB",
                        format="png",
                        elem_id="init_image",
                    ),
                )
                form.slider("denoising_strength", "Denoising strength", step=0.01)
                editor = gr.ImageEditor(
                    label="Inpaint: upload a source and paint the area to change",
                    type="pil",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                    format="png",
                    elem_id="inpaint_editor",
                )
                mask_image = form.add(
                    "mask_image",
                    gr.Image(
                        label="Mask (white = repaint); filled from the editor or uploaded",
                        type="filepath",
                        image_mode="L",
                        format="png",
                        elem_id="mask_image",
                    ),
                )
                with gr.Row():
                    form.slider("mask_blur", "Mask blur")
                    form.radio("masked_content", "Masked content", MASKED_CONTENT, info=None)
                with gr.Row():
                    form.checkbox("inpaint_only_masked", "Inpaint only masked (full resolution)", info=None)
                    form.slider("inpaint_padding", "Only masked padding, px")
                with gr.Row():
                    form.slider("outpaint_left", "Outpaint left", step=8)
                    form.slider("outpaint_right", "Outpaint right", step=8)
                    form.slider("outpaint_up", "Outpaint up", step=8)
                    form.slider("outpaint_down", "Outpaint down", step=8)
            with gr.Accordion("Hires fix", open=False):
                form.checkbox("enable_hr", "Hires fix", elem_id="enable_hr", info=None)
                with gr.Row():
                    form.slider("hr_scale", "Upscale by", step=0.05)
                    hr_upscaler = form.dropdown(
                        "hr_upscaler", "Upscaler", studio.hires_upscalers(), info=None
                    )
                with gr.Row():
                    form.slider("hr_second_pass_steps", "Hires steps")
                    form.slider("hr_denoising_strength", "Hires denoising", step=0.01)
            with gr.Accordion("SDXL refiner", open=False), gr.Row():
                refiner = form.dropdown(
                    "refiner",
                    "Refiner",
                    ["", *[n for _, n in studio.model_choices()]],
                    allow_custom_value=True,
                    info="an SDXL refiner model; empty = none",
                )
                form.slider("refiner_switch_at", "Switch at", step=0.01)
            with gr.Accordion("Variation seed", open=False), gr.Row():
                form.number("subseed", "Variation seed", info="-1 = random")
                form.slider("subseed_strength", "Variation strength", step=0.01)
            with gr.Accordion("ControlNet", open=False):
                with gr.Row():
                    controlnet = form.dropdown(
                        "controlnet", "ControlNet model", ["", *studio.controlnet_names()], info=None
                    )
                    form.radio(
                        "control_preprocessor",
                        "Preprocessor",
                        ["none", "canny"],
                        info="none: the image is already a canny/depth/pose map",
                    )
                    form.slider("controlnet_scale", "Weight", step=0.05)
                form.add("control_image", gr.Image(label="Control image", type="filepath", format="png"))
            with gr.Accordion("X/Y/Z plot", open=False):
                from engine.generation.xyz import AXES, XYZPlotRequest

                axes = Form(XYZPlotRequest)
                axis_names = list(AXES)
                with gr.Row():
                    axes.dropdown("x_type", "X type", axis_names)
                    axes.textbox("x_values", "X values", placeholder="1, 2, 3 or 1-5 or 10-30 [3]")
                with gr.Row():
                    axes.dropdown("y_type", "Y type", axis_names)
                    axes.textbox("y_values", "Y values")
                with gr.Row():
                    axes.dropdown("z_type", "Z type", axis_names)
                    axes.textbox("z_values", "Z values")
                axes.checkbox("draw_legend", "Draw legend")
                plot = gr.Button("Plot X/Y/Z", elem_id="xyz_btn")
        with gr.Column(scale=2):
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate_btn")
                stop = gr.Button("Cancel", variant="stop", elem_id="cancel_btn")
            preview = gr.Image(label="Preview", interactive=False, height=160, format="png")
            gallery = gr.Gallery(
                label="Images", format="png", columns=2, height=360, elem_id="gallery", interactive=False
            )
            infotext = gr.Textbox(
                label="Infotext (A1111 parameters)", lines=4, buttons=["copy"], elem_id="infotext"
            )
            with gr.Row():
                job_id = gr.Textbox(label="Job id", interactive=False, elem_id="job_id")
                cancel_token = gr.Textbox(label="Cancel token", interactive=False, type="password")
            status = gr.Markdown(label="Status", elem_id="job_state")

    def generate(request: gr.Request = None, progress=gr.Progress(), **fields):
        """Generate images: txt2img; img2img when init_image is given; inpaint with mask_image; outpaint
        with outpaint_*; hires fix with enable_hr; variation seeds; VAE; ControlNet; saved styles.
        Prompts use A1111 syntax ((word:1.2), [word], BREAK, <lora:name:weight>, embedding names).
        Yields progress; the final value holds the PNG files, the infotext of the first image, the job id
        and its cancel token."""
        with engine_errors():
            jid, token = studio.submit_generate(
                form.values(fields, fill_defaults=True), owner=username(request)
            )
        yield [], "", jid, token, f"**queued** · job `{jid}`", None
        # Every step reaches the progress bar (and gradio_client's progress_data); the outputs change only
        # when there is a new preview, so short jobs send no extra updates.
        for event in follow_job(
            studio,
            jid,
            progress,
            what=f"job {jid}",
            title="Generation failed",
            desc=lambda e: f"Generating · ETA {e.get('eta') or 0:.1f}s",
        ):
            if event["type"] == "progress" and "preview" in event:
                status_text = f"**running** · {event['desc']}"
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), status_text, event["preview"]
            elif event["type"] == "done":
                images = event["result"]["images"]
                files = [(img["path"], f"seed {img['seed']}") for img in images]
                yield (
                    files,
                    images[0]["infotext"] if images else "",
                    jid,
                    token,
                    f"**succeeded** · {len(images)} image(s)",
                    None,
                )
            elif event["type"] == "cancelled":
                yield [], "", jid, token, "**cancelled**", None

    # Inputs bound by parameter name, so the API's named parameters and the form cannot drift apart.
    form.bind(
        go.click,
        generate,
        API_ORDER,
        outputs=[gallery, infotext, job_id, cancel_token, status, preview],
        api_name="generate",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    )
    wire_job_controls(ctx, stop, job_id, cancel_token, status)

    def refresh_lists():
        return (
            gr.update(choices=studio.model_choices()),
            gr.update(choices=["", *[n for _, n in studio.model_choices()]]),
            gr.update(choices=studio.lora_names()),
            gr.update(choices=["", *studio.vae_names()]),
            gr.update(choices=["", *studio.controlnet_names()]),
            gr.update(choices=studio.hires_upscalers()),
            gr.update(choices=studio.styles().names()),
        )

    refresh.click(
        refresh_lists, None, [model, refiner, lora_pick, vae, controlnet, hr_upscaler, styles], **PRIVATE
    )

    def engine_lists(which: str):
        """The model and LoRA lists of the engine that will render: local files, or the ComfyUI server's."""
        if which == "comfyui":
            with engine_errors():
                found = studio.comfy_models()
            return (
                gr.update(choices=found["checkpoints"], value=(found["checkpoints"] or [""])[0]),
                gr.update(choices=[n.removesuffix(".safetensors") for n in found["loras"]]),
            )
        return (
            gr.update(choices=studio.model_choices(), value=studio.default_model()),
            gr.update(choices=studio.lora_names()),
        )

    engine.input(engine_lists, [engine], [model, lora_pick], **PRIVATE)

    def comfy_servers() -> list[dict]:
        """The configured ComfyUI servers: url (no credentials), healthy, in_flight, limit, last_error."""
        with engine_errors():
            return studio.comfy_servers()

    def comfy_models() -> dict:
        """What the ComfyUI pool's servers have: {"checkpoints", "loras", "upscale_models"} (/object_info)."""
        with engine_errors():
            return studio.comfy_models()

    gr.api(comfy_servers, api_name="comfy_servers")
    gr.api(comfy_models, api_name="comfy_models")
    editor.change(editor_to_inputs, [editor], [init_image, mask_image], **PRIVATE)
    editor.upload(editor_to_inputs, [editor], [init_image, mask_image], **PRIVATE)  # source shows at once

    def save_style(name: str, prompt: str, negative_prompt: str):
        with engine_errors():
            studio.styles().save(name, prompt, negative_prompt)
        gr.Info(f"style {name!r} saved")
        return gr.update(choices=studio.styles().names())

    style_save.click(save_style, [style_name, prompt, negative], [styles], **PRIVATE)

    def xyz_plot(request: gr.Request = None, progress=gr.Progress(), **fields):
        """X/Y/Z plot: render the recipe over up to three axes (A1111 axis names and value forms) into a
        labelled grid per Z value. Returns the grid files, the job id and its cancel token."""
        axis_values = axes.values({k: fields.pop(k) for k in list(fields) if k in axes.components}, True)
        with engine_errors():
            jid, token = studio.submit_xyz(
                form.values(fields, fill_defaults=True), axis_values, owner=username(request)
            )
        yield [], jid, token, f"**queued** · X/Y/Z plot `{jid}`"
        for event in follow_job(studio, jid, progress, what=f"job {jid}", title="X/Y/Z plot failed"):
            if event["type"] == "done":
                grids = event["result"]["grids"]
                yield (
                    [(g["path"], g["z"] or "grid") for g in grids],
                    jid,
                    token,
                    f"**succeeded** · {len(grids)} grid(s), {len(event['result']['images'])} cells",
                )
            elif event["type"] == "cancelled":
                yield [], jid, token, "**cancelled**"

    form.bind(
        plot.click,
        xyz_plot,
        XYZ_BASE,
        only=XYZ_BASE,
        before=axes.inputs(),
        outputs=[gallery, job_id, cancel_token, status],
        api_name="xyz_plot",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    )

    def list_models() -> dict:
        """Everything /generate accepts by name: models (name + label), LoRAs, samplers, VAEs, ControlNets,
        embeddings, hires upscalers and saved styles."""
        return {
            "models": [{"name": name, "label": label} for label, name in studio.model_choices()],
            "default_model": studio.default_model(),
            "loras": studio.lora_names(),
            "samplers": list(SAMPLER_NAMES),
            "vaes": studio.vae_names(),
            "controlnets": studio.controlnet_names(),
            "embeddings": studio.embedding_names(),
            "hires_upscalers": studio.hires_upscalers(),
            "styles": studio.styles().names(),
        }

    listing = gr.JSON(visible=False, label="models")
    refresh.click(list_models, None, [listing], api_name="list_models")

    def add_lora(current: str, name: str | None, weight: float) -> str:
        if not name:
            return current
        entry = f"{name}:{weight:g}"
        return f"{current}, {entry}" if current and current.strip() else entry

    lora_add.click(add_lora, [loras, lora_pick, lora_weight], [loras], **PRIVATE)

    def character_style(slug: str):
        """Picking a character fills the form with its effective style (project, then its own overrides)."""
        if not slug:
            return [gr.skip()] * 7
        with engine_errors():
            style = {
                k: v["value"]
                for k, v in studio.characters.effective_style(studio.characters.get(slug)).items()
            }
        return [
            style.get(k) if style.get(k) not in (None, "") else gr.skip()
            for k in ("model", "sampler", "steps", "cfg_scale", "width", "height", "clip_skip")
        ]

    character.input(
        character_style, [character], [model, sampler, steps, cfg, width, height, clip_skip], **PRIVATE
    )
    refresh.click(
        lambda: gr.update(choices=[("(none)", ""), *character_choices(studio)]), None, [character], **PRIVATE
    )
    return {**form.components, "_editor": editor}
