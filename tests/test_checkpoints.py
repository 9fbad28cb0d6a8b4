"""Single-file checkpoints: safe reading (code pickles refused), family detection on each family's key
layout, scanning with cached hashes, and offline loading that renders like the diffusers folder."""

from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import InputError
from engine.gallery.infotext import parse_infotext
from engine.model_manager import checkpoints
from engine.model_manager.checkpoints import (
    CheckpointInfo,
    config_folder,
    inspect_checkpoint,
    read_state_dict,
)
from engine.paths import SHIPPED_CONFIGS
from tests.test_generate import pixels, run

U = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD2_TE = "cond_stage_model.model.transformer.resblocks.0.ln_1.weight"
V2_KEY = U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
XL_TE1 = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
REFINER_TE = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"


def layout(family: str) -> dict[str, tuple[int, ...]]:
    """The keys (tiny tensors) by which each family is recognised, as in the real checkpoints."""
    base = {
        U + "input_blocks.0.0.weight": (8, 4, 3, 3),
        U + "output_blocks.11.0.skip_connection.weight": (4, 8, 1, 1),
        "first_stage_model.decoder.conv_out.weight": (3, 4, 3, 3),
    }
    extra = {
        "sd1": {SD1_TE: (8,), V2_KEY: (8, 768)},
        "sd1-inpaint": {SD1_TE: (8,), U + "input_blocks.0.0.weight": (8, 9, 3, 3)},
        "sd2": {SD2_TE: (8,), V2_KEY: (8, 1024)},
        "sdxl": {XL_TE1: (8,), XL_TE2: (8,), V2_KEY: (8, 2048)},
        "sdxl-refiner": {REFINER_TE: (8,), V2_KEY: (8, 1280)},
    }[family]
    return {**base, **extra}


def write(path, family: str, *, metadata: dict | None = None, extra_keys: dict | None = None):
    shapes = {**layout(family), **(extra_keys or {})}
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "family,name,meta,extra,expected,prediction",
    [
        ("sd1", "v1-5-pruned.safetensors", None, None, "SD1.x", "epsilon"),
        ("sd1-inpaint", "sd-inpainting.safetensors", None, None, "SD1.x inpainting", "epsilon"),
        ("sd2", "v2-1_768-ema-pruned.safetensors", None, None, "SD2.x (v-prediction)", "v_prediction"),
        ("sd2", "sd_turbo.safetensors", None, None, "SD-Turbo", "epsilon"),
        ("sdxl", "sd_xl_base_1.0.safetensors", None, None, "SDXL", "epsilon"),
        ("sdxl", "sdxl_turbo_1.0_fp16.safetensors", None, None, "SDXL-Turbo", "epsilon"),
        ("sdxl", "noob.safetensors", None, {"v_pred": ()}, "SDXL (v-prediction)", "v_prediction"),
        (
            "sdxl",
            "merge.safetensors",
            {"modelspec.prediction_type": "v"},
            None,
            "SDXL (v-prediction)",
            "v_prediction",
        ),
        ("sdxl", "anime-vpred-v1.safetensors", None, None, "SDXL (v-prediction)", "v_prediction"),
        ("sdxl-refiner", "sd_xl_refiner_1.0.safetensors", None, None, "SDXL refiner", "epsilon"),
    ],
)
def test_family_detection_from_key_layout(tmp_path, family, name, meta, extra, expected, prediction):
    info = inspect_checkpoint(write(tmp_path / name, family, metadata=meta, extra_keys=extra))
    assert (info.family, info.prediction_type) == (expected, prediction)
    assert CheckpointInfo.decode(info.encode()) == info and len(info.encode()) <= 64


