"""The Generate tab with the ComfyUI engine in a real browser: switching the engine shows the server's
checkpoints, and Generate renders on the stub ComfyUI server into the gallery with its infotext."""

from __future__ import annotations

import re

import pytest
from gradio_client import Client

from tests.comfy_stub import ComfyStub
from tests.factories import AppProcess
from tests.test_browser import open_page, set_slider

pytestmark = pytest.mark.browser


def test_generate_on_comfyui_in_the_browser(models_dir, model_configs, tmp_path):
    from playwright.sync_api import expect

    stub = ComfyStub(render_delay=0.3, steps=4).start()
    app = AppProcess(
        tmp_path / "data", models_dir, "--model-configs", str(model_configs), "--comfyui-urls", stub.url
    ).start()
    try:
        with open_page(app.url) as page:
            page.locator("#prompt textarea").fill("a lighthouse on a cliff")
            set_slider(page, "steps", 4)
            set_slider(page, "width", 64)
            set_slider(page, "height", 64)
            page.locator("#engine").get_by_text("ComfyUI", exact=True).click()
            model = page.get_by_label("Model", exact=True)
            expect(model).to_have_value("sd15_tiny.safetensors", timeout=30_000)  # the server's checkpoint
            page.locator("#generate_btn").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=90_000)
            infotext = page.locator("#infotext textarea")
            expect(infotext).to_have_value(
                re.compile(r"Steps: 4, .*Size: 64x64.*Model: sd15_tiny"), timeout=30_000
            )
            job_id = page.locator("#job_id textarea, #job_id input").first.input_value()
        assert (
            Client(app.url, verbose=False).predict(job_id, api_name="/job_status")["kind"] == "comfy_generate"
        )
        assert stub.submitted, "the stub server rendered it"
    finally:
        app.stop()
        stub.stop()
