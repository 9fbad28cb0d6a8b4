"""Train tab: a LoRA from a character's approved images, with presets, the options kohya_ss users rely on,
a live loss curve and samples; the result is the character's next LoRA version."""

from __future__ import annotations

import gradio as gr
from gradio.context import Context

from engine.training.trainer import PRESETS, TrainLoraRequest
from ui.characters_tab import character_choices
from ui.common import (
    JOBS_CONCURRENCY_ID,
    PRIVATE,
    UIContext,
    engine_errors,
    follow_job,
    remember_token,
    username,
)
from ui.forms import Form

OPTIMIZERS = ["adamw", "adamw8bit", "prodigy", "adafactor"]
SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"]


def _default(name: str):
    return TrainLoraRequest.model_fields[name].default


def preset_values(preset: str) -> dict:
    """What the form shows for a preset: its values over the request's defaults (the API leaves a field out
    to get the same; the browser always sends every field, so the form must show the real values)."""
    values = {name: PRESETS.get(preset, {}).get(name, _default_or_blank(name)) for name in FORM_FIELDS}
    values["resolution"] = 0  # the base model's family decides (512, SDXL 1024) unless the user sets one
    values["sample_prompts"] = (
        "\n".join(values["sample_prompts"]) if isinstance(values["sample_prompts"], list) else ""
    )
    return values


# request fields the form edits, in the order of /train_lora's parameters after character, model and preset
FORM_FIELDS = [
    "rank",
    "alpha",
    "learning_rate",
    "text_encoder_lr",
    "max_train_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "repeats",
    "seed",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "noise_offset",
    "min_snr_gamma",
    "train_text_encoder",
    "locon",
    "random_flip",
    "shuffle_captions",
    "gradient_checkpointing",
    "checkpoint_every",
    "sample_every",
    "sample_prompts",
    "max_train_epochs",
    "lr_num_cycles",
    "bucketing",
    "cache_latents",
    "caption_dropout",
    "keep_tokens",
    "concepts",
    "reg_dir",
    "reg_caption",
    "prior_loss_weight",
    "keep_checkpoints",
    "save_precision",
    "resume_from",
]
NOT_REQUEST_FIELDS = {
    "concepts": "",
    "reg_dir": "",
    "reg_caption": "",
    "sample_prompts": "",
    "resume_from": "",
}
# what the form sends beside the request's own fields (the studio turns these into the request), and defaults
UI_FIELDS = {"character": None, "preset": "quick", "backend": "builtin", **NOT_REQUEST_FIELDS}
# /train_lora's parameter order, frozen for positional callers; a new field follows these
API_ORDER = ("character", "model", "preset", *FORM_FIELDS, "backend")
ZERO_MEANS_DEFAULT = {"resolution", "max_train_epochs"}  # 0 = the family's resolution / steps decide


def _default_or_blank(name: str):
    return (
        NOT_REQUEST_FIELDS[name]
        if name in NOT_REQUEST_FIELDS
        else TrainLoraRequest.model_fields[name].default
    )


