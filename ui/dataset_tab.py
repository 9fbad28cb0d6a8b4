"""Ingest and Review tabs: bring images into a character's dataset, then approve or reject them (with
structured reasons, undo and keyboard shortcuts), caption them, and re-render rejected generations."""

from __future__ import annotations

import gradio as gr

from engine.characters.characters import REJECTION_REASONS
from ui.characters_tab import character_choices
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, username, wait_for_job

# Review shortcuts: a approve, r reject, p back to pending, u undo, j/→ next, k/← previous; never while typing.
SHORTCUTS_JS = """
() => {
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const typing = t && (t.tagName === "TEXTAREA" || t.isContentEditable || (t.tagName === "INPUT" &&
      !["checkbox", "radio", "button", "range"].includes(t.type)));
    if (typing) return;
    const panel = document.getElementById("review_panel");
    if (!panel || panel.offsetParent === null) return;
    const ids = {a: "review_approve", r: "review_reject", p: "review_pending", u: "review_undo",
                 j: "review_next", ArrowRight: "review_next", k: "review_prev", ArrowLeft: "review_prev"};
    const id = ids[e.key];
    if (!id) return;
    const el = document.getElementById(id);
    if (el) { e.preventDefault(); el.click(); }
  });
}
"""

PAGE_SIZE = 48


def build_ingest(ctx: UIContext) -> dict:
    studio = ctx.studio
    with gr.Row():
        # allow_custom_value: API callers name characters made after the page was built (see characters_tab)
        character = gr.Dropdown(
            character_choices(studio),
            label="Character",
            value=None,
            allow_custom_value=True,
            elem_id="ingest_character",
        )
        refresh = gr.Button("Refresh", size="sm", elem_id="ingest_refresh")
    files = gr.File(
        label="Images, ZIPs of images, or videos",
        file_count="multiple",
        type="filepath",
        elem_id="ingest_files",
    )
    with gr.Row():
        folder = gr.Textbox(
            label="Server folder",
            value="",
            info="inside an allowed root: " + ", ".join(str(p) for p in studio.settings.ingest_root_paths),
        )
        url = gr.Textbox(label="URL (yt-dlp; needs network)", value="")
    with gr.Row():
        video_mode = gr.Radio(
            ["scene", "rate"], value="scene", label="Video frames", info="one per scene, or a fixed rate"
        )
        fps = gr.Slider(0.1, 10, value=1.0, step=0.1, label="Frames per second (rate mode)")
        scene_threshold = gr.Slider(5, 60, value=27, step=1, label="Scene-cut threshold")
        min_sharpness = gr.Slider(0, 300, value=40, step=5, label="Minimum sharpness")
    go = gr.Button("Ingest", variant="primary", elem_id="ingest_btn")
    summary = gr.Markdown(elem_id="ingest_summary")
    result = gr.JSON(label="Result", visible=True)

    def ingest(
        character: str,
        files: list[str] | None = None,
        folder: str = "",
        url: str = "",
        video_mode: str = "scene",
        fps: float = 1.0,
        scene_threshold: float = 27.0,
        min_sharpness: float = 40.0,
        request: gr.Request = None,
        progress=gr.Progress(),
    ) -> dict:
        """Bring images into a character's dataset as pending: image files and ZIPs, videos (one frame per
        scene or a fixed rate; blurry frames and near-duplicates dropped), a server folder inside an allowed
        root (only new images), or a URL. Returns what was added, duplicates and skipped items with reasons."""
        values = dict(
            character=character or "",
            files=list(files or []),
            folder=(folder or "").strip(),
            url=(url or "").strip(),
            video_mode=video_mode or "scene",
            fps=float(fps),
            scene_threshold=float(scene_threshold),
            min_sharpness=float(min_sharpness),
        )
        with engine_errors():
            jid, _ = studio.submit_ingest(values, owner=username(request))
        return {**wait_for_job(studio, jid, progress, "ingest"), "job_id": jid}

    def describe(r: dict | None) -> str:
        if not r:
            return ""
        lines = [
            f"**{len(r['added'])} added**, {len(r['duplicates'])} duplicates, {len(r['skipped'])} skipped · "
            f"pending {r['pending']}, approved {r['approved']}, rejected {r['rejected']}"
        ]
        lines += [f"- skipped `{s['source']}`: {s['reason']}" for s in r["skipped"][:20]]
        return "\n".join(lines)

    go.click(
        ingest,
        [character, files, folder, url, video_mode, fps, scene_threshold, min_sharpness],
        [result],
        api_name="ingest",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    ).success(describe, [result], [summary], **PRIVATE)
    refresh.click(lambda: gr.update(choices=character_choices(studio)), None, [character], **PRIVATE)
    return {"character": character}


