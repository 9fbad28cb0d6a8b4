"""The ComfyUI engine as the Generate tab and API see it: templates, the pool's models and servers, and a
user's own workflow added with its manifest."""

from __future__ import annotations

import json
from collections.abc import Callable

from engine.comfyui.generate import check_comfy_request, pool_for, templates
from engine.comfyui.pool import server_models
from engine.comfyui.templates import add_user_template, user_templates_dir
from engine.errors import InputError
from engine.generation.request import GenerateRequest
from engine.settings import Settings


def request_check(settings: Settings) -> Callable[[GenerateRequest], None]:
    """The submit-time check of an engine='comfyui' request (servers, template, supported options), which the
    facade hands to GenerationService: generation does not import this room (comfyui saves through it)."""
    return lambda req: check_comfy_request(req, settings, settings.data_dir)


def comfy_template_names(settings: Settings) -> list[str]:
    return sorted(templates(settings.data_dir))


def comfy_models(settings: Settings) -> dict[str, list[str]]:
    """Checkpoints, LoRAs and upscale models the ComfyUI pool's servers have (from /object_info)."""
    if not settings.comfyui_urls.strip():
        raise InputError("no ComfyUI server is configured; start with --comfyui-urls http://127.0.0.1:8188")
    return server_models(pool_for(settings).object_info())


def comfy_servers(settings: Settings) -> list[dict]:
    """Each configured ComfyUI server: healthy, jobs in flight, limit, last error."""
    return pool_for(settings).status() if settings.comfyui_urls.strip() else []


def add_comfy_workflow(
    settings: Settings, workflow_json: str, manifest_json: str, overwrite: bool = False
) -> dict:
    """A user's ComfyUI workflow (exported with "Save (API format)") and its manifest, checked and kept
    under <data-dir>/workflows; usable as comfy_template at once."""
    try:
        manifest = json.loads(manifest_json)
    except json.JSONDecodeError as e:
        raise InputError(f"the manifest is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(manifest, dict):
        raise InputError("the manifest must be a JSON object with name, kind, bindings and outputs")
    template = add_user_template(
        workflow_json, manifest, user_templates_dir(settings.data_dir), overwrite=overwrite
    )
    return {
        "name": template.manifest.name,
        "kind": template.manifest.kind,
        "bindings": sorted(template.manifest.bindings),
    }
