"""txt2img and img2img: `generate_images(request, ctx) -> GenerateResult`.

Seeds work as in A1111: image k of a job uses seed + k, its noise drawn from a CPU generator, so
a seed means the same picture on any device and batch image i equals a single run at seed + i.
Every PNG carries A1111 infotext (`parameters`) and the complete recipe as JSON (`studionova`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.artifacts import save_png, sha256_file
from engine.errors import InputError
from engine.infotext import build_infotext
from engine.jobs import RunContext
from engine.prompts import encode_prompts
from engine.requests import GeneratedImage, GenerateRequest, GenerateResult
from engine.samplers import SAMPLERS, make_scheduler
from engine.store import Asset, Generation, utcnow

MAX_INIT_IMAGE_PIXELS = 4096 * 4096


def load_init_image(path: str, width: int, height: int):
    """Open, verify and resize the img2img source; errors name the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"init_image {p.name!r} was not uploaded or no longer exists")
    try:
        with Image.open(p) as probe:
            probe.verify()
        img = Image.open(p)
        if img.width * img.height > MAX_INIT_IMAGE_PIXELS:
            raise InputError(
                f"init_image is {img.width}x{img.height}; at most {MAX_INIT_IMAGE_PIXELS} pixels"
            )
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"init_image {p.name!r} is not a readable image (PNG, JPEG or WebP): {e}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"init_image {p.name!r} is too large to decode safely: {e}") from None
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return img


def a1111_params(
    req: GenerateRequest, seed: int, model_name: str, model_hash: str, lora_hashes: dict
) -> dict:
    spec = SAMPLERS[req.sampler]
    return {
        "Steps": req.steps,
        "Sampler": spec.a1111_sampler,
        "Schedule type": spec.a1111_schedule or None,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": f"{req.denoising_strength:g}" if req.init_image else None,
        "Clip skip": req.clip_skip if req.clip_skip > 1 else None,
        "Lora hashes": ", ".join(f"{n}: {h}" for n, h in lora_hashes.items()) or None,
    }


def generate_images(req: GenerateRequest, ctx: RunContext, previews: bool = True) -> GenerateResult:
    import torch

    if req.seed < 0:
        raise InputError("seed=-1 must be resolved to a real seed before the job runs")
    rt = ctx.runtime
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    model = rt.models.get(req.model)
    lora_hashes = rt.models.apply_loras(model, req.loras)
    timings["load"] = time.monotonic() - t0
    init = load_init_image(req.init_image, req.width, req.height) if req.init_image else None
    pipe = rt.models.img2img(model) if init is not None else model.pipe
    pipe.scheduler = make_scheduler(
        req.sampler, model.base_scheduler_config
    )  # per call: the next one is clean
    rt.models.configure_for_size(model, req.width, req.height)

    steps_per_batch = req.steps if init is None else max(1, int(req.steps * req.denoising_strength))
    total = steps_per_batch * req.batch_count
    started = time.monotonic()
    images = []
    for batch in range(req.batch_count):
        seeds = [req.seed + batch * req.batch_size + i for i in range(req.batch_size)]
        ctx.check_cancelled()
        kwargs = {
            "num_inference_steps": req.steps,
            "guidance_scale": req.cfg_scale,
            "num_images_per_prompt": req.batch_size,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
            "callback_on_step_end": rt.step_callback(
                ctx.emit, ctx.is_cancelled, batch * steps_per_batch, total, started, previews
            ),  # fmt: skip
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if init is None:
            kwargs.update(width=req.width, height=req.height)
        else:
            kwargs.update(image=init, strength=req.denoising_strength)
        try:
            with torch.inference_mode():
                kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = encode_prompts(
                    pipe, req.prompt, req.negative_prompt, req.clip_skip
                )
                out = pipe(**kwargs)
        except Exception as e:
            if rt.is_out_of_memory(e):
                raise rt.out_of_memory(
                    e,
                    f"{req.batch_size} image(s) at {req.width}x{req.height} did not fit; lower batch_size "
                    f"(now {req.batch_size}) or width/height, or restart with --cpu-offload",
                ) from None
            raise
        images.extend(zip(seeds, out.images, strict=True))
    timings["sampling"] = time.monotonic() - started

    t1 = time.monotonic()
    saved = [
        save_generated(req, ctx, model, lora_hashes, seed, img, k) for k, (seed, img) in enumerate(images)
    ]
    timings["save"] = time.monotonic() - t1
    return GenerateResult(images=saved, seed=req.seed, model=model.name, model_hash=model.model_hash,
                          lora_hashes=lora_hashes, device=rt.plan.device, timings=timings)  # fmt: skip


def save_generated(
    req, ctx: RunContext, model, lora_hashes: dict, seed: int, image, index: int
) -> GeneratedImage:
    rt = ctx.runtime
    infotext = build_infotext(req.prompt, req.negative_prompt,
                              a1111_params(req, seed, model.name, model.model_hash, lora_hashes),
                              f"StudioNOVA {rt.version}")  # fmt: skip
    recipe = {
        "app": "StudioNOVA",
        "version": rt.version,
        "job_id": ctx.job_id,
        "mode": req.mode,
        "request": req.model_dump(mode="json", exclude={"init_image"}),
        "seed": seed,
        "index": index,
        "model": model.name,
        "model_label": model.label,
        "model_hash": model.model_hash,
        "loras": [{"name": s.name, "weight": s.weight, "hash": lora_hashes[s.name]} for s in req.loras],
        "device": rt.plan.device,
        "dtype": rt.plan.dtype,
    }
    day = utcnow().strftime("%Y-%m-%d")
    path = rt.outputs_dir / day / f"{ctx.job_id[:12]}-{index:03d}-{seed}.png"
    save_png(image, path, {"parameters": infotext, "studionova": json.dumps(recipe, ensure_ascii=False)})
    asset = Asset(kind="image", path=str(path), sha256=sha256_file(path), size=path.stat().st_size,
                  width=image.width, height=image.height, job_id=ctx.job_id)  # fmt: skip
    gen = Generation(asset_id=asset.id, job_id=ctx.job_id, mode=req.mode, model=model.name,
                     model_hash=model.model_hash, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed,
                     steps=req.steps, cfg_scale=req.cfg_scale, sampler=req.sampler, width=req.width,
                     height=req.height, denoising_strength=req.denoising_strength if req.init_image else None,
                     clip_skip=req.clip_skip, loras=recipe["loras"], infotext=infotext, recipe=recipe)  # fmt: skip
    with rt.db.session() as s:
        s.add(asset)
        s.add(gen)
        s.commit()
    return GeneratedImage(
        path=str(path), seed=seed, infotext=infotext, asset_id=asset.id, generation_id=gen.id
    )


def run_generate_job(req: GenerateRequest, ctx: RunContext) -> dict:
    return generate_images(req, ctx).model_dump(mode="json")
