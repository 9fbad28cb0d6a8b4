"""StudioNOVA entry point: `python app.py --help`.

main() parses flags (each also settable as STUDIONOVA_<NAME>), builds Settings, the database,
the job runner and the UI, then launches. Nothing happens at import time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import MISSING
from pathlib import Path

from engine.errors import StudioError
from engine.settings import SETTING_FIELDS, Settings, env_name

log = logging.getLogger("studionova")

_TRUE = {"1", "true", "yes", "on"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="StudioNOVA: local-first AI character and content studio (web UI + API).",
        epilog="Every flag can also be set through the environment variable shown in brackets. "
        "On a Hugging Face Space (SPACE_ID set) the app binds 0.0.0.0:7860 and keeps data in /data.",
    )
    for f in SETTING_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} [{env}]"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, default=None, help=f"{help_text} (default: {default})", type=_ARG_TYPES.get(f.type, str)
            )
    return parser


_ARG_TYPES = {"int": int, int: int, "float": float, float: float}


def settings_from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values = {}
    for f in SETTING_FIELDS:
        value = args.get(f.name)
        if value is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            value = raw.lower() in _TRUE if f.type in ("bool", bool) else raw
            if f.type in _ARG_TYPES:
                value = _ARG_TYPES[f.type](raw)
        if value is not None:
            values[f.name] = value
    if environ.get("SPACE_ID"):
        # The platform routes to 0.0.0.0 on its port; the Space's visibility guards access.
        values.setdefault("host", "0.0.0.0")
        values.setdefault("port", int(environ.get("PORT", environ.get("GRADIO_SERVER_PORT", 7860))))
    return Settings(**values)


# The top-level groups and their tabs: (group id, label, ((tab id, label), ...)). Tab ids are what "send to"
# buttons and ?tab= links name; group labels contain no tab's label (so each reads unambiguously).
TAB_GROUPS = (
    (
        "create",
        "Create",
        (("generate", "Generate"), ("upscale", "Upscale"), ("video", "Video"), ("pnginfo", "PNG Info")),
    ),
    (
        "cast",
        "Character studio",
        (("characters", "Characters"), ("ingest", "Ingest"), ("review", "Review"), ("train", "Train")),
    ),
    (
        "collections",
        "Collections",
        (("gallery", "Gallery"), ("library", "Library"), ("variants", "Variants")),
    ),
    ("system", "System", (("models", "Models"), ("jobs", "Jobs"))),
)


def build_app(studio, settings: Settings):
    """The Gradio Blocks app: one tab per ui/ module in four groups, a queue with explicit limits."""
    import gradio as gr

    from ui import (
        characters_tab,
        dataset_tab,
        gallery_tab,
        generate_tab,
        jobs_tab,
        library_tab,
        models_tab,
        pnginfo_tab,
        train_tab,
        upscale_tab,
        variants_tab,
        video_tab,
    )
    from ui.common import UIContext

    with gr.Blocks(title="StudioNOVA", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(
            f"## StudioNOVA · device `{studio.device}` · {studio.dtype}"
            + (" · **demo model: random weights, images are noise**" if settings.demo else "")
        )
        ctx = UIContext(
            studio=studio,
            settings=settings,
            job_tokens=gr.BrowserState(
                {}, storage_key="studionova_jobs", secret=settings.browser_state_secret()
            ),
        )
        builders = {
            "generate": generate_tab.build,
            "upscale": upscale_tab.build,
            "video": video_tab.build,
            "pnginfo": pnginfo_tab.build,
            "characters": characters_tab.build,
            "ingest": dataset_tab.build_ingest,
            "review": dataset_tab.build_review,
            "train": train_tab.build,
            "gallery": gallery_tab.build,
            "library": library_tab.build,
            "variants": variants_tab.build,
            "models": models_tab.build,
            "jobs": jobs_tab.build,
        }
        built = {}
        with gr.Tabs() as ctx.tabs:
            for group_id, group_label, tabs in TAB_GROUPS:
                with gr.Tab(group_label, id=group_id), gr.Tabs() as ctx.tab_groups[group_id]:
                    for tab_id, tab_label in tabs:
                        ctx.tab_parent[tab_id] = group_id
                        with gr.Tab(tab_label, id=tab_id):
                            built[tab_id] = builders[tab_id](ctx)
                            if tab_id == "generate":
                                ctx.form = built[tab_id]
        upscale_tab.wire_send(ctx, built["upscale"], built["gallery"], built["video"])
        video_tab.wire_first_frame(ctx, built["video"], built["gallery"])
        # ?tab=<tab id> (e.g. ?tab=review) opens that tab inside its group
        demo.load(ctx.open_from_link, None, ctx.all_tabs(), api_visibility="private", queue=False)
    demo.queue(api_open=False, max_size=settings.max_queue, default_concurrency_limit=4)
    return demo


def launch_kwargs(settings: Settings) -> dict:
    blocked = [str(settings.models_dir), str(settings.cache_dir)]
    if settings.resolved_database_url.startswith("sqlite:///"):
        db_path = Path(settings.resolved_database_url.removeprefix("sqlite:///"))
        blocked += [str(db_path), str(db_path) + "-wal", str(db_path) + "-shm"]
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": settings.auth_pairs() or None,
        "max_file_size": f"{settings.max_upload_mb}mb",
        "allowed_paths": [str(settings.outputs_dir)],
        "blocked_paths": blocked,
        # each watching /generate call holds a worker thread while it waits for its job's events
        "max_threads": settings.max_queue + 16,
        "show_error": True,
        "footer_links": ["api", "settings"],
        "ssr_mode": False,
        "mcp_server": False,
        "js": _review_shortcuts(),  # keyboard shortcuts of the Review tab
    }


def _review_shortcuts() -> str:
    from ui.dataset_tab import SHORTCUTS_JS

    return SHORTCUTS_JS


def prepare_environment(settings: Settings) -> None:
    """Before gradio is imported: no telemetry, uploads under our data dir."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(settings.gradio_tmp_dir)
    if settings.demo:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(argv)
        settings.check_exposure()
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepare_environment(settings)
    from engine.studio import Studio

    studio = Studio.start(settings)
    demo = build_app(studio, settings)
    log.info(
        "StudioNOVA on http://%s:%s (device %s, data %s)",
        settings.host,
        settings.port,
        studio.device,
        settings.data_dir,
    )
    try:
        demo.launch(**launch_kwargs(settings))
    finally:
        studio.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