def test_a1111_sidecar_yaml_sets_prediction_type(tmp_path):
    path = write(tmp_path / "sd21-512-base.safetensors", "sd2")
    (tmp_path / "sd21-512-base.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert inspect_checkpoint(path).prediction_type == "epsilon"
    (tmp_path / "sd21-512-base.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert inspect_checkpoint(path).prediction_type == "v_prediction"


def test_not_a_checkpoint_is_named(tmp_path):
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)},
        str(tmp_path / "oops.safetensors"),
    )
    with pytest.raises(
        InputError, match=r"oops\.safetensors is not a Stable Diffusion checkpoint.*models/loras"
    ):
        inspect_checkpoint(tmp_path / "oops.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 32)
    with pytest.raises(InputError, match="broken.safetensors"):
        inspect_checkpoint(tmp_path / "broken.safetensors")


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))  # unpickling this creates the sentinel file


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_with_code_is_refused_before_it_runs(tmp_path, suffix):
    sentinel = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {U + "x": torch.zeros(1)}, "payload": _Payload(sentinel)}, str(path))
    assert not sentinel.exists()
    with pytest.raises(
        InputError, match=rf"evil\{suffix} is a pickle that needs code.*allowed: \.safetensors"
    ):
        read_state_dict(path)
    with pytest.raises(InputError):
        inspect_checkpoint(path)
    assert not sentinel.exists()


def test_tensor_only_ckpt_reads_and_unwraps_state_dict(tmp_path):
    sd = {k: torch.zeros(s) for k, s in layout("sd1").items()}
    torch.save({"state_dict": sd, "global_step": 7}, str(tmp_path / "old.ckpt"))
    got = read_state_dict(tmp_path / "old.ckpt")
    assert set(got) == set(sd)
    assert inspect_checkpoint(tmp_path / "old.ckpt").family == "SD1.x"
    with pytest.raises(InputError, match=r"unsupported weights file type '\.gguf'"):
        read_state_dict(tmp_path / "model.gguf")


def test_shipped_config_folders_read_as_their_families():
    labels = {
        name: checkpoints.folder_family(SHIPPED_CONFIGS / name)
        for name in ("sd1", "sd2", "sdxl", "sdxl-refiner")
    }
    assert labels == {
        "sd1": "SD1.x",
        "sd2": "SD2.x (v-prediction)",
        "sdxl": "SDXL",
        "sdxl-refiner": "SDXL refiner",
    }


