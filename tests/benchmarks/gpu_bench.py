"""GPU pass (issue 23): the real path on a GPU, every row measured in one process run.

    python3 -m tests.benchmarks.gpu_bench [--runs 10] [--rows 1,3,4,5,2] [--budget-s 400]
                                          [--section-file F] [--out BENCHMARKS.md]
    python3 -m tests.benchmarks.gpu_bench --tiny ...   (CPU smoke run: demo model, 64 px, 2 steps)
    python3 -m tests.benchmarks.gpu_bench --merge F    (write a section measured elsewhere into BENCHMARKS.md)

Model: SD 1.5's real architecture (engine/model_configs/sd1: UNet, VAE, CLIP ViT-L text encoder, the CLIP
BPE tokenizer) with random weights, built on the device and saved as a diffusers folder that the engine
loads like any model; fp16, 512x512, 20 steps, Euler, CFG 7, CPU noise generators on both sides (as the
engine draws its noise). Rows (numbers as in the issue):
1. bare `StableDiffusionPipeline.__call__` vs `Studio.submit_generate` + draining `Studio.watch` (job row,
   progress events, PNG with infotext + recipe, thumbnail, Asset/Generation rows), batch 1 and 4, interleaved.
3. speed options on the bare pipeline (batch 1), each vs plain fp16 SDPA measured in the same row:
   channels_last, bf16, torch.compile of the UNet (first-call time separate), xformers if installed,
   per-step previews (cheap latent factors vs a full VAE decode), VAE decode at 1024 px tiled vs untiled.
4. `ModelManager.apply_loras` switching two loaded LoRAs (set_adapters) vs loading one from disk vs a
   full pipeline reload (rank 16 LoRAs on UNet + text encoder attention).
5. upscale (realesr-general-x4v3's SRVGG architecture, random weights) 512 -> 2048 px tiled vs untiled
   through `upscale_image`; one LoRA training step (rank 16, 512 px, autocast fp16/bf16, gradient
   checkpointing on/off) in a bare diffusers + peft loop.
2. `/generate` through gradio_client against `app.py` launched on the device vs the bare call + a minimal
   Gradio app's one-PNG round trip measured in the same run (needs gradio installed).
6. peak memory per row: torch.cuda.max_memory_allocated, reset before each call (the largest call).

A time budget (--budget-s) bounds the run: each row fits its run count to the time left (n is in the
table) and a row that no longer fits is reported as not measured, with the reason. The section is
rewritten after every row, so a run stopped from outside keeps what it measured.

On the lent GPU machine (python3 there has torch, transformers, peft, accelerate; not diffusers, the engine's
database/validation packages or gradio), carry the missing packages as wheels, at the versions of .venv:
    echo /.gpuwheels/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .gpuwheels diffusers sqlmodel SQLAlchemy pydantic pydantic_core \
        annotated-types typing-inspection typing_extensions websockets lark compel spandrel   (NAME==VERSION)
    ... -d .gpuwheels/ui gradio gradio_client fastapi starlette uvicorn orjson pydub python-multipart groovy \
        semantic-version tomlkit safehttpx hf-gradio brotli annotated-doc opentelemetry-api anyio
(about 47 MiB in all, under the 64 MiB a call carries) and run, carrying .gpuwheels, with timeout_s 480:
    pip() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@"; }
    pip /tmp/site .gpuwheels/*.whl || exit; pip /tmp/site_ui .gpuwheels/ui/*.whl || echo no gradio
    export PYTHONPATH=/tmp/site:/tmp/site_ui:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    python3 -m tests.benchmarks.gpu_bench --budget-s 380 --no-write --section-file $OUT/gpu_section.md
then, here: python3 -m tests.benchmarks.gpu_bench --merge <files_at>/gpu_section.md
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks.run_benchmarks import GPU_HEADING, write_section

REPO = Path(__file__).resolve().parents[2]
HEADING = GPU_HEADING
MODEL_NAME = "sd15-random"
PROMPT = "a lighthouse at dusk, oil painting"
CFG = 7.0
LORA_RANK = 16


class Bench:
    """Run-wide state: sizes, the device, the time budget and the rows measured so far."""

    def __init__(self, args) -> None:
        import torch

        self.args = args
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = "cuda:0" if self.cuda else "cpu"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.size = 64 if self.tiny else 512
        self.steps = 2 if self.tiny else 20
        self.runs = args.runs
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="studionova-gpu-bench-"))
        self.models = self.tmp / "models"

    # --- timing --------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    def timed(self, fn) -> tuple[float, float | None]:
        """(ms, peak GiB) of one call, the device synchronised on both ends."""
        self.reset_peak()
        t = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t) * 1000, self.peak_gib()

    def fit(self, per_call_s: float, share: float, minimum: int = 3) -> int:
        """Runs that fit into `share` of the time left (at most --runs, at least `minimum`)."""
        budget = max(0.0, self.left()) * share
        return max(min(minimum, self.runs), min(self.runs, int(budget / max(per_call_s, 1e-3))))

    def measure(self, fns: dict, share: float, warmup: int = 1) -> dict:
        """Median ms and largest peak of each fn, the fns alternating, after `warmup` calls each."""
        last_round = 0.0  # the last warm-up round sizes n (the first may load, compile or autotune)
        for _ in range(warmup):
            last_round = sum(self.timed(fn)[0] / 1000 for fn in fns.values())
        n = self.fit(last_round, share)
        times = {k: [] for k in fns}
        peaks = {k: [] for k in fns}
        for _ in range(n):
            for k, fn in fns.items():
                ms, peak = self.timed(fn)
                times[k].append(ms)
                peaks[k].append(peak or 0.0)
        return {
            k: {"ms": statistics.median(times[k]), "n": n, "peak": max(peaks[k]) if self.cuda else None}
            for k in fns
        }

    def add(self, row: str, variant: str, result: dict | None, base_ms: float | None = None, note: str = ""):
        r = {"row": row, "variant": variant, "note": note}
        if result:
            r.update(ms=result["ms"], n=result["n"], peak=result.get("peak"))
            if base_ms:
                r["ratio"] = result["ms"] / base_ms
                r["added"] = result["ms"] - base_ms
        self.rows.append(r)
        print(json.dumps(r), flush=True)

    def skip(self, row: str, variant: str, why: str) -> None:
        self.add(row, variant, None, note=f"not measured: {why}")

    def need(self, seconds: float, row: str, variant: str) -> bool:
        if self.left() >= seconds:
            return True
        self.skip(
            row,
            variant,
            f"time budget ({self.left():.0f} s left of {self.args.budget_s:.0f}, needs ~{seconds:.0f})",
        )
        return False


# --- the model ---------------------------------------------------------------------------------------------
def build_sd15(b: Bench):
    """SD 1.5's architecture from the shipped configs, random weights, on the device; saved for the engine."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from engine.model_manager.checkpoints import clip_vocab
    from engine.paths import SHIPPED_CONFIGS

    cfg = SHIPPED_CONFIGS / "sd1"
    tok_dir = b.tmp / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    text = gzip.decompress((SHIPPED_CONFIGS / "clip_merges.txt.gz").read_bytes()).decode("utf-8")
    merges = [line for line in text.splitlines()[1:] if line]
    (tok_dir / "merges.txt").write_text(text, encoding="utf-8")
    (tok_dir / "vocab.json").write_text(json.dumps(clip_vocab(merges)), encoding="utf-8")
    torch.manual_seed(23)
    with torch.device(b.device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(
            json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(b.device, b.dtype)
    return pipe


def prepare_model(b: Bench):
    """(bare pipeline on the device, folder the engine loads, model name)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from engine.model_manager.demo_model import DEMO_MODEL_NAME, ensure_demo_model
    from engine.paths import ModelRoots

    ModelRoots(b.models).create_layout()
    t = time.perf_counter()
    if b.tiny:
        folder = ensure_demo_model(b.models)
        name = DEMO_MODEL_NAME
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
        ).to(b.device, b.dtype)
    else:
        pipe = build_sd15(b)
        name = MODEL_NAME
        folder = b.models / "diffusers" / name
        pipe.save_pretrained(folder, safe_serialization=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    b.notes.append(
        f"model: {name}, UNet {params:.0f} M parameters, built and saved in {time.perf_counter() - t:.1f} s"
    )
    if b.cuda:
        torch.cuda.empty_cache()
    return pipe, folder, name


def bare_call(b: Bench, pipe, batch: int, seed: int = 0, **extra):
    import torch

    def call():
        with torch.inference_mode():
            return pipe(
                PROMPT,
                negative_prompt="",
                num_inference_steps=b.steps,
                width=b.size,
                height=b.size,
                guidance_scale=CFG,
                num_images_per_prompt=batch,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
                **extra,
            ).images

    return call


# --- row 1 -------------------------------------------------------------------------------------------------
def row1(b: Bench, pipe, name: str) -> None:
    from engine.settings import Settings
    from engine.studio import Studio

    settings = Settings(
        data_dir=b.tmp / "data",
        models_dir=b.models,
        demo=b.tiny,
        device="cuda" if b.cuda else "cpu",
        dtype="float16" if b.cuda else "float32",
    )
    t = time.perf_counter()
    studio = Studio.start(settings)
    b.notes.append(
        f"Studio.start (database, executor, warm model load incl. hashing): {time.perf_counter() - t:.1f} s"
    )
    seed = [1000]
    last = {}
    try:
        for batch, share in ((1, 0.15), (2 if b.tiny else 4, 0.2)):

            def engine_call(batch=batch):
                seed[0] += batch
                values = dict(
                    prompt=PROMPT,
                    negative_prompt="",
                    model=name,
                    steps=b.steps,
                    width=b.size,
                    height=b.size,
                    cfg_scale=CFG,
                    sampler="Euler",
                    seed=seed[0],
                    batch_size=batch,
                )
                job_id, _ = studio.submit_generate(values)
                for event in studio.watch(job_id):
                    if event["type"] in ("done", "failed", "cancelled", "interrupted"):
                        assert event["type"] == "done", event
                        last[batch] = studio.job_status(job_id)["result"]
                        return

            res = b.measure({"bare": bare_call(b, pipe, batch), "engine": engine_call}, share, warmup=2)
            timings = (last.get(batch) or {}).get("timings") or {}
            split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
            b.add(f"1 (batch {batch})", "bare diffusers call", res["bare"])
            b.add(
                f"1 (batch {batch})",
                "engine generate via Studio (job row, events, PNG, rows)",
                res["engine"],
                res["bare"]["ms"],
                f"target <= 1.03x; engine's own split of the last run: {split}",
            )
    finally:
        studio.close()


# --- row 3 -------------------------------------------------------------------------------------------------
def row3(b: Bench, pipe) -> None:
    import torch

    from engine.runtime import latent_preview

    base = bare_call(b, pipe, 1)
    res = b.measure({"plain": base}, 0.05)
    plain = res["plain"]["ms"]
    b.add("3", "plain fp16, SDPA (torch default attention)" if b.cuda else "plain fp32 (CPU)", res["plain"])

    # channels_last on UNet + VAE
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    res = b.measure({"cl": base}, 0.06)
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    b.add(
        "3",
        "channels_last (UNet + VAE)",
        res["cl"],
        plain,
    )

    # bf16
    if b.cuda:
        pipe.to(dtype=torch.bfloat16)
        res = b.measure({"bf16": base}, 0.05)
        pipe.to(dtype=b.dtype)
        b.add("3", "bf16 instead of fp16", res["bf16"], plain)
    else:
        b.skip("3", "bf16 instead of fp16", "CPU run (fp16 needs the GPU)")

    if importlib.util.find_spec("xformers"):
        try:
            pipe.enable_xformers_memory_efficient_attention()
            res = b.measure({"x": base}, 0.05)
            b.add("3", "xformers attention", res["x"], plain)
        except Exception as e:  # noqa: BLE001 -- reported in the table, the run goes on
            b.skip("3", "xformers attention", f"{type(e).__name__}: {e}"[:120])
        finally:
            pipe.disable_xformers_memory_efficient_attention()
    else:
        b.skip("3", "xformers attention", "xformers is not installed")

    # previews: one per step, cheap latent factors (the engine's) vs a full VAE decode
    def vae_preview(latents):
        from PIL import Image

        with torch.inference_mode():
            img = pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor).sample[0]
        arr = ((img.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def with_preview(make):
        def cb(_pipe, _step, _t, kw):
            make(kw["latents"])
            return {}

        return bare_call(b, pipe, 1, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])

    res = b.measure(
        {"none": base, "latent": with_preview(latent_preview), "vae": with_preview(vae_preview)}, 0.12
    )
    note = f"vs no previews, measured alongside: {res['none']['ms']:.1f} ms"
    b.add("3", f"a cheap latent preview at every step ({b.steps})", res["latent"], res["none"]["ms"], note)
    b.add("3", f"a full VAE-decode preview at every step ({b.steps})", res["vae"], res["none"]["ms"], note)
    lat = torch.randn(1, 4, b.size // 8, b.size // 8, device=b.device, dtype=b.dtype)
    one = b.measure({"latent": lambda: latent_preview(lat), "vae": lambda: vae_preview(lat)}, 0.02)
    b.add("3", "one latent preview alone", one["latent"])
    b.add("3", "one VAE-decode preview alone", one["vae"], one["latent"]["ms"])

    # VAE decode at 1024 px (engine tiles above 1024*1024 px): tiled vs untiled
    big = 128 if not b.tiny else 16
    lat = torch.randn(1, 4, big, big, device=b.device, dtype=b.dtype)

    def decode():
        with torch.inference_mode():
            return pipe.vae.decode(lat).sample

    res_u = b.measure({"u": decode}, 0.04)
    pipe.vae.enable_tiling()
    res_t = b.measure({"t": decode}, 0.04)
    pipe.vae.disable_tiling()
    b.add("3", f"VAE decode {big * 8} px untiled", res_u["u"])
    b.add("3", f"VAE decode {big * 8} px tiled (enable_tiling)", res_t["t"], res_u["u"]["ms"])

    # torch.compile of the UNet: first call (compile) separate
    if not b.args.compile:
        b.skip("3", "torch.compile(unet)", "off in this run (--compile to measure)")
        return
    if not b.need(150 if b.cuda else 30, "3", "torch.compile(unet)"):
        return
    unet = pipe.unet
    try:
        pipe.unet = torch.compile(unet)
        first_ms, _ = b.timed(base)
        res = b.measure({"c": base}, 0.1)
        b.add(
            "3",
            "torch.compile(unet), default mode",
            res["c"],
            plain,
            f"first call (compile) {first_ms / 1000:.1f} s",
        )
    except Exception as e:  # noqa: BLE001 -- reported in the table, the run goes on
        b.skip("3", "torch.compile(unet)", f"{type(e).__name__}: {e}"[:160])
    finally:
        pipe.unet = unet


# --- row 4 -------------------------------------------------------------------------------------------------
def save_random_lora(pipe, path: Path, seed: int, rank: int = LORA_RANK) -> Path:
    """A PEFT-format LoRA (UNet to_q/k/v/out.0 + text encoder q/k/v/out_proj) with random weights."""
    import torch
    from diffusers import StableDiffusionPipeline

    g = torch.Generator("cpu").manual_seed(seed)

    def layers(model, suffixes):
        state = {}
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mname.endswith(suffixes):
                a = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
                bb = torch.randn(mod.out_features, rank, generator=g) * 0.01
                state[f"{mname}.lora_A.weight"] = a.to(torch.float16)
                state[f"{mname}.lora_B.weight"] = bb.to(torch.float16)
        return state

    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers(pipe.unet, (".to_q", ".to_k", ".to_v", ".to_out.0")),
        text_encoder_lora_layers=layers(pipe.text_encoder, (".q_proj", ".k_proj", ".v_proj", ".out_proj")),
        weight_name=path.name,
    )
    return path


def row4(b: Bench, pipe, name: str) -> None:
    from engine.device import resolve_device
    from engine.model_manager.pipelines import ModelManager
    from engine.requests import LoraSpec
    from engine.store.database import Database
    from engine.store.hashing import HashCache

    save_random_lora(pipe, b.models / "loras" / "style_a.safetensors", 1)
    save_random_lora(pipe, b.models / "loras" / "style_b.safetensors", 2)
    db = Database(f"sqlite:///{b.tmp / 'lora.db'}")
    db.create_all()
    mm = ModelManager(b.models, resolve_device(b.device, "float16" if b.cuda else "float32"), HashCache(db))
    loaded = mm.get(name)
    a, bb = [LoraSpec(name="style_a", weight=0.8)], [LoraSpec(name="style_b", weight=0.8)]
    mm.apply_loras(loaded, a)
    mm.apply_loras(loaded, bb)
    flip = [False]

    def switch():
        flip[0] = not flip[0]
        mm.apply_loras(loaded, a if flip[0] else bb)

    short_a = mm.lora_hash(b.models / "loras" / "style_a.safetensors")

    def from_disk():
        mm.unload_lora(loaded, short_a)
        mm.apply_loras(loaded, a)

    def reload():
        nonlocal loaded
        mm.unload()
        loaded = mm.get(name)

    sw = b.measure({"s": switch}, 0.03)
    disk = b.measure({"d": from_disk}, 0.05)
    full = b.measure({"r": reload}, 0.08)
    b.add("4", f"full pipeline reload from disk ({name}, {'fp16' if b.cuda else 'fp32'})", full["r"])
    b.add("4", f"switch two loaded rank-{LORA_RANK} LoRAs (set_adapters)", sw["s"], full["r"]["ms"])
    b.add("4", f"load one rank-{LORA_RANK} LoRA from disk", disk["d"], full["r"]["ms"])
    b.skip("4", "enable_lora_hotswap with torch.compile", "not scripted in this pass")
    mm.unload()
    db.dispose()


# --- row 5 -------------------------------------------------------------------------------------------------
def row5_upscale(b: Bench) -> None:
    import numpy as np
    from PIL import Image

    from engine.device import resolve_device
    from engine.upscale.upscalers import UpscalerCache, auto_tile, upscale_image
    from tests.upscale_factories import save_compact

    side = 128 if b.tiny else 512
    path = save_compact(
        b.models / "upscale_models" / "x4v3-random.pth", **({"num_conv": 2} if b.tiny else {})
    )
    plan = resolve_device(b.device, "float16" if b.cuda else "float32")
    cache = UpscalerCache()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    tile = side // 2

    def run(t):
        return lambda: upscale_image(image, path, scale=4.0, plan=plan, cache=cache, tile=t)

    auto = auto_tile(plan, 4, side, side)
    res = b.measure({"untiled": run(0), "tiled": run(tile)}, 0.05)
    arch = "SRVGG 64 feat x 2 convs" if b.tiny else "realesr-general-x4v3 arch (SRVGG 64 feat x 32 convs)"
    b.add(
        "5",
        f"upscale {side} -> {side * 4} px untiled ({arch}; auto tile picks {auto or 'untiled'})",
        res["untiled"],
    )
    b.add(
        "5",
        f"upscale {side} -> {side * 4} px tile {tile} (pad 16, overlap 16)",
        res["tiled"],
        res["untiled"]["ms"],
    )
    cache.clear()


def row5_train(b: Bench, pipe) -> None:
    """One LoRA training step in a bare diffusers + peft loop (the engine's trainer is not driven here)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(5)
    with torch.device(b.device):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)  # fp32 master weights
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = b.size // 8
    cross = pipe.unet.config.cross_attention_dim
    dtypes = [("fp16", torch.float16), ("bf16", torch.bfloat16)] if b.cuda else [("bf16", torch.bfloat16)]
    device_type = "cuda" if b.cuda else "cpu"
    base_ms = None
    for gc_on in (False, True):
        if gc_on:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        unet.train()
        for label, dt in dtypes:
            scaler = torch.amp.GradScaler(device_type, enabled=dt == torch.float16)

            def step(dt=dt, scaler=scaler):
                x = torch.randn(1, 4, lat, lat, device=b.device)
                noise = torch.randn_like(x)
                t = torch.randint(0, 1000, (1,), device=b.device)
                ctx = torch.randn(1, 77, cross, device=b.device)
                with torch.autocast(device_type, dtype=dt):
                    pred = unet(x + noise, t, ctx).sample
                    loss = torch.nn.functional.mse_loss(pred.float(), noise)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

            res = b.measure({"s": step}, 0.03, warmup=2)
            b.add(
                "5",
                f"train step rank {LORA_RANK}, {b.size} px, batch 1, autocast {label}, "
                f"gradient checkpointing {'on' if gc_on else 'off'}",
                res["s"],
                base_ms,
            )
            base_ms = base_ms or res["s"]["ms"]
    b.skip("5", "the engine's trainer step vs the bare loop", "the trainer is not driven step by step here")


# --- row 2 -------------------------------------------------------------------------------------------------
def row2(b: Bench, pipe, name: str) -> None:
    if not importlib.util.find_spec("gradio") or not importlib.util.find_spec("gradio_client"):
        b.skip("2", "/generate via gradio_client", "gradio/gradio_client not installed on this machine")
        return
    if not b.need(90, "2", "/generate via gradio_client (app start-up + runs)"):
        return
    import gradio as gr
    from gradio_client import Client
    from PIL import Image

    from tests.factories import AppProcess, free_port

    png = b.tmp / "one.png"
    Image.new("RGB", (b.size, b.size), "red").save(png)
    with gr.Blocks(analytics_enabled=False) as demo:
        btn = gr.Button()
        gallery = gr.Gallery(format="png")
        btn.click(lambda: [str(png)], None, gallery, api_name="one_png")
    demo.queue(api_open=False)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, allowed_paths=[str(b.tmp)])
    floor_client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    rt = b.measure({"rt": lambda: floor_client.predict(api_name="/one_png")}, 0.05, warmup=2)
    demo.close()
    extra = ("--device", "cuda", "--dtype", "float16") if b.cuda else ("--device", "cpu")
    app = AppProcess(b.tmp / "appdata", b.models, *extra).start(timeout=max(30, min(180, b.left() - 20)))
    try:
        client = Client(app.url, verbose=False)
        seed = [5000]

        def api_call():
            seed[0] += 1
            client.predict(
                prompt=PROMPT,
                negative_prompt="",
                model=name,
                steps=b.steps,
                width=b.size,
                height=b.size,
                cfg_scale=CFG,
                sampler="Euler",
                seed=seed[0],
                api_name="/generate",
            )

        res = b.measure({"bare": bare_call(b, pipe, 1), "api": api_call}, 0.5)
    finally:
        app.stop()
    floor = res["bare"]["ms"] + rt["rt"]["ms"]
    b.add("2", "Gradio one-PNG round trip (minimal app)", rt["rt"])
    b.add("2", "bare diffusers call (same run)", res["bare"])
    b.add(
        "2",
        "/generate via gradio_client vs bare + round trip (peak: this process only)",
        res["api"],
        floor,
        "target <= +40 ms",
    )


# --- report ------------------------------------------------------------------------------------------------
def machine(b: Bench) -> str:
    import platform
    from importlib.metadata import version

    import torch

    gpu = torch.cuda.get_device_name(0) if b.cuda else "no GPU (CPU smoke run)"
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = ", ".join(
        f"{p} {version(p)}"
        for p in ("diffusers", "transformers", "peft")
        if importlib.util.find_spec(p.replace("-", "_"))
    )
    return (
        f"{gpu}; {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if b.cuda else ''}, {libs}"
    )


def table(b: Bench) -> str:
    lines = [
        "| row | variant | n | median ms | vs baseline | added ms | peak GiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in b.rows:
        if "ms" not in r:
            lines.append(f"| {r['row']} | {r['variant']} | | | | | | {r['note']} |")
            continue
        ratio = f"{r['ratio']:.3f}x" if "ratio" in r else ""
        added = f"{r['added']:+.1f}" if "added" in r else ""
        peak = f"{r['peak']:.2f}" if r.get("peak") is not None else "n/a"
        lines.append(
            f"| {r['row']} | {r['variant']} | {r['n']} | {r['ms']:.1f} | {ratio} | {added} | {peak} | {r['note']} |"
        )
    return "\n".join(lines)


def section(b: Bench, argv: list[str]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python3 -m tests.benchmarks.gpu_bench " + " ".join(argv)
    setup = (
        f"{'Demo model (tiny, random weights)' if b.tiny else 'SD 1.5 architecture, random weights'}, "
        f"{'fp16' if b.cuda else 'fp32'}, {b.size}x{b.size}, {b.steps} steps, Euler, CFG {CFG:g}"
    )
    return (
        f"{HEADING}\n\nCommand: `{command.strip()}`\n\nMachine: {machine(b)}\n\nRun: {stamp}, "
        f"{time.monotonic() - b.started:.0f} s. {setup}. Medians of n runs after warm-up (n per row: fitted "
        f"to the time budget of {b.args.budget_s:.0f} s, at most {b.runs}); calls alternate within a row. "
        f"'vs baseline': against the row's first line (row 3: plain fp16 SDPA at batch 1). Peak: "
        f"torch.cuda.max_memory_allocated, reset before each call, largest call of the row.\n\n"
        + "".join(f"- {n}\n" for n in b.notes)
        + f"\n{table(b)}\n"
    )


def write_into(out: Path, text: str) -> None:
    """Replace (or append) the GPU section of BENCHMARKS.md, keeping every other section."""
    write_section(out, HEADING, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: demo model, 64 px, 2 steps")
    p.add_argument("--runs", type=int, default=10, help="most timed runs per variant")
    p.add_argument("--rows", default="1,3,4,5,2", help="rows to run, in this order")
    p.add_argument("--budget-s", type=float, default=400.0, help="time budget for the whole run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--section-file", type=Path, help="also write the section alone to this file")
    p.add_argument("--no-write", action="store_true", help="do not touch --out")
    p.add_argument("--merge", type=Path, help="write this section file into --out and exit")
    args = p.parse_args(argv)
    if args.merge:
        write_into(args.out, args.merge.read_text(encoding="utf-8"))
        print(f"wrote {args.out}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    b = Bench(args)
    if args.compile is None:
        args.compile = b.cuda
    pipe, _folder, name = prepare_model(b)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    steps = {
        "1": lambda: row1(b, pipe, name),
        "3": lambda: row3(b, pipe),
        "4": lambda: row4(b, pipe, name),
        "5": lambda: (row5_upscale(b), row5_train(b, pipe) if args.train else None),
        "2": lambda: row2(b, pipe, name),
    }
    failed = False
    for r in rows:
        if r not in steps:
            p.error(f"--rows: unknown row {r!r}; known: {', '.join(steps)}")
        if not b.need(5, r, "(whole row)"):
            continue
        try:
            steps[r]()
        except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others' figures
            failed = True
            traceback.print_exc()
            b.skip(r, "(rest of the row)", f"{type(e).__name__}: {e}"[:200])
        if args.section_file:  # after every row: a run stopped from outside keeps what it measured
            args.section_file.write_text(section(b, argv), encoding="utf-8")
    text = section(b, argv)
    print(text, flush=True)
    if args.section_file:
        args.section_file.write_text(text, encoding="utf-8")
    if not args.no_write:
        write_into(args.out, text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
