"""Characters, Ingest and Review through gradio_client: characters and projects, /generate with a character,
ingest (ZIP traversal and corrupt files refused), review with undo, negatives learnt from rejections,
captions, LoRA versions, reference sheets and re-rendering rejected images."""

from __future__ import annotations

import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.factories import save_kohya_lora

TAG = uuid.uuid4().hex[:6]  # the app is shared by the whole session: names must not collide
SMALL = dict(steps=2, width=64, height=64)
ENDPOINTS = {
    "/save_character",
    "/list_characters",
    "/get_character",
    "/delete_character",
    "/create_project",
    "/update_project",
    "/upload_lora",
    "/attach_lora",
    "/delete_lora",
    "/reference_sheet",
    "/effective_negative",
    "/rejection_terms",
    "/set_rejection_terms",
    "/ingest",
    "/review_queue",
    "/review",
    "/undo_review",
    "/set_caption",
    "/replace_captions",
    "/auto_caption",
    "/suggest_character",
    "/regenerate_rejected",
    "/dataset_stats",
    "/generate",
}


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def new_character(client, who: str, **fields) -> dict:
    values = dict(
        name=f"Api {who} {TAG}", trigger_word=f"{who.lower()}{TAG}", design_prompt="red hair, green eyes"
    )
    return client.predict(**{**values, **fields}, api_name="/save_character")


