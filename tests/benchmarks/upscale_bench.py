"""Upscaling benchmark (issue 8): tiling cost and memory of engine.upscale.upscalers on the CPU.

    .venv/bin/python -m tests.benchmarks.upscale_bench            (prints the rows, writes nothing)

Row 1: realesr-general-x4v3's architecture (SRVGGNetCompact, 64 features, 32 convs; random weights from
tests/upscale_factories.py) on one 512x512 image: `tile_upscale` at tile 256 with the default pad 16 and
overlap 16 (2 x 2 cells; at the default tile 512 this image would run untiled) vs tile 0 (one pass). Median of
RUNS runs each after one warm-up each, the two alternating; target <= 1.15x the untiled time.
Rows 2-5: memory. Each configuration runs `upscale_image` in a fresh subprocess. The model's own call is
wrapped: before each tile the process's peak RSS is reset (/proc/self/clear_refs = 5) and the peak during
the call minus the RSS before it is that tile's activation memory (inputs, every layer's features, the
tile's output); the row shows the largest. The output buffers are computed, not measured: float32 sum
(3 channels) + float32 weight + uint8 result = 19 bytes per output pixel. The model is SRVGGNetCompact at
x4v3's width (64 features) with 2 body convs: per pixel it holds the same features at once as x4v3 (layers
run one after another), at a tenth of the time. 512 -> 2048 and 1024 -> 4096 at tile 256 show the activation
peak does not grow with the image; 1024 -> 4096 at tile 128 shows it follows the tile; 512 -> 2048
untiled is the contrast.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Upscaling (issue 8)"
COMMAND = ".venv/bin/python -m tests.benchmarks.run_benchmarks --only upscale"
RUNS = 3
SPEED_SIZE = 512
SPEED_TILE = 256
SPEED_TARGET = 1.15
MEMORY_CASES = ((512, 256), (1024, 256), (1024, 128), (512, 0))  # (input side, tile); 4x model
OUTPUT_BYTES_PER_PX = 3 * 4 + 4 + 3

_MEMORY_CHILD = r"""
import json, re, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from spandrel import ImageModelDescriptor
from engine.device import DevicePlan
from engine.upscale.upscalers import UpscalerCache, upscale_image

