"""One real browser through the character workflow: create a character, ingest two PNGs, then review them
with the keyboard ("a" approves the focused image, "u" undoes it)."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.test_api_characters import noise_png
from tests.test_browser import open_page

pytestmark = pytest.mark.browser


def pick_option(page, elem_id: str, label: str) -> None:
    """Open a gr.Dropdown and click the option with this label."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=label, exact=True).click()


def test_create_ingest_and_review_with_shortcuts_in_the_browser(app, tmp_path):
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:6]
    name, slug = f"Browser Gil {tag}", f"browser-gil-{tag}"
    label = f"{name} ({slug})"
    files = [str(noise_png(tmp_path / f"gil{i}.png", 10 + i)) for i in range(2)]
    with open_page(app.url) as page:
        page.get_by_role("tab", name="Character studio").click()
        page.get_by_role("tab", name="Characters").click()
        page.locator("#character_name input, #character_name textarea").first.fill(name)
        page.locator("#character_trigger input, #character_trigger textarea").first.fill(f"gil{tag}")
        page.locator("#character_design textarea").fill("silver hair, blue cloak")
        page.locator("#character_save").click()
        expect(page.locator("#character_status")).to_contain_text(f"{name} · revision 1", timeout=30_000)
        expect(page.locator("#character_pick input")).to_have_value(label)

        page.get_by_role("tab", name="Character studio").click()
        page.get_by_role("tab", name="Ingest").click()
        page.locator("#ingest_refresh").click()
        pick_option(page, "ingest_character", label)
        page.locator("#ingest_files input[type=file]").set_input_files(files)
        expect(page.locator("#ingest_files")).to_contain_text("gil1", timeout=30_000)
        page.locator("#ingest_btn").click()
        expect(page.locator("#ingest_summary")).to_contain_text("2 added", timeout=60_000)

        page.get_by_role("tab", name="Character studio").click()
        page.get_by_role("tab", name="Review").click()
        page.locator("#review_refresh").click()
        pick_option(page, "review_character", label)
        readiness = page.locator("#review_readiness")
        expect(readiness).to_contain_text(re.compile(r"approved 0 · pending 2"), timeout=30_000)
        selected = page.locator("#review_selected input, #review_selected textarea").first
        expect(selected).not_to_have_value("")
        focused = selected.input_value()

        # Shortcuts act only when no input has the focus: put it on the page body, then press the key.
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.keyboard.press("a")
        expect(readiness).to_contain_text(re.compile(r"approved 1 · pending 1"), timeout=30_000)
        expect(page.locator("#review_note")).to_contain_text("approve · 1 item(s)")
        expect(selected).not_to_have_value(focused)  # the approved image left the pending queue
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.keyboard.press("u")
        expect(readiness).to_contain_text(re.compile(r"approved 0 · pending 2"), timeout=30_000)
        expect(page.locator("#review_note")).to_contain_text("undid approve of 1 item(s)")

        # typing the same letter into a text box must not approve anything
        page.get_by_label("Other: what was wrong").press("a")
        page.wait_for_timeout(500)
        expect(readiness).to_contain_text(re.compile(r"approved 0 · pending 2"))
