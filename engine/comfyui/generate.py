"""Generation on the ComfyUI engine: a GenerateRequest bound into a workflow template, run on the server pool,
and its images saved into the library exactly like local ones (infotext, StudioNOVA recipe, Asset and
Generation rows), plus the submitted workflow JSON as ComfyUI's own `prompt` chunk, so ComfyUI opens them.

What a ComfyUI generation cannot do yet (hires fix, refiner, ControlNet, IP-Adapter, variation seeds,
outpaint, inpaint-only-masked, VAE override, clip skip, masked content other than "original") is refused
before a job exists (`comfy_unsupported`), never silently dropped.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.comfyui.client import ComfyConnectionError
from engine.comfyui.pool import ComfyPool, NoServerError, parse_server_spec
from engine.comfyui.templates import bind, list_templates, user_templates_dir, validate_against_object_info
from engine.errors import InputError
from engine.generation.generate import apply_styles, generate_images, save_generated
from engine.generation.modes import open_image
from engine.generation.request import GenerateResult
from engine.prompt_tags import extract_lora_tags

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = {"txt2img": "txt2img", "img2img": "img2img", "inpaint": "inpaint"}
SHIPPED_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
_POOLS: dict[tuple, Any] = {}
_POOLS_LOCK = threading.Lock()


def comfy_unsupported(req) -> list[str]:
    """The request's options the ComfyUI templates do not render (yet), by field name."""
    checks = {
        "enable_hr": req.enable_hr,
        "refiner": bool(req.refiner),
        "controlnet": bool(req.controlnet),
        "ip_adapter_image": bool(req.ip_adapter_image),
        "subseed_strength": req.subseed_strength > 0,
        "outpaint": req.mode == "outpaint",
        "inpaint_only_masked": req.inpaint_only_masked,
        "vae": bool(req.vae),
        "clip_skip": req.clip_skip > 1,
        "masked_content": req.mask_image is not None and req.masked_content != "original",
    }
    return [name for name, used in checks.items() if used]


def check_comfy_request(req, settings, data_dir: Path) -> None:
    """Before a job exists: servers configured, a template for the mode, nothing the templates cannot do."""
    if not settings.comfyui_urls.strip():
        raise InputError(
            "engine='comfyui' needs at least one ComfyUI server: start with --comfyui-urls "
            "http://127.0.0.1:8188 (or set STUDIONOVA_COMFYUI_URLS)"
        )
    unsupported = comfy_unsupported(req)
    if unsupported:
        raise InputError(
            f"engine='comfyui' does not support {', '.join(unsupported)} yet; turn them off or use "
            "engine='local'"
        )
    template_for(req, data_dir)


def templates(data_dir: Path) -> dict:
    return list_templates([SHIPPED_WORKFLOWS, user_templates_dir(data_dir)])


def template_for(req, data_dir: Path):
    available = templates(data_dir)
    name = req.comfy_template or DEFAULT_TEMPLATES.get(req.mode, "")
    if name not in available:
        raise InputError(
            f"comfy_template={name!r} is not a workflow template; available: {', '.join(sorted(available))}"
        )
    template = available[name]
    kind = template.manifest.kind
    if kind != req.mode and not (req.mode == "txt2img" and kind == "txt2img"):
        raise InputError(
            f"template {name!r} is {kind}, the request is {req.mode} (init_image/mask_image decide)"
        )
    return template


def pool_for(settings):
    """One pool per server list, shared by every job of the process (its in-flight counts are global)."""
    key = (settings.comfyui_urls, int(settings.comfyui_max_inflight))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ComfyPool(parse_server_spec(settings.comfyui_urls), max_inflight=key[1])
        return _POOLS[key]


