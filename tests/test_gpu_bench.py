"""The GPU benchmark (tests/benchmarks/gpu_bench.py, issue 23) keeps running: a tiny CPU pass of every row
that needs no GPU or launched app (demo model, 64 px, 2 steps, batch 1 and 2, one timed run each), its section written to a
temporary BENCHMARKS.md beside the other sections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.run_benchmarks import GPU_HEADING, UPSCALE_HEADING

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_gpu_bench_tiny_cpu_pass(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\nkept\n\n{UPSCALE_HEADING}\n\nkept too\n", encoding="utf-8")
    section = tmp_path / "section.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.benchmarks.gpu_bench",
            "--tiny",
            "--runs",
            "1",
            "--rows",
            "1,3,4,5",
            "--budget-s",
            "600",
            "--out",
            str(out),
            "--section-file",
            str(section),
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = section.read_text(encoding="utf-8")
    assert text.startswith(GPU_HEADING)
    for variant in (
        "| 1 (batch 1) | engine generate via Studio",
        "| 1 (batch 2) | bare diffusers call | 1 |",
        "| 3 | channels_last (UNet + VAE) | 1 |",
        "| 3 | a full VAE-decode preview at every step (2) | 1 |",
        "| 3 | VAE decode 128 px tiled (enable_tiling) | 1 |",
        "| 4 | switch two loaded rank-16 LoRAs (set_adapters) | 1 |",
        "| 5 | upscale 128 -> 512 px tile 64",
        "| 5 | train step rank 16, 64 px, batch 1, autocast bf16, gradient checkpointing on | 1 |",
    ):
        assert variant in text, variant
    assert "not measured: Error" not in text and "(rest of the row)" not in text
    merged = out.read_text(encoding="utf-8")
    assert "kept too" in merged and merged.count(GPU_HEADING) == 1
    assert merged.index(UPSCALE_HEADING) < merged.index(GPU_HEADING)