def noise_png(path: Path, seed: int) -> Path:
    """A 64x64 image unlike any other seed's (so near-duplicate detection keeps it)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def wait_for_job(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (status := client.predict(job_id, api_name="/job_status"))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_character_endpoints_are_named_and_page_helpers_are_not(client):
    api = client.view_api(print_info=False, return_format="dict")
    names = set(api["named_endpoints"])
    assert names >= ENDPOINTS, ENDPOINTS - names
    helpers = ("fill", "after", "show", "focus", "pick", "describe", "lambda", "refresh", "character_style")
    assert not [n for n in names if any(h in n for h in helpers)]
    assert [p["parameter_name"] for p in api["named_endpoints"]["/list_characters"]["parameters"]] == [
        "project"
    ]
    generate = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert {"character", "dataset_review"} <= set(generate)


def test_create_update_list_and_get_a_character(client):
    made = new_character(client, "Ada", negative_prompt="lowres")
    assert made["slug"] == f"api-ada-{TAG}" and made["revision"] == 1 and made["project"] is None
    assert made["effective_negative"] == [{"term": "lowres", "source": "character"}]
    assert made["effective_style"]["steps"] == {"value": 20, "source": "default"}

    updated = client.predict(
        character=made["slug"],
        trigger_word=f"ada{TAG}",
        design_prompt="red hair, freckles",
        negative_prompt="lowres",
        steps=2,
        api_name="/save_character",
    )
    assert updated["id"] == made["id"] and updated["name"] == made["name"] and updated["revision"] == 2
    assert updated["design_prompt"] == "red hair, freckles"
    assert updated["effective_style"]["steps"] == {"value": 2, "source": "character"}

    listed = {c["slug"]: c for c in client.predict(api_name="/list_characters")}
    assert listed[made["slug"]]["trigger_word"] == f"ada{TAG}" and listed[made["slug"]]["pending"] == 0
    got = client.predict(made["slug"], api_name="/get_character")
    assert got["design_prompt"] == "red hair, freckles" and got["readiness"]["trainable"] is False


def test_a_character_inherits_its_projects_style(client):
    project = client.predict(f"Api Project {TAG}", "", "Euler", 3, None, 64, 64, api_name="/create_project")
    assert project["slug"] == f"api-project-{TAG}"
    assert project["style"] == {"sampler": "Euler", "steps": 3, "width": 64, "height": 64}
    kid = new_character(client, "Kid", project=project["slug"], cfg_scale=5)
    style = kid["effective_style"]
    assert kid["project"] == project["slug"]
    assert style["sampler"]["value"] == "Euler" and style["sampler"]["source"].startswith("project")
    assert style["width"]["value"] == 64 and style["width"]["source"].startswith("project")
    assert style["cfg_scale"] == {"value": 5.0, "source": "character"}
    assert style["clip_skip"]["source"] == "default"
    assert [c["slug"] for c in client.predict(project["slug"], api_name="/list_characters")] == [kid["slug"]]
    # the project's style changes later: the character inherits the new values it does not override
    updated = client.predict(project=project["slug"], sampler="DDIM", steps=7, api_name="/update_project")
    assert updated["style"] == {"sampler": "DDIM", "steps": 7}
    style = client.predict(kid["slug"], api_name="/get_character")["effective_style"]
    assert (
        style["steps"]["value"] == 7
        and style["sampler"]["value"] == "DDIM"
        and style["width"]["source"] == "default"
    )
    assert style["cfg_scale"] == {"value": 5.0, "source": "character"}


def test_ingest_review_undo_negatives_and_captions(client, tmp_path):
    c = new_character(client, "Bea")
    slug, trigger = c["slug"], c["trigger_word"]
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.write(noise_png(tmp_path / "z.png", 3), "good.png")
        z.write(noise_png(tmp_path / "e.png", 4), "../evil.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all")
    files = [
        noise_png(tmp_path / "a.png", 1),
        noise_png(tmp_path / "b.png", 2),
        tmp_path / "set.zip",
        tmp_path / "corrupt.png",
    ]
    result = client.predict(slug, [handle_file(str(f)) for f in files], api_name="/ingest")
    assert sorted(a["source"] for a in result["added"]) == [
        "upload:a.png",
        "upload:b.png",
        "zip:set.zip!good.png",
    ]
    skipped = {s["source"]: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"zip:set.zip!../evil.png", "upload:corrupt.png"}
    assert "escapes" in skipped["zip:set.zip!../evil.png"] and "corrupt" in skipped["upload:corrupt.png"]
    assert result["pending"] == 3 and result["job_id"]

    queue = client.predict(slug, api_name="/review_queue")
    by_source = {it["source"]: it["id"] for it in queue["items"]}
    assert queue["total"] == 3 and queue["readiness"]["pending"] == 3
    keep = [by_source["upload:a.png"], by_source["zip:set.zip!good.png"]]
    approved = client.predict(slug, ", ".join(keep), "approve", api_name="/review")
    assert approved["changed"] == 2 and approved["approved"] == 2 and approved["pending"] == 1
    bad = by_source["upload:b.png"]
    rejected = client.predict(slug, [bad], "reject", ["bad hands", "blurry"], api_name="/review")
    assert rejected["rejected"] == 1 and rejected["pending"] == 0
    [item] = client.predict(slug, "rejected", api_name="/review_queue")["items"]
    assert item["id"] == bad and sorted(item["reasons"]) == ["bad hands", "blurry"]

    negative = client.predict(slug, api_name="/effective_negative")
    assert {"term": "bad hands", "source": "rejected: bad hands x1"} in negative
    assert {"term": "blurry", "source": "rejected: blurry x1"} in negative
    undone = client.predict(slug, api_name="/undo_review")
    assert undone["undone"] == rejected["action_id"] and undone["rejected"] == 0 and undone["pending"] == 1
    assert not [
        t for t in client.predict(slug, api_name="/effective_negative") if t["source"].startswith("rejected")
    ]

    captioned = client.predict(keep[0], f"a red scarf, {trigger}, smiling", api_name="/set_caption")
    assert captioned["caption"].split(", ")[0] == trigger and "a red scarf" in captioned["caption"]
    assert client.predict(slug, "red scarf", "blue scarf", api_name="/replace_captions")["changed"] == 1
    approved_items = {
        it["id"]: it for it in client.predict(slug, "approved", api_name="/review_queue")["items"]
    }
    assert approved_items[keep[0]]["caption"] == f"{trigger}, a blue scarf, smiling"
    stats = client.predict(slug, api_name="/dataset_stats")
    assert (stats["approved"], stats["pending"], stats["rejected"], stats["trainable"]) == (2, 1, 0, False)
    assert stats["min_approved"] >= 1


def test_generate_with_a_character_then_regenerate_the_rejected_image(client):
    c = new_character(client, "Cy")
    # A character made after the app was built: the Character dropdown accepts it (allow_custom_value).
    _, infotext, job_id, *_ = client.predict(
        prompt="in a forest",
        seed=5,
        **SMALL,
        character=c["slug"],
        dataset_review=True,
        api_name="/generate",
    )
    assert infotext.startswith(f"{c['trigger_word']}, red hair, green eyes, in a forest\n")
    [item] = client.predict(c["slug"], api_name="/review_queue")["items"]
    assert item["source"].startswith(f"generation:{job_id}") and item["generation_id"]
    assert item["infotext"] == infotext

    client.predict(c["slug"], item["id"], "reject", ["bad hands"], api_name="/review")
    regen = client.predict(c["slug"], api_name="/regenerate_rejected")
    assert [j["item_id"] for j in regen["jobs"]] == [item["id"]] and regen["skipped"] == []
    assert regen["negative_prompt"].startswith("bad hands")
    assert wait_for_job(client, regen["jobs"][0]["job_id"])["status"] == "succeeded"
    [new] = client.predict(c["slug"], "pending", api_name="/review_queue")["items"]
    assert new["id"] != item["id"] and new["source"].startswith(f"generation:{regen['jobs'][0]['job_id']}")
    assert "Negative prompt: bad hands" in new["infotext"]
    [old] = client.predict(c["slug"], "rejected", api_name="/review_queue")["items"]
    assert old["regenerated_by"] == regen["jobs"][0]["job_id"]


def test_lora_versions_reference_sheet_and_regenerating_a_rejected_view(client, models_dir, tmp_path):
    c = new_character(client, "Dee", **SMALL)
    lora_name = f"api_dee_{TAG}"
    lora = save_kohya_lora(
        tmp_path / f"{lora_name}.safetensors", models_dir / "diffusers" / "studionova-demo", seed=4
    )
    row = client.predict(handle_file(str(lora)), "", c["slug"], api_name="/upload_lora")
    assert (row["name"], row["version"], row["format"], row["base_model"]) == (lora_name, 1, "kohya", "sd_v1")
    assert row["metadata"]["ss_network_dim"] == "4" and len(row["sha256"]) == 64
    view = client.predict(c["slug"], api_name="/get_character")
    assert view["active_lora"] == row["id"] and [lo["name"] for lo in view["loras"]] == [lora_name]
    (tmp_path / "pickled.ckpt").write_bytes(b"\x80\x04\x95junk")
    with pytest.raises(AppError, match=r"\.safetensors"):
        client.predict(handle_file(str(tmp_path / "pickled.ckpt")), "", c["slug"], api_name="/upload_lora")
    (tmp_path / "fake.safetensors").write_bytes(b"not a header")
    with pytest.raises(AppError, match=r"fake.safetensors is not a valid \.safetensors file"):
        client.predict(
            handle_file(str(tmp_path / "fake.safetensors")), "", c["slug"], api_name="/upload_lora"
        )

    sheet = client.predict(
        c["slug"], seed=42, views=["front"], expressions=["smiling"], **SMALL, api_name="/reference_sheet"
    )
    assert sheet["sheet_file"].endswith(".png") and [v["view"] for v in sheet["views"]] == [
        "front",
        "smiling",
    ]
    assert {v["seed"] for v in sheet["views"]} == {42} and len(sheet["dataset_items"]) == 2
    assert sheet["sheet_file"] in client.predict(c["slug"], api_name="/get_character")["sheets"]

    front = next(
        it
        for it in client.predict(c["slug"], api_name="/review_queue")["items"]
        if it["source"].endswith("#front")
    )
    client.predict(c["slug"], [front["id"]], "reject", ["blurry"], api_name="/review")
    regen = client.predict(c["slug"], api_name="/regenerate_rejected")
    assert [j["item_id"] for j in regen["jobs"]] == [front["id"]]
    assert wait_for_job(client, regen["jobs"][0]["job_id"])["status"] == "succeeded"
    pending = client.predict(c["slug"], "pending", api_name="/review_queue")["items"]
    assert len(pending) == 2 and any(
        it["source"].startswith(f"generation:{regen['jobs'][0]['job_id']}") for it in pending
    )

    assert client.predict(lora_name, api_name="/delete_lora") == {"deleted": lora_name}
    view = client.predict(c["slug"], api_name="/get_character")
    assert view["active_lora"] is None and view["loras"] == []
    with pytest.raises(AppError, match=f"LoRA '{lora_name}' is not registered"):
        client.predict(lora_name, api_name="/delete_lora")


def test_errors_name_what_is_wrong(client):
    missing = f"nobody-{TAG}"
    for endpoint in ("/get_character", "/review_queue", "/dataset_stats", "/effective_negative"):
        with pytest.raises(AppError, match=f"character '{missing}' not found; characters: "):
            client.predict(missing, api_name=endpoint)
    c = new_character(client, "Eve")
    with pytest.raises(AppError, match="a rejection needs at least one reason; allowed: .*bad hands"):
        client.predict(c["slug"], ["x"], "reject", api_name="/review")
    with pytest.raises(AppError, match="folder '/etc' is outside the allowed roots"):
        client.predict(c["slug"], None, "/etc", api_name="/ingest")
    with pytest.raises(AppError, match="nothing to undo"):
        client.predict(c["slug"], api_name="/undo_review")
    with pytest.raises(AppError, match="trigger_word=.*must not contain commas"):
        new_character(client, "Fay", trigger_word="two, words")


def test_train_lora_options_and_errors_through_the_api(client):
    """/train_lora takes every Train-tab option by name; the kohya backend without --kohya-dir, an unknown
    backend and a bad concept are refused with what is wrong and what is allowed, before any job exists."""
    c = new_character(client, "Trainer Api")
    with pytest.raises(AppError, match="no approved images"):
        client.predict(
            character=c["slug"],
            max_train_epochs=2,
            caption_dropout=0.1,
            keep_tokens=1,
            prior_loss_weight=1.0,
            api_name="/train_lora",
        )
    with pytest.raises(AppError, match="kohya.*--kohya-dir"):
        client.predict(character=c["slug"], backend="kohya", api_name="/train_lora")
    with pytest.raises(AppError, match=r"'sd-scripts'.*\['builtin', 'kohya'\]"):
        client.predict(character=c["slug"], backend="sd-scripts", api_name="/train_lora")
    with pytest.raises(AppError, match=r"concepts\[0\] repeats=0"):
        client.predict(character=c["slug"], concepts="someone:0", api_name="/train_lora")


def test_a_character_and_a_project_take_a_default_engine(client):
    c = new_character(client, "Engined", engine="comfyui")
    view = client.predict(c["slug"], api_name="/get_character")
    assert view["style"]["engine"] == "comfyui" and view["effective_style"]["engine"]["value"] == "comfyui"
    project = client.predict(
        f"Engine Project {TAG}", "", "", None, None, None, None, "local", api_name="/create_project"
    )
    assert project["style"] == {"engine": "local"}
