"""Generation through the real job path with the demo model (64 px, few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError, NotFoundError
from engine.gallery.infotext import PARAM_RE, parse_infotext
from engine.generation.request import GenerateRequest
from engine.samplers import SAMPLER_NAMES

BASE = dict(
    prompt="a red fox, portrait", negative_prompt="blurry", steps=3, width=64, height=64, cfg_scale=7.0
)


def run(studio, **values) -> dict:
    job_id, _ = studio.submit_generate({**BASE, **values})
    events = list(studio.watch(job_id))
    last = events[-1]
    assert last["type"] == "done", last
    return last["result"]


def pixels(result, i=0) -> np.ndarray:
    return np.asarray(Image.open(result["images"][i]["path"]).convert("RGB"), dtype=np.int16)


def test_same_seed_same_pixels_other_seed_differs(studio):
    a, b, c = run(studio, seed=1234), run(studio, seed=1234), run(studio, seed=1235)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_batch_image_i_equals_single_run_at_seed_plus_i(studio, sampler):
    batch = run(studio, seed=500, batch_size=3, sampler=sampler)
    assert [img["seed"] for img in batch["images"]] == [500, 501, 502]
    for i in range(3):
        single = run(studio, seed=500 + i, sampler=sampler)
        # Batched and single convolutions may round differently on CPU: allow 1/255 at most.
        diff = np.abs(pixels(batch, i) - pixels(single)).max()
        assert diff <= 1, f"batch image {i} differs from seed {500 + i} by {diff}"


def test_batch_count_continues_seeds(studio):
    res = run(studio, seed=77, batch_size=2, batch_count=2, steps=2)
    assert [img["seed"] for img in res["images"]] == [77, 78, 79, 80]


def test_random_seed_is_recorded(studio):
    res = run(studio, seed=-1, steps=2)
    seed = res["images"][0]["seed"]
    assert 0 <= seed < 2**32
    again = run(studio, seed=seed, steps=2)
    assert np.array_equal(pixels(res), pixels(again))


def test_png_carries_a1111_infotext_and_recipe(studio):
    res = run(studio, seed=42, sampler="DPM++ 2M Karras", clip_skip=2, loras="kohya_style:0.7")
    img = res["images"][0]
    png = Image.open(img["path"])
    assert png.format == "PNG"
    text = png.text["parameters"]
    assert text == img["infotext"]
    last_line = text.strip().split("\n")[-1]
    assert len(PARAM_RE.findall(last_line)) >= 3
    p = parse_infotext(text)
    assert p["Prompt"] == BASE["prompt"] and p["Negative prompt"] == "blurry"
    assert p["Steps"] == "3" and p["Seed"] == "42" and p["Size-1"] == "64" and p["Size-2"] == "64"
    assert p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras" and p["CFG scale"] == "7"
    assert p["Clip skip"] == "2" and p["Model"] == "studionova-demo" and len(p["Model hash"]) == 10
    assert p["Lora hashes"].startswith("kohya_style: ") and len(p["Lora hashes"].split(": ")[1]) == 12
    recipe = json.loads(png.text["studionova"])
    assert recipe["seed"] == 42 and recipe["request"]["sampler"] == "DPM++ 2M Karras"
    assert recipe["model_label"].endswith("demo (random weights)")
    assert recipe["loras"][0]["weight"] == 0.7


def test_every_sampler_runs(studio):
    outs = {}
    for sampler in SAMPLER_NAMES:
        outs[sampler] = pixels(run(studio, seed=9, steps=4, sampler=sampler))
    assert not np.array_equal(outs["Euler"], outs["Euler a"])


def test_clip_skip_changes_output(studio):
    assert not np.array_equal(
        pixels(run(studio, seed=3, clip_skip=1)), pixels(run(studio, seed=3, clip_skip=2))
    )


@pytest.mark.parametrize("lora", ["kohya_style", "peft_style"])
def test_lora_changes_output_and_removing_it_restores(studio, lora):
    plain = pixels(run(studio, seed=11))
    with_lora = pixels(run(studio, seed=11, loras=f"{lora}:1.0"))
    assert np.abs(plain - with_lora).max() > 3
    assert np.array_equal(plain, pixels(run(studio, seed=11)))
    weaker = pixels(run(studio, seed=11, loras=f"{lora}:0.3"))
    assert not np.array_equal(weaker, with_lora)


def test_two_loras_switch_without_reloading_base(studio):
    models = studio.executor.runtime(studio.device).models
    run(studio, seed=5, steps=2)
    loads = models.load_count
    run(studio, seed=5, steps=2, loras="kohya_style:1, peft_style:0.5")
    run(studio, seed=5, steps=2, loras="peft_style:1")
    run(studio, seed=5, steps=2)
    assert models.load_count == loads


def test_warm_cache_second_generation_reloads_nothing(studio):
    models = studio.executor.runtime(studio.device).models
    run(studio, seed=1, steps=2)
    loads = models.load_count
    pipe = models.loaded.pipe
    run(studio, seed=2, steps=2)
    assert models.load_count == loads and models.loaded.pipe is pipe


def test_lycoris_refused_with_clear_message(studio):
    with pytest.raises(
        InputError, match=r"some_loha.safetensors is a LoHa \(LyCORIS\) network.*not supported"
    ):
        studio.submit_generate({**BASE, "seed": 1, "loras": "some_loha"})


def test_img2img(studio, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(src)
    upload = studio.settings.gradio_tmp_dir / "t" / "in.png"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(src.read_bytes())
    a = run(studio, seed=8, steps=4, init_image=str(upload), denoising_strength=0.5)
    b = run(studio, seed=8, steps=4, init_image=str(upload), denoising_strength=0.5)
    assert np.array_equal(pixels(a), pixels(b)) and pixels(a).shape == (64, 64, 3)
    p = parse_infotext(a["images"][0]["infotext"])
    assert p["Denoising strength"] == "0.5"
    c = run(studio, seed=8, steps=4, init_image=str(upload), denoising_strength=0.9)
    assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (
            {"model": "no-such-model"},
            "model 'no-such-model' not found; available: demo-single.safetensors, studionova-demo, tiny-sdxl",
        ),
        ({"steps": -3}, "steps=-3"),
        ({"width": 100000}, "width=100000"),
        ({"width": 65}, "multiple of 8"),
        ({"sampler": "Euler z"}, "allowed: Euler"),
        ({"loras": "nope:1"}, "lora 'nope' not found"),
        ({"loras": "kohya_style:9"}, "between -4 and 4"),
        ({"init_image": "/etc/passwd"}, "server paths are not accepted"),
        ({"init_image": "../../studio.db"}, "server paths are not accepted"),
        ({"width": 2048, "height": 2048, "batch_size": 8}, "too large"),
    ],
)
def test_bad_input_is_refused_before_a_job_exists(studio, values, needle):
    before = len(studio.recent_jobs(1000))
    with pytest.raises((InputError, NotFoundError)) as err:
        studio.submit_generate({**BASE, **values})
    assert needle in str(err.value)
    assert len(studio.recent_jobs(1000)) == before


def test_non_image_upload_fails_clearly(studio):
    bad = studio.settings.gradio_tmp_dir / "t" / "notes.png"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("this is not an image")
    job_id, _ = studio.submit_generate({**BASE, "seed": 1, "init_image": str(bad)})
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "failed" and "not a readable image" in last["error"]


# --- what was rendered is what is recorded --------------------------------------------------------------
def _finish(studio, job_id: str) -> dict:
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "done", last
    return last["result"]


def test_a_retried_job_keeps_its_styles_after_styles_csv_changes(studio):
    book = studio.styles()
    book.save("retry-look", "{prompt}, oil painting", "lowres")
    job_id, token = studio.submit_generate({**BASE, "seed": 61, "steps": 2, "styles": "retry-look"})
    snapshot = [{"name": "retry-look", "prompt": "{prompt}, oil painting", "negative_prompt": "lowres"}]
    assert studio.jobs.require(job_id).request["style_snapshot"] == snapshot  # frozen at submission
    first = _finish(studio, job_id)

    book.save("retry-look", "{prompt}, watercolor", "sketch")  # edited after the job ran
    again = _finish(studio, studio.retry(job_id, token=token)[0])
    fresh = run(studio, seed=61, steps=2, styles="retry-look")

    old, new = (parse_infotext(r["images"][0]["infotext"]) for r in (again, fresh))
    assert old["Prompt"] == "a red fox, portrait, oil painting" and old["Negative prompt"] == "blurry, lowres"
    assert new["Prompt"] == "a red fox, portrait, watercolor" and new["Negative prompt"] == "blurry, sketch"
    assert again["images"][0]["infotext"] == first["images"][0]["infotext"]
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(fresh))
    recipe = json.loads(Image.open(again["images"][0]["path"]).text["studionova"])
    assert recipe["request"]["style_snapshot"] == snapshot
    row = studio.generation(again["images"][0]["generation_id"])
    assert row.prompt == "a red fox, portrait, oil painting" and row.negative_prompt == "blurry, lowres"


def test_the_infotext_prompt_is_the_prompt_the_pixels_were_made_from(studio):
    studio.styles().save("made-from", "film grain, {prompt}", "jpeg artifacts")
    styled = run(studio, seed=62, steps=2, styles="made-from")
    info = parse_infotext(styled["images"][0]["infotext"])
    assert info["Prompt"] == "film grain, a red fox, portrait"
    # the recorded prompts, typed in plainly with no style, render the very same pixels
    plain = run(studio, seed=62, steps=2, prompt=info["Prompt"], negative_prompt=info["Negative prompt"])
    assert np.array_equal(pixels(styled), pixels(plain))
    row = studio.generation(styled["images"][0]["generation_id"])
    assert (row.prompt, row.negative_prompt) == (info["Prompt"], info["Negative prompt"])


def test_a_job_submitted_before_style_snapshots_reads_styles_csv(studio):
    studio.styles().save("old-row", "{prompt}, sepia", "")
    request = studio.build_generate_request({**BASE, "seed": 63, "steps": 2, "styles": "old-row"})
    old = request.model_dump(mode="json", exclude={"style_snapshot"})  # as an older StudioNOVA stored it
    result = _finish(studio, studio.jobs.submit("generate", old)[0])
    assert parse_infotext(result["images"][0]["infotext"])["Prompt"] == "a red fox, portrait, sepia"


def test_style_names_are_checked_and_the_snapshot_matches_them(studio):
    with pytest.raises(InputError, match="style_snapshot must hold the styles named in styles"):
        GenerateRequest.build(**BASE, styles=["a"], style_snapshot=[{"name": "b"}])
    with pytest.raises(NotFoundError, match="style 'nowhere' not found"):
        studio.submit_generate({**BASE, "styles": "nowhere"})
