"""Generate tab: txt2img / img2img form, live progress with latent preview, cancel.

`generate` backs both the button and the `/generate` API endpoint: it submits a job and yields
its events. Closing the browser stops only this watcher; the job keeps running.
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr

from engine.generation.request import GenerateRequest
from engine.requests import field_spec
from engine.samplers import SAMPLER_NAMES
from ui.common import (
    JOBS_CONCURRENCY_ID,
    PRIVATE,
    UIContext,
    engine_errors,
    name_range_errors,
    username,
    wire_job_controls,
)


def _slider(name: str, label: str, step: float = 1, **extra) -> gr.Slider:
    spec = field_spec(GenerateRequest, name)
    slider = gr.Slider(
        minimum=spec["ge"],
        maximum=spec["le"],
        value=spec["default"],
        step=spec.get("multiple_of", step),
        label=label,
        info=spec["info"],
        elem_id=name,
        **extra,
    )
    return name_range_errors(slider, name)


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
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                from ui.characters_tab import character_choices

                character = gr.Dropdown(
                    [("(none)", ""), *character_choices(studio)],
                    value="",
                    label="Character",
                    elem_id="generate_character",
                    allow_custom_value=True,
                    info="adds its trigger word, design prompt, negatives and LoRA",
                )
                dataset_review = gr.Checkbox(
                    value=False, label="Queue images for review in its dataset", elem_id="dataset_review"
                )
                use_character_style = gr.Checkbox(
                    value=False, label="Use its sampler, steps, CFG and size", elem_id="use_character_style"
                )
            prompt = gr.Textbox(
                label="Prompt", lines=3, value="", placeholder="a portrait of ...", elem_id="prompt"
            )
            negative = gr.Textbox(label="Negative prompt", value="", lines=2, elem_id="negative_prompt")
            with gr.Row():
                model = gr.Dropdown(
                    studio.model_choices(),
                    value=studio.default_model(),
                    label="Model",
                    allow_custom_value=True,
                    info="diffusers folders and .safetensors/.ckpt checkpoints in models/",
                )
                sampler = gr.Dropdown(
                    list(SAMPLER_NAMES),
                    value=field_spec(GenerateRequest, "sampler")["default"],
                    label="Sampler",
                )
                refresh = gr.Button("Refresh lists", size="sm")
            with gr.Row():
                engine = gr.Radio(
                    [("local (diffusers)", "local"), ("ComfyUI", "comfyui")],
                    value="local",
                    label="Engine",
                    elem_id="engine",
                    info="ComfyUI: the --comfyui-urls pool renders; the model list becomes the server's",
                )
                comfy_template = gr.Dropdown(
                    ["", *studio.comfy_template_names()],
                    value="",
                    allow_custom_value=True,
                    label="ComfyUI workflow",
                    elem_id="comfy_template",
                    info="empty = by mode (txt2img, img2img, inpaint)",
                )
            with gr.Row():
                steps = _slider("steps", "Steps")
                cfg = _slider("cfg_scale", "CFG scale", step=0.5)
            with gr.Row():
                width = _slider("width", "Width", step=8)
                height = _slider("height", "Height", step=8)
            with gr.Row():
                seed = gr.Number(
                    value=-1, precision=0, label="Seed", info="-1 = random; the real seed is recorded"
                )
                batch_size = _slider("batch_size", "Batch size")
                batch_count = _slider("batch_count", "Batch count")
                clip_skip = _slider("clip_skip", "Clip skip")
            with gr.Accordion("LoRAs", open=False):
                loras = gr.Textbox(
                    label="LoRAs",
                    value="",
                    placeholder="name:weight, other:0.6",
                    info="files in models/loras; kohya or diffusers format",
                )
                with gr.Row():
                    lora_pick = gr.Dropdown(studio.lora_names(), label="Add LoRA", value=None)
                    lora_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight")
                    lora_add = gr.Button("Add", size="sm")
            with gr.Row():
                styles = gr.Dropdown(
                    studio.styles().names(),
                    multiselect=True,
                    label="Styles",
                    value=[],
                    info="saved prompt/negative pairs (A1111 styles.csv)",
                )
                vae = gr.Dropdown(
                    ["", *studio.vae_names()],
                    value="",
                    label="VAE",
                    info="empty = the model's own; files in models/vae",
                )
            with gr.Accordion("Save style", open=False), gr.Row():
                style_name = gr.Textbox(label="Style name", value="")
                style_save = gr.Button("Save prompt + negative as style", size="sm")
            with gr.Accordion("img2img / inpaint / outpaint", open=False):
                init_image = gr.Image(
                    label="Source image (leave empty for txt2img)",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    image_mode="RGB",
                    format="png",
                    elem_id="init_image",
                )
                denoise = _slider("denoising_strength", "Denoising strength", step=0.01)
                editor = gr.ImageEditor(
                    label="Inpaint: upload a source and paint the area to change",
                    type="pil",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                    format="png",
                    elem_id="inpaint_editor",
                )
                mask_image = gr.Image(
                    label="Mask (white = repaint); filled from the editor or uploaded",
                    type="filepath",
                    image_mode="L",
                    format="png",
                    elem_id="mask_image",
                )
                with gr.Row():
                    mask_blur = _slider("mask_blur", "Mask blur")
                    masked_content = gr.Radio(MASKED_CONTENT, value="original", label="Masked content")
                with gr.Row():
                    only_masked = gr.Checkbox(value=False, label="Inpaint only masked (full resolution)")
                    inpaint_padding = _slider("inpaint_padding", "Only masked padding, px")
                with gr.Row():
                    out_left = _slider("outpaint_left", "Outpaint left", step=8)
                    out_right = _slider("outpaint_right", "Outpaint right", step=8)
                    out_up = _slider("outpaint_up", "Outpaint up", step=8)
                    out_down = _slider("outpaint_down", "Outpaint down", step=8)
            with gr.Accordion("Hires fix", open=False):
                enable_hr = gr.Checkbox(value=False, label="Hires fix", elem_id="enable_hr")
                with gr.Row():
                    hr_scale = _slider("hr_scale", "Upscale by", step=0.05)
                    hr_upscaler = gr.Dropdown(studio.hires_upscalers(), value="Latent", label="Upscaler")
                with gr.Row():
                    hr_steps = _slider("hr_second_pass_steps", "Hires steps")
                    hr_denoise = _slider("hr_denoising_strength", "Hires denoising", step=0.01)
            with gr.Accordion("SDXL refiner", open=False), gr.Row():
                refiner = gr.Dropdown(
                    ["", *[n for _, n in studio.model_choices()]],
                    value="",
                    label="Refiner",
                    allow_custom_value=True,
                    info="an SDXL refiner model; empty = none",
                )
                refiner_switch_at = _slider("refiner_switch_at", "Switch at", step=0.01)
            with gr.Accordion("Variation seed", open=False), gr.Row():
                subseed = gr.Number(value=-1, precision=0, label="Variation seed", info="-1 = random")
                subseed_strength = _slider("subseed_strength", "Variation strength", step=0.01)
            with gr.Accordion("ControlNet", open=False):
                with gr.Row():
                    controlnet = gr.Dropdown(
                        ["", *studio.controlnet_names()], value="", label="ControlNet model"
                    )
                    control_pre = gr.Radio(
                        ["none", "canny"],
                        value="none",
                        label="Preprocessor",
                        info="none: the image is already a canny/depth/pose map",
                    )
                    cn_scale = _slider("controlnet_scale", "Weight", step=0.05)
                control_image = gr.Image(label="Control image", type="filepath", format="png")
            with gr.Accordion("X/Y/Z plot", open=False):
                from engine.generation.xyz import AXES

                axis_names = list(AXES)
                with gr.Row():
                    x_type = gr.Dropdown(axis_names, value="Seed", label="X type")
                    x_values = gr.Textbox(
                        label="X values", value="", placeholder="1, 2, 3 or 1-5 or 10-30 [3]"
                    )
                with gr.Row():
                    y_type = gr.Dropdown(axis_names, value="Nothing", label="Y type")
                    y_values = gr.Textbox(label="Y values", value="")
                with gr.Row():
                    z_type = gr.Dropdown(axis_names, value="Nothing", label="Z type")
                    z_values = gr.Textbox(label="Z values", value="")
                draw_legend = gr.Checkbox(value=True, label="Draw legend")
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

    def generate(
        prompt: str,
        negative_prompt: str = "",
        seed: float = -1,
        steps: float = 20,
        cfg_scale: float = 7.0,
        width: float = 512,
        height: float = 512,
        sampler: str = "Euler a",
        model: str = "",
        loras: str = "",
        batch_size: float = 1,
        batch_count: float = 1,
        clip_skip: float = 1,
        init_image: str | None = None,
        denoising_strength: float = 0.75,
        mask_image: str | None = None,
        mask_blur: float = 4,
        inpaint_only_masked: bool = False,
        inpaint_padding: float = 32,
        masked_content: str = "original",
        outpaint_left: float = 0,
        outpaint_right: float = 0,
        outpaint_up: float = 0,
        outpaint_down: float = 0,
        enable_hr: bool = False,
        hr_scale: float = 2.0,
        hr_upscaler: str = "Latent",
        hr_second_pass_steps: float = 0,
        hr_denoising_strength: float = 0.7,
        subseed: float = -1,
        subseed_strength: float = 0.0,
        vae: str = "",
        controlnet: str = "",
        control_image: str | None = None,
        control_preprocessor: str = "none",
        controlnet_scale: float = 1.0,
        styles: list[str] | None = None,
        refiner: str = "",
        refiner_switch_at: float = 0.8,
        character: str = "",
        dataset_review: bool = False,
        use_character_style: bool = False,
        engine: str = "local",
        comfy_template: str = "",
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Generate images: txt2img; img2img when init_image is given; inpaint with mask_image; outpaint
        with outpaint_*; hires fix with enable_hr; variation seeds; VAE; ControlNet; saved styles.
        Prompts use A1111 syntax ((word:1.2), [word], BREAK, <lora:name:weight>, embedding names).
        Yields progress; the final value holds the PNG files, the infotext of the first image, the job id
        and its cancel token."""
        values = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=int(seed if seed is not None else -1),
            steps=int(steps),
            cfg_scale=float(cfg_scale),
            width=int(width),
            height=int(height),
            sampler=sampler,
            model=model,
            loras=loras or "",
            batch_size=int(batch_size),
            batch_count=int(batch_count),
            clip_skip=int(clip_skip),
            init_image=init_image or None,
            denoising_strength=float(denoising_strength),
            mask_image=mask_image or None,
            mask_blur=int(mask_blur),
            inpaint_only_masked=bool(inpaint_only_masked),
            inpaint_padding=int(inpaint_padding),
            masked_content=masked_content or "original",
            outpaint_left=int(outpaint_left),
            outpaint_right=int(outpaint_right),
            outpaint_up=int(outpaint_up),
            outpaint_down=int(outpaint_down),
            enable_hr=bool(enable_hr),
            hr_scale=float(hr_scale),
            hr_upscaler=hr_upscaler or "Latent",
            hr_second_pass_steps=int(hr_second_pass_steps),
            hr_denoising_strength=float(hr_denoising_strength),
            subseed=int(subseed if subseed is not None else -1),
            subseed_strength=float(subseed_strength),
            vae=vae or "",
            controlnet=controlnet or "",
            control_image=control_image or None,
            control_preprocessor=control_preprocessor or "none",
            controlnet_scale=float(controlnet_scale),
            styles=list(styles or []),
            refiner=refiner or "",
            refiner_switch_at=float(refiner_switch_at),
            character=character or "",
            dataset_review=bool(dataset_review),
            use_character_style=bool(use_character_style),
            engine=engine or "local",
            comfy_template=comfy_template or "",
        )
        with engine_errors():
            jid, token = studio.submit_generate(values, owner=username(request))
        yield [], "", jid, token, f"**queued** · job `{jid}`", None
        for event in studio.watch(jid):
            kind = event["type"]
            if kind == "progress":
                # Every step reaches the progress bar (and gradio_client's progress_data); the outputs
                # change only when there is a new preview, so short jobs send no extra updates.
                eta = event.get("eta") or 0
                progress((event["step"], event["total"]), desc=f"Generating · ETA {eta:.1f}s")
                if "preview" in event:
                    status_text = f"**running** · {event['desc']}"
                    yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), status_text, event["preview"]
            elif kind == "done":
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
            elif kind == "cancelled":
                yield [], "", jid, token, "**cancelled**", None
                return
            elif kind in ("failed", "interrupted"):
                raise gr.Error(f"job {jid} {kind}: {event.get('error', '')}", title="Generation failed")

    fields = dict(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        cfg_scale=cfg,
        width=width,
        height=height,
        sampler=sampler,
        model=model,
        loras=loras,
        batch_size=batch_size,
        batch_count=batch_count,
        clip_skip=clip_skip,
        init_image=init_image,
        denoising_strength=denoise,
        mask_image=mask_image,
        mask_blur=mask_blur,
        inpaint_only_masked=only_masked,
        inpaint_padding=inpaint_padding,
        masked_content=masked_content,
        outpaint_left=out_left,
        outpaint_right=out_right,
        outpaint_up=out_up,
        outpaint_down=out_down,
        enable_hr=enable_hr,
        hr_scale=hr_scale,
        hr_upscaler=hr_upscaler,
        hr_second_pass_steps=hr_steps,
        hr_denoising_strength=hr_denoise,
        subseed=subseed,
        subseed_strength=subseed_strength,
        vae=vae,
        controlnet=controlnet,
        control_image=control_image,
        control_preprocessor=control_pre,
        controlnet_scale=cn_scale,
        styles=styles,
        refiner=refiner,
        refiner_switch_at=refiner_switch_at,
        character=character,
        dataset_review=dataset_review,
        use_character_style=use_character_style,
        engine=engine,
        comfy_template=comfy_template,
    )
    # Inputs bound by parameter name, so the API's named parameters and the form cannot drift apart.
    inputs = [fields[name] for name in inspect.signature(generate).parameters if name in fields]
    outputs = [gallery, infotext, job_id, cancel_token, status, preview]
    go.click(
        generate,
        inputs,
        outputs,
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

    def xyz_plot(
        x_type: str,
        x_values: str,
        y_type: str = "Nothing",
        y_values: str = "",
        z_type: str = "Nothing",
        z_values: str = "",
        draw_legend: bool = True,
        prompt: str = "",
        negative_prompt: str = "",
        seed: float = -1,
        steps: float = 20,
        cfg_scale: float = 7.0,
        width: float = 512,
        height: float = 512,
        sampler: str = "Euler a",
        model: str = "",
        loras: str = "",
        clip_skip: float = 1,
        vae: str = "",
        styles: list[str] | None = None,
        enable_hr: bool = False,
        hr_scale: float = 2.0,
        hr_upscaler: str = "Latent",
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """X/Y/Z plot: render the recipe over up to three axes (A1111 axis names and value forms) into a
        labelled grid per Z value. Returns the grid files, the job id and its cancel token."""
        base = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=int(seed if seed is not None else -1),
            steps=int(steps),
            cfg_scale=float(cfg_scale),
            width=int(width),
            height=int(height),
            sampler=sampler,
            model=model,
            loras=loras or "",
            clip_skip=int(clip_skip),
            vae=vae or "",
            styles=list(styles or []),
            enable_hr=bool(enable_hr),
            hr_scale=float(hr_scale),
            hr_upscaler=hr_upscaler or "Latent",
        )
        axes = dict(
            x_type=x_type,
            x_values=x_values or "",
            y_type=y_type or "Nothing",
            y_values=y_values or "",
            z_type=z_type or "Nothing",
            z_values=z_values or "",
            draw_legend=bool(draw_legend),
        )
        with engine_errors():
            jid, token = studio.submit_xyz(base, axes, owner=username(request))
        yield [], jid, token, f"**queued** · X/Y/Z plot `{jid}`"
        for event in studio.watch(jid):
            if event["type"] == "progress":
                progress((event["step"], event["total"]), desc=event.get("desc", ""))
            elif event["type"] == "done":
                grids = event["result"]["grids"]
                yield (
                    [(g["path"], g["z"] or "grid") for g in grids],
                    jid,
                    token,
                    f"**succeeded** · {len(grids)} grid(s), {len(event['result']['images'])} cells",
                )
            elif event["type"] == "cancelled":
                yield [], jid, token, "**cancelled**"
                return
            elif event["type"] in ("failed", "interrupted"):
                raise gr.Error(
                    f"job {jid} {event['type']}: {event.get('error', '')}", title="X/Y/Z plot failed"
                )

    xyz_fields = {
        **fields,
        "x_type": x_type,
        "x_values": x_values,
        "y_type": y_type,
        "y_values": y_values,
        "z_type": z_type,
        "z_values": z_values,
        "draw_legend": draw_legend,
    }
    xyz_inputs = [xyz_fields[name] for name in inspect.signature(xyz_plot).parameters if name in xyz_fields]
    plot.click(
        xyz_plot,
        xyz_inputs,
        [gallery, job_id, cancel_token, status],
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
    return {**fields, "_editor": editor}
