"""LoRA training as a job: a character's approved set -> a kohya LoRA registered as its next version,
bad input refused before a job exists, and kill -9 mid-training -> restart -> the run continues."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import InputError, NotFoundError
from tests.test_characters import FAST, wait
from tests.test_datasets import ingest, new_character, upload_dir
from tests.test_ingest import make_image

TINY = {
    "preset": "quick",
    "max_train_steps": 4,
    "resolution": 64,
    "rank": 4,
    "alpha": 2.0,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
}


@pytest.fixture
def low_minimum(studio):
    old = studio.settings.min_approved_images
    studio.settings.min_approved_images = 2
    yield
    studio.settings.min_approved_images = old


def approved_character(studio, name: str, n: int = 2):
    c = new_character(studio, name)
    up = upload_dir(studio, name.replace(" ", "-"))
    files = [str(make_image(up / f"{i}.png", size=(64, 64), seed=300 + i)) for i in range(n)]
    ids = [a["id"] for a in ingest(studio, c, files=files)["added"]]
    studio.review(c.slug, ids, "approve")
    return c


def test_train_job_exports_a_kohya_lora_as_the_next_version(studio, models_dir, low_minimum):
    from engine.artifacts import safetensors_header
    from engine.model_manager.pipelines import lora_format

    c = approved_character(studio, "Trainee")
    jid, _ = studio.submit_train_lora({"character": c.slug, **TINY})
    res = wait(studio, jid)
    assert (
        res["lora"] == "trainee-v1" and res["version"] == 1 and res["steps"] == 4 and len(res["losses"]) == 4
    )
    path = models_dir / "loras" / "trainee-v1.safetensors"
    assert lora_format(path) == "kohya"
    _, header = safetensors_header(path)
    meta = header["__metadata__"]
    assert (
        meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0 and meta["sshs_model_hash"]
    )
    assert all(k.startswith("lora_unet_") for k in header if k != "__metadata__")
    view = studio.character_view(c.slug)
    assert view["loras"][0]["name"] == "trainee-v1" and view["loras"][0]["source"] == "trained"
    assert view["active_lora"] == view["loras"][0]["id"]
    # ready in Generate: the character's generations use it
    img = wait(studio, studio.submit_generate({"prompt": "x", "seed": 1, "character": c.slug, **FAST})[0])
    assert f"trainee-v1: {res['short_hash']}" in img["images"][0]["infotext"]
    # a second training, with the text encoder trained too, is version 2 and has lora_te_ keys
    res2 = wait(
        studio,
        studio.submit_train_lora(
            {"character": c.slug, **TINY, "max_train_steps": 2, "train_text_encoder": True}
        )[0],
    )
    assert res2["lora"] == "trainee-v2"
    _, header2 = safetensors_header(models_dir / "loras" / "trainee-v2.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in header2)
    assert any(k.startswith("lora_unet_") for k in header2)
    assert Image.open(img["images"][0]["path"]).size == (64, 64)


def test_train_bad_input_is_refused_before_a_job(studio, low_minimum):
    empty = new_character(studio, "Nobody Approved")
    with pytest.raises(InputError, match="no approved images"):
        studio.submit_train_lora({"character": empty.slug, **TINY})
    c = approved_character(studio, "Bad Options")
    n = len(studio.recent_jobs(1000))
    studio.settings.min_approved_images = 3
    with pytest.raises(InputError, match="at least 3"):
        studio.submit_train_lora({"character": c.slug, **TINY})
    studio.settings.min_approved_images = 2
    with pytest.raises(InputError, match="mixed_precision"):
        studio.submit_train_lora({"character": c.slug, **TINY, "mixed_precision": "fp16"})
    with pytest.raises(InputError, match="preset"):
        studio.submit_train_lora({"character": c.slug, **TINY, "preset": "ultra"})
    with pytest.raises(InputError, match="rank"):
        studio.submit_train_lora({"character": c.slug, **TINY, "rank": 0})
    with pytest.raises(InputError, match="refiner"):
        studio.submit_train_lora({"character": c.slug, **TINY, "model": "tiny-sdxl-refiner"})
    with pytest.raises(InputError, match="outside the allowed roots"):
        studio.submit_train_lora({"character": c.slug, **TINY, "reg_dir": "/etc"})
    with pytest.raises(InputError, match="given twice"):
        studio.submit_train_lora({"character": c.slug, **TINY, "concepts": f"{c.slug}:2"})
    with pytest.raises(InputError, match="repeats"):
        studio.submit_train_lora(
            {"character": c.slug, **TINY, "concepts": [{"character": c.slug, "repeats": 0}]}
        )
    with pytest.raises(InputError, match="reg_dir is empty"):
        studio.submit_train_lora({"character": c.slug, **TINY, "reg_caption": "woman"})
    with pytest.raises(InputError, match="512"):
        studio.submit_train_lora({"character": c.slug, **TINY, "model": "tiny-sdxl", "resolution": 256})
    with pytest.raises(NotFoundError):
        studio.submit_train_lora({"character": c.slug, **TINY, "model": "no-such-model"})
    assert len(studio.recent_jobs(1000)) == n


def test_concepts_regularisation_epochs_and_a_single_file_base(studio, models_dir, low_minimum):
    """Another character's approved set joins as a second concept with its own repeats, a kohya-style reg
    folder (inside the allowed roots) adds class images, epochs decide the steps, and a single-file
    checkpoint is converted to diffusers once (cached) and trained on."""
    import json

    main, other = approved_character(studio, "Concept Main"), approved_character(studio, "Concept Other")
    reg = studio.settings.import_dir / "reg" / "1_woman"
    reg.mkdir(parents=True)
    make_image(reg / "r0.png", size=(64, 64), seed=900)
    make_image(reg / "r1.png", size=(64, 64), seed=901)
    (reg / "r1.txt").write_text("a woman, studio photo", encoding="utf-8")
    values = {
        **TINY,
        "character": main.slug,
        "concepts": f"{other.slug}:2",
        "reg_dir": str(reg.parent),
        "reg_caption": "woman",
        "max_train_epochs": 1,
        "model": "demo-single.safetensors",
    }
    values.pop("max_train_steps")
    jid, _ = studio.submit_train_lora(values)
    res = wait(studio, jid)
    report = json.loads(Path(res["report"]).read_text())
    assert report["images"] == 2 + 2 + 2 and report["config"]["max_train_epochs"] == 1
    # 2 main images x1 + 2 other x2 = 6 training samples, so 6 reg samples: 12 single-image batches = 12 steps
    assert res["steps"] == 12 == report["config"]["max_train_steps"]
    items = studio.jobs.require(jid).request["train"]["images"]
    assert [i.get("repeats", 1) for i in items if not i.get("reg")] == [1, 1, 2, 2]
    assert sorted(i["caption"] for i in items if i.get("reg")) == ["a woman, studio photo", "woman"]
    converted = list((studio.settings.cache_dir).rglob("converted/*/model_index.json"))
    assert len(converted) == 1, "the checkpoint was converted once, into the cache"
    assert report["config"]["model"] == "demo-single.safetensors"
    assert (models_dir / "loras" / f"{res['lora']}.safetensors").is_file()


@pytest.mark.timeout(600)
def test_kill9_mid_training_then_restart_resumes(models_dir, model_configs, tmp_path):
    """The app in a subprocess: train, kill -9 after a checkpoint, restart with --auto-resume; the job
    finishes, continuing from the checkpoint's step, and its LoRA is registered."""
    from gradio_client import Client, handle_file

    from tests.factories import AppProcess

    data = tmp_path / "data"
    extra = ("--model-configs", str(model_configs), "--min-approved-images", "2")
    app = AppProcess(data, models_dir, *extra).start()
    try:
        client = Client(app.url, verbose=False)
        c = client.predict(name="Crashy", trigger_word="crashy", api_name="/save_character")
        files = [
            handle_file(str(make_image(tmp_path / f"{i}.png", size=(64, 64), seed=400 + i))) for i in range(2)
        ]
        added = client.predict(character=c["slug"], files=files, api_name="/ingest")["added"]
        client.predict(
            character=c["slug"], item_ids=[a["id"] for a in added], action="approve", api_name="/review"
        )
        job = client.predict(
            character=c["slug"],
            preset="quick",
            max_train_steps=24,
            resolution=64,
            rank=4,
            alpha=2,
            checkpoint_every=4,
            api_name="/train_lora",
        )
        jid = job["job_id"]
        deadline = time.monotonic() + 240
        while True:
            st = client.predict(jid, api_name="/job_status")
            if (st.get("progress") or {}).get("step", 0) >= 9:
                break
            assert st["status"] in ("queued", "running") and time.monotonic() < deadline, st
            time.sleep(0.3)
        app.kill9()
    finally:
        app.stop()
    ckpts = sorted((data / "training" / jid / "checkpoints").glob("step-*"))
    assert ckpts, "a checkpoint was written before the kill"
    app = AppProcess(data, models_dir, *extra, "--auto-resume").start()
    try:
        client = Client(app.url, verbose=False)
        deadline = time.monotonic() + 300
        while (st := client.predict(jid, api_name="/job_status"))["status"] != "succeeded":
            assert st["status"] in ("queued", "running", "interrupted") and time.monotonic() < deadline, st
            time.sleep(0.5)
        result = st["result"]
        assert result["resumed_from_step"] >= 8 and result["steps"] == 24
        assert result["lora"] == "crashy-v1"
        assert not [p for p in (models_dir / "loras").iterdir() if p.name.startswith(".tmp-")]
    finally:
        app.stop()


def test_training_streams_samples_the_ui_can_show(studio, low_minimum):
    c = approved_character(studio, "Sampler Sue")
    jid, _ = studio.submit_train_lora(
        {"character": c.slug, **TINY, "sample_every": 2, "sample_prompts": ["sue"]}
    )
    samples = []
    for event in studio.watch(jid):
        if event["type"] == "sample":
            samples.extend(event["paths"])
        if event["type"] in ("done", "failed", "cancelled", "interrupted"):
            assert event["type"] == "done", event
            break
    assert samples and all(
        Path(p).is_relative_to(studio.settings.outputs_dir) and Path(p).is_file() for p in samples
    )
