"""The Train tab in a real browser, through a crash: start a LoRA training from the form, kill -9 the app
after a checkpoint, restart it (no --auto-resume), and the Train tab offers the interrupted run; Resume
(this browser holds the job's token) continues it from the checkpoint to a registered LoRA."""

from __future__ import annotations

import re
import time

import pytest
from gradio_client import Client, handle_file

from tests.factories import AppProcess, free_port
from tests.test_browser import CHROMIUM_ARGS
from tests.test_browser_characters import pick_option
from tests.test_ingest import make_image

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def test_train_in_the_browser_then_resume_after_a_crash(models_dir, model_configs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    data, port = tmp_path / "data", free_port()
    extra = ("--model-configs", str(model_configs), "--min-approved-images", "2")
    app = AppProcess(data, models_dir, *extra, port=port).start()
    with sync_playwright() as p:
        # one browser (one profile) across the restart: it keeps the job's cancel token, as a user's would
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            client = Client(app.url, verbose=False)
            c = client.predict(name="Browser Trainee", trigger_word="brtr", api_name="/save_character")
            files = [
                handle_file(str(make_image(tmp_path / f"{i}.png", size=(64, 64), seed=700 + i)))
                for i in range(2)
            ]
            added = client.predict(character=c["slug"], files=files, api_name="/ingest")["added"]
            client.predict(
                character=c["slug"], item_ids=[a["id"] for a in added], action="approve", api_name="/review"
            )
            page.goto(app.url, wait_until="networkidle")
            page.get_by_role("tab", name="Character studio").click()
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#train_resume_note")).to_be_hidden()  # nothing was interrupted yet
            page.get_by_role("button", name="Refresh").last.click()
            pick_option(page, "train_character", f"Browser Trainee ({c['slug']})")
            for elem_id, value in {"train_steps": 40, "train_resolution": 64}.items():
                box = page.locator(f"#{elem_id} input")
                box.fill(str(value))
                box.press("Tab")
            page.get_by_text("Checkpoints, output and samples").click()
            page.get_by_label("Checkpoint every N steps").fill("4")
            page.locator("#train_btn").click()
            expect(page.locator("#train_status")).to_contain_text("running", timeout=120_000)
            job_id = page.locator("#train_job_id textarea, #train_job_id input").first.input_value()
            assert job_id
            deadline = time.monotonic() + 300
            while (client.predict(job_id, api_name="/job_status").get("progress") or {}).get("step", 0) < 9:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            app.kill9()
        finally:
            app.stop()
        assert sorted((data / "training" / job_id / "checkpoints").glob("step-*")), (
            "a checkpoint before the kill"
        )

        app = AppProcess(data, models_dir, *extra, port=port).start()
        try:
            client = Client(app.url, verbose=False)
            assert client.predict(job_id, api_name="/job_status")["status"] == "interrupted"
            page.goto(app.url, wait_until="networkidle")
            page.get_by_role("tab", name="Character studio").click()
            page.get_by_role("tab", name="Train").click()
            note = page.locator("#train_resume_note")
            expect(note).to_contain_text("interrupted", timeout=30_000)
            expect(note).to_contain_text(re.compile(r"checkpoint at step \d+/40"))
            expect(note).to_contain_text(job_id)
            offered = int(re.search(r"checkpoint at step (\d+)/40", note.inner_text()).group(1))
            assert offered > 0 and offered % 4 == 0
            page.locator("#train_resume_btn").click()
            status = page.locator("#train_status")
            expect(status).to_contain_text("succeeded", timeout=300_000)
            expect(status).to_contain_text("browser-trainee-v1")
            expect(page.locator("#train_loss canvas, #train_loss svg").first).to_be_visible()
            expect(page.locator("#train_resume_note")).to_be_hidden(timeout=30_000)  # the offer is gone
            result = client.predict(job_id, api_name="/job_status")["result"]
            assert result["resumed_from_step"] == offered and result["steps"] == 40
            assert (models_dir / "loras" / "browser-trainee-v1.safetensors").is_file()
        finally:
            app.stop()
            browser.close()
