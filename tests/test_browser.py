"""One real browser (Debian Chromium driven by Playwright): fill the Generate form, click, see an image."""

from __future__ import annotations

import os
import re

import pytest

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
            shot = os.environ.get("STUDIONOVA_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
