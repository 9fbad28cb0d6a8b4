"""txt2img and img2img: `generate_images(request, ctx) -> GenerateResult`.

Seeds work as in A1111: image k of a job uses seed + k, its noise drawn from a CPU generator, so
a seed means the same picture on any device and batch image i equals a single run at seed + i.
Every PNG carries A1111 infotext (`parameters`) and the complete recipe as JSON (`studionova`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.artifacts import save_png
from engine.characters.characters import compose_negative, compose_prompt
from engine.errors import InputError
from engine.gallery.infotext import build_infotext
from engine.gallery.pnginfo import RECIPE_CHUNK
from engine.gallery.records import add_generation, ensure_thumbnail, file_asset
from engine.generation import modes
from engine.generation.ip_adapter import attach_ip_adapter, detach_ip_adapter, find_ip_adapter
from engine.generation.prompts import encode_prompts, is_sdxl
from engine.generation.request import GeneratedImage, GenerateRequest, GenerateResult
from engine.generation.styles import StyleBook, apply_snapshots
from engine.jobs.kinds import RunContext
from engine.paths import MODEL_FOLDERS
from engine.prompt_tags import extract_lora_tags
from engine.samplers import SAMPLERS, make_scheduler
from engine.store.database import Generation, utcnow


@dataclass
class Prepared:
    """Everything a mode needs before sampling: sizes, images, masks, the pipeline to call."""

    task: str  # txt2img / img2img / inpaint
    width: int
    height: int
    init: Any = None
    filled: Any = None  # init with the masked area prepared ("masked content")
    mask: Any = None
    blurred_mask: Any = None
    control: Any = None
    ip_image: Any = None  # IP-Adapter's reference image


def prepare_inputs(req: GenerateRequest) -> Prepared:
    w, h = req.width, req.height
    if not req.init_image:
        prep = Prepared("txt2img", w, h)
    else:
        init = modes.fit(modes.open_image(req.init_image, "init_image"), w, h)
        prep = Prepared("img2img", w, h, init=init)
        mask = None
        if req.mode == "outpaint":
            prep.init, mask = modes.outpaint_canvas(init, *req.outpaints)
            prep.width, prep.height = prep.init.size
        elif req.mode == "inpaint":
            mask = modes.fit(modes.open_image(req.mask_image, "mask_image", "L"), w, h)
        if mask is not None:
            prep.task = "inpaint"
            prep.mask, prep.blurred_mask = modes.prepare_mask(mask, req.mask_blur)
            prep.filled = modes.fill_masked(prep.init, prep.mask, req.masked_content, req.seed)
    if req.controlnet:
        control = modes.fit(modes.open_image(req.control_image, "control_image"), prep.width, prep.height)
        prep.control = modes.canny(control) if req.control_preprocessor == "canny" else control
    if req.ip_adapter_image:
        prep.ip_image = modes.open_image(req.ip_adapter_image, "ip_adapter_image")
    return prep


def model_display_name(name: str) -> str:
    """A1111's `Model:` value: a checkpoint file's stem, a diffusers folder's name."""
    path = Path(name)
    return path.stem if path.suffix.lower() in MODEL_FOLDERS["checkpoints"][1] else name


