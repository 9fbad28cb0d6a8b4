"""The one boundary where engine errors become gr.Error, and small helpers every tab shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
    tabs: gr.Tabs | None = None  # the top-level groups
    tab_groups: dict[str, gr.Tabs] = field(default_factory=dict)  # group id -> the Tabs holding its tabs
    tab_parent: dict[str, str] = field(default_factory=dict)  # tab id -> its group's id

    def switch_outputs(self, tab_id: str) -> list:
        """The outputs a "send to <tab>" handler updates: the top-level Tabs and the tab's group."""
        return [self.tabs, self.tab_groups[self.tab_parent[tab_id]]]

    def switch_to(self, tab_id: str) -> list:
        """Values for switch_outputs(tab_id): select the tab's group, then the tab in it."""
        return [gr.Tabs(selected=self.tab_parent[tab_id]), gr.Tabs(selected=tab_id)]

    def all_tabs(self) -> list:
        return [self.tabs, *self.tab_groups.values()]

    def open_from_link(self, request: gr.Request = None) -> list:
        """?tab=<tab id> (or a group id) in the page's address opens that tab; values for all_tabs()."""
        wanted = str((request.query_params.get("tab") if request is not None else "") or "")
        group = self.tab_parent.get(wanted) or (wanted if wanted in self.tab_groups else None)
        if group is None:
            return [gr.skip()] * (1 + len(self.tab_groups))
        inner = [
            gr.Tabs(selected=wanted) if g == group and wanted != group else gr.skip() for g in self.tab_groups
        ]
        return [gr.Tabs(selected=group), *inner]


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


FAILURES = ("failed", "interrupted")
TERMINAL = ("done", "cancelled", *FAILURES)


def follow_job(
    studio: Studio,
    job_id: str,
    progress=None,
    *,
    what: str = "job",
    title: str | None = None,
    raise_on: tuple[str, ...] = FAILURES,
    desc: Callable[[dict], str] | None = None,
    unit: str = "steps",
) -> Iterator[dict]:
    """Watch a job: every progress event feeds the progress bar (`desc(event)` or the event's own desc); an
    event in `raise_on` becomes gr.Error("<what> <type>: <error>"); every other event is yielded for the tab
    to show, and the generator ends after the terminal one."""
    for event in studio.watch(job_id):
        kind = event["type"]
        if kind == "progress" and progress is not None:
            total = event.get("total") or None
            progress(
                (event.get("step", 0), total) if total else None,
                desc=desc(event) if desc else event.get("desc", ""),
                unit=unit,
            )
        if kind in raise_on:
            error = event.get("error", "")
            raise gr.Error(f"{what} {kind}: {error}", title=title or f"{what.capitalize()} failed")
        yield event
        if kind in TERMINAL:
            return


def wait_for_job(studio: Studio, job_id: str, progress, what: str, title: str | None = None) -> dict:
    """Follow a job to its result; a failed, cancelled or interrupted job becomes a gr.Error naming `what`."""
    for event in follow_job(studio, job_id, progress, what=what, title=title, raise_on=TERMINAL[1:]):
        if event["type"] == "done":
            return event["result"]
    raise gr.Error(f"the {what} job ended without a result")
