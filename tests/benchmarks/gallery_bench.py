"""Gallery benchmark: filtered pages over a 10,000-generation SQLite database, through the engine.

    .venv/bin/python -m tests.benchmarks.gallery_bench [--rows 10000] [--runs 50] [--page-size 50]

`bench_gallery(...) -> list[dict]` is what run_benchmarks.py calls; each dict is one table row.
Timed: `engine.gallery.records.gallery_page` (count + page query + thumbnail existence checks), with a fresh
session per call as the UI gets it. Target: median < 50 ms per page of 50.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

TARGET_MS = 50.0
MODELS = [
    "sd15-base",
    "dreamshaper-8",
    "realistic-vision-6",
    "anything-v5",
    "juggernaut-xl",
    "studionova-demo",
]
LORAS = [
    "film_grain",
    "watercolor",
    "mira_character",
    "detail_tweaker",
    "pixel_art",
    "neon_noir",
    "ink_sketch",
    "soft_light",
    "retro_anime",
    "clay",
]
CHARACTERS = ["mira", "jon", "ayla", "kestrel", "old_tom"]
MODES = ["txt2img"] * 85 + ["img2img"] * 10 + ["inpaint"] * 3 + ["outpaint"] * 2
SUBJECTS = [
    "a lighthouse at dusk",
    "portrait of a woman",
    "a red fox in snow",
    "cyberpunk street at night",
    "a bowl of ramen",
    "mountain lake, morning mist",
    "an old sailor",
    "a castle on a cliff",
    "a cat sleeping on books",
    "astronaut in a sunflower field",
    "a steam locomotive",
    "desert ruins",
]
STYLES = [
    "oil painting",
    "watercolor",
    "35mm photo",
    "studio lighting",
    "highly detailed",
    "anime style",
    "cinematic",
    "soft focus",
    "golden hour",
    "volumetric light",
    "ink drawing",
    "8k",
    "bokeh",
]
NEGATIVES = ["", "blurry, lowres", "bad hands, extra fingers", "watermark, text", "jpeg artifacts, cropped"]
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def seed_database(db, outputs: Path, rows: int, rng: random.Random) -> None:
    """`rows` generations with their assets and LoRA index rows over ~180 days; 5% in the trash."""
    from sqlalchemy import insert

    from engine.gallery.records import lora_names
    from engine.store.database import Asset, Generation, GenerationLora, new_id

    assets, gens, lora_rows = [], [], []
    for i in range(rows):
        created = NOW - timedelta(seconds=rng.randrange(180 * 86400))
        w, h = rng.choice([(512, 512), (512, 768), (768, 512), (1024, 1024), (832, 1216)])
        model = rng.choices(MODELS, weights=[30, 25, 20, 10, 10, 5])[0]
        loras = [
            {"name": n, "weight": round(rng.uniform(0.3, 1.0), 2), "hash": "0123456789ab"}
            for n in rng.sample(LORAS, rng.choices([0, 1, 2, 3], weights=[40, 35, 18, 7])[0])
        ]
        prompt = f"{rng.choice(SUBJECTS)}, " + ", ".join(rng.sample(STYLES, rng.randint(2, 6)))
        asset_id, gen_id = new_id(), new_id()
        path = outputs / created.strftime("%Y-%m-%d") / f"{gen_id[:12]}-{i % 4:03d}-{i}.png"
        assets.append(
            dict(
                id=asset_id,
                kind="image",
                path=str(path),
                sha256=f"{i:064x}",
                size=400_000,
                width=w,
                height=h,
                job_id=gen_id,
                created_at=created,
            )
        )
        gens.append(
            dict(
                id=gen_id,
                asset_id=asset_id,
                job_id=gen_id,
                mode=rng.choice(MODES),
                model=model,
                model_hash="abcdef0123",
                prompt=prompt,
                negative_prompt=rng.choice(NEGATIVES),
                seed=rng.randrange(2**32),
                steps=rng.choice([20, 25, 30]),
                cfg_scale=7.0,
                sampler="DPM++ 2M",
                width=w,
                height=h,
                denoising_strength=None,
                clip_skip=1,
                loras=loras,
                infotext=f"{prompt}\nSteps: 25, Sampler: DPM++ 2M, Seed: {i}",
                recipe={"seed": i, "loras": loras, "request": {"prompt": prompt}},
                created_at=created,
                character=rng.choice(CHARACTERS) if rng.random() < 0.2 else None,
                trashed_at=created + timedelta(days=1) if rng.random() < 0.05 else None,
            )
        )
        lora_rows += [dict(generation_id=gen_id, name=n) for n in lora_names(loras)]
    with db.engine.begin() as conn:
        conn.execute(insert(Asset), assets)
        conn.execute(insert(Generation), gens)
        conn.execute(insert(GenerationLora), lora_rows)


def scenarios(page_size: int) -> list[tuple[str, dict]]:
    from engine.gallery.records import GalleryQuery

    def q(**kw) -> GalleryQuery:
        return GalleryQuery(page_size=page_size, **kw)

    return [
        ("newest, no filter, page 1", q()),
        ("newest, no filter, page 150 (deep offset)", q(page=150)),
        ("oldest first", q(sort="oldest")),
        ("text 'lighthouse' (substring, prompt + negative)", q(text="lighthouse")),
        ("text 'CINEMATIC' (case-insensitive)", q(text="CINEMATIC")),
        ("model", q(model="dreamshaper-8")),
        ("LoRA", q(lora="watercolor")),
        ("character", q(character="mira")),
        ("mode img2img", q(mode="img2img")),
        ("date range (30 days)", q(date_from="2025-03-01", date_to="2025-03-30")),
        (
            "model + LoRA + text + dates",
            q(model="sd15-base", lora="film_grain", text="photo", date_from="2025-01-01"),
        ),
        ("trash view (only trashed)", q(only_trashed=True)),
        ("include trashed", q(include_trashed=True)),
    ]


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 1 else times[0]


def bench_gallery(
    rows: int = 10_000, runs: int = 50, page_size: int = 50, workdir: Path | None = None, seed: int = 0
) -> list[dict]:
    """Seed `rows` generations in a temp SQLite db, time `runs` page queries per filter scenario and once
    over all scenarios mixed; returns one dict per row: benchmark, runs, median_ms, p95_ms, matches,
    target, ok."""
    from engine.gallery.records import count_statement, ensure_thumbnail, gallery_page, page_statement
    from engine.store.database import Database

    tmp = Path(workdir or tempfile.mkdtemp(prefix="studionova-gallery-bench-"))
    db = Database(f"sqlite:///{tmp / 'gallery.db'}")
    try:
        db.create_all()
        seed_database(db, tmp / "outputs", rows, random.Random(seed))
        cases = scenarios(page_size)
        results = []

        def bare(query) -> None:  # baseline: the same two statements on a pooled SQLAlchemy Core connection
            with db.engine.connect() as conn:
                conn.execute(count_statement(query)).one()
                conn.execute(page_statement(query)).all()

        for name, query in cases:
            page = gallery_page(db, query)
            assert len(page.items) == min(page_size, max(0, page.total - (query.page - 1) * page_size)), name
            times = timed(lambda query=query: gallery_page(db, query), runs)
            base = timed(lambda query=query: bare(query), runs)
            results.append(
                dict(
                    benchmark=f"gallery page of {page_size}: {name}",
                    runs=runs,
                    median_ms=statistics.median(times),
                    p95_ms=p95(times),
                    matches=page.total,
                    bare_ms=statistics.median(base),
                )
            )
        mixed = [cases[i % len(cases)][1] for i in range(runs)]
        it = iter(mixed * 2)
        times = timed(lambda: gallery_page(db, next(it)), runs, warmup=0)
        results.insert(
            0,
            dict(
                benchmark=f"gallery: {runs} filtered pages of {page_size}, scenarios mixed",
                runs=runs,
                median_ms=statistics.median(times),
                p95_ms=p95(times),
                matches=rows,
            ),
        )
        for r in results:
            r.update(target=f"median < {TARGET_MS:g} ms", ok=r["median_ms"] < TARGET_MS)

        # One thumbnail from a 768x512 PNG: the first call decodes and encodes, later calls only stat.
        from PIL import Image

        image = tmp / "outputs" / "thumb-source.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((768, 512), 64).convert("RGB").save(image)

        def cold() -> None:
            for p in (image.parent / "thumbs").glob("*.webp"):
                p.unlink()
            ensure_thumbnail(image)

        for label, fn in (
            ("first call (decode 768x512 PNG, write WebP)", cold),
            ("already made (stat only)", lambda: ensure_thumbnail(image)),
        ):
            times = timed(fn, max(5, runs // 5), warmup=1)
            results.append(
                dict(
                    benchmark=f"ensure_thumbnail, {label}",
                    runs=len(times),
                    median_ms=statistics.median(times),
                    p95_ms=p95(times),
                    matches=1,
                    target="report",
                    ok=True,
                )
            )
        return results
    finally:
        db.dispose()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| benchmark | runs | median ms | p95 ms | bare SQL median ms | ratio | matches | target | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        bare = f"{r['bare_ms']:.1f} | {r['median_ms'] / r['bare_ms']:.2f}x" if r.get("bare_ms") else "- | -"
        lines.append(
            f"| {r['benchmark']} | {r['runs']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {bare} | "
            f"{r['matches']} | {r['target']} | {'PASS' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--page-size", type=int, default=50)
    args = parser.parse_args()
    t = time.perf_counter()
    results = bench_gallery(args.rows, args.runs, args.page_size)
    print(markdown_table(results))
    print(f"({args.rows} rows seeded and measured in {time.perf_counter() - t:.1f} s)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