def a1111_params(req: GenerateRequest, seed: int, model_name: str, model_hash: str, extras: dict) -> dict:
    spec = SAMPLERS[req.sampler]
    inpaint = req.mode in ("inpaint", "outpaint")
    hires = req.enable_hr and not req.init_image
    params = {
        "Steps": req.steps,
        "Sampler": spec.a1111_sampler,
        "Schedule type": spec.a1111_schedule or None,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash,
        "Model": model_display_name(model_name),
        "VAE hash": extras.get("vae_hash"),
        "VAE": extras.get("vae"),
        "Variation seed": extras.get("subseed") if req.subseed_strength > 0 else None,
        "Variation seed strength": f"{req.subseed_strength:g}" if req.subseed_strength > 0 else None,
        "Denoising strength": f"{req.denoising_strength:g}" if req.init_image else None,
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "Mask blur": req.mask_blur if inpaint else None,
        "Inpaint area": "Only masked" if inpaint and req.inpaint_only_masked else None,
        "Masked area padding": req.inpaint_padding if inpaint and req.inpaint_only_masked else None,
        "Masked content": req.masked_content if inpaint else None,
        "Outpaint": " ".join(
            f"{k}={v}" for k, v in zip(("left", "right", "up", "down"), req.outpaints, strict=True)
        )
        if req.mode == "outpaint"
        else None,
    }
    if hires:
        params["Denoising strength"] = f"{req.hr_denoising_strength:g}"
        params.update(
            {
                "Hires upscale": f"{req.hr_scale:g}",
                "Hires steps": req.hr_second_pass_steps or None,
                "Hires upscaler": req.hr_upscaler,
            }
        )
    if extras.get("refiner"):
        params.update({"Refiner": extras["refiner"], "Refiner switch at": f"{req.refiner_switch_at:g}"})
    if req.controlnet:
        params["ControlNet 0"] = (
            f"Module: {req.control_preprocessor}, Model: {req.controlnet} "
            f"[{extras.get('controlnet_hash', '')}], Weight: {req.controlnet_scale:g}"
        )
    lora_hashes, ti_hashes = extras.get("lora_hashes") or {}, extras.get("ti_hashes") or {}
    params["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in lora_hashes.items()) or None
    params["TI hashes"] = ", ".join(f"{n}: {h}" for n, h in ti_hashes.items()) or None
    if extras.get("ip_adapter"):
        params["IP-Adapter"] = extras["ip_adapter"]
        params["IP-Adapter weight"] = f"{req.ip_adapter_scale:g}"
    return params


def _sampling_steps(req: GenerateRequest) -> tuple[int, int, int]:
    """(first pass, refiner, hires pass) steps actually run, as diffusers counts them."""
    first = req.steps if not req.init_image else max(1, int(req.steps * req.denoising_strength))
    refine = req.steps - int(req.steps * req.refiner_switch_at) if uses_refiner(req) else 0
    hires = 0
    if req.enable_hr and not req.init_image:
        hires = max(1, int((req.hr_second_pass_steps or req.steps) * req.hr_denoising_strength))
    return first - refine, refine, hires


def uses_refiner(req: GenerateRequest) -> bool:
    return bool(req.refiner) and not req.init_image and req.refiner_switch_at < 1.0


def generate_images(req: GenerateRequest, ctx: RunContext, previews: bool = True) -> GenerateResult:
    if req.seed < 0 or (req.subseed_strength > 0 and req.subseed < 0):
        raise InputError("seed/subseed=-1 must be resolved to a real seed before the job runs")
    rt = ctx.runtime
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    rt.make_room("image")
    model = rt.models.get(req.model)
    prompt, negative = apply_styles(req, rt)
    extras: dict[str, Any] = {"lora_hashes": rt.models.apply_loras(model, req.loras), "subseed": req.subseed}
    if vae := rt.models.set_vae(model, req.vae):
        extras["vae"], extras["vae_hash"] = vae
    prep = prepare_inputs(req)
    pipe = rt.models.variant(model, prep.task, req.controlnet)
    if req.controlnet:
        extras["controlnet_hash"] = rt.models.model_hash(rt.models.controlnet_path(req.controlnet))
    extras["ti_hashes"] = rt.models.ensure_embeddings(model, [prompt, negative])
    if prep.ip_image is not None:
        files = find_ip_adapter(rt.models.roots.models_dir, req.ip_adapter, req.ip_adapter_encoder)
        extras["ip_adapter"] = (
            f"{files.adapter.stem} [{attach_ip_adapter(pipe, files, req.ip_adapter_scale)}]"
        )
    timings["load"] = time.monotonic() - t0
    try:
        return _generate(req, ctx, model, pipe, prep, prompt, negative, extras, timings, previews)
    finally:
        if prep.ip_image is not None:  # the UNet is shared by every variant: leave it as it was
            detach_ip_adapter(pipe)


def _generate(req, ctx, model, pipe, prep, prompt, negative, extras, timings, previews) -> GenerateResult:
    import torch

    rt = ctx.runtime
    pipe.scheduler = make_scheduler(
        req.sampler, model.base_scheduler_config
    )  # per call: the next one is clean
    rt.models.configure_for_size(model, *req.output_size)

    first, refine, second = _sampling_steps(req)
    per_batch = first + refine + second
    total = per_batch * req.batch_count
    refiner = rt.models.get_refiner(req.refiner) if uses_refiner(req) else None
    if refiner is not None:
        extras["refiner"] = f"{refiner.name} [{refiner.model_hash}]"
        if not is_sdxl(model.pipe):
            raise InputError(f"refiner needs an SDXL base model; {model.name!r} is not SDXL")
        with torch.inference_mode():
            refiner_embeds = encode_prompts(
                refiner.pipe, extract_lora_tags(prompt)[0], extract_lora_tags(negative)[0], req.clip_skip
            )
    started = time.monotonic()
    with torch.inference_mode():
        embeds = encode_prompts(
            pipe, extract_lora_tags(prompt)[0], extract_lora_tags(negative)[0], req.clip_skip
        )
    images = []
    w, h = req.output_size
    advice = (
        f"{req.batch_size} image(s) at {w}x{h} did not fit; lower batch_size "
        f"(now {req.batch_size}) or width/height, or restart with --cpu-offload"
    )
    for batch in range(req.batch_count):
        seeds = [req.seed + batch * req.batch_size + i for i in range(req.batch_size)]
        ctx.check_cancelled()
        offset = batch * per_batch
        callback = rt.step_callback(ctx.emit, ctx.is_cancelled, offset, total, started, previews)
        with rt.oom_guard(advice):
            out = _sample(req, rt, model, pipe, prep, embeds, seeds, callback)
            if refiner is not None:
                callback = rt.step_callback(
                    ctx.emit, ctx.is_cancelled, offset + first, total, started, previews
                )
                out = _refiner_pass(req, refiner, model, out, refiner_embeds, seeds, callback)
            if second:
                callback = rt.step_callback(
                    ctx.emit, ctx.is_cancelled, offset + first + refine, total, started, previews
                )
                out = _hires_pass(req, rt, model, out, embeds, seeds, callback)
        if prep.task == "inpaint":
            out = [modes.paste_back(prep.init, img, prep.blurred_mask) for img in out]
        images.extend(zip(seeds, out, strict=True))
    timings["sampling"] = time.monotonic() - started

    t1 = time.monotonic()
    saved = [
        save_generated(req, ctx, model, extras, seed, img, k, (prompt, negative))
        for k, (seed, img) in enumerate(images)
    ]
    timings["save"] = time.monotonic() - t1
    return GenerateResult(
        images=saved,
        seed=req.seed,
        model=model.name,
        model_hash=model.model_hash,
        lora_hashes=extras["lora_hashes"],
        device=rt.plan.device,
        timings=timings,
    )


def apply_styles(req: GenerateRequest, rt) -> tuple[str, str]:
    """The prompts the sampler sees: the character composed in (trigger word + design prompt + prompt,
    negatives merged), then the saved styles applied as the request's snapshot holds them (a job submitted
    before styles were snapshotted reads styles.csv)."""
    prompt, negative = (
        compose_prompt(req.character, req.prompt),
        compose_negative(req.character, req.negative_prompt),
    )
    if req.style_snapshot is not None:
        return apply_snapshots(req.style_snapshot, prompt, negative)
    if not req.styles:
        return prompt, negative
    return StyleBook(rt.styles_path).apply(req.styles, prompt, negative)


def _call_kwargs(
    req: GenerateRequest, pipe, prep: Prepared, embeds: dict, seeds: list[int], callback
) -> dict:
    import torch

    kwargs = {
        **embeds,
        "num_inference_steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if prep.task == "txt2img":
        kwargs.update(width=prep.width, height=prep.height)
        if req.subseed_strength > 0:
            unet = pipe.unet
            f = pipe.vae_scale_factor
            shape = (unet.config.in_channels, prep.height // f, prep.width // f)
            noise = modes.initial_noise(seeds, shape, req.subseed, req.subseed_strength)
            kwargs["latents"] = noise.to(dtype=unet.dtype)
    elif prep.task == "img2img":
        kwargs.update(image=prep.init, strength=req.denoising_strength)
    else:
        kwargs.update(
            image=prep.filled,
            mask_image=prep.mask,
            strength=req.denoising_strength,
            width=prep.width,
            height=prep.height,
        )
        if req.inpaint_only_masked:
            kwargs["padding_mask_crop"] = req.inpaint_padding
    if prep.ip_image is not None:
        kwargs["ip_adapter_image"] = prep.ip_image
    if prep.control is not None:
        key = "image" if prep.task == "txt2img" else "control_image"
        kwargs[key] = prep.control
        kwargs["controlnet_conditioning_scale"] = req.controlnet_scale
    return kwargs


def _sample(req, rt, model, pipe, prep: Prepared, embeds, seeds, callback) -> list:
    kwargs = _call_kwargs(req, pipe, prep, embeds, seeds, callback)
    hires = req.enable_hr and prep.task == "txt2img"
    if (hires and req.hr_upscaler in modes.HIRES_LATENT_MODES) or uses_refiner(req):
        kwargs["output_type"] = "latent"
    if uses_refiner(req):
        kwargs["denoising_end"] = req.refiner_switch_at
    import torch

    with torch.inference_mode():
        return list(pipe(**kwargs).images)


def _refiner_pass(req, refiner, model, latents: list, embeds, seeds, callback) -> list:
    """SDXL base -> refiner switch-over: the refiner finishes the same noise schedule from the switch point."""
    import torch

    pipe = refiner.pipe
    pipe.scheduler = make_scheduler(req.sampler, refiner.base_scheduler_config)
    kwargs = {
        **embeds,
        "image": torch.stack(latents),
        "denoising_start": req.refiner_switch_at,
        "num_inference_steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    if req.enable_hr and req.hr_upscaler in modes.HIRES_LATENT_MODES:
        kwargs["output_type"] = "latent"
    kwargs = _repeat_embeds(kwargs, len(seeds))
    with torch.inference_mode():
        return list(pipe(**kwargs).images)


def _repeat_embeds(kwargs: dict, n: int) -> dict:
    if n == 1:
        return kwargs
    return {k: (v.repeat(n, *[1] * (v.dim() - 1)) if k.endswith("embeds") else v) for k, v in kwargs.items()}


def _hires_pass(req, rt, model, first: list, embeds, seeds, callback) -> list:
    """A1111's hires fix: upscale the first pass (in latent space or as an image) and run img2img on it."""
    import torch

    w, h = req.output_size
    if req.hr_upscaler in modes.HIRES_LATENT_MODES:
        image = modes.upscale_latents(torch.stack(first), w, h, req.hr_upscaler, model.pipe.vae_scale_factor)
    else:
        upscaler = None
        if req.hr_upscaler != "Lanczos":
            upscaler = rt.models.roots.resolve(
                "upscale_models", req.hr_upscaler, rt.models.roots.list_files("upscale_models")
            )
        image = [modes.upscale_image(img, w, h, upscaler, rt.plan.device) for img in first]
    pipe = rt.models.variant(model, "img2img")
    pipe.scheduler = make_scheduler(req.sampler, model.base_scheduler_config)
    kwargs = {
        **embeds,
        "image": image,
        "strength": req.hr_denoising_strength,
        "num_inference_steps": req.hr_second_pass_steps or req.steps,
        "guidance_scale": req.cfg_scale,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    kwargs = _repeat_embeds(kwargs, len(seeds))
    with torch.inference_mode():
        return list(pipe(**kwargs).images)


def save_generated(
    req,
    ctx: RunContext,
    model,
    extras: dict,
    seed: int,
    image,
    index: int,
    prompts: tuple[str, str],
    extra_chunks: dict[str, str] | None = None,
) -> GeneratedImage:
    """One image with its records; `prompts` are the (prompt, negative) the image was rendered from (styles
    and character composed in), so the infotext, recipe and Generation row say what made the pixels."""
    rt = ctx.runtime
    lora_hashes = extras["lora_hashes"]
    prompt, negative = prompts
    infotext = build_infotext(
        prompt,
        negative,
        a1111_params(req, seed, model.name, model.model_hash, extras),
        f"StudioNOVA {rt.version}",
    )
    recipe = {
        "app": "StudioNOVA",
        "version": rt.version,
        "job_id": ctx.job_id,
        "mode": req.mode,
        "request": req.model_dump(
            mode="json", exclude={"init_image", "mask_image", "control_image", "ip_adapter_image"}
        ),
        "seed": seed,
        "index": index,
        "model": model.name,
        "model_label": model.label,
        "model_hash": model.model_hash,
        "loras": [{"name": s.name, "weight": s.weight, "hash": lora_hashes[s.name]} for s in req.loras],
        "embeddings": extras.get("ti_hashes") or {},
        "vae": {"name": extras["vae"], "hash": extras["vae_hash"]} if extras.get("vae") else None,
        "device": rt.plan.device,
        "dtype": rt.plan.dtype,
    }
    if extras.get("comfyui"):  # rendered by a ComfyUI server: which one, which prompt, which template
        comfy = extras["comfyui"]
        recipe.update(
            engine="comfyui",
            device=f"comfyui:{comfy['server']}",
            dtype="",
            comfyui={k: comfy[k] for k in ("server", "prompt_id", "template")},
        )
    if extras.get("ip_adapter"):
        recipe["ip_adapter"] = {"name": extras["ip_adapter"], "scale": req.ip_adapter_scale}
    if req.character is not None:  # who it shows, and which LoRA version, as of submission
        recipe["character"] = req.character.model_dump(mode="json")
    day = utcnow().strftime("%Y-%m-%d")
    # A job may save through several generate calls (X/Y/Z plot): number files per job, not per call.
    n = ctx.extra.get("images_saved", 0)
    ctx.extra["images_saved"] = n + 1
    path = ctx.outputs / day / f"{ctx.job_id[:12]}-{n:03d}-{seed}.png"
    save_png(
        image,
        path,
        {
            "parameters": infotext,
            RECIPE_CHUNK: json.dumps(recipe, ensure_ascii=False),
            **(extra_chunks or {}),
        },
    )
    asset = file_asset(path, "image", image.width, image.height, ctx.job_id)
    gen = Generation(
        asset_id=asset.id,
        job_id=ctx.job_id,
        mode=req.mode,
        model=model.name,
        model_hash=model.model_hash,
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=req.steps,
        cfg_scale=req.cfg_scale,
        sampler=req.sampler,
        width=image.width,
        height=image.height,
        denoising_strength=req.denoising_strength if req.init_image else None,
        clip_skip=req.clip_skip,
        loras=recipe["loras"],
        infotext=infotext,
        recipe=recipe,
        character=req.character.slug if req.character else None,
    )
    ensure_thumbnail(path)  # the gallery never opens full images
    add_generation(rt.db, asset, gen)
    if req.dataset_review and req.character is not None:
        ctx.datasets.add_generated(req.character.id, path, gen.id, f"generation:{ctx.job_id}#{index}")
    return GeneratedImage(
        path=str(path), seed=seed, infotext=infotext, asset_id=asset.id, generation_id=gen.id
    )


def run_generate_job(req: GenerateRequest, ctx: RunContext) -> dict:
    return generate_images(req, ctx).model_dump(mode="json")
