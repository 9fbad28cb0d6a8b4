"""Library tab: videos, audios, images and hook lines; collections, tags, search; upload and delete."""

from __future__ import annotations

import gradio as gr

from engine.media.library import public_item
from ui.common import PRIVATE, UIContext, engine_errors, name_range_errors, username, wait_for_job

KINDS = ["", "video", "audio", "image"]
ITEM_COLUMNS = ["id", "kind", "name", "tags", "collection", "duration s", "size", "resolution"]
HOOK_COLUMNS = ["id", "category", "text"]


def _item_row(item, collections: dict[str, str]) -> list:
    res = f"{item.width}x{item.height}" if item.width and item.height else ""
    return [
        item.id,
        item.kind,
        item.name,
        ", ".join(item.tags or []),
        collections.get(item.collection_id or "", ""),
        round(item.duration, 2) if item.duration else "",
        f"{item.size / 1e6:.1f} MB",
        res,
    ]


def build(ctx: UIContext) -> None:
    studio = ctx.studio

    def collection_choices(kind: str = "") -> list[tuple[str, str]]:
        return [("", "")] + [(f"{c.name} ({c.kind})", c.id) for c in studio.library.collections(kind)]

    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(
                label="Add videos, audios or images",
                file_count="multiple",
                type="filepath",
                elem_id="library_files",
            )
            with gr.Row():
                add_tags = gr.Textbox(label="Tags (comma separated)", value="")
                add_collection = gr.Dropdown(collection_choices(), value="", label="Into collection")
            add_btn = gr.Button("Add to library", variant="primary", elem_id="library_add")
        with gr.Column(scale=1), gr.Group():
            coll_kind = gr.Radio(["video", "audio"], value="video", label="New collection of")
            coll_name = gr.Textbox(label="Collection name", value="")
            coll_btn = gr.Button("Create collection", size="sm")
    with gr.Row():
        kind = gr.Dropdown(KINDS, value="", label="Kind")
        text = gr.Textbox(label="Name contains", value="", elem_id="library_text")
        tag = gr.Textbox(label="Tag", value="")
        coll_filter = gr.Dropdown(collection_choices(), value="", label="Collection")
        search = gr.Button("Search", elem_id="library_search")
    table = gr.Dataframe(headers=ITEM_COLUMNS, interactive=False, wrap=True, elem_id="library_table")
    thumbs = gr.Gallery(label="Thumbnails", columns=8, height=220, elem_id="library_thumbs")
    with gr.Row():
        item_id = gr.Textbox(label="Selected item id", value="", elem_id="library_item_id")
        new_name = gr.Textbox(label="Rename to", value="", elem_id="library_new_name")
        new_tags = gr.Textbox(label="Tags", value="")
        move_to = gr.Dropdown(collection_choices(), value="", label="Collection (empty = none)")
    with gr.Row():
        save_btn = gr.Button("Save changes", size="sm", elem_id="library_save")
        delete_btn = gr.Button("Delete item (file and row)", size="sm", variant="stop")
    status = gr.Markdown(elem_id="library_status")

    with gr.Accordion("Hooks (short texts overlaid on variants)", open=False):
        with gr.Row():
            hooks_text = gr.Textbox(
                label="One hook per line, or a CSV with text[,category] columns",
                lines=5,
                value="",
                elem_id="hooks_text",
            )
            hooks_category = gr.Textbox(label="Category", value="general", elem_id="hooks_category")
        hooks_btn = gr.Button("Add hooks", elem_id="hooks_add")
        hooks_table = gr.Dataframe(headers=HOOK_COLUMNS, interactive=False, wrap=True, elem_id="hooks_table")

    with gr.Accordion("Image -> clip with a camera move (saved into the video library)", open=False):
        with gr.Row():
            motion_image = gr.Textbox(
                label="Image id (select an image above)", value="", elem_id="motion_image"
            )
            motion_moves = gr.Dropdown(
                [
                    "static",
                    "zoom_in",
                    "zoom_out",
                    "pan_left",
                    "pan_right",
                    "pan_up",
                    "pan_down",
                    "zoom_in+pan_right",
                    "zoom_out+pan_left",
                    "zoom_in+pan_up",
                ],
                value="zoom_in",
                allow_custom_value=True,
                label="Move (combine with +)",
            )
            motion_strength = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="Strength")
        with gr.Row():
            motion_duration = gr.Slider(0.5, 30, value=4, step=0.5, label="Duration, s")
            motion_fps = gr.Slider(1, 60, value=30, step=1, label="FPS")
            motion_size = gr.Dropdown(
                ["", "1080x1920", "1920x1080", "1080x1080", "720x1280", "1280x720"],
                value="",
                allow_custom_value=True,
                label="Size (empty = the image's)",
            )
        motion_btn = gr.Button("Make clip", elem_id="motion_btn")
        motion_video = gr.Video(label="Clip", elem_id="motion_video")

    with gr.Accordion("Join clips (with an audio track and burned-in subtitles)", open=False):
        with gr.Row():
            join_clips = gr.Textbox(
                label="Video ids, in order (comma separated)", value="", elem_id="join_clips"
            )
            join_audio = gr.Textbox(label="Audio id (optional)", value="")
            join_srt = gr.File(label="Subtitles (.srt, optional)", file_types=[".srt"], type="filepath")
        with gr.Row():
            join_size = gr.Dropdown(
                ["", "1080x1920", "1920x1080", "1080x1080", "720x1280", "1280x720"],
                value="",
                allow_custom_value=True,
                label="Size (empty = the first clip's)",
            )
            join_fps = gr.Slider(1, 60, value=30, step=1, label="FPS")
            join_btn = gr.Button("Join", elem_id="join_btn")
        join_video = gr.Video(label="Joined clip")

    with gr.Accordion("Text to speech (saved into the audio library)", open=False):
        with gr.Row():
            tts_text = gr.Textbox(label="Text", lines=3, value="", elem_id="tts_text")
            with gr.Column():
                tts_backend = gr.Radio(
                    ["espeak", "http"],
                    value="espeak",
                    label="Voice engine",
                    info="espeak: built in, offline; http: an OpenAI-compatible /v1/audio/speech",
                )
                tts_voice = gr.Dropdown(["en", "en-us"], value="en", allow_custom_value=True, label="Voice")
                tts_speed = name_range_errors(
                    gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed"), "speed"
                )
        with gr.Row():
            tts_url = gr.Textbox(
                label="Server URL (http engine)", value="", placeholder="http://127.0.0.1:8880"
            )
            tts_model = gr.Textbox(label="Model (http engine)", value="tts-1")
            tts_key = gr.Textbox(label="API key (http engine, optional)", value="", type="password")
        tts_btn = gr.Button("Speak and save", elem_id="tts_btn")
        tts_audio = gr.Audio(label="Speech", type="filepath", elem_id="tts_audio")

    # --- API + events --------------------------------------------------------------------------
    def library_add(files: list[str] | None, tags: str = "", collection_id: str = "") -> list[dict]:
        """Add uploaded media files (video, audio, image) to the library; returns the new items."""
        if not files:
            raise gr.Error("choose one or more files first", title="Nothing to add")
        out = []
        with engine_errors():
            for path in files:
                checked = studio.checked_upload(path, "files")
                item = studio.library.add_file(
                    checked, name=_original_name(path), tags=tags or "", collection_id=collection_id or None
                )
                out.append(public_item(item, studio.library.root))
        return out

    def library_items(kind: str = "", text: str = "", tag: str = "", collection_id: str = "") -> list[dict]:
        """Library items, newest first, filtered by kind, name text, tag and collection."""
        with engine_errors():
            items = studio.library.items(kind or "", text or "", tag or "", collection_id or "")
        return [public_item(i, studio.library.root) for i in items]

    def show(kind="", text="", tag="", collection_id=""):
        with engine_errors():
            items = studio.library.items(kind or "", text or "", tag or "", collection_id or "")
            names = {c.id: c.name for c in studio.library.collections()}
        rows = [_item_row(i, names) for i in items]
        thumbs_ = [(i.thumbnail, i.name) for i in items if i.thumbnail]
        return rows, thumbs_, f"{len(rows)} item(s)"

    def library_update(item_id: str, name: str = "", tags: str = "", collection_id: str = "") -> dict:
        """Rename, re-tag and move an item (collection '' = none); empty name/tags keep the old ones."""
        with engine_errors():
            item = studio.library.update(
                item_id.strip(),
                name=name or None,
                tags=tags if tags else None,
                collection_id=collection_id or "",
            )
        return public_item(item, studio.library.root)

    def library_delete(item_id: str) -> dict:
        """Delete library items (comma-separated ids): rows and files together."""
        with engine_errors():
            n = studio.library.delete([i.strip() for i in item_id.split(",") if i.strip()])
        return {"deleted": n}

    def create_collection(kind: str, name: str) -> dict:
        """A new video or audio collection."""
        with engine_errors():
            return studio.library.create_collection(kind, name).model_dump(mode="json")

    def add_hooks(text: str, category: str = "general") -> list[dict]:
        """Hooks from pasted lines or a CSV (text[,category]); returns them."""
        with engine_errors():
            return [
                h.model_dump(mode="json") for h in studio.library.add_hooks(text or "", category or "general")
            ]

    def list_hooks(category: str = "") -> list[dict]:
        """All hooks, or those of one category."""
        with engine_errors():
            return [h.model_dump(mode="json") for h in studio.library.hooks(category=category or "")]

    def hook_rows():
        """Newest first: what was just added is at the top of the (virtualised) table."""
        hooks = sorted(studio.library.hooks(), key=lambda h: h.created_at, reverse=True)
        return [[h.id, h.category, h.text] for h in hooks]

    def refresh_collections():
        choices = collection_choices()
        return [gr.Dropdown(choices=choices) for _ in range(3)]

    def speak(
        text: str,
        voice: str = "en",
        speed: float = 1.0,
        backend: str = "espeak",
        base_url: str = "",
        model: str = "tts-1",
        api_key: str = "",
        name: str = "",
        tags: str = "tts",
    ) -> dict:
        """Speak `text` (espeak-ng built in, or an OpenAI-compatible server) and save it as a library audio;
        returns the item with its measured duration."""
        values = dict(
            text=text or "",
            voice=voice or "en",
            speed=float(speed),
            backend=backend or "espeak",
            base_url=base_url or "",
            model=model or "tts-1",
            api_key=api_key or "",
        )
        with engine_errors():
            return studio.speak(values, name=name or "", tags=tags or "tts")

    tts_hidden = gr.JSON(visible=False)
    tts_btn.click(
        speak,
        [tts_text, tts_voice, tts_speed, tts_backend, tts_url, tts_model, tts_key],
        [tts_hidden],
        api_name="speak",
    ).then(
        lambda item: str(studio.library.root / item["file"]) if item else None,
        [tts_hidden],
        [tts_audio],
        **PRIVATE,
    )

    def image_to_clip(
        image_id: str,
        moves: str = "zoom_in",
        strength: float = 0.25,
        duration: float = 4.0,
        fps: float = 30,
        output_size: str = "",
        request: gr.Request = None,
    ) -> dict:
        """A library image -> a video clip with a camera move (zoom/pan, smooth sub-pixel motion), saved into
        the video library; returns the new item."""
        values = dict(
            image_id=(image_id or "").strip(),
            moves=moves or "zoom_in",
            strength=float(strength),
            duration=float(duration),
            fps=int(fps),
            output_size=output_size or "",
        )
        with engine_errors():
            job_id, _ = studio.submit_motion_clip(values, owner=username(request))
        return wait_for_job(studio, job_id, None, "clip", title="Camera motion failed")

    def join_clips_api(
        clips: str,
        audio: str = "",
        subtitles: str | None = None,
        output_size: str = "",
        fps: float = 30,
        request: gr.Request = None,
    ) -> dict:
        """Join library videos in order (comma-separated ids), under a library audio, with an uploaded .srt
        burned in; saves the result into the video library and returns it."""
        values = dict(
            clips=clips or "",
            audio=(audio or "").strip(),
            subtitles=subtitles or None,
            output_size=output_size or "",
            fps=int(fps),
        )
        with engine_errors():
            job_id, _ = studio.submit_join_clips(values, owner=username(request))
            return studio.run_and_wait(job_id)

    join_hidden = gr.JSON(visible=False)
    join_btn.click(
        join_clips_api,
        [join_clips, join_audio, join_srt, join_size, join_fps],
        [join_hidden],
        api_name="join_clips",
    ).then(
        lambda item: str(studio.library.root / item["file"]) if item else None,
        [join_hidden],
        [join_video],
        **PRIVATE,
    )

    motion_hidden = gr.JSON(visible=False)
    motion_btn.click(
        image_to_clip,
        [motion_image, motion_moves, motion_strength, motion_duration, motion_fps, motion_size],
        [motion_hidden],
        api_name="image_to_clip",
    ).then(
        lambda item: str(studio.library.root / item["file"]) if item else None,
        [motion_hidden],
        [motion_video],
        **PRIVATE,
    )

    filters = [kind, text, tag, coll_filter]
    hidden = gr.JSON(visible=False)
    add_btn.click(library_add, [files, add_tags, add_collection], [hidden], api_name="library_add").then(
        show, filters, [table, thumbs, status], **PRIVATE
    )
    search.click(library_items, filters, [hidden], api_name="library_items")
    search.click(show, filters, [table, thumbs, status], **PRIVATE)
    save_btn.click(
        library_update, [item_id, new_name, new_tags, move_to], [hidden], api_name="library_update"
    ).then(show, filters, [table, thumbs, status], **PRIVATE)
    delete_btn.click(library_delete, [item_id], [hidden], api_name="library_delete").then(
        show, filters, [table, thumbs, status], **PRIVATE
    )
    coll_btn.click(create_collection, [coll_kind, coll_name], [hidden], api_name="create_collection").then(
        refresh_collections, None, [add_collection, coll_filter, move_to], **PRIVATE
    )
    hooks_btn.click(add_hooks, [hooks_text, hooks_category], [hidden], api_name="add_hooks").then(
        hook_rows, None, [hooks_table], **PRIVATE
    )
    hooks_category.submit(list_hooks, [hooks_category], [hidden], api_name="list_hooks")

    def select_row(evt: gr.SelectData, data):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        try:
            values = data.iloc[row].tolist()
        except (AttributeError, IndexError):
            return gr.skip(), gr.skip(), gr.skip()
        return values[0], values[2], values[3]

    table.select(select_row, [table], [item_id, new_name, new_tags], **PRIVATE).then(
        lambda i: i, [item_id], [motion_image], **PRIVATE
    )


def _original_name(path: str) -> str:
    from pathlib import Path

    return Path(path).stem
