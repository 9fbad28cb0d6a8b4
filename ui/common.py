"""The one boundary where engine errors become gr.Error, and small helpers every tab shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import gradio as gr

from engine.errors import PermissionDeniedError, StudioError
from engine.settings import Settings
from engine.studio import Studio

# Events that exist only to keep the page in sync are hidden from the API page.
PRIVATE = {"api_visibility": "private"}
JOBS_CONCURRENCY_ID = "jobs"


@dataclass
class UIContext:
    """What a tab's build() gets: the engine facade and settings, never pipelines or sessions."""

    studio: Studio
    settings: Settings
    job_tokens: gr.BrowserState | None = None  # job id -> cancel token, kept in this browser
    form: dict | None = None  # the Generate tab's components by request field (for "send to" buttons)
    tabs: gr.Tabs | None = None


@contextmanager
def engine_errors() -> Iterator[None]:
    try:
        yield
    except PermissionDeniedError as e:
        raise gr.Error(str(e), title="Not allowed") from None
    except StudioError as e:
        raise gr.Error(str(e), title="Invalid input") from None


def remember_token(jid: str, token: str, tokens: dict | None) -> dict:
    """The browser's job id -> cancel token map (gr.BrowserState), so this browser can cancel or resume its
    jobs after a reload or a restart; the newest 200 are kept."""
    tokens = dict(tokens or {})
    if jid and token:
        tokens[jid] = token
        tokens = dict(list(tokens.items())[-200:])
    return tokens


def wire_job_controls(ctx: UIContext, stop, job_id, cancel_token, status) -> None:
    """A tab's Cancel button for the job it started, and that job's cancel token remembered in this browser
    (ctx.job_tokens) as soon as the job exists, for the Jobs tab's buttons after a reload."""
    studio = ctx.studio
    if ctx.job_tokens is not None:
        job_id.change(remember_token, [job_id, cancel_token, ctx.job_tokens], [ctx.job_tokens], **PRIVATE)

    def cancel_current(jid: str, token: str, request: gr.Request = None) -> str:
        if not jid:
            return "nothing to cancel"
        with engine_errors():
            return f"**{studio.cancel(jid, username(request), token)}**"

    stop.click(cancel_current, [job_id, cancel_token], [status], **PRIVATE)


def username(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "anonymous") if request is not None else "anonymous"


def name_range_errors(component, name: str):
    """Gradio's own range check says "Value -1 is less than minimum value 1."; make it name the
    parameter and the allowed range, as every other StudioNOVA error does."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error as e:
            allowed = f"allowed: {component.minimum:g} to {component.maximum:g}"
            raise gr.Error(f"{name}={payload!r}: {e.message} ({allowed})", title="Invalid input") from None

    component.preprocess = preprocess
    return component


def wait_for_job(studio: Studio, job_id: str, progress, what: str) -> dict:
    """Follow a job to its result, feeding the progress bar; its failure becomes a gr.Error naming `what`."""
    for event in studio.watch(job_id):
        if event["type"] == "progress":
            progress((event["step"], event["total"]), desc=event.get("desc", ""))
        elif event["type"] == "done":
            return event["result"]
        elif event["type"] in ("failed", "cancelled", "interrupted"):
            raise gr.Error(
                f"{what} {event['type']}: {event.get('error', '')}", title=f"{what.capitalize()} failed"
            )
    raise gr.Error(f"the {what} job ended without a result")
