"""Models tab: everything in models/ with family, size and hashes; downloads with progress; unload."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, follow_job, username

COLUMNS = [
    "kind",
    "name",
    "family",
    "size MB",
    "sha256",
    "short hash",
    "note",
]  # family includes v-prediction
KINDS = ["checkpoints", "diffusers", "loras", "vae", "embeddings", "controlnet", "upscale_models"]


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    with gr.Row():
        refresh = gr.Button(
            "Refresh (scan models/ and hash new files)", variant="primary", elem_id="models_refresh"
        )
        unload = gr.Button("Unload model (free memory)", size="sm")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="models_table")
    status = gr.Markdown()
    with gr.Accordion("Download a model", open=False):
        with gr.Row():
            repo_id = gr.Textbox(label="Hugging Face repo id", value="", placeholder="org/name")
            filename = gr.Textbox(label="File in the repo (empty = whole diffusers repo)", value="")
            revision = gr.Textbox(label="Revision", value="", placeholder="main")
        url = gr.Textbox(label="…or a URL", value="", placeholder="https://…/model.safetensors")
        with gr.Row():
            kind = gr.Dropdown(KINDS, value="checkpoints", label="Kind (target folder)")
            save_as = gr.Textbox(label="Save as (optional)", value="")
            sha256 = gr.Textbox(label="Expected SHA-256 (optional)", value="")
        download = gr.Button("Download", elem_id="download_btn")
        download_status = gr.Markdown(elem_id="download_status")

    def list_model_files() -> list[dict]:
        """Every model file and folder under models/: kind, name, family, size, SHA-256 and A1111 short hash
        (hashes are computed once and cached by size + mtime)."""
        with engine_errors():
            return studio.model_inventory()

    def show():
        rows = list_model_files()
        data = [
            [
                r["kind"],
                r["name"],
                r.get("family", ""),
                round(r["size"] / 1e6, 1),
                r.get("sha256", ""),
                r.get("short_hash", ""),
                r.get("error", ""),
            ]
            for r in rows
        ]
        return data, f"{len(rows)} item(s) in `{ctx.settings.models_dir}`"

    hidden = gr.JSON(visible=False)
    refresh.click(list_model_files, None, [hidden], api_name="list_model_files")
    refresh.click(show, None, [table, status], **PRIVATE)
    if ctx.form is not None and "model" in ctx.form:  # new files show up in the Generate tab too
        refresh.click(
            lambda: gr.Dropdown(choices=studio.model_choices()), None, [ctx.form["model"]], **PRIVATE
        )

    def unload_model():
        studio.unload_models()
        return "models unloaded; the next generation loads its model again"

    unload.click(unload_model, None, [status], **PRIVATE)

    def download_model(
        repo_id: str = "",
        filename: str = "",
        revision: str = "",
        url: str = "",
        kind: str = "checkpoints",
        save_as: str = "",
        sha256: str = "",
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Download a model by Hugging Face repo id (+ file) or URL into models/<kind>/, resumable and
        verified by SHA-256. Yields progress; returns the saved path, size and hash."""
        values = dict(
            repo_id=repo_id or "",
            filename=filename or "",
            revision=revision or "",
            url=url or "",
            kind=kind or "checkpoints",
            save_as=save_as or "",
            sha256=sha256 or "",
        )
        with engine_errors():
            jid, _token = studio.submit_download(values, owner=username(request))
        yield {"job_id": jid, "status": "queued"}, f"**queued** · job `{jid}`"
        for event in follow_job(
            studio,
            jid,
            progress,
            what="download",
            raise_on=("failed", "interrupted", "cancelled"),
            unit="bytes",
        ):
            if event["type"] == "done":
                res = dict(event["result"])
                # a server path would read as a file to download in gradio_client: report it relative to models/
                res["saved_as"] = studio.models_relative(res.pop("path", ""))
                yield {"job_id": jid, "status": "succeeded", **res}, f"**saved** `{res['saved_as']}`"

    result = gr.JSON(visible=False)
    download.click(
        download_model,
        [repo_id, filename, revision, url, kind, save_as, sha256],
        [result, download_status],
        api_name="download_model",
        concurrency_id=JOBS_CONCURRENCY_ID,
        concurrency_limit=ctx.settings.max_queue,
    )

    with gr.Accordion("ComfyUI servers and workflows", open=False):
        servers = gr.JSON(label="Servers (--comfyui-urls): healthy, jobs in flight, limit, last error")
        servers_refresh = gr.Button("Check servers", size="sm")
        with gr.Row():
            workflow_file = gr.File(
                label="Workflow (ComfyUI: Save (API format))", file_types=[".json"], type="filepath"
            )
            manifest_text = gr.Code(
                label="Manifest (name, kind, family, bindings, outputs, lora_stack)",
                language="json",
                value="",
            )
        overwrite = gr.Checkbox(value=False, label="Replace a workflow of the same name")
        add_workflow = gr.Button("Add workflow", size="sm")
        workflow_status = gr.Markdown()

    def check_servers() -> list[dict]:
        with engine_errors():
            return studio.comfy_servers()

    def add_comfy_workflow(workflow: str, manifest: str, overwrite: bool = False) -> str:
        """Add a ComfyUI API-format workflow file plus its manifest (JSON text) as a template."""
        if not workflow:
            raise gr.Error("upload the workflow JSON exported with ComfyUI's Save (API format)")
        with engine_errors():
            text = Path(workflow).read_text(encoding="utf-8", errors="replace")
            added = studio.add_comfy_workflow(text, manifest or "", bool(overwrite))
        return f"**added** `{added['name']}` ({added['kind']}): binds {', '.join(added['bindings'])}"

    servers_refresh.click(check_servers, None, [servers], **PRIVATE)
    add_workflow.click(
        add_comfy_workflow,
        [workflow_file, manifest_text, overwrite],
        [workflow_status],
        api_name="add_comfy_workflow",
    )
