"""Train tab: a LoRA from a character's approved images, with presets, the options kohya_ss users rely on,
a live loss curve and samples; the result is the character's next LoRA version."""

from __future__ import annotations

import gradio as gr
from gradio.context import Context

from engine.training.trainer import PRESETS, TrainLoraRequest
from ui.characters_tab import character_choices
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, remember_token, username

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
INT_FIELDS = {
    "rank",
    "max_train_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "repeats",
    "seed",
    "lr_warmup_steps",
    "checkpoint_every",
    "sample_every",
    "max_train_epochs",
    "lr_num_cycles",
    "keep_tokens",
    "keep_checkpoints",
}
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
    with gr.Row():
        character = gr.Dropdown(
            character_choices(studio),
            label="Character",
            value=None,
            allow_custom_value=True,
            elem_id="train_character",
        )
        model = gr.Dropdown(
            [("(the character's)", ""), *studio.model_choices()],
            value="",
            label="Base model",
            allow_custom_value=True,
            info="SD1.x, SD2.x or SDXL base: a diffusers folder or a single-file checkpoint",
        )
        preset = gr.Radio(["", *PRESETS], value="quick", label="Preset", info="options below override it")
        backend = gr.Radio(
            [("built-in (diffusers + peft)", "builtin"), ("kohya sd-scripts", "kohya")],
            value="builtin",
            label="Trainer",
            info="kohya needs --kohya-dir (a kohya_ss or sd-scripts install)",
        )
        refresh = gr.Button("Refresh", size="sm")
    v = preset_values("quick")
    with gr.Row():
        rank = gr.Number(v["rank"], precision=0, label="Rank (network dim)")
        alpha = gr.Number(v["alpha"], label="Alpha")
        lr = gr.Number(v["learning_rate"], label="UNet learning rate")
        te_lr = gr.Number(v["text_encoder_lr"], label="Text-encoder learning rate")
        steps = gr.Number(v["max_train_steps"], precision=0, label="Max steps", elem_id="train_steps")
        epochs = gr.Number(v["max_train_epochs"], precision=0, label="Epochs (0 = steps decide)")
    with gr.Row():
        batch = gr.Number(v["batch_size"], precision=0, label="Batch size")
        accum = gr.Number(v["gradient_accumulation_steps"], precision=0, label="Gradient accumulation")
        resolution = gr.Number(
            v["resolution"], precision=0, label="Resolution (0 = 512, SDXL 1024)", elem_id="train_resolution"
        )
        repeats = gr.Number(v["repeats"], precision=0, label="Repeats")
        seed = gr.Number(v["seed"], precision=0, label="Seed")
    with gr.Row():
        optimizer = gr.Dropdown(OPTIMIZERS, value=v["optimizer"], label="Optimizer")
        scheduler = gr.Dropdown(SCHEDULERS, value=v["lr_scheduler"], label="LR scheduler")
        warmup = gr.Number(v["lr_warmup_steps"], precision=0, label="Warm-up steps")
        cycles = gr.Number(v["lr_num_cycles"], precision=0, label="Restarts (cosine with restarts)")
        precision = gr.Radio(["no", "fp16", "bf16"], value=v["mixed_precision"], label="Mixed precision")
        noise_offset = gr.Number(v["noise_offset"], label="Noise offset")
        min_snr = gr.Number(v["min_snr_gamma"], label="Min-SNR gamma (0 = off)")
    with gr.Row():
        train_te = gr.Checkbox(v["train_text_encoder"], label="Train text encoder")
        locon = gr.Checkbox(v["locon"], label="LoCon (conv layers)")
        flip = gr.Checkbox(v["random_flip"], label="Random flip")
        shuffle = gr.Checkbox(v["shuffle_captions"], label="Shuffle captions")
        checkpointing = gr.Checkbox(v["gradient_checkpointing"], label="Gradient checkpointing")
        bucketing = gr.Checkbox(v["bucketing"], label="Aspect-ratio buckets")
        cache_latents = gr.Checkbox(v["cache_latents"], label="Cache latents")
    with gr.Accordion("Captions, concepts and regularisation", open=False):
        with gr.Row():
            caption_dropout = gr.Number(v["caption_dropout"], label="Caption dropout (0-1)")
            keep_tokens = gr.Number(
                v["keep_tokens"], precision=0, label="Keep tokens (shuffle leaves them first)"
            )
            concepts = gr.Textbox(
                v["concepts"],
                label="More concepts",
                lines=2,
                placeholder="other-character-slug:repeats",
                info="other characters' approved sets, one 'slug:repeats' per line",
            )
        with gr.Row():
            reg_dir = gr.Textbox(
                v["reg_dir"],
                label="Regularisation folder",
                info="class images on the server, inside --ingest-roots (a kohya reg folder works)",
            )
            reg_caption = gr.Textbox(
                v["reg_caption"], label="Class prompt", info="caption of reg images without a .txt"
            )
            prior_loss_weight = gr.Number(v["prior_loss_weight"], label="Prior loss weight")
    with gr.Accordion("Checkpoints, output and samples", open=False):
        with gr.Row():
            checkpoint_every = gr.Number(v["checkpoint_every"], precision=0, label="Checkpoint every N steps")
            keep_checkpoints = gr.Number(v["keep_checkpoints"], precision=0, label="Checkpoints kept")
            save_precision = gr.Radio(
                ["fp16", "bf16", "float"], value=v["save_precision"], label="Save precision"
            )
            resume_from = gr.Dropdown(
                ["", *studio.lora_names()],
                value="",
                allow_custom_value=True,
                label="Continue from a LoRA",
                info="its weights start the training",
            )
        with gr.Row():
            sample_every = gr.Number(v["sample_every"], precision=0, label="Sample every N steps (0 = off)")
            sample_prompts = gr.Textbox(v["sample_prompts"], label="Sample prompts (one per line)", lines=2)
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

    def train_lora(
        character: str,
        model: str = "",
        preset: str = "quick",
        rank: float | None = None,
        alpha: float | None = None,
        learning_rate: float | None = None,
        text_encoder_lr: float | None = None,
        max_train_steps: float | None = None,
        batch_size: float | None = None,
        gradient_accumulation_steps: float | None = None,
        resolution: float | None = None,
        repeats: float | None = None,
        seed: float | None = None,
        optimizer: str | None = None,
        lr_scheduler: str | None = None,
        lr_warmup_steps: float | None = None,
        mixed_precision: str | None = None,
        noise_offset: float | None = None,
        min_snr_gamma: float | None = None,
        train_text_encoder: bool | None = None,
        locon: bool | None = None,
        random_flip: bool | None = None,
        shuffle_captions: bool | None = None,
        gradient_checkpointing: bool | None = None,
        checkpoint_every: float | None = None,
        sample_every: float | None = None,
        sample_prompts: str | None = None,
        max_train_epochs: float | None = None,
        lr_num_cycles: float | None = None,
        bucketing: bool | None = None,
        cache_latents: bool | None = None,
        caption_dropout: float | None = None,
        keep_tokens: float | None = None,
        concepts: str | None = None,
        reg_dir: str | None = None,
        reg_caption: str | None = None,
        prior_loss_weight: float | None = None,
        keep_checkpoints: float | None = None,
        save_precision: str | None = None,
        resume_from: str | None = None,
        backend: str = "builtin",
        request: gr.Request = None,
    ) -> dict:
        """Train a LoRA on the character's approved images: a preset (quick, balanced, quality) plus the options
        given (left out = the preset's or the default). concepts: other characters' sets as "slug:repeats"
        lines; reg_dir: a server folder of regularisation images inside the ingest roots; resume_from: a LoRA
        name in models/loras to continue from; resolution/max_train_epochs 0 = the family's / steps decide;
        backend: "builtin" or "kohya" (a configured sd-scripts install). Returns {"job_id", "cancel_token"} at
        once; follow it with /job_status. The result is models/loras/<slug>-v<k>.safetensors in kohya format."""
        given = dict(locals())
        values: dict = {}
        for name in FORM_FIELDS:
            value = given[name]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if name in INT_FIELDS:
                value = int(value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                value = float(value)
            if name in ZERO_MEANS_DEFAULT and value == 0:
                continue
            values[name] = value.strip() if isinstance(value, str) else value
        if "sample_prompts" in values:
            values["sample_prompts"] = [p.strip() for p in values["sample_prompts"].splitlines() if p.strip()]
        if backend and backend != "builtin":
            values["backend"] = backend
        with engine_errors():
            jid, tok = studio.submit_train_lora(
                {"character": character or "", "model": model or "", "preset": preset or "", **values},
                owner=username(request),
            )
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
        for event in studio.watch(jid):
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

    form = {
        "rank": rank,
        "alpha": alpha,
        "learning_rate": lr,
        "text_encoder_lr": te_lr,
        "max_train_steps": steps,
        "batch_size": batch,
        "gradient_accumulation_steps": accum,
        "resolution": resolution,
        "repeats": repeats,
        "seed": seed,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "lr_warmup_steps": warmup,
        "mixed_precision": precision,
        "noise_offset": noise_offset,
        "min_snr_gamma": min_snr,
        "train_text_encoder": train_te,
        "locon": locon,
        "random_flip": flip,
        "shuffle_captions": shuffle,
        "gradient_checkpointing": checkpointing,
        "checkpoint_every": checkpoint_every,
        "sample_every": sample_every,
        "sample_prompts": sample_prompts,
        "max_train_epochs": epochs,
        "lr_num_cycles": cycles,
        "bucketing": bucketing,
        "cache_latents": cache_latents,
        "caption_dropout": caption_dropout,
        "keep_tokens": keep_tokens,
        "concepts": concepts,
        "reg_dir": reg_dir,
        "reg_caption": reg_caption,
        "prior_loss_weight": prior_loss_weight,
        "keep_checkpoints": keep_checkpoints,
        "save_precision": save_precision,
        "resume_from": resume_from,
    }
    inputs = [character, model, preset, *(form[name] for name in FORM_FIELDS), backend]
    # a preset fills the form (what it leaves alone goes back to the default); the dataset fields stay
    kept = {"concepts", "reg_dir", "reg_caption", "resume_from", "sample_prompts"}
    filled = [name for name in FORM_FIELDS if name not in kept]
    preset.input(
        lambda p: [preset_values(p)[name] for name in filled], [preset], [form[n] for n in filled], **PRIVATE
    )
    submitted = gr.JSON(visible=False)
    start.click(train_lora, inputs, [submitted], api_name="train_lora").success(
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