def build_review(ctx: UIContext) -> dict:
    studio = ctx.studio
    reason_choices = [(label, key) for key, label in REJECTION_REASONS.items()]
    with gr.Column(elem_id="review_panel"):
        with gr.Row():
            character = gr.Dropdown(
                character_choices(studio),
                label="Character",
                value=None,
                allow_custom_value=True,
                elem_id="review_character",
            )
            status = gr.Radio(["pending", "approved", "rejected", "all"], value="pending", label="Show")
            page = gr.Number(value=1, precision=0, label="Page", minimum=1)
            load = gr.Button("Load", size="sm", elem_id="review_load")
            refresh = gr.Button("Refresh characters", size="sm", elem_id="review_refresh")
        readiness = gr.Markdown(elem_id="review_readiness")
        with gr.Row():
            with gr.Column(scale=2):
                grid = gr.Gallery(
                    label="Queue", columns=6, height=300, allow_preview=False, elem_id="review_grid"
                )
                with gr.Row():
                    selected = gr.Textbox(
                        label="Selected item ids (comma separated)", value="", elem_id="review_selected"
                    )
                    select_all = gr.Button("Select all on page", size="sm", elem_id="review_select_all")
                reasons = gr.CheckboxGroup(
                    reason_choices, label="Rejection reasons", elem_id="review_reasons"
                )
                reason_text = gr.Textbox(label="Other: what was wrong", value="")
                with gr.Row():
                    approve = gr.Button("Approve (a)", variant="primary", elem_id="review_approve")
                    reject = gr.Button("Reject (r)", variant="stop", elem_id="review_reject")
                    pending = gr.Button("Back to pending (p)", size="sm", elem_id="review_pending")
                    undo = gr.Button("Undo (u)", size="sm", elem_id="review_undo")
                    prev = gr.Button("◀ (k)", size="sm", elem_id="review_prev")
                    nxt = gr.Button("▶ (j)", size="sm", elem_id="review_next")
            with gr.Column(scale=3):
                big = gr.Image(
                    label="Image", interactive=False, height=420, format="png", elem_id="review_image"
                )
                meta = gr.JSON(label="Metadata", elem_id="review_meta")
        with gr.Accordion("Captions", open=False):
            with gr.Row():
                caption = gr.Textbox(
                    label="Caption of the selected image (trigger word first)",
                    value="",
                    elem_id="review_caption",
                )
                caption_save = gr.Button("Save caption", size="sm", elem_id="caption_save")
            with gr.Row():
                find = gr.Textbox(label="Find", value="")
                replace = gr.Textbox(label="Replace with", value="")
                regex = gr.Checkbox(value=False, label="Regular expression")
                replace_btn = gr.Button("Replace in all approved captions", size="sm")
            with gr.Row():
                overwrite = gr.Checkbox(value=False, label="Overwrite existing captions")
                auto = gr.Button("Auto-caption approved images (vision endpoint)", size="sm")
                suggest = gr.Button("Which character is this? (vision endpoint)", size="sm")
        regen = gr.Button(
            "Regenerate rejected (with the refined negative prompt)", elem_id="review_regenerate"
        )
        note = gr.Markdown(elem_id="review_note")
    # not gr.State: that keeps a heartbeat stream open, so a page never goes network-idle (see gallery_tab)
    ids = gr.JSON([], visible=False)
    cursor = gr.Number(0, precision=0, visible=False)
    hidden = gr.JSON(visible=False)

    # --- API functions ------------------------------------------------------------------------
    def review_queue(character: str, status: str = "pending", page: float = 1) -> dict:
        """A page of a character's dataset (pending by default) with each item's source, size, status,
        reasons, caption and, for generated images, the infotext; plus readiness counts."""
        with engine_errors():
            return studio.review_queue(character or "", status or "pending", int(page or 1), PAGE_SIZE)

    def review(
        character: str,
        item_ids: str | list[str],
        action: str = "approve",
        reasons: list[str] | str | None = None,
        reason_text: str = "",
    ) -> dict:
        """Approve, reject (with one or more reasons: wrong character, bad anatomy, bad hands, blurry,
        off-style, wrong outfit, artifacts, duplicate, other + reason_text) or reset items; one undoable action."""
        ids_ = [i.strip() for i in item_ids.split(",")] if isinstance(item_ids, str) else list(item_ids or [])
        with engine_errors():
            return studio.review(character or "", ids_, action, reasons, reason_text or "")

    def undo_review(character: str, action_id: str = "") -> dict:
        """Undo a review action (default: the character's latest)."""
        with engine_errors():
            return studio.undo_review(character or "", action_id or "")

    def set_caption(item_id: str, caption: str) -> dict:
        """Edit an approved image's caption (the trigger word is kept first)."""
        with engine_errors():
            return studio.datasets.set_caption((item_id or "").split(",")[0].strip(), caption or "")

    def replace_captions(character: str, find: str, replace: str = "", regex: bool = False) -> dict:
        """Find/replace in every approved caption of a character."""
        with engine_errors():
            return studio.datasets.replace_captions(
                studio.characters.get(character or "").id, find or "", replace or "", bool(regex)
            )

    def auto_caption(
        character: str, overwrite: bool = False, request: gr.Request = None, progress=gr.Progress()
    ) -> dict:
        """Caption approved images through the configured OpenAI-compatible vision endpoint (--vision-url)."""
        with engine_errors():
            jid, _ = studio.submit_captions(
                {"character": character or "", "overwrite": bool(overwrite)}, owner=username(request)
            )
        return {**wait_for_job(studio, jid, progress, "captioning"), "job_id": jid}

    def suggest_character(item_id: str) -> dict:
        """Ask the vision endpoint which known character a dataset image shows."""
        with engine_errors():
            return studio.suggest_character((item_id or "").split(",")[0].strip())

    def regenerate_rejected(character: str, request: gr.Request = None) -> dict:
        """Re-render the character's rejected generated images with its refined negative prompt; the new
        images join the review queue. Returns the job ids."""
        with engine_errors():
            return studio.regenerate_rejected(character or "", owner=username(request))

    def dataset_stats(character: str) -> dict:
        """Approved / pending / rejected counts and whether the character is trainable."""
        with engine_errors():
            return studio.review_queue(character or "", "all", 1, 1)["readiness"]

    # --- page sync (private) ------------------------------------------------------------------
    def show(character: str, status: str, page: float, at: int = 0):
        if not character:
            return [], [], 0, "", None, {}, "", "pick a character"
        with engine_errors():
            q = studio.review_queue(character, status or "pending", int(page or 1), PAGE_SIZE)
        items = q["items"]
        r = q["readiness"]
        ready = f"approved **{r['approved']}** · pending {r['pending']} · rejected {r['rejected']} · " + (
            "**trainable**" if r["trainable"] else f"needs {r['min_approved']} approved to train"
        )
        thumbs = [(str(studio.settings.outputs_dir / it["file"]), it["status"]) for it in items]
        at = min(max(0, at), max(0, len(items) - 1))
        return (thumbs, [it["id"] for it in items], at, *_focus(items, at), ready)

    def _focus(items: list[dict], at: int):
        if not items:
            return "", None, {}, ""
        it = items[at]
        return it["id"], str(studio.settings.outputs_dir / it["file"]), it, it["caption"]

    def focus(character: str, status: str, page: float, at: int):
        with engine_errors():
            items = studio.review_queue(character, status or "pending", int(page or 1), PAGE_SIZE)["items"]
        at = min(max(0, at), max(0, len(items) - 1))
        return (at, *_focus(items, at))

    def pick(id_list: list, evt: gr.SelectData, character: str, status: str, page: float):
        return focus(character, status, page, evt.index)

    view_outputs = [grid, ids, cursor, selected, big, meta, caption, readiness]
    focus_outputs = [cursor, selected, big, meta, caption]
    queue_inputs = [character, status, page]

    gr.api(review_queue, api_name="review_queue")
    # without it a character made after the page loaded could not be picked here
    refresh.click(lambda: gr.update(choices=character_choices(studio)), None, [character], **PRIVATE)
    load.click(show, [*queue_inputs, cursor], view_outputs, **PRIVATE)
    character.change(show, queue_inputs, view_outputs, **PRIVATE)
    status.change(show, queue_inputs, view_outputs, **PRIVATE)
    grid.select(pick, [ids, *queue_inputs], focus_outputs, **PRIVATE)
    prev.click(lambda c, s, p, at: focus(c, s, p, at - 1), [*queue_inputs, cursor], focus_outputs, **PRIVATE)
    nxt.click(lambda c, s, p, at: focus(c, s, p, at + 1), [*queue_inputs, cursor], focus_outputs, **PRIVATE)
    select_all.click(lambda id_list: ", ".join(id_list or []), [ids], [selected], **PRIVATE)

    def after(result: dict | None) -> str:
        if not result:
            return ""
        if "undone" in result:
            return f"undid {result['action']} of {result['items']} item(s)"
        return f"{result['action']} · {result['changed']} item(s)"

    for button, action in ((approve, "approve"), (reject, "reject"), (pending, "pending")):
        button.click(
            lambda c, i, r, t, a=action: review(c, i, a, r, t),
            [character, selected, reasons, reason_text],
            [hidden],
            **PRIVATE,
        ).success(after, [hidden], [note], **PRIVATE).success(
            show, [*queue_inputs, cursor], view_outputs, **PRIVATE
        )
    gr.api(review, api_name="review")
    gr.api(undo_review, api_name="undo_review")
    undo.click(lambda c: undo_review(c, ""), [character], [hidden], **PRIVATE).success(
        after, [hidden], [note], **PRIVATE
    ).success(show, [*queue_inputs, cursor], view_outputs, **PRIVATE)
    caption_save.click(set_caption, [selected, caption], [hidden], api_name="set_caption").success(
        lambda r: f"caption saved: {r['caption']}" if r else "", [hidden], [note], **PRIVATE
    )
    replace_btn.click(
        replace_captions, [character, find, replace, regex], [hidden], api_name="replace_captions"
    ).success(lambda r: f"{r['changed']} caption(s) changed" if r else "", [hidden], [note], **PRIVATE)
    auto.click(
        auto_caption,
        [character, overwrite],
        [hidden],
        api_name="auto_caption",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    ).success(
        lambda r: (
            f"{len(r['captioned'])} captioned, {r['kept']} kept, {len(r['failed'])} failed" if r else ""
        ),
        [hidden],
        [note],
        **PRIVATE,
    )
    suggest.click(suggest_character, [selected], [hidden], api_name="suggest_character").success(
        lambda r: f"looks like: **{r['suggested'] or 'none of the characters'}**" if r else "",
        [hidden],
        [note],
        **PRIVATE,
    )
    regen.click(regenerate_rejected, [character], [hidden], api_name="regenerate_rejected").success(
        lambda r: (
            f"{len(r['jobs'])} re-render job(s) queued with negative prompt: {r['negative_prompt']}"
            if r
            else ""
        ),
        [hidden],
        [note],
        **PRIVATE,
    )
    gr.api(dataset_stats, api_name="dataset_stats")
    return {"character": character}
