"""Generate tab: txt2img / img2img form, live progress with latent preview, cancel.

`generate` backs both the button and the `/generate` API endpoint: it submits a job and yields
its events. Closing the browser stops only this watcher; the job keeps running.
"""

from __future__ import annotations

import inspect

import gradio as gr

from engine.requests import GenerateRequest, field_spec
from engine.samplers import SAMPLER_NAMES
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, name_range_errors, username


def _slider(name: str, label: str, step: float = 1, **extra) -> gr.Slider:
    spec = field_spec(GenerateRequest, name)
    slider = gr.Slider(minimum=spec["ge"], maximum=spec["le"], value=spec["default"],
                       step=spec.get("multiple_of", step), label=label, info=spec["info"], elem_id=name,
                       **extra)  # fmt: skip
    return name_range_errors(slider, name)


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt", lines=3, value="", placeholder="a portrait of ...", elem_id="prompt"
            )
            negative = gr.Textbox(label="Negative prompt", value="", lines=2, elem_id="negative_prompt")
            with gr.Row():
                model = gr.Dropdown(studio.model_choices(), value=studio.default_model(), label="Model",
                                    allow_custom_value=True,
                                    info="diffusers folders under models/diffusers or models/checkpoints")  # fmt: skip
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=field_spec(GenerateRequest, "sampler")["default"],
                                      label="Sampler")  # fmt: skip
                refresh = gr.Button("Refresh lists", size="sm")
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
                loras = gr.Textbox(label="LoRAs", value="", placeholder="name:weight, other:0.6",
                                   info="files in models/loras; kohya or diffusers format")  # fmt: skip
                with gr.Row():
                    lora_pick = gr.Dropdown(studio.lora_names(), label="Add LoRA", value=None)
                    lora_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight")
                    lora_add = gr.Button("Add", size="sm")
            with gr.Accordion("img2img", open=False):
                init_image = gr.Image(label="Source image (leave empty for txt2img)", type="filepath",
                                      sources=["upload", "clipboard"], image_mode="RGB", format="png")  # fmt: skip
                denoise = _slider("denoising_strength", "Denoising strength", step=0.01)
        with gr.Column(scale=2):
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate_btn")
                stop = gr.Button("Cancel", variant="stop", elem_id="cancel_btn")
            preview = gr.Image(label="Preview", interactive=False, height=160, format="png")
            gallery = gr.Gallery(label="Images", format="png", columns=2, height=360, elem_id="gallery",
                                 interactive=False)  # fmt: skip
            infotext = gr.Textbox(
                label="Infotext (A1111 parameters)", lines=4, buttons=["copy"], elem_id="infotext"
            )
            with gr.Row():
                job_id = gr.Textbox(label="Job id", interactive=False, elem_id="job_id")
                cancel_token = gr.Textbox(label="Cancel token", interactive=False, type="password")
            status = gr.Markdown(label="Status", elem_id="job_state")

    def generate(prompt: str, negative_prompt: str = "", seed: float = -1, steps: float = 20, cfg_scale: float = 7.0,
                 width: float = 512, height: float = 512, sampler: str = "Euler a", model: str = "", loras: str = "",
                 batch_size: float = 1, batch_count: float = 1, clip_skip: float = 1, init_image: str | None = None,
                 denoising_strength: float = 0.75, request: gr.Request = None, progress=gr.Progress()):  # fmt: skip
        """Generate images (txt2img, or img2img when init_image is given). Yields progress; the final
        value holds the PNG files, the infotext of the first image, the job id and its cancel token."""
        values = dict(prompt=prompt, negative_prompt=negative_prompt, seed=int(seed if seed is not None else -1),
                      steps=int(steps), cfg_scale=float(cfg_scale), width=int(width), height=int(height),
                      sampler=sampler, model=model, loras=loras or "", batch_size=int(batch_size),
                      batch_count=int(batch_count), clip_skip=int(clip_skip), init_image=init_image or None,
                      denoising_strength=float(denoising_strength))  # fmt: skip
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

    fields = dict(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, cfg_scale=cfg, width=width,
                  height=height, sampler=sampler, model=model, loras=loras, batch_size=batch_size,
                  batch_count=batch_count, clip_skip=clip_skip, init_image=init_image,
                  denoising_strength=denoise)  # fmt: skip
    # Inputs bound by parameter name, so the API's named parameters and the form cannot drift apart.
    inputs = [fields[name] for name in inspect.signature(generate).parameters if name in fields]
    outputs = [gallery, infotext, job_id, cancel_token, status, preview]
    go.click(generate, inputs, outputs, api_name="generate", concurrency_limit=ctx.settings.max_queue,
                     concurrency_id=JOBS_CONCURRENCY_ID)  # fmt: skip
    if ctx.job_tokens is not None:  # remembered as soon as the job exists, for the Jobs tab's buttons
        job_id.change(_remember_token, [job_id, cancel_token, ctx.job_tokens], [ctx.job_tokens], **PRIVATE)

    def cancel_current(jid: str, token: str, request: gr.Request = None) -> str:
        if not jid:
            return "nothing to cancel"
        with engine_errors():
            return f"**{studio.cancel(jid, username(request), token)}**"

    stop.click(cancel_current, [job_id, cancel_token], [status], **PRIVATE)

    def refresh_lists():
        return gr.update(choices=studio.model_choices()), gr.update(choices=studio.lora_names())

    refresh.click(refresh_lists, None, [model, lora_pick], **PRIVATE)

    def list_models() -> dict:
        """Models (name + label), LoRAs and samplers this server accepts in /generate."""
        return {
            "models": [{"name": name, "label": label} for label, name in studio.model_choices()],
            "default_model": studio.default_model(),
            "loras": studio.lora_names(),
            "samplers": list(SAMPLER_NAMES),
        }

    listing = gr.JSON(visible=False, label="models")
    refresh.click(list_models, None, [listing], api_name="list_models")

    def add_lora(current: str, name: str | None, weight: float) -> str:
        if not name:
            return current
        entry = f"{name}:{weight:g}"
        return f"{current}, {entry}" if current and current.strip() else entry

    lora_add.click(add_lora, [loras, lora_pick, lora_weight], [loras], **PRIVATE)


def _remember_token(jid: str, token: str, tokens: dict | None) -> dict:
    tokens = dict(tokens or {})
    if jid and token:
        tokens[jid] = token
        tokens = dict(list(tokens.items())[-200:])
    return tokens