def test_config_folder_patches_variants_and_builds_clip_vocab(tmp_path, model_configs):
    shipped = SHIPPED_CONFIGS
    if (shipped / "sd1" / "model_index.json").is_file():
        folder = config_folder(checkpoints.describe("inpainting", "epsilon", False, "t"), shipped, tmp_path)
        assert json.loads((folder / "unet/config.json").read_text())["in_channels"] == 9
        assert (
            json.loads((folder / "model_index.json").read_text())["_class_name"]
            == "StableDiffusionInpaintPipeline"
        )
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        assert len(tok) == 49408 and tok("a photo of a cat").input_ids == [
            49406,
            320,
            1125,
            539,
            320,
            2368,
            49407,
        ]
    turbo = config_folder(checkpoints.describe("v1", "v_prediction", True, "t"), model_configs, tmp_path)
    sched = json.loads((turbo / "scheduler/scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["timestep_spacing"]) == ("v_prediction", "trailing")
    assert (
        config_folder(checkpoints.describe("v1", "v_prediction", True, "t"), model_configs, tmp_path) == turbo
    )
    with pytest.raises(InputError, match="Playground v2.5 cannot be loaded yet; loadable: SD1.x"):
        config_folder(checkpoints.describe("playground-v2-5", "epsilon", False, "t"), model_configs, tmp_path)


# --- through the studio -----------------------------------------------------------------------
def test_scan_lists_family_size_and_cached_hashes(studio, models_dir, monkeypatch):
    path = models_dir / "checkpoints" / "demo-single.safetensors"
    rows = {r["name"]: r for r in studio.model_inventory() if r["kind"] == "checkpoints"}
    row = rows["demo-single.safetensors"]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (row["family"], row["sha256"], row["short_hash"], row["size"]) == (
        "SD1.x",
        sha,
        sha[:10],
        path.stat().st_size,
    )

    def boom(p):
        raise AssertionError("rescanned an unchanged file")

    monkeypatch.setattr(checkpoints, "inspect_checkpoint", boom)
    monkeypatch.setattr("engine.artifacts.sha256_file", boom)
    again = studio.model_inventory()
    assert {r["name"]: r for r in again if r["kind"] == "checkpoints"}["demo-single.safetensors"] == row
    assert "demo-single.safetensors" in [n for _, n in studio.model_choices()]
    families = {(r["kind"], r["name"]): r["family"] for r in again}
    assert families[("diffusers", "studionova-demo")] == "SD1.x · demo, random weights"
    assert (
        families[("diffusers", "tiny-sdxl")] == "SDXL"
        and families[("diffusers", "tiny-sdxl-refiner")] == "SDXL refiner"
    )
    assert ("controlnet", "tiny-canny") in families


def test_single_file_checkpoint_loads_offline_and_renders_like_its_folder(studio, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access while loading a single-file checkpoint")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    base = dict(seed=11, steps=2)
    folder = run(studio, **base)
    single = run(studio, model="demo-single.safetensors", **base)
    assert (pixels(single) == pixels(folder)).all()
    info = parse_infotext(single["images"][0]["infotext"])
    sha = hashlib.sha256((studio.settings.models_dir / "checkpoints/demo-single.safetensors").read_bytes())
    assert (info["Model"], info["Model hash"]) == ("demo-single", sha.hexdigest()[:10])


def test_code_pickle_checkpoint_is_refused_by_generate(studio, models_dir, tmp_path):
    sentinel = tmp_path / "pwned"
    path = models_dir / "checkpoints" / "evil.ckpt"
    torch.save({"state_dict": {U + "x": torch.zeros(1)}, "payload": _Payload(sentinel)}, str(path))
    try:
        rows = {r["name"]: r for r in studio.model_inventory() if r["kind"] == "checkpoints"}
        assert "needs code" in rows["evil.ckpt"]["error"] and rows["evil.ckpt"]["family"] == "unknown"
        job_id, _ = studio.submit_generate(
            {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 1, "model": "evil.ckpt"}
        )
        last = list(studio.watch(job_id))[-1]
        assert last["type"] == "failed" and "needs code" in json.dumps(last)
        assert not sentinel.exists()
    finally:
        path.unlink()


@pytest.mark.parametrize("refiner", [False, True], ids=["sdxl-base", "sdxl-refiner"])
def test_sdxl_single_file_loads_offline_with_every_weight(tmp_path, refiner, monkeypatch):
    """SDXL base (CLIP-L + OpenCLIP-G) and refiner (OpenCLIP-G as embedder 0) single files, through the
    model manager's loader: every weight of every component equals the diffusers folder's."""
    from engine.device import resolve_device
    from engine.model_manager.pipelines import ModelManager
    from engine.store.database import Database
    from engine.store.hashing import HashCache
    from tests.factories import build_tiny_sdxl
    from tests.ldm_export import export_sdxl_checkpoint, tiny_config_folder

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    pipe = build_tiny_sdxl(refiner=refiner)
    family = "sdxl-refiner" if refiner else "sdxl"
    pipe.save_pretrained(tmp_path / "folder")
    tiny_config_folder(tmp_path / "folder", tmp_path / "configs" / family)
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    export_sdxl_checkpoint(pipe, models / "checkpoints" / "xl.safetensors")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create_all()
    try:
        mm = ModelManager(
            models,
            resolve_device("cpu", "auto", False),
            HashCache(db),
            configs_dir=tmp_path / "configs",
            cache_dir=tmp_path / "cache",
        )
        loaded = mm.get("xl.safetensors")
        assert type(loaded.pipe).__name__ == (
            "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
        )
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            ours, theirs = getattr(loaded.pipe, name), getattr(pipe, name)
            assert (ours is None) == (theirs is None), name
            if theirs is not None:
                a, b = ours.state_dict(), theirs.state_dict()
                assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b), name
        if refiner:
            assert mm.get_refiner("xl.safetensors").pipe is not None
    finally:
        db.dispose()
