"""LoRA training benchmark (issue 6): StudioNOVA's trainer vs a bare diffusers + peft loop.

    .venv/bin/python -m tests.benchmarks.run_benchmarks --only training
    .venv/bin/python -m tests.benchmarks.training_bench            (prints the rows, writes nothing)

Same tiny model (the demo model), same 4 random 64x64 images and captions, same settings on both sides:
rank 4, alpha 4, UNet attention targets, 64 px, batch 1, AdamW (weight decay 1e-2), constant LR 1e-4,
grad-norm clip 1.0, MSE on epsilon, timesteps uniform over the scheduler's range, latents cached.

Row 1: per-step time of `engine.training.trainer.train_lora` with checkpoints every 10 steps, no samples
(sample_every=0) and its per-step progress events fed through the job's path (train_job's 2/s throttle,
then an EventBus publish and a Job row progress update at most once a second, as `JobService` does), against
the bare loop written below. Row 2: `train_lora` with cache_latents off vs on (report).

Every run is a fresh subprocess (`--worker`), one at a time, with torch.set_num_threads(THREADS) before any
work; ours and the bare loop alternate, REPEATS runs each. A run's step time is the mean interval between its
per-step timestamps after the first WARMUP_STEPS steps (model loading, latent caching and the first steps are
outside it on both sides; the checkpoints at steps 10, 20, 30 are inside it for ours); the table shows the
median over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 40
WARMUP_STEPS = 5
REPEATS = 3
# One torch thread per side. With 2 threads on this 2-core VM, any other load on the machine (a test suite)
# makes OpenMP's barriers spin: steps of 150 ms turned into 1-10 s, CPU time included. 1 thread stays steady.
THREADS = int(os.environ.get("TRAINING_BENCH_THREADS", "1"))
CHECKPOINT_EVERY = 10
RANK, ALPHA, LR, SEED = 4, 4.0, 1e-4, 42
TARGET = 1.10
# Observed by hand (kept with the section when it is rewritten).
NOTE = (
    " Noise (hand-written, 2026-12-01): another engineer's pytest suite (with an `app.py --demo` subprocess) ran "
    "on this VM during these runs, load average 1.7-4.7. With torch.set_num_threads(2) on both sides the step "
    "gaps jumped from about 150 ms to 1-10 s at random (process CPU time too: OpenMP barriers spinning while the "
    "other thread waits for a core), e.g. one trial read ours 171 vs bare 1540 ms/step, so the ratio said "
    "nothing; with 1 thread the gaps stay within about 150-320 ms. Trials with 1 thread before this run: ours "
    "209 vs bare 215 ms/step (0.97x), cache off 253; a full run just before this one: row 1 0.988x, 1b 0.950x, "
    "row 2 1.108x. So the plain-step ratio (1b) moves between about 0.95x and 1.04x here, both sides drifting "
    "with the other load. A checkpoint adds about 100 ms to its step (3 in the 35 timed steps). Set "
    "TRAINING_BENCH_THREADS=2 to measure with both cores on a quiet machine."
)
CAPTIONS = [
    "nova, a red lighthouse",
    "nova, a city at night",
    "nova, portrait, smiling",
    "nova, a forest path",
]


def prepare(root: Path) -> tuple[Path, list[dict]]:
    """The demo model and 4 random 64x64 PNGs with captions."""
    import numpy as np
    from PIL import Image

    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    models = root / "models"
    ModelRoots(models).create_layout()
    model_dir = ensure_demo_model(models)
    rng = np.random.default_rng(7)
    images = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS):
        path = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        images.append({"path": str(path), "caption": caption})
    return model_dir, images


# --- workers (each in its own process) ----------------------------------------------------------------


def worker_ours(model_dir: Path, images: list[dict], work: Path, steps: int, cache: bool) -> dict:
    from engine.jobs.events import EventBus
    from engine.jobs.service import PROGRESS_DB_INTERVAL_S
    from engine.store.database import Database, Job
    from engine.training.job import EMIT_INTERVAL_S
    from engine.training.trainer import TrainLoraRequest, train_lora

    req = TrainLoraRequest.build(
        model="studionova-demo",
        model_path=str(model_dir),
        images=images,
        output_name="bench",
        rank=RANK,
        alpha=ALPHA,
        learning_rate=LR,
        resolution=64,
        batch_size=1,
        optimizer="adamw",
        lr_scheduler="constant",
        max_train_steps=steps,
        checkpoint_every=CHECKPOINT_EVERY,
        sample_every=0,
        cache_latents=cache,
        seed=SEED,
    )
    # the job's sink: JobService._execute's emit (bus + Job.progress at most once a second)
    db = Database(f"sqlite:///{work / 'jobs.db'}")
    db.create_all()
    with db.session() as s:
        job = Job(kind="train_lora", status="running", request={})
        s.add(job)
        s.commit()
        job_id = job.id
    bus = EventBus()
    watcher = bus.subscribe(job_id)
    last_db = [0.0]

    def job_emit(event: dict) -> None:
        from sqlmodel import update

        event = {"type": "progress", "job_id": job_id, **event}
        bus.publish(job_id, event)
        stored = {k: v for k, v in event.items() if k in ("step", "total", "eta", "desc")}
        now = time.monotonic()
        if now - last_db[0] >= PROGRESS_DB_INTERVAL_S:
            last_db[0] = now
            with db.session() as s:
                s.execute(update(Job).where(Job.id == job_id).values(progress=stored))
                s.commit()

    # run_train_job's emit: losses kept, events throttled to EMIT_INTERVAL_S (the last step always)
    stamps: list[float] = []
    cpu: list[float] = []
    losses: list[float] = []
    last = [0.0]

    def emit(event: dict) -> None:
        if "loss" in event:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            losses.append(float(event["loss"]))
        now = time.monotonic()
        if event.get("step") == event.get("total") or now - last[0] >= EMIT_INTERVAL_S or "step" not in event:
            last[0] = now
            job_emit({k: v for k, v in event.items() if k != "type"} if "step" in event else event)

    result = train_lora(req, work / "run", emit, lambda: False, device="cpu")
    assert result["steps"] == steps and len(stamps) == steps, (result["steps"], len(stamps))
    forwarded = watcher.qsize()
    db.engine.dispose()
    return {
        "stamps": stamps,
        "cpu": cpu,
        "losses": losses,
        "forwarded": forwarded,
        "checkpoints": len(list((work / "run" / "checkpoints").glob("step-*"))),
    }


def worker_bare(model_dir: Path, images: list[dict], steps: int) -> dict:
    """What a user writes with diffusers + peft alone (diffusers' train_text_to_image_lora.py, trimmed)."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **kw)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **kw)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(SEED)
    unet.add_adapter(
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    latents_cache = []
    with torch.no_grad():
        for item in images:
            img = Image.open(item["path"]).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents_cache.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
    order = random.Random(SEED)
    unet.train()
    stamps, cpu, losses = [], [], []
    for _ in range(steps):
        k = order.randrange(len(images))
        latents = latents_cache[k]
        ids = tokenizer(
            [images[k]["caption"]],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, embeds, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    return {"stamps": stamps, "cpu": cpu, "losses": losses}


# --- driver -------------------------------------------------------------------------------------------


def step_ms(stamps: list[float]) -> tuple[float, float]:
    """(mean, median) ms between consecutive steps after the warm-up steps."""
    gaps = [(b - a) * 1000 for a, b in zip(stamps[WARMUP_STEPS - 1 :], stamps[WARMUP_STEPS:], strict=False)]
    return statistics.fmean(gaps), statistics.median(gaps)


def run_worker(kind: str, model_dir: Path, images_json: Path, work: Path, steps: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}
    cmd = [
        sys.executable,
        "-m",
        "tests.benchmarks.training_bench",
        "--worker",
        kind,
        "--model",
        str(model_dir),
        "--images",
        str(images_json),
        "--work",
        str(work),
        "--steps",
        str(steps),
    ]
    t = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600
    )
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    out["mean_ms"], out["median_ms"] = step_ms(out["stamps"])
    out["cpu_ms"] = step_ms(out["cpu"])[0]
    out["setup_s"] = out["stamps"][0] - out.pop("t0")
    return out


def bench_training(steps: int = STEPS, repeats: int = REPEATS, workdir: Path | None = None) -> dict:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="studionova-training-bench-"))
    try:
        model_dir, images = prepare(tmp)
        images_json = tmp / "images.json"
        images_json.write_text(json.dumps(images), encoding="utf-8")
        runs: dict[str, list[dict]] = {"ours": [], "bare": [], "ours-nocache": []}
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        for r in range(repeats):  # interleaved: drift hits every side alike
            for kind in runs:
                runs[kind].append(run_worker(kind, model_dir, images_json, tmp / f"{kind}-{r}", steps))
        loads = [load_before, os.getloadavg()[0]]
        return {
            "runs": runs,
            "seconds": time.perf_counter() - started,
            "load": loads,
            "steps": steps,
            "repeats": repeats,
        }
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def rows(data: dict) -> list[dict]:
    med = {k: statistics.median(r["mean_ms"] for r in v) for k, v in data["runs"].items()}
    med_gap = {k: statistics.median(r["median_ms"] for r in v) for k, v in data["runs"].items()}
    ratio = med["ours"] / med["bare"]
    return [
        dict(
            benchmark=f"1. per-step time, `train_lora` (cached latents, checkpoint every {CHECKPOINT_EVERY}, "
            "no samples, job-throttled progress) vs bare diffusers + peft loop",
            ours=med["ours"],
            base=med["bare"],
            ratio=ratio,
            target=f"<= {TARGET:.2f}x",
            ok=ratio <= TARGET,
        ),
        dict(
            benchmark="1b. same runs, median single-step gap (checkpoint steps fall out)",
            ours=med_gap["ours"],
            base=med_gap["bare"],
            ratio=med_gap["ours"] / med_gap["bare"],
            target="report",
            ok=True,
        ),
        dict(
            benchmark="2. `train_lora` per-step time, cache_latents off vs on (VAE encode every step)",
            ours=med["ours-nocache"],
            base=med["ours"],
            ratio=med["ours-nocache"] / med["ours"],
            target="report",
            ok=True,
        ),
    ]


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| benchmark | ours (ms/step) | baseline (ms/step) | ratio | target | result |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['benchmark']} | {r['ours']:.1f} | {r['base']:.1f} | {r['ratio']:.3f}x | {r['target']} | "
            f"{'PASS' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def per_run_line(data: dict) -> str:
    parts = []
    for kind, label in (("ours", "ours"), ("bare", "bare"), ("ours-nocache", "ours, cache off")):
        parts.append(
            f"{label} " + " / ".join(f"{r['mean_ms']:.0f} ({r['cpu_ms']:.0f})" for r in data["runs"][kind])
        )
    return "; ".join(parts)


