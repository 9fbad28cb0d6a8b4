from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factories import (
    AppProcess,
    build_tiny_sdxl,
    save_compact_upscaler,
    save_controlnet,
    save_diffusers_lora,
    save_embedding_pt,
    save_kohya_lora,
    save_loha,
    save_vae_file,
)
from tests.ldm_export import export_sd1_checkpoint, tiny_config_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder with the demo model and three LoRAs (kohya, diffusers, and a LoHa to refuse), a VAE,
    an embedding, a ControlNet, tiny SDXL models, a single-file checkpoint, upscalers (Compact, SD x4) and
    tiny video models (SVD, LTX-Video, an AnimateDiff motion adapter)."""
    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    root = tmp_path_factory.mktemp("models")
    ModelRoots(root).create_layout()
    model_dir = ensure_demo_model(root)
    save_kohya_lora(root / "loras" / "kohya_style.safetensors", model_dir, seed=1)
    save_diffusers_lora(root / "loras" / "peft_style.safetensors", model_dir, seed=2)
    save_loha(root / "loras" / "some_loha.safetensors")
    save_vae_file(root / "vae" / "tinyvae.safetensors", model_dir)
    save_embedding_pt(root / "embeddings" / "nova-style.pt")
    save_controlnet(root / "controlnet" / "tiny-canny", model_dir)
    build_tiny_sdxl().save_pretrained(root / "diffusers" / "tiny-sdxl")
    build_tiny_sdxl(refiner=True).save_pretrained(root / "diffusers" / "tiny-sdxl-refiner")
    export_sd1_checkpoint(model_dir, root / "checkpoints" / "demo-single.safetensors")
    save_compact_upscaler(root / "upscale_models" / "tiny-compact-x4.pth")
    from tests.upscale_factories import build_sd_x4
    from tests.video_factories import build_tiny_ltx, build_tiny_motion_adapter, build_tiny_svd

    build_sd_x4(root / "diffusers" / "tiny-sd-x4")
    build_tiny_svd(root / "diffusers" / "tiny-svd")
    build_tiny_ltx(root / "diffusers" / "tiny-ltx")
    build_tiny_motion_adapter(root / "animatediff_models" / "tiny-motion", model_dir)
    return root


@pytest.fixture(scope="session")
def model_configs(models_dir, tmp_path_factory) -> Path:
    """Per-family config folders for the tiny models (the demo's configs without weights, as "sd1"):
    single-file checkpoints load through exactly the code real ones use, with these instead of the
    shipped full-size configs."""
    root = tmp_path_factory.mktemp("model_configs")
    tiny_config_folder(models_dir / "diffusers" / "studionova-demo", root / "sd1")
    return root


@pytest.fixture(scope="session")
def studio(models_dir, model_configs, tmp_path_factory):
    """One in-process studio (worker thread, SQLite in a temp dir) shared by the engine tests."""
    from engine.settings import Settings
    from engine.studio import Studio

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        models_dir=models_dir,
        demo=True,
        device="cpu",
        model_configs=str(model_configs),
    )
    st = Studio.start(settings)
    yield st
    st.close()


@pytest.fixture(scope="session")
def app(models_dir, model_configs, tmp_path_factory):
    """The real app launched in a subprocess (shared by the API and browser tests)."""
    proc = AppProcess(
        tmp_path_factory.mktemp("appdata"),
        models_dir,
        "--max-upload-mb",
        "1",
        "--model-configs",
        str(model_configs),
    ).start()
    yield proc
    proc.stop()


def pytest_collection_modifyitems(config, items):
    if not Path("/usr/bin/chromium").exists():
        skip = pytest.mark.skip(reason="Debian chromium is not installed (.ci/run installs it)")
        for item in items:
            if "browser" in item.keywords and not os.environ.get("CI"):
                item.add_marker(skip)
