"""Upscale and video through gradio_client against the real app (tiny models built in conftest)."""

from __future__ import annotations

import json

import pytest
from gradio_client import Client, handle_file
from PIL import Image, PngImagePlugin

from engine.media.clips import read_metadata
from engine.media.ffmpeg import probe


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def _path(video) -> str:
    """gradio_client gives a Video output as its file path (a dict with "video" in older versions)."""
    return video["video"] if isinstance(video, dict) else video


def _png_with_infotext(path, size=(48, 40), mode="RGB"):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse\nSteps: 4, Sampler: Euler a, Seed: 7, Size: 48x40")
    Image.new(mode, size, (200, 60, 30, 128) if mode == "RGBA" else (200, 60, 30)).save(path, pnginfo=info)
    return path


def test_upscale_models_list_architecture_and_scale(client):
    rows = {r["name"]: r for r in client.predict(api_name="/upscale_models")}
    assert rows["Lanczos"]["kind"] == "lanczos"
    compact = rows["tiny-compact-x4"]
    assert (
        compact["kind"] == "model"
        and compact["scale"] == 4
        and compact["architecture"]
        and not compact["error"]
    )
    assert rows["SD x4: tiny-sd-x4"]["kind"] == "sd_x4"


def test_upscale_an_upload_keeps_its_metadata_and_adds_the_step(client, tmp_path):
    src = _png_with_infotext(tmp_path / "src.png")
    pics, video, summary, *_ = client.predict(
        images=[handle_file(str(src))], upscaler="tiny-compact-x4", scale=2, api_name="/upscale"
    )
    assert video is None and len(pics) == 1
    with Image.open(pics[0]["image"]) as im:
        assert im.size == (96, 80)
        assert im.info["parameters"].startswith("a lighthouse\nSteps: 4")
        assert im.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: tiny-compact-x4"
        recipe = json.loads(im.info["studionova"])
    step = recipe["postprocess"][-1]
    assert step["op"] == "upscale" and step["upscaler"] == "tiny-compact-x4" and step["size"] == [96, 80]
    page = client.predict(mode="upscale", api_name="/gallery")
    assert summary["items"][0]["generation_id"] in {it["generation_id"] for it in page["items"]}


def test_upscale_a_gallery_generation_to_a_target_size_and_an_rgba_upload(client, tmp_path):
    gen = client.predict(prompt="a lighthouse", steps=2, width=64, height=64, seed=11, api_name="/generate")
    generation_id = client.predict(mode="txt2img", api_name="/gallery")["items"][0]["generation_id"]
    rgba = _png_with_infotext(tmp_path / "alpha.png", mode="RGBA")
    pics, _, summary, *_ = client.predict(
        images=[handle_file(str(rgba))],
        generation_ids=generation_id,
        upscaler="Lanczos",
        scale=0,
        width=100,
        height=90,
        api_name="/upscale",
    )
    assert gen and len(pics) == 2
    sizes = {it["source"]: (it["width"], it["height"]) for it in summary["items"]}
    assert set(sizes.values()) == {(100, 90)}
    with Image.open(pics[0]["image"]) as im:  # the upload first, then the gallery generation
        assert im.mode == "RGBA" and im.getpixel((50, 45))[3] == 128
    with Image.open(pics[1]["image"]) as im:
        recipe = json.loads(im.info["studionova"])
        assert recipe["seed"] == 11 and recipe["postprocess"][-1]["source_generation"] == generation_id
        assert im.info["postprocessing"].startswith("Postprocess upscale to: 100x90")


def test_upscale_refusals_name_the_value(client, tmp_path):
    src = _png_with_infotext(tmp_path / "src.png")
    with pytest.raises(
        Exception, match=r"upscaler 'nope' is not in models/upscale_models; available: Lanczos"
    ):
        client.predict(images=[handle_file(str(src))], upscaler="nope", api_name="/upscale")
    with pytest.raises(Exception, match="nothing to upscale"):
        client.predict(upscaler="Lanczos", api_name="/upscale")
    with pytest.raises(Exception, match=r"tile.*must be 0 \(chosen from free memory\) or 64-4096"):
        client.predict(images=[handle_file(str(src))], upscaler="Lanczos", tile=32, api_name="/upscale")
    with pytest.raises(Exception, match="noise_level"):
        client.predict(
            images=[handle_file(str(src))], upscaler="SD x4: tiny-sd-x4", noise_level=400, api_name="/upscale"
        )


def test_upscale_a_video_keeps_frames_fps_and_audio(client, tmp_path):
    from tests.upscale_factories import make_test_video

    clip = make_test_video(tmp_path / "clip.mp4", seconds=1, fps=8, size=(64, 48), audio=True)
    _, video, summary, *_ = client.predict(
        video=handle_file(str(clip)), upscaler="tiny-compact-x4", scale=2, api_name="/upscale"
    )
    src, out = probe(clip), probe(_path(video))
    assert (out.width, out.height) == (128, 96) and out.has_audio
    assert out.fps == pytest.approx(src.fps) and out.duration == pytest.approx(src.duration, abs=0.15)
    assert summary["items"][0]["kind"] == "video"


def test_sd_x4_upscaler_with_prompt(client, tmp_path):
    src = _png_with_infotext(tmp_path / "small.png", size=(32, 32))
    pics, _, summary, *_ = client.predict(
        images=[handle_file(str(src))],
        upscaler="SD x4: tiny-sd-x4",
        scale=4,
        prompt="a lighthouse",
        noise_level=30,
        steps=2,
        seed=3,
        api_name="/upscale",
    )
    with Image.open(pics[0]["image"]) as im:
        assert im.size == (128, 128)
        step = json.loads(im.info["studionova"])["postprocess"][-1]
        assert (step["kind"], step["noise_level"], step["prompt"]) == ("sd_x4", 30, "a lighthouse")