model_path, side, tile = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def status():
    text = open("/proc/self/status").read()
    return (int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024,
            int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

cache = UpscalerCache()
model = cache.get(model_path, DevicePlan(device="cpu", dtype="float32"))
weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
real_call = ImageModelDescriptor.__call__
tiles = []

def measured(self, x):
    before, _ = status()
    reset_peak()
    out = real_call(self, x)
    tiles.append(status()[1] - before)
    return out

ImageModelDescriptor.__call__ = measured
base, _ = status()
reset_peak()
t = time.perf_counter()
out = upscale_image(image, model_path, scale=4.0, cache=cache, tile=tile)
seconds = time.perf_counter() - t
_, peak = status()
assert out.size == (side * 4, side * 4)
print(json.dumps({"activation": max(tiles), "tiles": len(tiles), "run_peak": peak - base, "weights": weights,
                  "seconds": seconds}))
"""


def _models(folder: Path) -> tuple[Path, Path]:
    from tests.upscale_factories import save_compact

    return save_compact(folder / "realesr-general-x4v3.pth"), save_compact(
        folder / "compact-64nf-2nc.pth", num_conv=2
    )


def bench_speed(model_path: Path, runs: int = RUNS) -> dict:
    import torch

    from engine.device import DevicePlan
    from engine.upscale.upscalers import UpscalerCache, tile_upscale

    model = UpscalerCache().get(model_path, DevicePlan(device="cpu", dtype="float32"))
    torch.manual_seed(0)
    x = torch.rand(1, 3, SPEED_SIZE, SPEED_SIZE)
    tiled, untiled = [], []
    for i in range(runs + 1):
        t = time.perf_counter()
        a = tile_upscale(model, x, tile=SPEED_TILE)
        tiled_s = time.perf_counter() - t
        t = time.perf_counter()
        b = tile_upscale(model, x, tile=0)
        untiled_s = time.perf_counter() - t
        if i:  # the first pair warms up
            tiled.append(tiled_s)
            untiled.append(untiled_s)
    seam = float((a - b).abs().max())
    return {
        "tiled": statistics.median(tiled),
        "untiled": statistics.median(untiled),
        "seam": seam,
        "runs": runs,
    }


def bench_memory(model_path: Path, side: int, tile: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(model_path), str(side), str(tile)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {side} px tile {tile} failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data.update(side=side, tile=tile, output=OUTPUT_BYTES_PER_PX * (side * 4) ** 2)
    return data


def bench_upscale(runs: int = RUNS) -> dict:
    with tempfile.TemporaryDirectory(prefix="upscale-bench-") as tmp:
        x4v3, narrow = _models(Path(tmp))
        speed = bench_speed(x4v3, runs)
        memory = [bench_memory(narrow, side, tile) for side, tile in MEMORY_CASES]
    return {"speed": speed, "memory": memory}


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def rows(data: dict) -> list[dict]:
    s = data["speed"]
    ratio = s["tiled"] / s["untiled"]
    out = [
        dict(
            benchmark=f"1. realesr-general-x4v3 arch, {SPEED_SIZE} px -> {SPEED_SIZE * 4} px: tile {SPEED_TILE} "
            f"(pad 16, overlap 16; 2x2 cells) vs untiled (median s of {s['runs']}, interleaved; "
            f"max abs diff {s['seam']:.1e})",
            ours=f"{s['tiled']:.2f}",
            base=f"{s['untiled']:.2f}",
            ratio=f"{ratio:.2f}x",
            target=f"<= {SPEED_TARGET}x",
            ok=ratio <= SPEED_TARGET,
        ),
    ]
    tiled = [m for m in data["memory"] if m["tile"]]
    for n, m in enumerate(data["memory"], start=2):
        out.append(
            dict(
                benchmark=f"{n}. memory {m['side']} -> {m['side'] * 4} px, "
                f"{'tile ' + str(m['tile']) if m['tile'] else 'untiled'} ({m['tiles']} model call"
                f"{'s' if m['tiles'] > 1 else ''}, {m['seconds']:.0f} s; weights {m['weights'] / 2**10:.0f} KiB): "
                "activation peak of one tile / output buffers (computed) / whole-run peak",
                ours=_mb(m["activation"]),
                base=_mb(m["output"]),
                ratio=_mb(m["run_peak"]),
                target="activation flat in image size (within 1.5x), smaller at a smaller tile"
                if m["tile"]
                else "contrast",
                ok=True,
            )
        )
    same_tile = [m for m in tiled if m["tile"] == MEMORY_CASES[0][1]]
    if len(same_tile) >= 2:
        flat = max(m["activation"] for m in same_tile) <= 1.5 * min(m["activation"] for m in same_tile)
        by_tile = {m["tile"]: m["activation"] for m in tiled if m["side"] == 1024}
        grows = len(by_tile) < 2 or by_tile[max(by_tile)] > by_tile[min(by_tile)]
        for r in out[1:]:
            if "untiled" not in r["benchmark"]:
                r["ok"] = flat and grows
    return out


def markdown_table(results: list[dict]) -> str:
    lines = ["| benchmark | ours | baseline | ratio | target | result |", "|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(
            f"| {r['benchmark']} | {r['ours']} | {r['base']} | {r['ratio']} | {r['target']} | "
            f"{'PASS' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def _machine() -> str:
    from tests.benchmarks.run_benchmarks import machine

    return machine()


def bench_upscale_section(runs: int = RUNS) -> str:
    """The BENCHMARKS.md section: heading, command, machine, what was measured, the table."""
    from datetime import UTC, datetime

    started = time.perf_counter()
    data = bench_upscale(runs)
    table = markdown_table(rows(data))
    print(table)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = (__doc__ or "").split("Row 1:", 1)[1].strip()
    return (
        f"{HEADING}\n\nCommand: `{COMMAND}` (or `.venv/bin/python -m tests.benchmarks.upscale_bench`)\n\n"
        f"Machine: {_machine()}\n\nRun: {stamp}, {time.perf_counter() - started:.0f} s.\n\nRow 1: {doc}\n\n"
        "Memory columns: ours = activation peak of one tile, baseline = output buffers (computed), ratio = "
        "whole-run peak RSS above the loaded model and input (includes the output buffers and the final "
        "uint8/PIL conversion).\n\n"
        f"{table}\n"
    )


def main() -> int:
    print(markdown_table(rows(bench_upscale())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
