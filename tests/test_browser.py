"""One real browser (Debian Chromium driven by Playwright): fill the Generate form, click, see an image."""

from __future__ import annotations

import os
import re
import time

import pytest
from gradio_client import Client

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_generate_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app.url, wait_until="networkidle")
            page.locator("#prompt textarea").fill("a tiny red house")
            set_slider(page, "steps", 4)
            set_slider(page, "width", 64)
            set_slider(page, "height", 64)
            page.locator("#generate_btn").click()
            image = page.locator("#gallery img").first
            expect(image).to_be_visible(timeout=90_000)
            infotext = page.locator("#infotext textarea")
            expect(infotext).to_have_value(re.compile(r"Steps: 4, .*Size: 64x64"), timeout=30_000)
            page.wait_for_function("() => document.querySelector('#gallery img')?.naturalWidth > 0")
            assert image.evaluate("img => img.naturalWidth") == 64
            assert page.locator("#job_id textarea, #job_id input").first.input_value()
            page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)

            # A long job, cancelled with the Cancel button: the job stops and says so.
            first_job = page.locator("#job_id textarea, #job_id input").first.input_value()
            set_slider(page, "steps", 150)
            set_slider(page, "width", 256)
            set_slider(page, "height", 256)
            page.locator("#generate_btn").click()
            job_box = page.locator("#job_id textarea, #job_id input").first
            expect(job_box).not_to_have_value(first_job, timeout=30_000)
            expect(page.locator("#job_state")).to_contain_text("running", timeout=30_000)
            page.locator("#cancel_btn").click()
            expect(page.locator("#job_state")).to_contain_text("cancel", timeout=30_000)
            status = Client(app.url, verbose=False).predict(job_box.input_value(), api_name="/job_status")
            deadline = time.monotonic() + 30
            while status["status"] != "cancelled":
                assert status["status"] == "running" and time.monotonic() < deadline, status
                time.sleep(0.2)
                status = Client(app.url, verbose=False).predict(job_box.input_value(), api_name="/job_status")
            assert status["progress"]["step"] < 150
            shot = os.environ.get("STUDIONOVA_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