def test_camera_clip_from_an_upload_with_the_recipe_in_its_metadata(client, tmp_path):
    src = _png_with_infotext(tmp_path / "still.png", size=(96, 64))
    video, summary, generation_id, *_ = client.predict(
        mode="camera",
        image=handle_file(str(src)),
        camera_moves=["zoom_in"],
        duration=1.0,
        fps=12,
        seed=5,
        prompt="a still",
        api_name="/generate_video",
    )
    info = probe(_path(video))
    assert (info.width, info.height) == (96, 64) and info.fps == pytest.approx(12)
    assert summary["frames"] == 12 and generation_id == summary["generation_id"]
    recipe = json.loads(read_metadata(_path(video))["comment"])
    assert recipe["mode"] == "camera" and recipe["seed"] == 5 and recipe["moves"] == ["zoom_in"]
    assert recipe["first_frame"] == {
        "image": "still.png",
        "name": "still.png",
    }  # no server path in a shared file
    # moves combined with "+" as one string (what a script sends), and a refused interpolation target
    video, summary, *_ = client.predict(
        mode="camera",
        image=handle_file(str(src)),
        camera_moves="zoom_out+pan_left",
        duration=1.0,
        fps=8,
        api_name="/generate_video",
    )
    assert json.loads(read_metadata(_path(video))["comment"])["moves"] == ["zoom_out", "pan_left"]
    with pytest.raises(Exception, match=r"interpolate_fps=8: must be above the clip's 8 fps"):
        client.predict(
            mode="camera",
            image=handle_file(str(src)),
            duration=1.0,
            fps=8,
            interpolate_fps=8,
            api_name="/generate_video",
        )
    with pytest.raises(Exception, match=r"camera_moves=\['spin'\]: unknown"):
        client.predict(
            mode="camera", image=handle_file(str(src)), camera_moves="spin", api_name="/generate_video"
        )


def test_video_models_and_families(client):
    models = {m["name"]: m for m in client.predict(api_name="/video_models")}
    assert models["tiny-svd"]["family"] == "svd" and models["tiny-ltx"]["family"] == "ltx"
    assert any(m["family"] == "animatediff" for m in models.values())
    families = {f["key"]: f for f in client.predict(api_name="/video_families")}
    assert families["ltx"]["frame_multiple"] == 8 and "txt2video" in families["ltx"]["modes"]


def test_txt2video_ltx_and_its_frame_rule(client):
    video, summary, *_ = client.predict(
        mode="txt2video",
        model="tiny-ltx",
        prompt="waves",
        frames=9,
        fps=8,
        width=64,
        height=64,
        steps=2,
        seed=1,
        api_name="/generate_video",
    )
    info = probe(_path(video))
    assert round(info.duration * info.fps) == 9 and info.fps == pytest.approx(8)
    assert summary["family"] == "ltx"
    with pytest.raises(Exception, match=r"frames=20"):
        client.predict(
            mode="txt2video", model="tiny-ltx", prompt="waves", frames=20, api_name="/generate_video"
        )


def test_img2video_svd_from_a_gallery_generation_then_interpolated(client):
    client.predict(prompt="a boat", steps=2, width=64, height=64, seed=12, api_name="/generate")
    generation_id = client.predict(mode="txt2img", api_name="/gallery")["items"][0]["generation_id"]
    video, summary, *_ = client.predict(
        mode="img2video",
        model="tiny-svd",
        generation_id=generation_id,
        frames=4,
        fps=4,
        width=64,
        height=64,
        steps=2,
        seed=2,
        interpolate_fps=8,
        api_name="/generate_video",
    )
    info = probe(_path(video))
    assert info.fps == pytest.approx(8) and summary["family"] == "svd"
    recipe = json.loads(read_metadata(_path(video))["comment"])
    assert recipe["first_frame"]["generation_id"] == generation_id and recipe["frames"] == 4
    page = client.predict(mode="img2video", api_name="/gallery")
    assert summary["generation_id"] in {it["generation_id"] for it in page["items"]}
    with pytest.raises(Exception, match="needs a first frame"):
        client.predict(mode="img2video", model="tiny-svd", api_name="/generate_video")


def test_txt2video_animatediff_on_the_demo_model_with_a_lora(client):
    adapter = next(
        m["name"] for m in client.predict(api_name="/video_models") if m["family"] == "animatediff"
    )
    video, summary, *_ = client.predict(
        mode="txt2video",
        model=adapter,
        prompt="a dancer",
        frames=4,
        fps=6,
        width=64,
        height=64,
        steps=2,
        seed=9,
        loras="kohya_style:0.7",
        api_name="/generate_video",
    )
    info = probe(_path(video))
    assert round(info.duration * info.fps) == 4 and summary["family"] == "animatediff"
    recipe = json.loads(read_metadata(_path(video))["comment"])
    assert recipe["base_model"] == "studionova-demo"
    assert recipe["loras"][0]["name"] == "kohya_style" and recipe["loras"][0]["hash"]
    with pytest.raises(Exception, match="only AnimateDiff"):
        client.predict(
            mode="txt2video", model="tiny-ltx", prompt="x", loras="kohya_style", api_name="/generate_video"
        )