def _resume_offer(studio) -> tuple[str, list[tuple[str, str]]]:
    runs = studio.interrupted_trainings()
    if not runs:
        return "", []
    lines = [
        f"**{len(runs)} training run(s) were interrupted** (a crash or a restart). Resume continues from the "
        "last complete checkpoint: the step count, optimizer, schedule and data order carry on."
    ]
    choices = []
    for r in runs:
        label = f"{r['character']} · checkpoint at step {r['checkpoint_step']}/{r['total']} · {r['job_id']}"
        lines.append(f"- {label}")
        choices.append((label, r["job_id"]))
    return "\n".join(lines), choices


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    with gr.Group(visible=False) as resume_group:
        resume_note = gr.Markdown(elem_id="train_resume_note")
        with gr.Row():
            resume_pick = gr.Dropdown(
                [], label="Interrupted run", allow_custom_value=True, elem_id="train_resume_pick"
            )
            resume_btn = gr.Button("Resume", size="sm", elem_id="train_resume_btn")
    form = Form(TrainLoraRequest, extra=UI_FIELDS)
    with gr.Row():
        character = form.dropdown(
            "character",
            "Character",
            character_choices(studio),
            value=None,
            allow_custom_value=True,
            elem_id="train_character",
        )
        model = form.dropdown(
            "model",
            "Base model",
            [("(the character's)", ""), *studio.model_choices()],
            value="",
            allow_custom_value=True,
            info="SD1.x, SD2.x or SDXL base: a diffusers folder or a single-file checkpoint",
        )
        preset = form.radio("preset", "Preset", ["", *PRESETS], info="options below override it")
        form.radio(
            "backend",
            "Trainer",
            [("built-in (diffusers + peft)", "builtin"), ("kohya sd-scripts", "kohya")],
            info="kohya needs --kohya-dir (a kohya_ss or sd-scripts install)",
        )
        refresh = gr.Button("Refresh", size="sm")
    v = preset_values("quick")
    with gr.Row():
        form.number("rank", "Rank (network dim)", value=v["rank"])
        form.number("alpha", "Alpha", value=v["alpha"])
        form.number("learning_rate", "UNet learning rate", value=v["learning_rate"])
        form.number("text_encoder_lr", "Text-encoder learning rate", value=v["text_encoder_lr"])
        form.number("max_train_steps", "Max steps", value=v["max_train_steps"], elem_id="train_steps")
        form.number("max_train_epochs", "Epochs (0 = steps decide)", value=v["max_train_epochs"])
    with gr.Row():
        form.number("batch_size", "Batch size", value=v["batch_size"])
        form.number(
            "gradient_accumulation_steps", "Gradient accumulation", value=v["gradient_accumulation_steps"]
        )
        form.number(
            "resolution", "Resolution (0 = 512, SDXL 1024)", value=v["resolution"], elem_id="train_resolution"
        )
        form.number("repeats", "Repeats", value=v["repeats"])
        form.number("seed", "Seed", value=v["seed"])
    with gr.Row():
        form.dropdown("optimizer", "Optimizer", OPTIMIZERS, value=v["optimizer"])
        form.dropdown("lr_scheduler", "LR scheduler", SCHEDULERS, value=v["lr_scheduler"])
        form.number("lr_warmup_steps", "Warm-up steps", value=v["lr_warmup_steps"])
        form.number("lr_num_cycles", "Restarts (cosine with restarts)", value=v["lr_num_cycles"])
        form.radio("mixed_precision", "Mixed precision", ["no", "fp16", "bf16"], value=v["mixed_precision"])
        form.number("noise_offset", "Noise offset", value=v["noise_offset"])
        form.number("min_snr_gamma", "Min-SNR gamma (0 = off)", value=v["min_snr_gamma"])
    with gr.Row():
        form.checkbox("train_text_encoder", "Train text encoder", value=v["train_text_encoder"])
        form.checkbox("locon", "LoCon (conv layers)", value=v["locon"])
        form.checkbox("random_flip", "Random flip", value=v["random_flip"])
        form.checkbox("shuffle_captions", "Shuffle captions", value=v["shuffle_captions"])
        form.checkbox("gradient_checkpointing", "Gradient checkpointing", value=v["gradient_checkpointing"])
        form.checkbox("bucketing", "Aspect-ratio buckets", value=v["bucketing"])
        form.checkbox("cache_latents", "Cache latents", value=v["cache_latents"])
    with gr.Accordion("Captions, concepts and regularisation", open=False):
        with gr.Row():
            form.number("caption_dropout", "Caption dropout (0-1)", value=v["caption_dropout"])
            form.number("keep_tokens", "Keep tokens (shuffle leaves them first)", value=v["keep_tokens"])
            form.textbox(
                "concepts",
                "More concepts",
                value=v["concepts"],
                lines=2,
                placeholder="other-character-slug:repeats",
                info="other characters' approved sets, one 'slug:repeats' per line",
            )
        with gr.Row():
            form.textbox(
                "reg_dir",
                "Regularisation folder",
                value=v["reg_dir"],
                info="class images on the server, inside --ingest-roots (a kohya reg folder works)",
            )
            form.textbox(
                "reg_caption",
                "Class prompt",
                value=v["reg_caption"],
                info="caption of reg images without a .txt",
            )
            form.number("prior_loss_weight", "Prior loss weight", value=v["prior_loss_weight"])
    with gr.Accordion("Checkpoints, output and samples", open=False):
        with gr.Row():
            form.number("checkpoint_every", "Checkpoint every N steps", value=v["checkpoint_every"])
            form.number("keep_checkpoints", "Checkpoints kept", value=v["keep_checkpoints"])
            form.radio(
                "save_precision", "Save precision", ["fp16", "bf16", "float"], value=v["save_precision"]
            )
            resume_from = form.dropdown(
                "resume_from",
                "Continue from a LoRA",
                ["", *studio.lora_names()],
                value="",
                allow_custom_value=True,
                info="its weights start the training",
            )
        with gr.Row():
            form.number("sample_every", "Sample every N steps (0 = off)", value=v["sample_every"])
            form.textbox(
                "sample_prompts", "Sample prompts (one per line)", value=v["sample_prompts"], lines=2
            )
    with gr.Row():
        start = gr.Button("Train LoRA", variant="primary", elem_id="train_btn")
        stop = gr.Button("Cancel (keeps the last checkpoint)", variant="stop")
    status = gr.Markdown(elem_id="train_status")
    with gr.Row():
        curve = gr.LinePlot(x="step", y="loss", title="Loss", height=260, elem_id="train_loss")
        samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="train_samples")
    job_id = gr.Textbox(label="Job id", interactive=False, elem_id="train_job_id")
    token = gr.Textbox(visible=False)
    result = gr.JSON(label="Result", elem_id="train_result")

    def train_lora(request: gr.Request = None, **fields) -> dict:
        """Train a LoRA on the character's approved images: a preset (quick, balanced, quality) plus the options
        given (left out = the preset's or the default). concepts: other characters' sets as "slug:repeats"
        lines; reg_dir: a server folder of regularisation images inside the ingest roots; resume_from: a LoRA
        name in models/loras to continue from; resolution/max_train_epochs 0 = the family's / steps decide;
        backend: "builtin" or "kohya" (a configured sd-scripts install). Returns {"job_id", "cancel_token"} at
        once; follow it with /job_status. The result is models/loras/<slug>-v<k>.safetensors in kohya format."""
        head = {name: fields.pop(name, None) or "" for name in ("character", "model", "preset")}
        backend = fields.pop("backend", None) or "builtin"
        values = form.values({k: v.strip() if isinstance(v, str) else v for k, v in fields.items()})
        for name in ZERO_MEANS_DEFAULT:
            if values.get(name) == 0:
                del values[name]
        if "sample_prompts" in values:
            values["sample_prompts"] = [p.strip() for p in values["sample_prompts"].splitlines() if p.strip()]
        if backend != "builtin":
            values["backend"] = backend
        with engine_errors():
            jid, tok = studio.submit_train_lora({**head, **values}, owner=username(request))
        return {"job_id": jid, "cancel_token": tok}

    def follow(submitted: dict | None):
        """Stream the job: status line, loss curve, samples, result."""
        import pandas as pd

        if not submitted:
            return
        jid = submitted["job_id"]
        points: list[dict] = []
        shown: list = []
        yield jid, submitted["cancel_token"], f"**queued** · training `{jid}`", gr.skip(), gr.skip(), None
        for event in follow_job(studio, jid, raise_on=()):
            if event["type"] == "progress" and "loss" in event:
                points.append({"step": event["step"], "loss": event["loss"]})
                yield (
                    gr.skip(),
                    gr.skip(),
                    f"**running** · {event.get('desc', '')} · ETA {event.get('eta') or 0:.0f}s",
                    pd.DataFrame(points),
                    gr.skip(),
                    gr.skip(),
                )
            elif event["type"] == "sample":
                shown.extend((p, f"step {event['step']}") for p in event.get("paths") or [])
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), list(shown), gr.skip()
            elif event["type"] == "done":
                r = event["result"]
                curve_df = pd.DataFrame({"step": range(1, len(r["losses"]) + 1), "loss": r["losses"]})
                yield (
                    gr.skip(),
                    gr.skip(),
                    f"**succeeded** · `{r['lora']}` (version {r['version']}) in models/loras",
                    curve_df,
                    r["samples"],
                    r,
                )
            elif event["type"] in ("failed", "cancelled", "interrupted"):
                yield (
                    gr.skip(),
                    gr.skip(),
                    f"**{event['type']}** · {event.get('error', '')}",
                    gr.skip(),
                    gr.skip(),
                    None,
                )

    # a preset fills the form (what it leaves alone goes back to the default); the dataset fields stay
    kept = {"concepts", "reg_dir", "reg_caption", "resume_from", "sample_prompts"}
    filled = [name for name in FORM_FIELDS if name not in kept]
    preset.input(
        lambda p: [preset_values(p)[name] for name in filled], [preset], [form[n] for n in filled], **PRIVATE
    )
    submitted = gr.JSON(visible=False)
    form.bind(
        start.click, train_lora, API_ORDER, outputs=[submitted], required=["character"], api_name="train_lora"
    ).success(
        follow,
        [submitted],
        [job_id, token, status, curve, samples, result],
        **PRIVATE,
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    )

    def cancel(jid: str, tok: str, request: gr.Request = None) -> str:
        if not jid:
            return "nothing to cancel"
        with engine_errors():
            return f"**{studio.cancel(jid, username(request), tok)}**"

    stop.click(cancel, [job_id, token], [status], **PRIVATE)
    refresh.click(
        lambda: (
            gr.update(choices=character_choices(studio)),
            gr.update(choices=[("(the character's)", ""), *studio.model_choices()]),
            gr.update(choices=["", *studio.lora_names()]),
        ),
        None,
        [character, model, resume_from],
        **PRIVATE,
    )

    def offer_resume():
        note, choices = _resume_offer(studio)
        return (
            gr.update(visible=bool(choices)),
            note,
            gr.update(choices=choices, value=choices[0][1] if choices else None),
        )

    def resume(jid: str | None, tokens: dict | None = None, request: gr.Request = None):
        if not jid:
            raise gr.Error("pick an interrupted run to resume")
        tok = (tokens or {}).get(jid, "")
        with engine_errors():
            studio.resume(jid, username(request), tok)
        return {"job_id": jid, "cancel_token": tok}

    if ctx.job_tokens is not None:  # this browser keeps its training jobs' tokens: it may resume them later
        job_id.change(remember_token, [job_id, token, ctx.job_tokens], [ctx.job_tokens], **PRIVATE)
    # a restart offers to resume the runs it interrupted, as soon as the page opens
    Context.root_block.load(offer_resume, None, [resume_group, resume_note, resume_pick], **PRIVATE)
    resume_btn.click(
        resume,
        [resume_pick, *([ctx.job_tokens] if ctx.job_tokens is not None else [])],
        [submitted],
        **PRIVATE,
    ).success(
        follow,
        [submitted],
        [job_id, token, status, curve, samples, result],
        **PRIVATE,
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    ).then(offer_resume, None, [resume_group, resume_note, resume_pick], **PRIVATE)
