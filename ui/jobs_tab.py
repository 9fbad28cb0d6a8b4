"""Jobs tab: live table with progress bars, cancel / retry / resume, error details and usage.

Also registers the job API endpoints: /job_status, /cancel_job, /retry_job, /resume_job.
"""

from __future__ import annotations

import html

import gradio as gr

from ui.common import PRIVATE, UIContext, engine_errors, username

STATUS_COLOURS = {
    "queued": "#888",
    "running": "#2a7ae2",
    "succeeded": "#2e9d4f",
    "failed": "#d43c3c",
    "cancelled": "#b08a00",
    "interrupted": "#b05c00",
}


def render_jobs_table(jobs) -> str:
    rows = []
    for job in jobs:
        p = job.progress or {}
        total, step = p.get("total") or 0, p.get("step") or 0
        if job.status == "succeeded":
            step = total = max(total, 1)
        bar = f'<progress value="{step}" max="{total or 1}"></progress> {step}/{total}' if total else ""
        err = (
            f"<details><summary>error</summary><pre>{html.escape(job.error)}</pre></details>"
            if job.error
            else ""
        )
        colour = STATUS_COLOURS.get(job.status, "#444")
        rows.append(
            f"<tr><td><code>{job.id}</code></td><td>{html.escape(job.kind)}</td>"
            f'<td style="color:{colour}"><b>{job.status}</b></td><td>{bar}</td>'
            f"<td>{html.escape(job.model_key)}</td><td>{html.escape(job.owner)}</td>"
            f"<td>{job.created_at:%Y-%m-%d %H:%M:%S}</td><td>{job.run_seconds:.1f}s</td><td>{err}</td></tr>"
        )
    head = "<tr><th>job</th><th>kind</th><th>status</th><th>progress</th><th>model</th><th>owner</th><th>created</th><th>time</th><th></th></tr>"
    return f'<table class="studio-jobs">{head}{"".join(rows)}</table>' if rows else "<p>No jobs yet.</p>"


def build(ctx: UIContext) -> None:
    studio = ctx.studio
    table = gr.HTML(render_jobs_table(studio.recent_jobs()), elem_id="jobs_table")
    with gr.Row():
        job_id = gr.Textbox(label="Job id", scale=3)
        cancel_token = gr.Textbox(
            label="Cancel token (optional if you started the job here)", type="password", scale=2
        )
    with gr.Row():
        cancel_btn = gr.Button("Cancel", variant="stop")
        retry_btn = gr.Button("Retry")
        resume_btn = gr.Button("Resume")
        refresh_btn = gr.Button("Refresh")
    details = gr.JSON(label="Job status")
    with gr.Accordion("Usage (device-seconds, jobs per kind, storage, GPU budget)", open=False):
        budget = gr.Markdown(elem_id="usage_budget")
        per_day = gr.Dataframe(label="Per day", interactive=False)
        per_model = gr.Dataframe(label="Per model", interactive=False)
        per_kind = gr.Dataframe(label="Jobs per day and kind", interactive=False)
        storage = gr.Dataframe(label="Storage used", interactive=False)
    timer = gr.Timer(2.0)

    def _token(jid: str, token: str, tokens: dict | None) -> str:
        return token or (tokens or {}).get(jid, "")

    def job_status(job_id: str) -> dict:
        """State, progress (step/total/ETA), result and error of one job."""
        with engine_errors():
            return studio.job_status(job_id.strip())

    def cancel_job(job_id: str, cancel_token: str = "", request: gr.Request = None) -> str:
        """Cancel a job you own (auth user) or hold the cancel token of. Returns the new state."""
        with engine_errors():
            return studio.cancel(job_id.strip(), username(request), cancel_token)

    def retry_job(job_id: str, cancel_token: str = "", request: gr.Request = None) -> tuple[str, str]:
        """Run a finished job's request again as a new job. Returns (new job id, its cancel token)."""
        with engine_errors():
            return studio.retry(job_id.strip(), username(request), cancel_token)

    def resume_job(job_id: str, cancel_token: str = "", request: gr.Request = None) -> str:
        """Resume an interrupted job whose kind supports it (training)."""
        with engine_errors():
            return studio.resume(job_id.strip(), username(request), cancel_token)

    # API endpoints (no browser state involved).
    hidden_status = gr.JSON(visible=False, label="status")
    hidden_text = gr.Textbox(visible=False, label="state")
    hidden_text2 = gr.Textbox(visible=False, label="cancel token")
    api = gr.Button(visible=False)
    api.click(job_status, [job_id], [hidden_status], api_name="job_status")
    api.click(cancel_job, [job_id, cancel_token], [hidden_text], api_name="cancel_job")
    api.click(retry_job, [job_id, cancel_token], [hidden_text, hidden_text2], api_name="retry_job")
    api.click(resume_job, [job_id, cancel_token], [hidden_text], api_name="resume_job")

    # Buttons: use the token this browser remembered for jobs it started.
    tokens = ctx.job_tokens

    def ui_cancel(jid, token, toks, request: gr.Request = None):
        state = cancel_job(jid, _token(jid, token, toks), request)
        return job_status(jid) | {"action": f"cancel -> {state}"}

    def ui_retry(jid, token, toks, request: gr.Request = None):
        new_id, new_token = retry_job(jid, _token(jid, token, toks), request)
        toks = dict(toks or {}) | {new_id: new_token}
        return job_status(new_id) | {"action": f"retry of {jid}"}, toks

    def ui_resume(jid, token, toks, request: gr.Request = None):
        state = resume_job(jid, _token(jid, token, toks), request)
        return job_status(jid) | {"action": f"resume -> {state}"}

    cancel_btn.click(ui_cancel, [job_id, cancel_token, tokens], [details], **PRIVATE)
    retry_btn.click(ui_retry, [job_id, cancel_token, tokens], [details, tokens], **PRIVATE)
    resume_btn.click(ui_resume, [job_id, cancel_token, tokens], [details], **PRIVATE)

    def refresh():
        day, model = studio.usage()
        info = studio.budget()
        text = f"GPU today: **{info['used_minutes']:.1f} min**" + (
            f" of a {info['daily_gpu_minutes']:g} min budget" if info["daily_gpu_minutes"] else " (no budget)"
        )
        return (
            render_jobs_table(studio.recent_jobs()),
            day,
            model,
            studio.usage_by_kind(),
            studio.storage(),
            text,
        )

    refresh_btn.click(refresh, None, [table, per_day, per_model, per_kind, storage, budget], **PRIVATE)

    def usage() -> dict:
        """Device-seconds and GPU-seconds per day and per model over the last 30 days; jobs per day and kind;
        storage used per kind; today's GPU minutes against the daily budget."""
        day, model = studio.usage()
        return {
            "per_day": day.to_dict(orient="records"),
            "per_model": model.to_dict(orient="records"),
            "per_kind": studio.usage_by_kind().to_dict(orient="records"),
            "storage": studio.storage().to_dict(orient="records"),
            "budget": studio.budget(),
        }

    api.click(usage, None, [hidden_status], api_name="usage")
    timer.tick(
        lambda: render_jobs_table(studio.recent_jobs()), None, [table], show_progress="hidden", **PRIVATE
    )
    job_id.submit(job_status, [job_id], [details], **PRIVATE)
