"""Issue 3's endpoints through gradio_client against the launched app: inpaint, hires, X/Y/Z plot,
PNG info, gallery, and the extended model listing."""

from __future__ import annotations

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

from engine.gallery.infotext import parse_infotext

SMALL = dict(prompt="a castle, (tower:1.2)", negative_prompt="", steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def test_list_models_names_everything_generate_accepts(client):
    listing = client.predict(api_name="/list_models")
    assert "tinyvae" in listing["vaes"] and "tiny-canny" in listing["controlnets"]
    assert "nova-style" in listing["embeddings"] and listing["hires_upscalers"][:3] == [
        "Latent",
        "Latent (nearest)",
        "Lanczos",
    ]
    assert {m["name"] for m in listing["models"]} >= {"studionova-demo", "tiny-sdxl"}


def test_inpaint_through_api(client, tmp_path):
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(src)
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle((20, 20, 44, 44), fill=255)
    m.save(mask)
    files, infotext, *_ = client.predict(
        **SMALL,
        seed=3,
        init_image=handle_file(str(src)),
        mask_image=handle_file(str(mask)),
        denoising_strength=1.0,
        mask_blur=2,
        api_name="/generate",
    )
    out = np.asarray(Image.open(files[0]["image"]).convert("RGB"))
    assert (out[:10, :10] == (30, 120, 200)).all()  # far outside the mask: untouched
    assert parse_infotext(infotext)["Mask blur"] == "2"


def test_hires_and_png_info_round_trip(client):
    files, infotext, *_ = client.predict(
        **SMALL,
        seed=4,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Lanczos",
        hr_second_pass_steps=2,
        api_name="/generate",
    )
    path = files[0]["image"]
    assert Image.open(path).size == (128, 128)
    info = client.predict(handle_file(path), api_name="/png_info")
    assert info["source"] == "studionova"
    assert info["params"]["prompt"] == SMALL["prompt"] and info["params"]["enable_hr"] is True
    assert info["params"]["seed"] == 4


def test_xyz_plot_through_api(client):
    grids, job_id, *_ = client.predict(
        "Steps",
        "2, 3",
        "CFG Scale",
        "5, 9",
        "Nothing",
        "",
        True,
        prompt="a castle",
        seed=8,
        width=64,
        height=64,
        api_name="/xyz_plot",
    )
    assert len(grids) == 1
    assert client.predict(job_id, api_name="/job_status")["status"] == "succeeded"


def test_gallery_query_through_api(client):
    client.predict(**{**SMALL, "prompt": "a unique-gallery-word lighthouse"}, seed=5, api_name="/generate")
    page = client.predict("unique-gallery-word", api_name="/gallery")
    assert page["total"] == 1 and page["items"][0]["prompt"] == "a unique-gallery-word lighthouse"
    assert page["items"][0]["thumbnail_path"].endswith(".webp")
    with pytest.raises(Exception, match="page_size"):
        client.predict("", page_size=5000, api_name="/gallery")


def test_export_jpeg_carries_a1111_exif(client):
    files, infotext, *_ = client.predict(
        **{**SMALL, "prompt": "export-me castle"}, seed=6, api_name="/generate"
    )
    page = client.predict("export-me", api_name="/gallery")
    path = client.predict(page["items"][0]["generation_id"], "jpeg", api_name="/export_image")
    assert path.endswith(".jpg")
    from engine.gallery.pnginfo import read_image_metadata

    meta = read_image_metadata(path)
    assert meta.format == "jpeg" and meta.source == "studionova"
    assert meta.infotext.splitlines()[-1] == infotext.splitlines()[-1]
