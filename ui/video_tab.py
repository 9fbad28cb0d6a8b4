"""Video tab: image-to-video, text-to-video (families from engine.video.generate's registry) and camera-motion clips.

`/generate_video` runs one job and returns the MP4 (recipe in its metadata) and a summary; `/video_models`
lists the video models found with their family and modes, `/video_families` the registry's rules.
"""

from __future__ import annotations

import inspect

import gradio as gr

from engine.media.ffmpeg import VIDEO_SUFFIXES
from engine.media.motion import MOVES
from engine.video.job import VIDEO_MODES
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


def build(ctx: UIContext) -> dict:
    studio = ctx.studio
    outputs_dir = ctx.settings.outputs_dir

    def model_names() -> list[str]:
        return [m["name"] for m in studio.video_models()]

    with gr.Row():
        with gr.Column(scale=3):
            mode = gr.Radio(
                list(VIDEO_MODES),
                value="camera",
                label="Mode",
                elem_id="video_mode",
                info="camera: a camera move over a still (no weights needed)",
            )
            with gr.Row():
                model = gr.Dropdown(
                    ["", *model_names()],
                    value="",
                    label="Video model (img2video / txt2video)",
                    allow_custom_value=True,
                    elem_id="video_model",
                    scale=3,
                )
                base_model = gr.Dropdown(
                    ["", *[n for _, n in studio.model_choices()]],
                    value="",
                    label="AnimateDiff base (SD1.5)",
                    allow_custom_value=True,
                )
                refresh = gr.Button("🔄", size="sm", scale=0, min_width=40)
            prompt = gr.Textbox(label="Prompt", value="", lines=2, elem_id="video_prompt")
            negative = gr.Textbox(label="Negative prompt", value="")
            with gr.Row():
                image = gr.Image(
                    label="First frame (img2video, camera)",
                    type="filepath",
                    sources=["upload"],
                    elem_id="video_image",
                    height=200,
                )
                with gr.Column():
                    generation_id = gr.Textbox(
                        label="…or a gallery generation id", value="", elem_id="video_generation_id"
                    )
                    first_frame_prompt = gr.Textbox(
                        label="…or generate the first frame from this prompt",
                        value="",
                        elem_id="video_first_prompt",
                    )
                    first_frame_model = gr.Dropdown(
                        ["", *[n for _, n in studio.model_choices()]],
                        value="",
                        label="First-frame model (empty = default)",
                        allow_custom_value=True,
                    )
            with gr.Row():
                frames = gr.Number(
                    value=0, precision=0, minimum=0, maximum=1000, label="Frames (0 = default)"
                )
                fps = gr.Number(
                    value=0,
                    precision=0,
                    minimum=0,
                    maximum=60,
                    label="FPS (0 = default)",
                    elem_id="video_fps",
                )
                width = gr.Number(value=0, precision=0, minimum=0, maximum=4096, label="Width (0 = default)")
                height = gr.Number(
                    value=0, precision=0, minimum=0, maximum=4096, label="Height (0 = default)"
                )
            with gr.Row():
                steps = gr.Number(value=0, precision=0, minimum=0, maximum=150, label="Steps (0 = default)")
                cfg = gr.Number(value=0, minimum=0, maximum=30, label="CFG (0 = default)")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                motion = gr.Slider(0, 1, value=0.5, step=0.05, label="Motion strength (SVD)")
            with gr.Row():
                loras = gr.Textbox(label="LoRAs (AnimateDiff; name:weight, ...)", value="")
                decode_chunk = gr.Number(
                    value=0, precision=0, minimum=0, maximum=64, label="Decode chunk (SVD; 0 = auto)"
                )
            with gr.Accordion("Camera motion", open=True), gr.Row():
                moves = gr.Dropdown(
                    list(MOVES),
                    value=["zoom_in"],
                    multiselect=True,
                    label="Moves",
                    allow_custom_value=True,
                    elem_id="video_moves",
                )
                strength = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="Camera strength")
                duration = gr.Number(
                    value=4.0, minimum=0.5, maximum=120, label="Seconds", elem_id="video_duration"
                )
            interpolate = gr.Number(
                value=0,
                precision=0,
                minimum=0,
                maximum=120,
                label="Interpolate to fps (ffmpeg motion interpolation; 0 = off)",
            )
            with gr.Row():
                go = gr.Button("Generate video", variant="primary", elem_id="video_go")
                stop = gr.Button("Cancel", variant="stop", size="sm")
            status = gr.Markdown(elem_id="video_status")
        with gr.Column(scale=2):
            result = gr.Video(label="Video", elem_id="video_result", interactive=False)
            summary = gr.JSON(label="Result")
            result_id = gr.Textbox(label="Generation id", interactive=False, elem_id="video_result_id")
            send_upscale = gr.Button("Send to upscale", size="sm", elem_id="video_send_upscale")
            job_id = gr.Textbox(visible=False)
            cancel_token = gr.Textbox(visible=False)
            with gr.Accordion("Families", open=False):
                families = gr.JSON(studio.video_families(), label="Video families")

    for component, name in (
        (frames, "frames"),
        (fps, "fps"),
        (width, "width"),
        (height, "height"),
        (steps, "steps"),
        (cfg, "cfg_scale"),
        (motion, "motion_strength"),
        (decode_chunk, "decode_chunk_size"),
        (strength, "camera_strength"),
        (duration, "duration"),
        (interpolate, "interpolate_fps"),
    ):
        name_range_errors(component, name)

    def generate_video(
        mode: str = "camera",
        model: str = "",
        base_model: str = "",
        prompt: str = "",
        negative_prompt: str = "",
        image: str | None = None,
        generation_id: str = "",
        first_frame_prompt: str = "",
        first_frame_model: str = "",
        frames: float = 0,
        fps: float = 0,
        width: float = 0,
        height: float = 0,
        steps: float = 0,
        cfg_scale: float = 0,
        seed: float = -1,
        motion_strength: float = 0.5,
        loras: str = "",
        decode_chunk_size: float = 0,
        camera_moves: list[str] | None = None,
        camera_strength: float = 0.25,
        duration: float = 4.0,
        interpolate_fps: float = 0,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Make a clip. mode img2video (SVD, LTX-Video; first frame from image, generation_id or
        first_frame_prompt with first_frame_model), txt2video (LTX-Video, AnimateDiff on base_model with loras) or camera (a camera
        move over the first frame, no weights). 0 = the family's default for frames, fps, size, steps, cfg.
        Returns the MP4 (H.264, recipe in its metadata) and a summary (generation id, frames, fps, size)."""
        moves = (
            camera_moves
            if isinstance(camera_moves, list)
            else [m for m in str(camera_moves or "").split("+") if m]
        )
        values = dict(
            mode=mode or "camera",
            model=model or "",
            base_model=base_model or "",
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            image=image or None,
            generation_id=generation_id or "",
            first_frame_prompt=first_frame_prompt or "",
            first_frame_model=first_frame_model or "",
            frames=int(frames or 0),
            fps=int(fps or 0),
            width=int(width or 0),
            height=int(height or 0),
            steps=int(steps or 0),
            cfg_scale=float(cfg_scale or 0),
            seed=int(seed if seed is not None else -1),
            motion_strength=float(motion_strength),
            loras=loras or "",
            decode_chunk_size=int(decode_chunk_size or 0),
            camera_moves="+".join(moves) or "static",
            camera_strength=float(camera_strength),
            duration=float(4.0 if duration is None else duration),
            interpolate_fps=int(interpolate_fps or 0),
        )
        with engine_errors():
            jid, token = studio.submit_video(values, owner=username(request))
        yield None, {"job_id": jid}, "", jid, token, f"**queued** · job `{jid}`"
        for event in follow_job(studio, jid, progress, what=f"job {jid}", title="Video failed"):
            if event["type"] == "done":
                res = event["result"]
                yield (
                    str(outputs_dir / res["file"]),
                    {"job_id": jid, **res},
                    res["generation_id"],
                    jid,
                    token,
                    f"**succeeded** · {res['frames']} frames at {res['fps']:g} fps, {res['width']}x{res['height']}",
                )
            elif event["type"] == "cancelled":
                yield None, {"job_id": jid, "status": "cancelled"}, "", jid, token, "**cancelled**"

    fields = dict(
        mode=mode,
        model=model,
        base_model=base_model,
        prompt=prompt,
        negative_prompt=negative,
        image=image,
        generation_id=generation_id,
        first_frame_prompt=first_frame_prompt,
        first_frame_model=first_frame_model,
        frames=frames,
        fps=fps,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        seed=seed,
        motion_strength=motion,
        loras=loras,
        decode_chunk_size=decode_chunk,
        camera_moves=moves,
        camera_strength=strength,
        duration=duration,
        interpolate_fps=interpolate,
    )
    inputs = [fields[name] for name in inspect.signature(generate_video).parameters if name in fields]
    go.click(
        generate_video,
        inputs,
        [result, summary, result_id, job_id, cancel_token, status],
        api_name="generate_video",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    )
    wire_job_controls(ctx, stop, job_id, cancel_token, status)

    def video_models() -> list[dict]:
        """Video models found (models/diffusers SVD and LTX-Video folders, models/animatediff_models motion
        adapters): name, family, label and the modes each can run."""
        with engine_errors():
            return studio.video_models()

    def video_families() -> list[dict]:
        """The video family registry: modes, frame rule (frames = k*frame_multiple + frame_offset), sizes,
        defaults."""
        return studio.video_families()

    hidden = gr.JSON(visible=False)
    refresh.click(video_models, None, [hidden], api_name="video_models")
    refresh.click(
        lambda: (
            gr.update(choices=["", *model_names()]),
            gr.update(choices=["", *[n for _, n in studio.model_choices()]]),
            gr.update(choices=["", *[n for _, n in studio.model_choices()]]),
        ),
        None,
        [model, base_model, first_frame_model],
        **PRIVATE,
    )
    families_btn = gr.Button(visible=False)
    families_btn.click(video_families, None, [families], api_name="video_families")
    return {
        "send_upscale": send_upscale,
        "generation_id": result_id,
        "image": image,
        "generation_input": generation_id,
        "mode": mode,
    }


def wire_first_frame(ctx: UIContext, video_tab: dict, gallery: dict | None) -> None:
    """The gallery's "Send to video": its selected image becomes the first frame (img2video or camera)."""
    if gallery is None:
        return

    def send(generation_id: str, mode: str, record: dict | None):
        if not generation_id:
            raise gr.Error("select an image in the gallery first", title="Nothing selected")
        if str((record or {}).get("image_path") or "").lower().endswith(VIDEO_SUFFIXES):
            raise gr.Error("a clip cannot be a first frame: pick an image", title="Not an image")
        # the gallery image replaces an uploaded one, and needs a mode that takes a first frame
        return generation_id, None, "img2video" if mode == "txt2video" else mode, *ctx.switch_to("video")

    gallery["send_video"].click(
        send,
        [gallery["selected"], video_tab["mode"], gallery["detail"]],
        [video_tab["generation_input"], video_tab["image"], video_tab["mode"], *ctx.switch_outputs("video")],
        **PRIVATE,
    )