def bench_training_section(args, write_section, heading: str, machine: str) -> bool:
    from datetime import UTC, datetime

    data = bench_training()
    results = rows(data)
    table = markdown_table(results)
    print(table)
    print("per run, mean ms/step (CPU ms/step):", per_run_line(data))
    ours = data["runs"]["ours"][0]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_section(
        args.out,
        heading,
        (
            f"{heading}\n\nCommand: `.venv/bin/python -m tests.benchmarks.run_benchmarks --only training`\n\n"
            f"Machine: {machine}; the training runs below use {THREADS} torch thread(s)\n\nRun: {stamp}, {data['seconds']:.0f} s for {3 * data['repeats']} training runs. "
            f"Demo model (random weights), 4 random 64x64 PNGs with captions, rank {RANK}, alpha {ALPHA:g}, UNet "
            f"attention targets, 64 px, batch 1, AdamW, constant LR {LR:g}, {data['steps']} steps, "
            f"torch.set_num_threads({THREADS}) (and OMP_NUM_THREADS={THREADS}) on both sides. Each run is a fresh "
            f"subprocess; ours, bare and ours-without-cache alternate, {data['repeats']} runs each. A run's step "
            f"time is the mean gap between its per-step timestamps after step {WARMUP_STEPS} (loading and latent "
            "caching excluded on both sides); the table shows the median over the runs.\n\n"
            f"Ours: `engine.training.trainer.train_lora` with checkpoint_every={CHECKPOINT_EVERY} (LoRA weights, optimizer, "
            "scheduler and RNG state, fsynced; the ones at steps 10, 20 and 30 fall inside the timed window), "
            "sample_every=0 (no sample renders: a 20-step render would dominate a 64 px step), and every step's "
            "progress event passed through the job's own path: `run_train_job`'s 2/s throttle, then an EventBus "
            f"publish and a Job row progress update at most once a second ({ours['forwarded']} of "
            f"{data['steps']} events forwarded, {ours['checkpoints']} checkpoints kept). "
            "Baseline: a loop written with diffusers + peft only: the same folder's tokenizer, text encoder, VAE, "
            "UNet and DDPMScheduler, `unet.add_adapter(LoraConfig(same r/alpha/targets, gaussian init))`, AdamW "
            "(weight decay 1e-2) over the LoRA parameters, diffusers' constant scheduler, latents cached before "
            "the loop, captions encoded every step, MSE on epsilon at uniform timesteps, grad-norm clip 1.0; no "
            "checkpoints. Row 2 is ours with cache_latents=False (image load + VAE encode every step) over ours "
            f"with it on.\n\n{table}\n\nPer run, in run order, mean wall ms/step (process CPU ms/step): "
            f"{per_run_line(data)}. 1-minute load average before / after the runs: {data['load'][0]:.2f} / "
            f"{data['load'][1]:.2f} on {os.cpu_count()} cores.{NOTE}\n"
        ),
    )
    return all(r["ok"] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=["ours", "bare", "ours-nocache"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if not args.worker:
        data = bench_training(args.steps)
        print(markdown_table(rows(data)))
        print("per run, mean ms/step (CPU ms/step):", per_run_line(data))
        return 0
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the stamps
    import torch

    torch.set_num_threads(THREADS)
    images = json.loads(args.images.read_text(encoding="utf-8"))
    if args.worker == "bare":
        out = worker_bare(args.model, images, args.steps)
    else:
        out = worker_ours(args.model, images, args.work, args.steps, cache=args.worker == "ours")
    print(json.dumps({**out, "t0": t0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
