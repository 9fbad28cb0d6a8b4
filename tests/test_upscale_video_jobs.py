"""Upscale and video jobs through the in-process studio: limits from the settings, a generated first frame,
a video upscaled from the gallery, and no partial file after a failure."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from engine.errors import InputError, StudioError
from engine.media.clips import read_metadata
from engine.media.ffmpeg import probe


def _upload(studio, name: str, size=(64, 48)):
    root = studio.settings.gradio_tmp_dir / "upscale-jobs"
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(root / name)
    return str(root / name)


def test_the_configured_pixel_limit_refuses_a_large_upscale(studio, monkeypatch):
    monkeypatch.setattr(studio.settings, "max_upscale_pixels", 100 * 100)
    job_id, _ = studio.submit_upscale(
        {"images": [_upload(studio, "big.png")], "upscaler": "tiny-compact-x4", "scale": 2}
    )
    with pytest.raises(StudioError, match=r"64x48 -> 128x96 px is larger than max_pixels=10000"):
        studio.run_and_wait(job_id)
    assert not list(studio.settings.outputs_dir.rglob(f"{job_id[:12]}-*"))  # nothing half-written


def test_camera_clip_on_a_generated_first_frame_then_upscaled_from_the_gallery(studio):
    job_id, _ = studio.submit_video(
        {
            "mode": "camera",
            "first_frame_prompt": "a lighthouse at dusk",
            "width": 64,
            "height": 64,
            "duration": 1.0,
            "fps": 8,
            "camera_moves": "pan_left",
            "seed": 21,
        }
    )
    clip = studio.run_and_wait(job_id)
    recipe = json.loads(read_metadata(studio.settings.outputs_dir / clip["file"])["comment"])
    first = studio.generation(recipe["first_frame"]["generated"])
    assert first.prompt == "a lighthouse at dusk" and first.mode == "txt2img" and first.seed == 21
    assert clip["frames"] == 8 and (clip["width"], clip["height"]) == (64, 64)
    row = studio.generation(clip["generation_id"])  # a camera move draws no noise and takes no steps
    assert (row.seed, row.steps, row.cfg_scale, row.sampler) == (None, None, None, None) and clip[
        "seed"
    ] is None

    up_id, _ = studio.submit_upscale(
        {"generation_ids": clip["generation_id"], "upscaler": "Lanczos", "scale": 2}
    )
    item = studio.run_and_wait(up_id)["items"][0]
    info = probe(studio.settings.outputs_dir / item["file"])
    assert item["kind"] == "video" and (info.width, info.height) == (128, 128)
    assert round(info.duration * info.fps) == 8
    detail = studio.generation(item["generation_id"])
    assert (
        detail.mode == "upscale"
        and detail.recipe["postprocess"][-1]["source_generation"] == clip["generation_id"]
    )


def test_video_refusals_before_a_job_exists(studio):
    with pytest.raises(InputError, match="needs a first frame"):
        studio.submit_video({"mode": "camera"})
    with pytest.raises(InputError, match=r"moves=\['spin'\]: unknown"):
        studio.submit_video({"mode": "camera", "first_frame_prompt": "x", "camera_moves": "spin"})
    with pytest.raises(InputError, match="video model 'nope' not found; available: "):
        studio.submit_video({"mode": "txt2video", "model": "nope", "prompt": "x"})
    with pytest.raises(InputError, match=r"width=70"):
        studio.submit_video(
            {"mode": "txt2video", "model": "tiny-ltx", "prompt": "x", "width": 70, "height": 64}
        )
    with pytest.raises(InputError, match="txt2video"):
        studio.submit_video({"mode": "txt2video", "model": "tiny-svd", "prompt": "x"})


def test_jpeg_metadata_and_orientation_survive_an_upscale(studio):
    """A1111 infotext in a JPEG's EXIF UserComment (as engine.gallery.pnginfo writes it, piexif's layout) reaches the
    upscaled PNG's parameters; an EXIF-rotated photo (orientation 6: shown turned 90 degrees) comes out upright."""
    from engine.gallery.pnginfo import save_image

    root = studio.settings.gradio_tmp_dir / "upscale-jobs"
    root.mkdir(parents=True, exist_ok=True)
    text = "a red fox\nSteps: 4, Sampler: Euler a, Seed: 9, Size: 40x24"
    jpeg = save_image(Image.new("RGB", (40, 24), (200, 30, 30)), root / "fox.jpg", text, None, "jpeg").path
    job_id, _ = studio.submit_upscale({"images": [str(jpeg)], "upscaler": "Lanczos", "scale": 2})
    item = studio.run_and_wait(job_id)["items"][0]
    with Image.open(studio.settings.outputs_dir / item["file"]) as im:
        assert im.size == (80, 48) and im.info["parameters"] == text

    rotated = root / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 24), (10, 200, 10)).save(rotated, exif=exif.tobytes())
    job_id, _ = studio.submit_upscale({"images": [str(rotated)], "upscaler": "Lanczos", "scale": 2})
    item = studio.run_and_wait(job_id)["items"][0]
    assert (item["width"], item["height"]) == (48, 80)


def test_an_upscale_model_of_unknown_architecture_is_refused_before_a_job(studio):
    from tests.upscale_factories import save_unknown_model

    path = save_unknown_model(studio.settings.models_dir / "upscale_models" / "mystery.safetensors")
    try:
        row = next(r for r in studio.upscalers() if r["name"] == "mystery")
        assert row["error"] and "mystery" in row["error"]
        with pytest.raises(InputError, match="mystery"):
            studio.submit_upscale({"images": [_upload(studio, "m.png")], "upscaler": "mystery"})
    finally:
        path.unlink()


def test_upscale_rows_record_sampling_only_where_it_happened(studio):
    """An upload upscaled by Lanczos had no seed, steps, CFG or sampler: its row says None (not zeros) and
    the gallery lists it; SD x4 did sample, so its steps, CFG and seed are kept."""
    job_id, _ = studio.submit_upscale(
        {"images": [_upload(studio, "plain.png")], "upscaler": "Lanczos", "scale": 2}
    )
    plain = studio.generation(studio.run_and_wait(job_id)["items"][0]["generation_id"])
    assert (plain.mode, plain.seed, plain.steps, plain.cfg_scale, plain.sampler) == (
        "upscale",
        None,
        None,
        None,
        None,
    )
    listed = {i.generation_id: i for i in studio.gallery(mode="upscale", page_size=200).items}
    assert listed[plain.generation_id].seed is None

    job_id, _ = studio.submit_upscale(
        {
            "images": [_upload(studio, "x4.png", size=(32, 32))],
            "upscaler": "SD x4: tiny-sd-x4",
            "scale": 4,
            "prompt": "a lighthouse",
            "steps": 2,
            "cfg_scale": 5.0,
            "seed": 3,
        }
    )
    x4 = studio.generation(studio.run_and_wait(job_id)["items"][0]["generation_id"])
    assert (x4.seed, x4.steps, x4.cfg_scale, x4.prompt) == (3, 2, 5.0, "a lighthouse")
