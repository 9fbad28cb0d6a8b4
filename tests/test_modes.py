"""A1111 prompt syntax, inpaint/outpaint, hires fix, variation seeds, styles, VAE, embeddings and
ControlNet, through the real job path with the demo model (64 px, 2-3 steps)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.errors import InputError, NotFoundError
from engine.gallery.infotext import parse_infotext
from engine.generation import modes
from engine.generation.prompts import Fragment, encode_prompts, parse_prompt
from engine.prompt_tags import extract_lora_tags
from tests.test_generate import pixels, run


# --- prompt syntax ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("a (cat:1.2) dog", [("a ", 1.0), ("cat", 1.2), (" dog", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("(red (hat:1.5))", [("red ", 1.1), ("hat", 1.65)]),
        (r"\(literal\) x", [("(literal) x", 1.0)]),
        ("style: anime", [("style: anime", 1.0)]),
        ("open (bracket", [("open ", 1.0), ("bracket", 1.1)]),  # A1111: unclosed runs to the end
        ("stray) closer", [("stray) closer", 1.0)]),
    ],
)
def test_a1111_attention_syntax(text, expected):
    (segment,) = parse_prompt(text)
    assert [(f.text, round(f.weight, 4)) for f in segment] == [(t, round(w, 4)) for t, w in expected]


def test_break_splits_segments():
    assert parse_prompt("a cat BREAK (a dog:1.3)") == [[Fragment("a cat", 1.0)], [Fragment("a dog", 1.3)]]


def test_lora_tags_are_extracted():
    text, tags = extract_lora_tags("a cat <lora:kohya_style:0.6>, smiling <lora:peft_style>")
    assert text == "a cat, smiling"
    assert tags == [("kohya_style", 0.6), ("peft_style", 1.0)]
    with pytest.raises(InputError, match="hypernet"):
        extract_lora_tags("x <hypernet:foo:1>")


@pytest.fixture(scope="module")
def demo_pipe(models_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(models_dir / "diffusers" / "studionova-demo")


def test_weighting_changes_conditioning_and_long_prompts_are_not_truncated(demo_pipe):
    plain = encode_prompts(demo_pipe, "a cat on a mat", "", 1)["prompt_embeds"]
    weighted = encode_prompts(demo_pipe, "a (cat:1.5) on a mat", "", 1)["prompt_embeds"]
    assert plain.shape == weighted.shape == (1, 77, 32)
    assert not np.allclose(plain.numpy(), weighted.numpy())
    long_prompt = ", ".join(f"detail{i}" for i in range(40))  # far over 75 tokens
    emb = encode_prompts(demo_pipe, long_prompt, "short", 1)
    assert emb["prompt_embeds"].shape[1] > 77 and emb["prompt_embeds"].shape[1] % 77 == 0
    assert emb["negative_prompt_embeds"].shape == emb["prompt_embeds"].shape  # padded to the same chunks
    # The tail of a long prompt matters: changing the last word changes the last chunk.
    other = encode_prompts(demo_pipe, long_prompt[:-1] + "X", "short", 1)["prompt_embeds"]
    assert not np.allclose(emb["prompt_embeds"][:, -77:].numpy(), other[:, -77:].numpy())
    broken = encode_prompts(demo_pipe, "a cat BREAK a mat", "", 1)["prompt_embeds"]
    assert broken.shape[1] == 154
    skip2 = encode_prompts(demo_pipe, "a cat on a mat", "", 2)["prompt_embeds"]
    assert not np.allclose(plain.numpy(), skip2.numpy())


def test_prompt_lora_tag_applies_the_lora(studio):
    plain = run(studio, seed=9, steps=2)
    tagged = run(studio, seed=9, steps=2, prompt="a red fox, portrait <lora:kohya_style:1>")
    listed = run(studio, seed=9, steps=2, loras="kohya_style:1")
    assert not np.array_equal(pixels(plain), pixels(tagged))
    assert np.array_equal(pixels(tagged), pixels(listed))
    info = parse_infotext(tagged["images"][0]["infotext"])
    assert "kohya_style" in info["Lora hashes"] and "<lora:kohya_style:1>" in info["Prompt"]


# --- inpaint / outpaint -------------------------------------------------------------------------
def _mask(path, box=(16, 16, 48, 48), size=(64, 64)):
    img = Image.new("L", size, 0)
    ImageDraw.Draw(img).rectangle(box, fill=255)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def source(studio):
    return run(studio, seed=3, steps=2)["images"][0]["path"]


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
def test_inpaint_changes_only_the_masked_area(studio, source, content):
    mask_path = _mask(studio.settings.outputs_dir / f"mask-{content.replace(' ', '_')}.png")
    res = run(
        studio,
        seed=11,
        steps=3,
        init_image=source,
        mask_image=str(mask_path),
        denoising_strength=0.9,
        masked_content=content,
        mask_blur=4,
    )
    out, src = pixels(res), np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    _, blurred = modes.prepare_mask(Image.open(mask_path), 4)
    outside = np.asarray(blurred) == 0
    assert np.array_equal(out[outside], src[outside]), "pixels outside the mask changed"
    inside = np.asarray(blurred) == 255
    assert np.abs(out[inside] - src[inside]).mean() > 1, "the masked area was not repainted"
    info = parse_infotext(res["images"][0]["infotext"])
    assert info["Mask blur"] == "4" and info["Masked content"] == content


def test_inpaint_only_masked_with_padding(studio, source):
    mask_path = _mask(studio.settings.outputs_dir / "mask-small.png", box=(40, 40, 56, 56))
    res = run(
        studio,
        seed=12,
        steps=2,
        init_image=source,
        mask_image=str(mask_path),
        inpaint_only_masked=True,
        inpaint_padding=8,
        denoising_strength=0.8,
    )
    out, src = pixels(res), np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    _, blurred = modes.prepare_mask(Image.open(mask_path), 4)
    assert np.array_equal(out[np.asarray(blurred) == 0], src[np.asarray(blurred) == 0])
    assert parse_infotext(res["images"][0]["infotext"])["Inpaint area"] == "Only masked"


def test_outpaint_extends_the_canvas(studio, source):
    res = run(
        studio,
        seed=13,
        steps=2,
        init_image=source,
        outpaint_left=16,
        outpaint_down=8,
        denoising_strength=0.9,
        mask_blur=0,
    )
    out = pixels(res)
    assert out.shape[:2] == (72, 80)
    src = np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)
    # The original sits at (16, 0); its interior away from the repainted seam is kept exactly.
    assert np.array_equal(out[0:56, 24:80], src[0:56, 8:64])


def test_mask_without_init_image_is_refused(studio):
    with pytest.raises(InputError, match="init_image"):
        studio.build_generate_request(
            {"prompt": "x", "mask_image": str(_mask(studio.settings.outputs_dir / "m.png"))}
        )


def test_empty_mask_is_a_clear_error(studio, source):
    empty = studio.settings.outputs_dir / "mask-empty.png"
    Image.new("L", (64, 64), 0).save(empty)
    job_id, _ = studio.submit_generate(
        {"prompt": "x", "steps": 2, "width": 64, "height": 64, "init_image": source, "mask_image": str(empty)}
    )
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "failed" and "mask_image is empty" in last["error"]


# --- hires fix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "tiny-compact-x4"])
def test_hires_fix_output_size(studio, upscaler):
    """Latent, Lanczos, or an upscale model from models/upscale_models (Real-ESRGAN Compact via spandrel)."""
    res = run(
        studio,
        seed=21,
        steps=2,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler=upscaler,
        hr_second_pass_steps=2,
        hr_denoising_strength=0.6,
    )
    img = Image.open(res["images"][0]["path"])
    assert img.size == (96, 96)
    info = parse_infotext(res["images"][0]["infotext"])
    assert info["Hires upscaler"] == upscaler and info["Hires upscale"] == "1.5"
    assert info["Size-1"] == "64"  # A1111 records the first-pass size


def test_unknown_hires_upscaler_names_the_choices(studio):
    with pytest.raises(InputError, match="Lanczos"):
        studio.build_generate_request({"prompt": "x", "enable_hr": True, "hr_upscaler": "nope"})


# --- variation seed -------------------------------------------------------------------------------
def test_variation_seed(studio):
    base = run(studio, seed=31, steps=3, sampler="Euler")
    zero = run(studio, seed=31, steps=3, sampler="Euler", subseed=99, subseed_strength=0.0)
    some = run(studio, seed=31, steps=3, sampler="Euler", subseed=99, subseed_strength=0.3)
    full = run(studio, seed=31, steps=3, sampler="Euler", subseed=99, subseed_strength=1.0)
    other = run(studio, seed=99, steps=3, sampler="Euler")
    assert np.array_equal(pixels(base), pixels(zero))
    assert not np.array_equal(pixels(base), pixels(some))
    assert np.abs(pixels(full) - pixels(other)).max() <= 1  # strength 1 = the variation seed's noise
    info = parse_infotext(some["images"][0]["infotext"])
    assert info["Variation seed"] == "99" and info["Variation seed strength"] == "0.3"


# --- styles, VAE, embeddings, ControlNet ------------------------------------------------------------
def test_styles_apply_and_round_trip_as_a1111_csv(studio):
    book = studio.styles()
    book.save("cinematic", "{prompt}, cinematic lighting", "lowres")
    book.save("plain", "film grain", "")
    res = run(studio, seed=41, steps=2, prompt="a fox", negative_prompt="blurry", styles="cinematic, plain")
    info = parse_infotext(res["images"][0]["infotext"])
    assert info["Prompt"] == "a fox, cinematic lighting, film grain"
    assert info["Negative prompt"] == "blurry, lowres"
    text = (studio.settings.data_dir / "styles.csv").read_text()
    assert text.splitlines()[0] == "name,prompt,negative_prompt"
    with pytest.raises(NotFoundError, match="cinematic"):
        studio.build_generate_request({"prompt": "x", "styles": ["missing"]})


def test_vae_choice_changes_decoding_and_is_recorded(studio):
    own = run(studio, seed=51, steps=2)
    other = run(studio, seed=51, steps=2, vae="tinyvae")
    back = run(studio, seed=51, steps=2)
    assert not np.array_equal(pixels(own), pixels(other))
    assert np.array_equal(pixels(own), pixels(back))  # "" goes back to the model's own VAE
    info = parse_infotext(other["images"][0]["infotext"])
    assert info["VAE"] == "tinyvae" and len(info["VAE hash"]) == 10
    with pytest.raises(NotFoundError, match="tinyvae"):
        studio.build_generate_request({"prompt": "x", "vae": "nope"})


def test_embedding_by_name_in_prompt(studio):
    plain = run(studio, seed=61, steps=2, prompt="a fox, style")
    emb = run(studio, seed=61, steps=2, prompt="a fox, nova-style")
    assert not np.array_equal(pixels(plain), pixels(emb))
    info = parse_infotext(emb["images"][0]["infotext"])
    assert info["TI hashes"].startswith("nova-style: ")


def test_controlnet_with_canny_preprocessing(studio, source):
    ctrl = studio.settings.outputs_dir / "control.png"
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse((10, 10, 54, 54), outline="white", width=3)
    img.save(ctrl)
    plain = run(studio, seed=71, steps=2)
    cn = run(
        studio,
        seed=71,
        steps=2,
        controlnet="tiny-canny",
        control_image=str(ctrl),
        control_preprocessor="canny",
    )
    assert not np.array_equal(pixels(plain), pixels(cn))
    info = parse_infotext(cn["images"][0]["infotext"])
    assert "Model: tiny-canny" in info["ControlNet 0"]
    with pytest.raises(InputError, match="control_image"):
        studio.build_generate_request({"prompt": "x", "controlnet": "tiny-canny"})


# --- X/Y/Z plot -------------------------------------------------------------------------------------
def test_xyz_values_parse_like_a1111():
    from engine.generation.xyz import parse_values

    assert parse_values("Steps", "1-5") == [1, 2, 3, 4, 5]
    assert parse_values("Steps", "1-10 (+3)") == [1, 4, 7, 10]
    assert parse_values("CFG Scale", "5-7 [5]") == [5.0, 5.5, 6.0, 6.5, 7.0]
    assert parse_values("Sampler", 'Euler, "DPM++ 2M Karras"') == ["Euler", "DPM++ 2M Karras"]
    with pytest.raises(InputError, match="Steps axis: 'ten'"):
        parse_values("Steps", "1, ten")
    with pytest.raises(InputError, match="allowed: Nothing, Seed"):
        parse_values("Colour", "1")


def test_xyz_grid_cells_equal_single_renders(studio):
    base = {
        "prompt": "a red fox, portrait",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "seed": 5,
        "sampler": "Euler",
    }
    job_id, _ = studio.submit_xyz(
        base, {"x_type": "Steps", "x_values": "2, 3", "y_type": "Prompt S/R", "y_values": "fox, cat"}
    )
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "done", last
    (grid,) = last["result"]["grids"]
    assert Image.open(grid["path"]).size[0] >= 128 and len(grid["cells"]) == 4
    cells = {(c["x"], c["y"]): c["path"] for c in grid["cells"]}
    single = run(studio, **{**base, "steps": 3, "prompt": "a red cat, portrait"})
    cell = np.asarray(Image.open(cells[(1, 1)]).convert("RGB"), dtype=np.int16)
    assert np.array_equal(cell, pixels(single))
    with pytest.raises(InputError, match="Prompt S/R"):
        studio.generator.build_xyz_request(base, {"x_type": "Prompt S/R", "x_values": "dog, cat"})
    with pytest.raises(InputError, match="cells; at most"):
        studio.generator.build_xyz_request(
            base, {"x_type": "Seed", "x_values": "1-20", "y_type": "Steps", "y_values": "1-6"}
        )


# --- SDXL and the refiner switch-over ---------------------------------------------------------------
def test_sdxl_with_refiner_switch_over(studio):
    base = run(studio, model="tiny-sdxl", seed=81, steps=4, sampler="Euler", prompt="a (fox:1.3), portrait")
    refined = run(
        studio,
        model="tiny-sdxl",
        seed=81,
        steps=4,
        sampler="Euler",
        prompt="a (fox:1.3), portrait",
        refiner="tiny-sdxl-refiner",
        refiner_switch_at=0.5,
    )
    assert Image.open(refined["images"][0]["path"]).size == (64, 64)
    assert not np.array_equal(pixels(base), pixels(refined))
    info = parse_infotext(refined["images"][0]["infotext"])
    assert info["Refiner"].startswith("tiny-sdxl-refiner [") and info["Refiner switch at"] == "0.5"
    job_id, _ = studio.submit_generate(
        {"prompt": "x", "steps": 2, "width": 64, "height": 64, "refiner": "tiny-sdxl-refiner"}
    )
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "failed" and "needs an SDXL base model" in last["error"]
    job_id, _ = studio.submit_generate(
        {
            "prompt": "x",
            "steps": 2,
            "width": 64,
            "height": 64,
            "model": "tiny-sdxl",
            "refiner": "studionova-demo",
        }
    )
    last = list(studio.watch(job_id))[-1]
    assert last["type"] == "failed" and "is not an SDXL refiner" in last["error"]
