"""Variants tab: pick clips, audios and hooks; preview the plan; render a batch; download it as a ZIP."""

from __future__ import annotations

import gradio as gr

from engine.media.variants import SIZES
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, follow_job, username

PLAN_COLUMNS = ["#", "video", "audio", "hook"]


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    lib = studio.library
    outputs_dir = ctx.settings.outputs_dir

    def media(kind: str):
        return [(i.name, i.id) for i in lib.items(kind=kind)]

    def colls(kind: str):
        return [(c.name, c.id) for c in lib.collections(kind)]

    def hook_choices():
        return [(h.text[:60], h.id) for h in lib.hooks()]

    with gr.Row():
        refresh = gr.Button("Refresh lists", size="sm")
    with gr.Row():
        videos = gr.Dropdown(
            media("video"), multiselect=True, allow_custom_value=True, label="Videos", elem_id="v_videos"
        )
        video_collections = gr.Dropdown(
            colls("video"), multiselect=True, allow_custom_value=True, label="Video collections"
        )
    with gr.Row():
        audios = gr.Dropdown(
            media("audio"),
            multiselect=True,
            allow_custom_value=True,
            label="Audios (empty = keep the clip's audio)",
            elem_id="v_audios",
        )
        audio_collections = gr.Dropdown(
            colls("audio"), multiselect=True, allow_custom_value=True, label="Audio collections"
        )
    with gr.Row():
        hooks = gr.Dropdown(
            hook_choices(), multiselect=True, allow_custom_value=True, label="Hooks", elem_id="v_hooks"
        )
        hook_categories = gr.Dropdown(
            lib.hook_categories(), multiselect=True, allow_custom_value=True, label="Hook categories"
        )
    with gr.Row():
        mode = gr.Radio(
            ["round-robin", "random", "cartesian"],
            value="round-robin",
            label="Mode",
            info="round-robin: each video cycles through audios and hooks in order",
        )
        per_video = gr.Number(value=1, precision=0, minimum=1, maximum=50, label="Variants per video")
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (random mode)")
        limit = gr.Number(value=100, precision=0, minimum=1, maximum=2000, label="Limit")
    with gr.Accordion("Audio", open=False), gr.Row():
        audio_mode = gr.Radio(["replace", "mix"], value="replace", label="Audio")
        audio_volume = gr.Slider(0, 2, value=1.0, step=0.05, label="New audio volume (mix)")
        fade_out_s = gr.Slider(0, 10, value=0.5, step=0.1, label="Fade out, s")
    with gr.Accordion("Hook text", open=False):
        with gr.Row():
            hook_position = gr.Radio(["top", "center", "bottom"], value="bottom", label="Position")
            hook_start = gr.Number(value=0, minimum=0, label="Show from, s")
            hook_duration = gr.Number(value=0, minimum=0, label="Show for, s (0 = to the end)")
            margin = gr.Slider(0, 0.3, value=0.08, step=0.01, label="Safe margin (fraction of height)")
        with gr.Row():
            font_size = gr.Number(
                value=0, precision=0, minimum=0, maximum=400, label="Font size px (0 = auto)"
            )
            color = gr.ColorPicker(value="#ffffff", label="Colour")
            outline_color = gr.ColorPicker(value="#000000", label="Outline")
            outline_width = gr.Number(value=3, precision=0, minimum=0, maximum=30, label="Outline px")
    with gr.Accordion("Output", open=False), gr.Row():
        output_size = gr.Dropdown(
            list(SIZES), value="", label="Size (empty = the clip's)", allow_custom_value=True
        )
        fit = gr.Radio(["crop", "pad"], value="crop", label="Fit")
        expire_hours = gr.Number(value=24, minimum=0.01, label="Delete the batch after, hours")
    with gr.Row():
        preview_btn = gr.Button("Preview plan", elem_id="v_preview")
        make_btn = gr.Button("Make variants", variant="primary", elem_id="v_make")
        cancel_btn = gr.Button("Cancel", variant="stop", size="sm")
    plan_table = gr.Dataframe(headers=PLAN_COLUMNS, interactive=False, wrap=True, elem_id="v_plan")
    progress_md = gr.Markdown(elem_id="v_status")
    outputs = gr.Gallery(label="Finished variants", columns=4, height=360, elem_id="v_gallery")
    archive = gr.File(label="Batch ZIP", elem_id="v_zip")
    batch = gr.JSON(visible=False)

    fields = dict(
        videos=videos,
        video_collections=video_collections,
        audios=audios,
        audio_collections=audio_collections,
        hooks=hooks,
        hook_categories=hook_categories,
        mode=mode,
        per_video=per_video,
        seed=seed,
        limit=limit,
        audio_mode=audio_mode,
        audio_volume=audio_volume,
        fade_out_s=fade_out_s,
        hook_position=hook_position,
        hook_start=hook_start,
        hook_duration=hook_duration,
        margin=margin,
        font_size=font_size,
        color=color,
        outline_color=outline_color,
        outline_width=outline_width,
        output_size=output_size,
        fit=fit,
        expire_hours=expire_hours,
    )
    names = list(fields)
    inputs = [fields[n] for n in names]

    def values_of(args: dict) -> dict:
        out = {}
        for name in names:
            value = args.get(name)
            if value is None or value == "" or value == []:
                continue
            if name in ("per_video", "seed", "limit", "font_size", "outline_width"):
                value = int(value)
            out[name] = value
        return out

    def preview_variants(
        videos: list[str] | None = None,
        video_collections: list[str] | None = None,
        audios: list[str] | None = None,
        audio_collections: list[str] | None = None,
        hooks: list[str] | None = None,
        hook_categories: list[str] | None = None,
        mode: str = "round-robin",
        per_video: float = 1,
        seed: float = 0,
        limit: float = 100,
        audio_mode: str = "replace",
        audio_volume: float = 1.0,
        fade_out_s: float = 0.5,
        hook_position: str = "bottom",
        hook_start: float = 0,
        hook_duration: float = 0,
        margin: float = 0.08,
        font_size: float = 0,
        color: str = "#ffffff",
        outline_color: str = "#000000",
        outline_width: float = 3,
        output_size: str = "",
        fit: str = "crop",
        expire_hours: float = 24,
    ) -> dict:
        """How many variants the selection makes, and which (video, audio, hook), without rendering."""
        with engine_errors():
            return studio.preview_variants(values_of(locals()))

    def show_plan(*args):
        plan = preview_variants(*args)
        rows = [[v["index"] + 1, v["video"], v["audio"], v["hook"]] for v in plan["variants"]]
        return rows, f"**{plan['count']} variant(s)** · {plan['mode']}"

    def make_variants(
        videos: list[str] | None = None,
        video_collections: list[str] | None = None,
        audios: list[str] | None = None,
        audio_collections: list[str] | None = None,
        hooks: list[str] | None = None,
        hook_categories: list[str] | None = None,
        mode: str = "round-robin",
        per_video: float = 1,
        seed: float = 0,
        limit: float = 100,
        audio_mode: str = "replace",
        audio_volume: float = 1.0,
        fade_out_s: float = 0.5,
        hook_position: str = "bottom",
        hook_start: float = 0,
        hook_duration: float = 0,
        margin: float = 0.08,
        font_size: float = 0,
        color: str = "#ffffff",
        outline_color: str = "#000000",
        outline_width: float = 3,
        output_size: str = "",
        fit: str = "crop",
        expire_hours: float = 24,
        request: gr.Request = None,
    ) -> dict:
        """Queue a batch of variants; returns its batch id (a job id: follow it with /job_status, fetch the
        ZIP with /batch_zip) and a cancel token."""
        values = values_of(locals())
        with engine_errors():
            job_id, token = studio.submit_variants(values, owner=username(request))
        return {"batch_id": job_id, "cancel_token": token}

    def follow(info: dict | None):
        if not info or not info.get("batch_id"):
            return
        done: list[tuple[str, str]] = []
        for event in follow_job(studio, info["batch_id"], raise_on=()):
            if event["type"] == "progress":
                row = event.get("variant")
                if row and row.get("ok"):
                    done.append((str(outputs_dir / row["file"]), f"{row['index'] + 1}: {row['hook'][:40]}"))
                msg = f"**{event.get('step', 0)}/{event.get('total', '?')}** variants"
                if row and not row.get("ok"):
                    msg += f" · variant {row['index'] + 1} failed: {row['error'][:200]}"
                yield list(done), msg, gr.skip()
            elif event["type"] == "done":
                res = event["result"]
                yield (
                    list(done),
                    f"**done** · {res['ok']} ok, {res['failed']} failed · expires {res['expires_at']}",
                    str(outputs_dir / res["zip"]),
                )
            elif event["type"] in ("failed", "cancelled", "interrupted"):
                yield list(done), f"**{event['type']}** {event.get('error', '')}", gr.skip()

    def batch_zip(batch_id: str) -> str:
        """The ZIP of a finished batch (every successful variant), as a file download."""
        with engine_errors():
            return studio.batch_zip(batch_id.strip())

    zip_id = gr.Textbox(visible=False)
    zip_id.submit(batch_zip, [zip_id], [archive], api_name="batch_zip")

    def cancel(info: dict | None):
        if not info or not info.get("batch_id"):
            return "nothing to cancel"
        with engine_errors():
            return studio.cancel(info["batch_id"], None, info.get("cancel_token"))

    def refresh_lists():
        return (
            gr.Dropdown(choices=media("video")),
            gr.Dropdown(choices=colls("video")),
            gr.Dropdown(choices=media("audio")),
            gr.Dropdown(choices=colls("audio")),
            gr.Dropdown(choices=hook_choices()),
            gr.Dropdown(choices=lib.hook_categories()),
        )

    preview_json = gr.JSON(visible=False)
    preview_btn.click(preview_variants, inputs, [preview_json], api_name="preview_variants")
    preview_btn.click(show_plan, inputs, [plan_table, progress_md], **PRIVATE)
    make_btn.click(make_variants, inputs, [batch], api_name="make_variants").then(
        follow,
        [batch],
        [outputs, progress_md, archive],
        concurrency_id=JOBS_CONCURRENCY_ID,
        concurrency_limit=ctx.settings.max_queue,
        **PRIVATE,
    )
    cancel_btn.click(cancel, [batch], [progress_md], **PRIVATE)
    refresh.click(
        refresh_lists,
        None,
        [videos, video_collections, audios, audio_collections, hooks, hook_categories],
        **PRIVATE,
    )
