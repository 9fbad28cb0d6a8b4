"""Upscale and Video tabs in a real browser: the gallery's "Send to upscale" fills the Upscale tab, which
upscales the image with a Real-ESRGAN Compact model; "Send to video" makes that image the first frame of a
camera clip, which plays in the Video tab and is listed in the gallery."""

from __future__ import annotations

import re

import pytest
from gradio_client import Client

from tests.test_browser import open_page

pytestmark = pytest.mark.browser


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_gallery_to_upscale_and_video_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect

    client = Client(app.url, verbose=False)
    client.predict(
        prompt="browser-upscale-word harbour", steps=2, width=64, height=64, seed=77, api_name="/generate"
    )
    with open_page(app.url) as page:
        page.get_by_role("tab", name="Collections").click()
        page.get_by_role("tab", name="Gallery").click()
        _field(page, "gallery_text").fill("browser-upscale-word")
        page.locator("#gallery_search").click()
        expect(page.locator("#gallery_summary")).to_contain_text("1 image(s)", timeout=30_000)
        page.locator("#history_gallery img").first.click()
        selected = _field(page, "gallery_selected")
        expect(selected).not_to_have_value("", timeout=30_000)
        generation_id = selected.input_value()

        page.locator("#gallery_send_upscale").click()
        expect(_field(page, "upscale_generations")).to_have_value(generation_id, timeout=30_000)
        upscaler = page.locator("#upscale_upscaler input")
        upscaler.fill("tiny-compact-x4")
        upscaler.press("Enter")
        scale = page.locator("#upscale_scale input")
        scale.fill("2")
        scale.press("Enter")
        page.locator("#upscale_go").click()
        expect(page.locator("#upscale_status")).to_contain_text("succeeded", timeout=90_000)
        expect(page.locator("#upscale_result img").first).to_be_visible(timeout=30_000)
        page.wait_for_function("() => document.querySelector('#upscale_result img')?.naturalWidth > 0")

        page.get_by_role("tab", name="Collections").click()
        page.get_by_role("tab", name="Gallery").click()
        page.locator("#gallery_send_video").click()
        expect(_field(page, "video_generation_id")).to_have_value(generation_id, timeout=30_000)
        duration = page.locator("#video_duration input")
        duration.fill("1")
        duration.press("Enter")
        fps = page.locator("#video_fps input")
        fps.fill("8")
        fps.press("Enter")
        page.locator("#video_go").click()
        expect(page.locator("#video_status")).to_contain_text(
            re.compile(r"succeeded · 8 frames at 8 fps"), timeout=90_000
        )
        expect(page.locator("#video_result video")).to_be_visible(timeout=30_000)
        clip_id = _field(page, "video_result_id").input_value()
        page.screenshot(path=str(tmp_path / "video.png"), full_page=True)

    upscaled = client.predict(mode="upscale", text="browser-upscale-word", api_name="/gallery")["items"]
    assert upscaled and (upscaled[0]["width"], upscaled[0]["height"]) == (128, 128)
    clips = client.predict(mode="camera", api_name="/gallery")["items"]
    assert clip_id in {c["generation_id"] for c in clips}
