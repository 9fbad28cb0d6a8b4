"""Train tab: a LoRA from a character's approved images, with presets, the options kohya_ss users rely on,
a live loss curve and samples; the result is the character's next LoRA version."""

from __future__ import annotations

import gradio as gr

from engine.training import PRESETS, TrainLoraRequest
from ui.characters_tab import character_choices
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, username

OPTIMIZERS = ["adamw", "adamw8bit", "prodigy", "adafactor"]
SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"]


def _default(name: str):
    return TrainLoraRequest.model_fields[name].default


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    with gr.Row():
        character = gr.Dropdown(character_choices(studio), label="Character", value=None, allow_custom_value=True,
                                elem_id="train_character")  # fmt: skip
        model = gr.Dropdown([("(the character's)", ""), *studio.model_choices()], value="", label="Base model",
                            allow_custom_value=True, info="a diffusers folder (SD1.x, SD2.x, SDXL base)")  # fmt: skip
        preset = gr.Radio(["", *PRESETS], value="quick", label="Preset", info="options below override it")
        refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        rank = gr.Number(value=None, precision=0, label=f"Rank (preset / {_default('rank')})")
        alpha = gr.Number(value=None, label="Alpha")
        lr = gr.Number(value=None, label="UNet learning rate")
        te_lr = gr.Number(value=None, label="Text-encoder learning rate")
        steps = gr.Number(value=None, precision=0, label="Max steps", elem_id="train_steps")
    with gr.Row():
        batch = gr.Number(value=None, precision=0, label="Batch size")
        accum = gr.Number(value=None, precision=0, label="Gradient accumulation")
        resolution = gr.Number(value=None, precision=0, label="Resolution", elem_id="train_resolution")
        repeats = gr.Number(value=None, precision=0, label="Repeats")
        seed = gr.Number(value=None, precision=0, label="Seed")
    with gr.Row():
        optimizer = gr.Dropdown(["", *OPTIMIZERS], value="", label="Optimizer")
        scheduler = gr.Dropdown(["", *SCHEDULERS], value="", label="LR scheduler")
        warmup = gr.Number(value=None, precision=0, label="Warm-up steps")
        precision = gr.Radio(["", "no", "fp16", "bf16"], value="", label="Mixed precision")
        noise_offset = gr.Number(value=None, label="Noise offset")
        min_snr = gr.Number(value=None, label="Min-SNR gamma")
    with gr.Row():
        train_te = gr.Checkbox(value=False, label="Train text encoder")
        locon = gr.Checkbox(value=False, label="LoCon (conv layers)")
        flip = gr.Checkbox(value=False, label="Random flip")
        shuffle = gr.Checkbox(value=False, label="Shuffle captions")
        checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing")
    with gr.Row():
        checkpoint_every = gr.Number(value=None, precision=0, label="Checkpoint every N steps")
        sample_every = gr.Number(value=None, precision=0, label="Sample every N steps (0 = off)")
        sample_prompts = gr.Textbox(label="Sample prompts (one per line)", value="", lines=2)
    with gr.Row():
        start = gr.Button("Train LoRA", variant="primary", elem_id="train_btn")
        stop = gr.Button("Cancel (keeps the last checkpoint)", variant="stop")
    status = gr.Markdown(elem_id="train_status")
    with gr.Row():
        curve = gr.LinePlot(x="step", y="loss", title="Loss", height=260, elem_id="train_loss")
        samples = gr.Gallery(label="Samples", columns=4, height=260)
    job_id = gr.Textbox(label="Job id", interactive=False, elem_id="train_job_id")
    token = gr.Textbox(visible=False)
    result = gr.JSON(label="Result")

    def train_lora(character: str, model: str = "", preset: str = "quick", rank: float | None = None,
                   alpha: float | None = None, learning_rate: float | None = None,
                   text_encoder_lr: float | None = None, max_train_steps: float | None = None,
                   batch_size: float | None = None, gradient_accumulation_steps: float | None = None,
                   resolution: float | None = None, repeats: float | None = None, seed: float | None = None,
                   optimizer: str = "", lr_scheduler: str = "", lr_warmup_steps: float | None = None,
                   mixed_precision: str = "", noise_offset: float | None = None, min_snr_gamma: float | None = None,
                   train_text_encoder: bool = False, locon: bool = False, random_flip: bool = False,
                   shuffle_captions: bool = False, gradient_checkpointing: bool = False,
                   checkpoint_every: float | None = None, sample_every: float | None = None,
                   sample_prompts: str = "", request: gr.Request = None) -> dict:  # fmt: skip
        """Train a LoRA on the character's approved images: a preset (quick, balanced, quality) plus the options
        given (empty = the preset's or the default). Returns {"job_id", "cancel_token"} at once; follow it with
        /job_status. The result is models/loras/<slug>-v<k>.safetensors in kohya format."""
        ints = {"rank": rank, "max_train_steps": max_train_steps, "batch_size": batch_size,
                "gradient_accumulation_steps": gradient_accumulation_steps, "resolution": resolution,
                "repeats": repeats, "seed": seed, "lr_warmup_steps": lr_warmup_steps,
                "checkpoint_every": checkpoint_every, "sample_every": sample_every}  # fmt: skip
        floats = {"alpha": alpha, "learning_rate": learning_rate, "text_encoder_lr": text_encoder_lr,
                  "noise_offset": noise_offset, "min_snr_gamma": min_snr_gamma}  # fmt: skip
        values = {k: int(v) for k, v in ints.items() if v not in (None, "")}
        values |= {k: float(v) for k, v in floats.items() if v not in (None, "")}
        values |= {k: v for k, v in {"optimizer": optimizer, "lr_scheduler": lr_scheduler,
                                     "mixed_precision": mixed_precision}.items() if v}  # fmt: skip
        for key, flag in {"train_text_encoder": train_text_encoder, "locon": locon, "random_flip": random_flip,
                          "shuffle_captions": shuffle_captions,
                          "gradient_checkpointing": gradient_checkpointing}.items():  # fmt: skip
            if flag:
                values[key] = True
        prompts = [p.strip() for p in (sample_prompts or "").splitlines() if p.strip()]
        if prompts:
            values["sample_prompts"] = prompts
        with engine_errors():
            jid, tok = studio.submit_train_lora({"character": character or "", "model": model or "",
                                                 "preset": preset or "", **values}, owner=username(request))  # fmt: skip
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
                yield (gr.skip(), gr.skip(), f"**running** · {event.get('desc', '')} · ETA {event.get('eta') or 0:.0f}s",
                       pd.DataFrame(points), gr.skip(), gr.skip())  # fmt: skip
            elif event["type"] == "sample":
                shown.extend((p, f"step {event['step']}") for p in event.get("paths") or [])
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), list(shown), gr.skip()
            elif event["type"] == "done":
                r = event["result"]
                curve_df = pd.DataFrame({"step": range(1, len(r["losses"]) + 1), "loss": r["losses"]})
                yield (gr.skip(), gr.skip(), f"**succeeded** · `{r['lora']}` (version {r['version']}) in models/loras",
                       curve_df, r["samples"], r)  # fmt: skip
            elif event["type"] in ("failed", "cancelled", "interrupted"):
                yield gr.skip(), gr.skip(), f"**{event['type']}** · {event.get('error', '')}", gr.skip(), gr.skip(), None

    inputs = [character, model, preset, rank, alpha, lr, te_lr, steps, batch, accum, resolution, repeats, seed,
              optimizer, scheduler, warmup, precision, noise_offset, min_snr, train_te, locon, flip, shuffle,
              checkpointing, checkpoint_every, sample_every, sample_prompts]  # fmt: skip
    submitted = gr.JSON(visible=False)
    start.click(train_lora, inputs, [submitted], api_name="train_lora").success(
        follow, [submitted], [job_id, token, status, curve, samples, result], **PRIVATE,
        concurrency_limit=ctx.settings.max_queue, concurrency_id=JOBS_CONCURRENCY_ID)  # fmt: skip

    def cancel(jid: str, tok: str, request: gr.Request = None) -> str:
        if not jid:
            return "nothing to cancel"
        with engine_errors():
            return f"**{studio.cancel(jid, username(request), tok)}**"

    stop.click(cancel, [job_id, token], [status], **PRIVATE)
    refresh.click(lambda: (gr.update(choices=character_choices(studio)),
                           gr.update(choices=[("(the character's)", ""), *studio.model_choices()])),
                  None, [character, model], **PRIVATE)  # fmt: skip