def _mask_bytes(path: str, blur: int) -> bytes:
    """The mask as ComfyUI's LoadImageMask reads it (white = repaint), blurred like A1111's mask blur."""
    from PIL import Image, ImageFilter

    mask = open_image(path, "mask_image").convert("L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    out = io.BytesIO()
    Image.merge("RGB", (mask, mask, mask)).save(out, "PNG")
    return out.getvalue()


def run_comfy_generate(req, ctx):
    """Each batch is one prompt on the least busy healthy server; progress and previews stream to the job."""
    from PIL import Image

    rt = ctx.runtime
    settings = rt.settings
    template = template_for(req, settings.data_dir)
    pool = pool_for(settings)
    try:
        object_info = pool.object_info()
    except NoServerError:
        if not settings.comfyui_fallback_local:
            raise
        return _fall_back_to_local(req, ctx)
    prompt, negative = apply_styles(req, rt)

    prompt_text, negative_text = extract_lora_tags(prompt)[0], extract_lora_tags(negative)[0]
    uploads: dict[str, Any] = {}
    params: dict[str, Any] = {
        "prompt": prompt_text,
        "negative_prompt": negative_text,
        "steps": req.steps,
        "cfg_scale": req.cfg_scale,
        "sampler": req.sampler,
        "width": req.width,
        "height": req.height,
        "batch_size": req.batch_size,
        "model": req.model,
        "loras": [{"name": s.name, "weight": s.weight} for s in req.loras],
    }
    if req.init_image:
        name = f"studionova-{ctx.job_id[:12]}-init.png"
        uploads[name] = Path(req.init_image)
        params.update(init_image=name, denoising_strength=req.denoising_strength)
    if req.mask_image:
        name = f"studionova-{ctx.job_id[:12]}-mask.png"
        uploads[name] = _mask_bytes(req.mask_image, req.mask_blur)
        params["mask_image"] = name
    manifest_params = {k: v for k, v in params.items() if k in template.manifest.bindings or k == "loras"}
    graph0 = bind(template.graph, template.manifest, {**manifest_params, "seed": req.seed})
    validate_against_object_info(graph0, object_info)  # missing nodes or models: before any render

    total = req.steps * req.batch_count
    started = time.monotonic()
    saved, timings = [], {"sampling": 0.0}
    model = SimpleNamespace(name=req.model, model_hash="", label=f"{req.model} (ComfyUI)")
    extras: dict[str, Any] = {"lora_hashes": {s.name: "" for s in req.loras}, "subseed": req.subseed}
    for batch in range(req.batch_count):
        ctx.check_cancelled()
        seed = req.seed + batch * req.batch_size
        graph = bind(template.graph, template.manifest, {**manifest_params, "seed": seed})
        offset = batch * req.steps

        def on_event(event: dict, offset: int = offset) -> None:
            if event["type"] == "progress" and event.get("max"):
                done = offset + int(event["value"])
                elapsed = time.monotonic() - started
                ctx.emit(
                    {
                        "step": done,
                        "total": total,
                        "desc": f"ComfyUI step {done}/{total}",
                        "eta": round(elapsed / done * (total - done), 2) if done else None,
                    }
                )
            elif event["type"] == "preview":
                try:
                    preview = Image.open(io.BytesIO(event["image"]))
                    preview.load()
                except OSError:
                    return
                ctx.emit({"step": offset, "total": total, "desc": "ComfyUI preview", "preview": preview})

        t0 = time.monotonic()
        recipe_extra = {"engine": "comfyui", "template": template.manifest.name}
        with pool.acquire() as lease:
            server = lease.url
            try:
                result = lease.client.run(
                    graph,
                    on_event,
                    ctx.is_cancelled,
                    upload=uploads or None,
                    extra_pnginfo={"studionova": recipe_extra},
                )
            except (
                ComfyConnectionError
            ) as exc:  # skipped until it answers again; the job's retry goes elsewhere
                pool.mark_unhealthy(server, str(exc))
                raise
        timings["sampling"] += time.monotonic() - t0
        extras["comfyui"] = {
            "server": server,
            "prompt_id": result.prompt_id,
            "template": template.manifest.name,
            "workflow": graph,
        }
        for i, (data, _meta) in enumerate(result.images):
            image = Image.open(io.BytesIO(data))
            image.load()
            saved.append(
                save_generated(
                    req,
                    ctx,
                    model,
                    extras,
                    seed + i,
                    image.convert("RGB"),
                    len(saved),
                    (prompt, negative),
                    extra_chunks={"prompt": json.dumps(graph)},
                )
            )
        if not result.images:
            raise InputError(
                f"ComfyUI prompt {result.prompt_id} on {server} finished without images; the "
                f"template {template.manifest.name!r} has no image output"
            )
    return GenerateResult(
        images=saved,
        seed=req.seed,
        model=req.model,
        model_hash="",
        lora_hashes=extras["lora_hashes"],
        device=f"comfyui:{server}",
        timings=timings,
    )


def _fall_back_to_local(req, ctx):
    """--comfyui-fallback-local: no ComfyUI server is healthy, so local diffusers renders the request (its
    model if this machine has it, else the default model); the result says so."""
    models = ctx.runtime.models.models()
    model = req.model if req.model in models else next(iter(models), "")
    if not model:
        raise InputError("no ComfyUI server is healthy and there is no local model to fall back to")
    log.warning("no healthy ComfyUI server; job %s falls back to local diffusers with %s", ctx.job_id, model)
    ctx.emit(
        {"step": 0, "total": req.steps * req.batch_count, "desc": "no ComfyUI server: rendering locally"}
    )
    lock = ctx.extra.get("gpu_lock")
    if lock is None:
        result = generate_images(req.model_copy(update={"engine": "local", "model": model}), ctx)
    else:
        with lock:  # never two diffusion jobs on one device
            result = generate_images(req.model_copy(update={"engine": "local", "model": model}), ctx)
    result.device = f"{result.device} (fallback from comfyui)"
    return result


def run_comfy_generate_job(req, ctx) -> dict:
    """The "comfy_generate" job kind's runner."""
    return run_comfy_generate(req, ctx).model_dump(mode="json")
