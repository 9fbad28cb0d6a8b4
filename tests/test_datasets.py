"""Datasets: ingest jobs (files, ZIP, video scenes, folder), review with undo, rejection reasons teaching the
negative prompt (with provenance), captions (manual, find/replace, a stub vision endpoint), readiness and
"regenerate rejected" (engine level, the shared in-process studio and the demo model)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import InputError, NotFoundError
from tests.test_characters import FAST, wait
from tests.test_ingest import _QuietHandler, clip, make_image, serve  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("studio")


def upload_dir(studio, name: str) -> Path:
    d = studio.settings.gradio_tmp_dir / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def new_character(studio, name: str, **values):
    return studio.characters.create({"name": name, "trigger_word": name.lower().replace(" ", ""), **values})


def ingest(studio, character, **values) -> dict:
    jid, _ = studio.submit_ingest({"character": character.slug, **values})
    return wait(studio, jid)


def test_ingest_files_and_zip_keeps_good_items_and_names_bad_ones(studio):
    c = new_character(studio, "Ingest One")
    up = upload_dir(studio, "ingest-one")
    good = make_image(up / "good.png", seed=1)
    jpeg_named_png = make_image(up / "really-jpeg.png", fmt="JPEG", seed=2)
    corrupt = up / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    archive = up / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(make_image(up / "inzip.png", seed=3), "a/inzip.png")
        z.writestr("../evil.png", good.read_bytes())
        z.writestr("notes.txt", "hello")
    res = ingest(studio, c, files=[str(good), str(jpeg_named_png), str(corrupt), str(archive)])
    sources = sorted(a["source"] for a in res["added"])
    assert sources == ["upload:good.png", "upload:really-jpeg.png", "zip:set.zip!a/inzip.png"]
    skipped = {s["source"]: s["reason"] for s in res["skipped"]}
    assert "corrupt" in skipped["upload:corrupt.png"] or "truncated" in skipped["upload:corrupt.png"]
    assert any("escapes" in r or ".." in r for s, r in skipped.items() if "evil" in s)
    assert res["pending"] == 3 and res["approved"] == 0
    folder = studio.settings.outputs_dir / "datasets" / c.id
    assert len(list(folder.iterdir())) == 3  # nothing for the bad items, nothing partial
    jpeg_item = next(a for a in res["added"] if a["source"] == "upload:really-jpeg.png")
    assert jpeg_item["file"].endswith(".jpg") or jpeg_item["file"].endswith(".jpeg")

    # the same bytes again are an exact duplicate, caught by content hash
    again = ingest(studio, c, files=[str(good)])
    assert again["added"] == [] and again["duplicates"][0]["source"] == "upload:good.png"


def test_ingest_video_one_frame_per_scene(studio, clip):  # noqa: F811
    c = new_character(studio, "Video Girl")
    up = upload_dir(studio, "video")
    shutil.copy(clip, up / "scenes.mp4")
    res = ingest(studio, c, files=[str(up / "scenes.mp4")])
    assert len(res["added"]) == 2, res
    reasons = " | ".join(s["reason"] for s in res["skipped"])
    assert "near-duplicate" in reasons and "blurry" in reasons
    assert all(a["source"].startswith("video:scenes.mp4@") for a in res["added"])


def test_ingest_url_through_the_job_and_a_clear_error_offline(studio, clip, serve):  # noqa: F811
    import functools
    import socket

    c = new_character(studio, "Url Fox")
    base = serve(functools.partial(_QuietHandler, directory=str(clip.parent)))
    res = ingest(studio, c, url=f"{base}/{clip.name}")
    assert len(res["added"]) == 2 and all(a["source"].startswith(f"url:{base}/") for a in res["added"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = ingest(studio, c, url=f"http://127.0.0.1:{port}/gone.mp4")
    assert res["added"] == [] and "needs network access" in res["skipped"][0]["reason"]


def test_ingest_folder_inside_allowed_root_only_new_images(studio, tmp_path):
    c = new_character(studio, "Folder Kid")
    root = studio.settings.import_dir / "comfy-out"
    root.mkdir(parents=True, exist_ok=True)
    make_image(root / "1.png", seed=11)
    make_image(root / "2.png", seed=12)
    res = ingest(studio, c, folder=str(root))
    assert sorted(a["source"] for a in res["added"]) == ["folder:comfy-out/1.png", "folder:comfy-out/2.png"]
    make_image(root / "3.png", seed=13)
    res = ingest(studio, c, folder=str(root))  # a rescan picks up only the new image
    assert [a["source"] for a in res["added"]] == ["folder:comfy-out/3.png"] and not res["duplicates"]
    n = len(studio.recent_jobs(1000))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(InputError, match="outside the allowed roots"):
        studio.submit_ingest({"character": c.slug, "folder": str(outside)})
    with pytest.raises(InputError, match="outside the allowed roots"):
        studio.submit_ingest({"character": c.slug, "folder": str(root / ".." / ".." / "..")})
    with pytest.raises(InputError, match="server paths"):
        studio.submit_ingest({"character": c.slug, "files": ["/etc/passwd"]})
    with pytest.raises(InputError, match="url"):
        studio.submit_ingest({"character": c.slug, "url": "file:///etc/passwd"})
    with pytest.raises(NotFoundError):
        studio.submit_ingest({"character": "nobody-here", "folder": str(root)})
    assert len(studio.recent_jobs(1000)) == n  # refused before any job row


def _three_items(studio, name: str):
    c = new_character(studio, name)
    up = upload_dir(studio, name.replace(" ", "-"))
    files = [str(make_image(up / f"{i}.png", seed=100 + i + hash(name) % 1000)) for i in range(3)]
    res = ingest(studio, c, files=files)
    return c, [a["id"] for a in res["added"]]


def test_review_actions_undo_and_readiness(studio):
    c, ids = _three_items(studio, "Review Bee")
    out = studio.review(c.slug, ids[:2], "approve")
    assert out["approved"] == 2 and out["pending"] == 1 and out["trainable"] is False
    q = studio.review_queue(c.slug, "approved")
    assert {i["id"] for i in q["items"]} == set(ids[:2])
    assert all(i["caption"] == "reviewbee" for i in q["items"])  # caption starts as the trigger word
    out = studio.review(c.slug, [ids[2]], "reject", ["bad hands", "blurry"])
    assert out["rejected"] == 1
    item = studio.review_queue(c.slug, "rejected")["items"][0]
    assert item["reasons"] == ["bad hands", "blurry"]
    # undo: the rejection is gone, the item is pending again; a second undo undoes the approval
    assert studio.undo_review(c.slug)["action"] == "reject"
    assert studio.datasets.readiness(c.id) == {"pending": 1, "approved": 2, "rejected": 0}
    assert studio.undo_review(c.slug)["action"] == "approve"
    assert studio.datasets.readiness(c.id) == {"pending": 3, "approved": 0, "rejected": 0}
    with pytest.raises(InputError, match="nothing to undo"):
        studio.undo_review(c.slug)
    with pytest.raises(InputError, match="at least one reason"):
        studio.review(c.slug, ids, "reject", [])
    with pytest.raises(InputError, match="unknown"):
        studio.review(c.slug, ids, "reject", ["ugly"])
    with pytest.raises(InputError, match="reason_text"):
        studio.review(c.slug, ids, "reject", ["other"])
    with pytest.raises(InputError, match="action"):
        studio.review(c.slug, ids, "delete")
    other, other_ids = _three_items(studio, "Review Wasp")
    with pytest.raises(NotFoundError, match="not in 'review-bee'"):
        studio.review(c.slug, other_ids[:1], "approve")
    # readiness: trainable at the configured minimum
    old = studio.settings.min_approved_images
    studio.settings.min_approved_images = 3
    try:
        assert studio.review(c.slug, ids, "approve")["trainable"] is True
        assert studio.character_view(c.slug)["readiness"]["trainable"] is True
    finally:
        studio.settings.min_approved_images = old


def test_rejections_refine_the_effective_negative_with_provenance(studio):
    c, ids = _three_items(studio, "Neg Learner")
    studio.characters.update(c.slug, {"negative_prompt": "lowres, bad hands"})
    studio.review(c.slug, ids[:2], "reject", ["bad_hands"])
    studio.review(c.slug, [ids[2]], "reject", ["blurry", "other"], "weird ears")
    terms = {t.term: t.source for t in studio.characters.effective_negative(studio.characters.get(c.slug))}
    assert terms["lowres"] == "character" and terms["bad hands"] == "character"  # own terms first, once
    assert terms["extra fingers"] == "rejected: bad hands x2"
    assert terms["out of focus"] == "rejected: blurry x1"
    # the mapping is editable, and generation uses the refined negatives
    studio.characters.set_rejection_terms({"blurry": "blurry, soft focus"})
    try:
        snap = studio.characters.snapshot(c.slug)
        assert [t.term for t in snap.negative_terms if t.source.startswith("rejected: blurry")] == [
            "blurry",
            "soft focus",
        ]
        jid, _ = studio.submit_generate({"prompt": "x", "seed": 3, "character": c.slug, **FAST})
        params = Image.open(wait(studio, jid)["images"][0]["path"]).info["parameters"]
        assert (
            "Negative prompt: lowres, bad hands, extra fingers, missing fingers, fused fingers, blurry, soft focus"
            in params
        )
    finally:
        from engine.characters.characters import DEFAULT_REJECTION_TERMS

        studio.characters.set_rejection_terms(DEFAULT_REJECTION_TERMS)
    with pytest.raises(InputError, match="unknown"):
        studio.characters.set_rejection_terms({"ugly": "x"})
    # undoing the rejection takes its terms away again
    studio.undo_review(c.slug)
    terms = {t.term for t in studio.characters.effective_negative(studio.characters.get(c.slug))}
    assert "out of focus" not in terms and "extra fingers" in terms


def test_regenerate_rejected_rerenders_with_refined_negatives_into_review(studio):
    c = new_character(studio, "Regen Rex", design_prompt="orange fur")
    jid, _ = studio.submit_generate(
        {
            "prompt": "standing",
            "seed": 9,
            "character": c.slug,
            "dataset_review": True,
            "batch_size": 2,
            **FAST,
        }
    )
    wait(studio, jid)
    q = studio.review_queue(c.slug)
    assert q["total"] == 2 and all(i["generation_id"] and i["infotext"] for i in q["items"])
    first = q["items"][0]
    studio.review(c.slug, [first["id"]], "reject", ["bad anatomy"])
    out = studio.regenerate_rejected(c.slug)
    assert len(out["jobs"]) == 1 and "deformed body" in out["negative_prompt"]
    img = wait(studio, out["jobs"][0]["job_id"])["images"][0]
    params = Image.open(img["path"]).info["parameters"]
    assert "deformed body" in params.split("Negative prompt: ")[1]
    assert (
        json.loads(Image.open(img["path"]).info["studionova"])["seed"]
        == json.loads(Image.open(studio.settings.outputs_dir / first["file"]).info["studionova"])["seed"]
    )
    q = studio.review_queue(c.slug)
    assert q["total"] == 2  # the other original plus the re-render, both pending
    assert any(i["source"].startswith(f"generation:{out['jobs'][0]['job_id']}") for i in q["items"])
    assert studio.regenerate_rejected(c.slug)["jobs"] == []  # a rejected item is re-rendered once


def test_captions_manual_replace_and_vision_endpoint(studio):
    from tests.vision_stub import VisionStub

    c, ids = _three_items(studio, "Cap Tain")
    studio.review(c.slug, ids, "approve")
    item = studio.datasets.set_caption(ids[0], "red hat, captain, smiling")
    assert item["caption"] == "captain, red hat, smiling"  # the trigger word moves first, once
    assert studio.datasets.replace_captions(c.id, "red hat", "blue hat")["changed"] == 1
    assert studio.datasets.item(ids[0]).caption == "captain, blue hat, smiling"
    with pytest.raises(InputError, match="regular expression"):
        studio.datasets.replace_captions(c.id, "(", "x", regex=True)
    with pytest.raises(InputError, match="vision endpoint"):
        studio.submit_captions({"character": c.slug})
    up = upload_dir(studio, "red")
    red = up / "red.png"
    Image.new("RGB", (64, 64), (220, 10, 10)).save(red)
    ingest(studio, c, files=[str(red)])
    red_id = studio.review_queue(c.slug)["items"][0]["id"]
    studio.review(c.slug, [red_id], "approve")
    s = studio.settings
    with VisionStub(api_key="sekrit") as stub:
        s.vision_url, s.vision_model, s.vision_api_key = stub.base_url, "llava", "sekrit"
        try:
            jid, _ = studio.submit_captions({"character": c.slug})
            res = wait(studio, jid)
            assert res["kept"] == 1 and len(res["captioned"]) == 3  # the edited caption is kept
            red_caption = studio.datasets.item(red_id).caption
            assert red_caption.startswith("captain, ") and "red" in red_caption
            assert stub.requests and stub.requests[-1]["model"] == "llava"
            stub.character_answer = "Cap Tain"
            assert studio.suggest_character(red_id)["suggested"] == c.slug
        finally:
            s.vision_url, s.vision_api_key = "", ""


def test_review_fixes_undo_order_regex_and_regenerate_without_new_terms(studio):
    c, ids = _three_items(studio, "Order Owl")
    first = studio.review(c.slug, ids[:1], "approve")["action_id"]
    studio.review(c.slug, ids[1:2], "approve")
    with pytest.raises(InputError, match="not the latest"):
        studio.undo_review(c.slug, first)
    with pytest.raises(InputError, match="regular expression"):
        studio.datasets.replace_captions(c.id, "(o)", r"\2", regex=True)
    # a rejection whose reasons map to no terms would re-render the same picture: skipped, with the reason
    g = new_character(studio, "Same Sam")
    wait(
        studio,
        studio.submit_generate(
            {"prompt": "x", "seed": 2, "character": g.slug, "dataset_review": True, **FAST}
        )[0],
    )
    item = studio.review_queue(g.slug)["items"][0]
    studio.review(g.slug, [item["id"]], "reject", ["other"], "just not right")
    out = studio.regenerate_rejected(g.slug)
    assert out["jobs"] == [] and "no new negative terms" in out["skipped"][0]["reason"]
