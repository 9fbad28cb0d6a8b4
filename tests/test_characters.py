"""Characters: prompt composition, negatives merging, inheritance, snapshots in recipes, LoRA versions,
reference sheets (engine level, the shared in-process studio and the demo model)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from engine.characters.characters import compose_negative, compose_prompt, merge_terms, split_terms
from engine.errors import InputError, NotFoundError
from engine.requests import CharacterSnapshot, NegativeTerm

FAST = dict(steps=2, width=64, height=64, sampler="Euler")


def wait(studio, job_id: str) -> dict:
    for event in studio.watch(job_id):
        if event["type"] == "done":
            return event["result"]
        if event["type"] in ("failed", "cancelled", "interrupted"):
            raise AssertionError(f"job {job_id} {event['type']}: {event.get('error')}")
    raise AssertionError("no result")


def test_split_and_merge_terms_keep_weighted_groups():
    assert split_terms("a, (red, blue:1.2), [x, y], <lora:a:1>\nz") == [
        "a",
        "(red, blue:1.2)",
        "[x, y]",
        "<lora:a:1>",
        "z",
    ]
    assert merge_terms("blurry, bad hands", "Bad  Hands, lowres", ["blurry", "text"]) == [
        "blurry",
        "bad hands",
        "lowres",
        "text",
    ]


def test_compose_prompt_and_negative():
    snap = CharacterSnapshot(
        id="x",
        slug="nova",
        name="Nova",
        trigger_word="nova_chr",
        design_prompt="silver hair, red jacket",
        negative_terms=[
            NegativeTerm(term="blurry", source="character"),
            NegativeTerm(term="bad hands", source="rejected: bad hands x2"),
        ],
    )
    assert compose_prompt(snap, "on a rooftop") == "nova_chr, silver hair, red jacket, on a rooftop"
    assert compose_prompt(snap, "") == "nova_chr, silver hair, red jacket"
    assert compose_negative(snap, "lowres, BLURRY") == "blurry, bad hands, lowres"
    assert compose_prompt(None, "p") == "p" and compose_negative(None, "n") == "n"


def test_character_inherits_project_style_unless_overridden(studio):
    chars = studio.characters
    project = chars.create_project("Inherit Test", {"steps": 3, "cfg_scale": 5.5, "width": 64})
    c = chars.create({"name": "Heir", "project": project.slug, "style": {"steps": 2}})
    style = chars.effective_style(c)
    assert style["steps"] == {"value": 2, "source": "character"}
    assert style["cfg_scale"] == {"value": 5.5, "source": f"project {project.name}"}
    assert style["width"]["value"] == 64 and style["sampler"]["source"] == "default"
    with pytest.raises(InputError, match="steps"):
        chars.create({"name": "Bad", "style": {"steps": 0}})
    with pytest.raises(InputError, match="unknown"):
        chars.create({"name": "Bad", "style": {"seed": 3}})
    with pytest.raises(NotFoundError, match="project"):
        chars.create({"name": "Bad", "project": "no-such-project"})


def test_generate_with_character_composes_and_records_it(studio):
    from engine.store.database import Generation

    c = studio.characters.create(
        {
            "name": "Nova Prime",
            "trigger_word": "novaprime",
            "design_prompt": "silver hair, red jacket",
            "negative_prompt": "lowres",
        }
    )
    assert c.slug == "nova-prime"
    jid, _ = studio.submit_generate(
        {"prompt": "on a rooftop", "negative_prompt": "text, LOWRES", "seed": 5, "character": c.slug, **FAST}
    )
    img = wait(studio, jid)["images"][0]
    info = Image.open(img["path"]).info
    assert info["parameters"].startswith(
        "novaprime, silver hair, red jacket, on a rooftop\nNegative prompt: lowres, text\n"
    )
    recipe = json.loads(info["studionova"])
    assert recipe["character"]["slug"] == "nova-prime" and recipe["character"]["revision"] == 1
    assert recipe["request"]["prompt"] == "on a rooftop"
    assert studio.db.get_job(jid).request["character"]["id"] == c.id
    with studio.db.session() as s:
        gen = s.get(Generation, img["generation_id"])
    assert gen.character == "nova-prime" and gen.prompt.startswith("novaprime, ")

    # Editing the character never rewrites the past: the old PNG and row keep their recipe.
    before = Path(img["path"]).read_bytes()
    studio.characters.update(c.slug, {"design_prompt": "black hair, blue coat"})
    assert Path(img["path"]).read_bytes() == before
    with studio.db.session() as s:
        assert (
            s.get(Generation, img["generation_id"]).recipe["character"]["design_prompt"]
            == "silver hair, red jacket"
        )
    jid2, _ = studio.submit_generate({"prompt": "on a rooftop", "seed": 5, "character": c.slug, **FAST})
    img2 = wait(studio, jid2)["images"][0]
    assert (
        Image.open(img2["path"])
        .info["parameters"]
        .startswith("novaprime, black hair, blue coat, on a rooftop")
    )
    assert json.loads(Image.open(img2["path"]).info["studionova"])["character"]["revision"] == 2
    # the same seed with other prompt text draws another picture
    assert Image.open(img["path"]).tobytes() != Image.open(img2["path"]).tobytes()


def test_unknown_character_is_refused_before_a_job(studio):
    n = len(studio.recent_jobs(1000))
    with pytest.raises(NotFoundError, match="character 'nobody' not found"):
        studio.submit_generate({"prompt": "x", "character": "nobody", **FAST})
    assert len(studio.recent_jobs(1000)) == n


def test_lora_upload_validates_registers_and_versions(studio, models_dir, tmp_path):
    from tests.factories import save_kohya_lora, save_loha

    chars = studio.characters
    c = chars.create({"name": "Lora Owner", "trigger_word": "lorachr"})
    src = save_kohya_lora(tmp_path / "mine.safetensors", models_dir / "diffusers" / "studionova-demo", seed=7)
    row = chars.add_lora(src, "owner_v1", c.slug)
    assert row.version == 1 and row.format == "kohya" and len(row.short_hash) == 12
    assert (models_dir / "loras" / "owner_v1.safetensors").is_file()
    assert chars.get(c.slug).active_lora_id == row.id
    row2 = chars.add_lora(src, "owner_v2", c.slug)
    assert row2.version == 2 and chars.get(c.slug).active_lora_id == row2.id

    # generating with the character uses its active LoRA version, recorded in the recipe and infotext
    jid, _ = studio.submit_generate({"prompt": "x", "seed": 1, "character": c.slug, **FAST})
    img = wait(studio, jid)["images"][0]
    params = Image.open(img["path"]).info["parameters"]
    assert f"owner_v2: {row2.short_hash}" in params
    assert json.loads(Image.open(img["path"]).info["studionova"])["character"]["lora"]["version"] == 2

    # bad files: nothing is written, the message names the file and what is allowed
    before = sorted(p.name for p in (models_dir / "loras").iterdir())
    pkl = tmp_path / "evil.ckpt"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match=r"\.safetensors"):
        chars.add_lora(pkl, "evil", c.slug)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError, match="not a valid .safetensors"):
        chars.add_lora(junk, "junk", c.slug)
    with pytest.raises(InputError, match="LyCORIS"):
        chars.add_lora(save_loha(tmp_path / "loha.safetensors"), "loha", c.slug)
    with pytest.raises(InputError, match="already exists"):
        chars.add_lora(src, "owner_v1", c.slug)
    assert sorted(p.name for p in (models_dir / "loras").iterdir()) == before

    # delete removes the file and the row, and the character's pointer to it
    assert chars.delete_lora("owner_v2") == "owner_v2"
    assert not (models_dir / "loras" / "owner_v2.safetensors").exists()
    assert chars.get(c.slug).active_lora_id is None
    assert [r.name for r in chars.loras(c.slug)] == ["owner_v1"]
    chars.delete_lora("owner_v1")


def test_reference_sheet_from_text_and_ip_adapter_refusal(studio, tmp_path):
    from engine.store.database import Asset

    c = studio.characters.create(
        {
            "name": "Sheet Girl",
            "trigger_word": "sheetgirl",
            "design_prompt": "green cape",
            "style": {"steps": 2, "width": 64, "height": 64},
        }
    )
    jid, _ = studio.submit_reference_sheet(
        {"character": c.slug, "seed": 77, "views": ["front", "side"], "expressions": ["smiling"]}
    )
    res = wait(studio, jid)
    assert [v["view"] for v in res["views"]] == ["front", "side", "smiling"]
    assert {v["seed"] for v in res["views"]} == {77}
    sheet = Image.open(res["sheet"])
    assert sheet.width >= 3 * 64 and sheet.height > 64
    for v in res["views"]:
        params = Image.open(v["path"]).info["parameters"]
        assert params.startswith("sheetgirl, green cape, ")
    assert "side view" in Image.open(res["views"][1]["path"]).info["parameters"]
    with studio.db.session() as s:
        assert s.get(Asset, res["asset_id"]).character_id == c.id
    view = studio.character_view(c.slug)
    assert view["sheets"] and view["readiness"]["pending"] == 3
    # from a source image through IP-Adapter without its weights: refused before a job, saying what to put where
    src = studio.settings.outputs_dir / "ref-src.png"
    Image.new("RGB", (64, 64), "red").save(src)
    with pytest.raises(InputError, match="ipadapter"):
        studio.submit_reference_sheet(
            {"character": c.slug, "seed": 1, "source_image": str(src), "use_ip_adapter": True}
        )
    # img2img from the source image works
    jid, _ = studio.submit_reference_sheet(
        {
            "character": c.slug,
            "seed": 1,
            "source_image": str(src),
            "views": ["back"],
            "expressions": [],
            "add_to_dataset": False,
        }
    )
    res = wait(studio, jid)
    assert "Denoising strength" in Image.open(res["views"][0]["path"]).info["parameters"]
    with pytest.raises(InputError, match="view 'top'"):
        studio.submit_reference_sheet({"character": c.slug, "seed": 1, "views": ["top"]})


def test_character_style_loras_and_delete_fixes(studio, models_dir, tmp_path):
    from tests.factories import save_kohya_lora

    chars = studio.characters
    a = chars.create(
        {"name": "Style User", "style": {"steps": 3, "cfg_scale": 4.5, "width": 64, "height": 64}}
    )
    jid, _ = studio.submit_generate(
        {"prompt": "x", "seed": 1, "character": a.slug, "use_character_style": True, "sampler": "Euler"}
    )
    assert "Steps: 3, Sampler: Euler a, CFG scale: 4.5" in wait(studio, jid)["images"][0]["infotext"]
    # a LoRA version belongs to one character: attaching it elsewhere is refused, the owner keeps working
    src = save_kohya_lora(tmp_path / "own.safetensors", models_dir / "diffusers" / "studionova-demo", seed=9)
    row = chars.add_lora(src, "owned_by_a", a.slug)
    b = chars.create({"name": "Thief"})
    with pytest.raises(InputError, match="is a version of 'style-user'"):
        chars.register_lora("owned_by_a", b.slug)
    assert chars.snapshot(a.slug).lora["name"] == "owned_by_a"
    chars.delete_lora(row.id)
    # deleting a character removes its sheets and reference images too
    jid, _ = studio.submit_reference_sheet(
        {"character": a.slug, "seed": 5, "views": ["front"], "expressions": []}
    )
    sheet = Path(wait(studio, jid)["sheet"])
    assert sheet.is_file()
    out = chars.delete(a.slug, studio.settings.outputs_dir)
    assert out["sheets"] == 1 and not sheet.exists()
