"""engine.gallery.pnginfo: metadata read from and written to PNG/JPEG/WebP, as A1111, ComfyUI and StudioNOVA do it."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from PIL import ExifTags, Image

from engine.errors import InputError
from engine.gallery import pnginfo
from engine.gallery.infotext import parse_infotext
from engine.gallery.pnginfo import (
    COMFY_SAMPLERS,
    RECIPE_CHUNK,
    a1111_to_comfy,
    comfy_to_a1111,
    decode_user_comment,
    infotext_from_params,
    params_from_comfy_graph,
    params_from_infotext,
    read_image_metadata,
    save_image,
    studionova_sampler,
)

DATA = Path(__file__).parent / "data" / "pnginfo"
SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}

# As A1111 1.10 writes it: hires fix, LoRA tags and hashes, quoted values (ADetailer, hash lists).
A1111_SAMPLE = (
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:mychar:0.8>, <lora:film_grain:0.35>\n"
    "city street at night, neon signs\n"
    "Negative prompt: (worst quality, low quality:1.4), watermark, easynegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3719004381, Size: 512x768, "
    "Model hash: 6ce0161689, Model: realisticVision_v51, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Variation seed: 12345, Variation seed strength: 0.15, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 12, Hires upscaler: Latent (nearest), "
    'Lora hashes: "mychar: 0123456789ab, film_grain: ba9876543210", TI hashes: "easynegative: c74b4e810b03", '
    'ADetailer model: face_yolov8n.pt, ADetailer prompt: "detailed face, smile", Emphasis: Original, '
    "Version: v1.10.1"
)
SHORT_INFOTEXT = (
    "a red fox in the snow, <lora:kohya_style:0.7>\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: abcdef0123, "
    'Model: demo, Lora hashes: "kohya_style: 0123456789ab", Version: v1.10.1'
)


def small_image(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (64, 48), (200, 40, 40, 255)[: len(mode)] if mode != "L" else 128)


def make_recipe() -> dict:
    """A recipe shaped as engine.generation.generate.save_generated writes it."""
    from engine.generation.request import GenerateRequest

    req = GenerateRequest.build(
        prompt="a red fox in snow, (detailed fur:1.1)",
        negative_prompt="blurry",
        seed=1000,
        steps=12,
        cfg_scale=6.0,
        sampler="DPM++ 2M Karras",
        width=64,
        height=64,
        batch_size=2,
        clip_skip=2,
        loras="kohya_style:0.7",
        model="demo",
    )
    return {
        "app": "StudioNOVA",
        "version": "0.1.0",
        "job_id": "0123456789abcdef0123456789abcdef",
        "mode": req.mode,
        "request": req.model_dump(mode="json", exclude={"init_image", "mask_image", "control_image"}),
        "seed": 1001,
        "index": 1,
        "model": "demo",
        "model_label": "Demo model",
        "model_hash": "abcdef0123",
        "loras": [{"name": "kohya_style", "weight": 0.7, "hash": "0123456789ab"}],
        "embeddings": {},
        "vae": None,
        "device": "cpu",
        "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------- A1111 infotext


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a1111_infotext_round_trips(tmp_path, fmt):
    path = tmp_path / f"img{SUFFIX[fmt]}"
    saved = save_image(small_image(), path, A1111_SAMPLE, None, fmt)
    assert saved.path == path and saved.notes == ()
    meta = read_image_metadata(path)
    assert (meta.source, meta.format, meta.size) == ("a1111", fmt, (64, 48))
    assert meta.infotext == A1111_SAMPLE
    assert meta.params == params_from_infotext(A1111_SAMPLE)[0]
    assert read_image_metadata(path.read_bytes()).infotext == A1111_SAMPLE  # bytes in, same answer
    assert ("parameters" if fmt == "png" else "exif:UserComment") in meta.raw
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left by the atomic write


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each JPEG segment before the scan, walked from the markers."""
    assert data[:2] == b"\xff\xd8"
    pos, out = 2, []
    while data[pos] == 0xFF and data[pos + 1] != 0xDA:
        marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
    return out


def tiff_entries(tiff: bytes, offset: int) -> dict[int, tuple[int, int, bytes]]:
    """tag -> (type, count, value bytes) of the IFD at `offset`, for either byte order."""
    endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
    assert struct.unpack(endian + "H", tiff[2:4])[0] == 42
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8}
    (count,) = struct.unpack(endian + "H", tiff[offset : offset + 2])
    entries = {}
    for i in range(count):
        at = offset + 2 + 12 * i
        tag, typ, n = struct.unpack(endian + "HHI", tiff[at : at + 8])
        size = sizes[typ] * n
        where = at + 8 if size <= 4 else struct.unpack(endian + "I", tiff[at + 8 : at + 12])[0]
        entries[tag] = (typ, n, tiff[where : where + size])
    return entries


def test_jpeg_exif_is_piexifs_layout(tmp_path):
    """A1111 writes piexif.dump({"Exif": {UserComment: UserComment.dump(text, "unicode")}}): check the bytes
    in the file by walking the JPEG and TIFF structures here, without the module's code or piexif."""
    text = 'a, b: "c"\nNegative prompt: é ü 漢字 🎨\nSteps: 20, Sampler: Euler, Seed: 1'
    path = save_image(small_image(), tmp_path / "a.jpg", text, None, "jpeg").path
    (exif,) = [
        payload for marker, payload in jpeg_segments(path.read_bytes()) if payload.startswith(b"Exif\0\0")
    ]
    tiff = exif[6:]
    assert tiff[:8] == b"MM\x00\x2a\x00\x00\x00\x08"  # big-endian, IFD0 at 8, as piexif writes
    ifd0 = tiff_entries(tiff, 8)
    assert list(ifd0) == [0x8769]  # only the Exif IFD pointer
    typ, _, pointer = ifd0[0x8769]
    assert typ == 4 and struct.unpack(">I", pointer)[0] == 26
    exif_ifd = tiff_entries(tiff, 26)
    assert list(exif_ifd) == [0x9286]
    typ, count, value = exif_ifd[0x9286]
    assert typ == 7  # UNDEFINED: piexif returns bytes (type BYTE would come back as a tuple of ints)
    assert value == b"UNICODE\0" + text.encode("utf-16-be") and count == len(value)
    # piexif.dump's exact bytes: the Exif IFD has no next-IFD offset, so the comment starts at 26 + 2 + 12.
    expected = (
        b"Exif\0\0MM\x00\x2a\x00\x00\x00\x08"
        + struct.pack(">HHHII", 1, 0x8769, 4, 1, 26)
        + bytes(4)
        + struct.pack(">HHHII", 1, 0x9286, 7, len(value), 40)
        + value
    )
    assert exif == expected


def test_webp_exif_chunk_holds_the_same_block(tmp_path):
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1"
    data = save_image(small_image(), tmp_path / "a.webp", text, None, "webp").path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos, chunks = 12, {}
    while pos < len(data):
        cid, (size,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        chunks[cid] = data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
    assert chunks[b"EXIF"] == pnginfo.exif_user_comment(text)[6:]  # RIFF EXIF chunks carry no "Exif\0\0"


def test_piexif_reads_our_jpeg_as_a1111_does(tmp_path):
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")

    text = "x, y\nNegative prompt: é\nSteps: 2, Sampler: Euler, Seed: 3"
    for fmt in ("jpeg", "webp"):
        path = save_image(small_image(), tmp_path / f"a{SUFFIX[fmt]}", text, None, fmt).path
        exif = piexif.load(Image.open(path).info["exif"])  # modules/images.py read_info_from_image
        assert helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment]) == text
    dumped = piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: helper.UserComment.dump(text, encoding="unicode")}}
    )
    assert dumped == pnginfo.exif_user_comment(text)


def test_a1111_sample_maps_to_request_fields():
    params, unmapped = params_from_infotext(A1111_SAMPLE)
    assert params == {
        "prompt": "masterpiece, best quality, 1girl, (red hair:1.2), <lora:mychar:0.8>, <lora:film_grain:0.35>\n"
        "city street at night, neon signs",
        "negative_prompt": "(worst quality, low quality:1.4), watermark, easynegative",
        "loras": ["mychar:0.8", "film_grain:0.35"],
        "steps": 28,
        "sampler": "DPM++ 2M Karras",
        "a1111_sampler": "DPM++ 2M",
        "schedule_type": "Karras",
        "cfg_scale": 6.5,
        "seed": 3719004381,
        "width": 512,
        "height": 768,
        "model_hash": "6ce0161689",
        "model": "realisticVision_v51",
        "vae_hash": "735e4c3a44",
        "vae": "vae-ft-mse-840000-ema-pruned",
        "vae_file": "vae-ft-mse-840000-ema-pruned.safetensors",
        "subseed": 12345,
        "subseed_strength": 0.15,
        "hr_denoising_strength": 0.45,  # under hires fix A1111's Denoising strength is the hires one
        "clip_skip": 2,
        "enable_hr": True,
        "hr_scale": 2.0,
        "hr_second_pass_steps": 12,
        "hr_upscaler": "Latent (nearest)",
        "lora_hashes": {"mychar": "0123456789ab", "film_grain": "ba9876543210"},
        "ti_hashes": {"easynegative": "c74b4e810b03"},
        "version": "v1.10.1",
        "mode": "txt2img",
    }
    assert unmapped == [
        "ADetailer model: face_yolov8n.pt",
        "ADetailer prompt: detailed face, smile",
        "Emphasis: Original",
    ]


def test_params_build_a_generate_request():
    from engine.generation.request import GenerateRequest

    params, _ = params_from_infotext(SHORT_INFOTEXT)
    fields = {k: v for k, v in params.items() if k in GenerateRequest.model_fields}
    fields["loras"] = ", ".join(fields["loras"])  # GenerateRequest parses "name:w" from a string only
    req = GenerateRequest.build(**fields)
    assert (req.sampler, req.seed, req.width, req.height, req.model) == (
        "Euler a",
        965400086,
        512,
        512,
        "demo",
    )
    assert [(s.name, s.weight) for s in req.loras] == [("kohya_style", 0.7)]


def test_rebuilt_infotext_parses_back_to_the_same_params():
    params, _ = params_from_infotext(A1111_SAMPLE)
    again, _ = params_from_infotext(infotext_from_params(params, "v1.10.1"))
    keep = set(params) - {"vae_file"}  # the rebuilt text names the VAE as StudioNOVA shows it
    assert {k: again[k] for k in keep} == {k: params[k] for k in keep}


def test_img2img_inpaint_and_odd_values():
    text = (
        "a house\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512, Denoising strength: 0.6, "
        "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Masked content: original, "
        "Seed resize from: -1x-1, Hires resize: 1024x1024, Clip skip: two"
    )
    params, unmapped = params_from_infotext(text)
    assert params["sampler"] == "DPM++ 2M Karras"  # A1111 < 1.9 put the schedule in the sampler name
    assert (params["a1111_sampler"], params["schedule_type"]) == ("DPM++ 2M", "Karras")
    assert params["mode"] == "inpaint" and params["inpaint_only_masked"] is True
    assert "hr_denoising_strength" in params and params["enable_hr"]  # "Hires resize" marks hires fix
    assert "Clip skip: 'two' is not an integer" in unmapped
    assert "Hires resize: 1024x1024" in unmapped and "Seed resize from: -1x-1" in unmapped
    plain, unmapped = params_from_infotext(
        "a cat\nSteps: 20, Sampler: DPM++ 3M SDE, Schedule type: Exponential"
    )
    assert "sampler" not in plain and plain["a1111_sampler"] == "DPM++ 3M SDE"
    assert any(
        u.startswith("Sampler: DPM++ 3M SDE with Schedule type Exponential is not one") for u in unmapped
    )


def test_sampler_tables():
    assert comfy_to_a1111("euler_ancestral", "normal") == ("Euler a", "Normal")
    assert comfy_to_a1111("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert comfy_to_a1111("dpmpp_2m_sde_gpu", "exponential") == ("DPM++ 2M SDE", "Exponential")
    assert a1111_to_comfy("DPM++ 2M", "Karras") == ("dpmpp_2m", "karras")
    assert a1111_to_comfy("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert a1111_to_comfy("DPM++ SDE") == ("dpmpp_sde", "karras")  # A1111's Automatic = Karras for it
    assert a1111_to_comfy("Euler a") == ("euler_ancestral", "normal")
    assert studionova_sampler("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert studionova_sampler("Euler a", "Normal") == "Euler a"
    assert studionova_sampler("DPM++ 2M", "Automatic") == "DPM++ 2M Karras"
    assert studionova_sampler("Euler", "Karras") is None
    for label in {"Euler", "Euler a", "DPM++ 2M", "Heun", "DDIM", "UniPC", "LCM"}:
        assert label in COMFY_SAMPLERS.values()
    with pytest.raises(InputError, match="'res_multistep'.*known: euler"):
        comfy_to_a1111("res_multistep", "normal")
    with pytest.raises(InputError, match="'Align Your Steps' has no ComfyUI equivalent"):
        a1111_to_comfy("Euler", "Align Your Steps")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"UNICODE\0" + "né, 漢".encode("utf-16-be"), "né, 漢"),  # A1111 / piexif
        (b"UNICODE\0" + "né, 漢".encode("utf-16-le"), "né, 漢"),  # little-endian, no BOM
        (b"UNICODE\0\xff\xfe" + "né".encode("utf-16-le"), "né"),
        (b"UNICODE\0\xfe\xff" + "né".encode("utf-16-be"), "né"),
        (b"ASCII\0\0\0Steps: 20\0", "Steps: 20"),
        (b"ASCII\0\0\0" + "caf\u00e9".encode(), "caf\u00e9"),  # UTF-8 under the ASCII prefix
        (b"\0" * 8 + b"plain", "plain"),
        (b"no prefix at all", "no prefix at all"),
        ("already text\0", "already text"),
    ],
)
def test_user_comment_variants(raw, text):
    assert decode_user_comment(raw) == text


def test_jpeg_with_a_little_endian_comment_reads_as_a1111():
    exif = Image.Exif()
    exif.endian = "<"
    exif.get_ifd(ExifTags.IFD.Exif)[0x9286] = b"UNICODE\0" + SHORT_INFOTEXT.encode("utf-16-le")
    buf = io.BytesIO()
    small_image().save(buf, "JPEG", exif=exif.tobytes())
    meta = read_image_metadata(buf.getvalue())
    assert meta.source == "a1111" and meta.infotext == SHORT_INFOTEXT


# --------------------------------------------------------------------------------------------- ComfyUI


def comfy_png(tmp_path: Path, graph: dict) -> Path:
    from engine.artifacts import save_png

    workflow = {"last_node_id": 20, "nodes": [], "links": [], "version": 0.4}
    return save_png(
        small_image(),
        tmp_path / "ComfyUI_00001_.png",
        {"prompt": json.dumps(graph), "workflow": json.dumps(workflow)},
    )


def test_comfy_graph_in_png_maps_to_params(tmp_path):
    graph = json.loads((DATA / "comfy_api_graph.json").read_text())
    meta = read_image_metadata(comfy_png(tmp_path, graph))
    assert meta.source == "comfyui"
    assert meta.params == {
        "prompt": "masterpiece, best quality, 1girl, (red hair:1.2), city street at night",
        "negative_prompt": "worst quality, low quality, watermark",
        "steps": 28,
        "cfg_scale": 6.5,
        "seed": 3719004381,
        "comfy_sampler": "dpmpp_2m",
        "comfy_scheduler": "karras",
        "a1111_sampler": "DPM++ 2M",
        "schedule_type": "Karras",
        "sampler": "DPM++ 2M Karras",
        "model": "realisticVision_v51",
        "model_file": "SD1.5\\realisticVision_v51.safetensors",
        "loras": ["mychar:0.8", "film_grain_v2:0.35"],
        "lora_files": ["characters/mychar.safetensors", "film_grain_v2.safetensors"],
        "clip_skip": 2,
        "width": 512,
        "height": 768,
        "batch_size": 2,
        "mode": "txt2img",
    }
    assert meta.unmapped == [
        "node 11 (LoraLoader): strength_clip 1 differs from strength_model 0.35; StudioNOVA uses one weight",
        "node 20 (StudioWatermark|custom)",
    ]
    assert {"prompt", "workflow"} <= set(meta.raw)
    assert meta.infotext == (
        "masterpiece, best quality, 1girl, (red hair:1.2), city street at night, <lora:mychar:0.8>, "
        "<lora:film_grain_v2:0.35>\nNegative prompt: worst quality, low quality, watermark\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3719004381, Size: 512x768, "
        "Model: realisticVision_v51, Clip skip: 2, Version: ComfyUI"
    )
    back, _ = params_from_infotext(meta.infotext)
    assert (back["sampler"], back["loras"], back["clip_skip"]) == ("DPM++ 2M Karras", meta.params["loras"], 2)


def test_comfy_hires_graph_maps_first_pass_and_hires_fix():
    graph = json.loads((DATA / "comfy_hires_graph.json").read_text())
    params, unmapped = params_from_comfy_graph(graph)
    # node 16 comes after node 13 by id, but it samples the empty latent: it is the first pass
    assert (params["steps"], params["width"], params["height"]) == (25, 832, 1216)
    assert (params["sampler"], params["schedule_type"]) == ("Euler a", "Normal")
    assert (
        params["enable_hr"]
        and params["hr_scale"] == 1.5
        and params["hr_upscaler"] == "Latent (nearest-exact)"
    )
    assert (params["hr_second_pass_steps"], params["hr_denoising_strength"]) == (12, 0.45)
    assert (params["model"], params["vae"], params["vae_file"]) == (
        "sd_xl_base_1.0",
        "sdxl_vae",
        "sdxl_vae.safetensors",
    )
    assert unmapped == [
        "node 15 (ModelSamplingDiscrete): feeds model of node 16 (KSampler); its effect is not mapped"
    ]
    text = infotext_from_params(params, "ComfyUI")
    assert (
        "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest-exact)"
        in text
    )


def test_comfy_other_samplers_links_and_joins_are_reported():
    graph = json.loads((DATA / "comfy_api_graph.json").read_text())
    graph["30"] = {"class_type": "ShowText|pysssss", "inputs": {"text": "from a custom node"}}
    graph["6"]["inputs"]["text"] = ["30", 0]  # prompt text from an unknown node
    graph["31"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 0], "text": "jpeg artifacts"}}
    graph["32"] = {
        "class_type": "ConditioningConcat",
        "inputs": {"conditioning_to": ["7", 0], "conditioning_from": ["31", 0]},
    }
    graph["3"]["inputs"]["negative"] = ["32", 0]
    graph["40"] = {"class_type": "PrimitiveInt", "inputs": {"value": 33}}
    graph["3"]["inputs"]["steps"] = ["40", 0]
    graph["41"] = dict(
        graph["3"], inputs=dict(graph["3"]["inputs"], latent_image=["42", 0])
    )  # a second, unrelated sampler
    graph["42"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    params, unmapped = params_from_comfy_graph(graph)
    assert "prompt" not in params
    assert params["negative_prompt"] == "worst quality, low quality, watermark BREAK jpeg artifacts"
    assert params["steps"] == 33  # through a core Primitive node
    assert "node 30 (ShowText|pysssss): feeds text of node 6 (CLIPTextEncode); not read" in unmapped
    assert "node 41 (KSampler): another sampler; only the first sampler's settings are mapped" in unmapped
    assert "node 42 (EmptyLatentImage)" in unmapped and "node 20 (StudioWatermark|custom)" in unmapped
    assert not any(u.startswith(("node 31 ", "node 32 ", "node 40 ")) for u in unmapped)


def test_comfy_img2img_and_advanced_sampler():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "oil painting"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["5", 0],
                "add_noise": "enable",
                "noise_seed": 2**40,
                "steps": 30,
                "cfg": 7,
                "sampler_name": "res_multistep",
                "scheduler": "linear_quadratic",
                "start_at_step": 0,
                "end_at_step": 10000,
                "return_with_leftover_noise": "disable",
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    params, unmapped = params_from_comfy_graph(graph)
    assert (params["mode"], params["seed"], params["model"]) == ("img2img", 2**40, "dreamshaper_8")
    assert "sampler" not in params and params["a1111_sampler"] == "res_multistep"
    assert any("'photo.png' is not stored" in u for u in unmapped)
    assert any(u.startswith("seed 1099511627776 is outside") for u in unmapped)
    assert "ComfyUI scheduler 'linear_quadratic' has no A1111 equivalent; written as is" in unmapped


# ------------------------------------------------------------------------------------------ StudioNOVA


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_studionova_recipe_round_trips(tmp_path, fmt):
    from engine.generation.request import GenerateRequest

    recipe = make_recipe()
    path = save_image(small_image(), tmp_path / f"gen{SUFFIX[fmt]}", SHORT_INFOTEXT, recipe, fmt).path
    meta = read_image_metadata(path)
    assert meta.source == "studionova" and meta.infotext == SHORT_INFOTEXT
    if fmt == "png":
        assert json.loads(meta.raw[RECIPE_CHUNK]) == recipe  # the chunk save_generated writes
        assert Image.open(path).text[RECIPE_CHUNK] == meta.raw[RECIPE_CHUNK]
    else:
        assert json.loads(pnginfo.recipe_from_xmp(meta.raw["xmp"])) == recipe
    params = meta.params
    assert (params["seed"], params["loras"], params["model"]) == (1001, ["kohya_style:0.7"], "demo")
    assert (params["sampler"], params["a1111_sampler"], params["schedule_type"]) == (
        "DPM++ 2M Karras",
        "DPM++ 2M",
        "Karras",
    )
    assert params["lora_hashes"] == {"kohya_style": "0123456789ab"} and params["model_hash"] == "abcdef0123"
    fields = {k: v for k, v in params.items() if k in GenerateRequest.model_fields}
    fields["loras"] = ", ".join(fields["loras"])  # GenerateRequest parses "name:w" from a string only
    req = GenerateRequest.build(**fields)
    assert req.model_dump(mode="json", exclude={"init_image", "mask_image", "control_image"}) == {
        **recipe["request"],
        "seed": 1001,
    }


def test_recipe_without_infotext_gets_one_rebuilt(tmp_path):
    path = save_image(small_image(), tmp_path / "gen.png", "", make_recipe(), "png").path
    meta = read_image_metadata(path)
    assert meta.source == "studionova" and "parameters" not in meta.raw
    parsed = parse_infotext(meta.infotext)
    assert (parsed["Sampler"], parsed["Schedule type"], parsed["Seed"], parsed["Clip skip"]) == (
        "DPM++ 2M",
        "Karras",
        "1001",
        "2",
    )
    assert parsed["Lora hashes"] == "kohya_style: 0123456789ab" and parsed["Version"] == "StudioNOVA 0.1.0"
    assert "Denoising strength" not in parsed and "Mask blur" not in parsed and "Hires upscale" not in parsed


def test_bad_recipe_falls_back_to_the_infotext(tmp_path):
    from engine.artifacts import save_png

    path = save_png(
        small_image(), tmp_path / "x.png", {"parameters": SHORT_INFOTEXT, RECIPE_CHUNK: "{not json"}
    )
    meta = read_image_metadata(path)
    assert meta.source == "a1111" and any("'studionova' chunk is not valid JSON" in u for u in meta.unmapped)


# ----------------------------------------------------------------------------------- none and errors


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_without_metadata_is_source_none(tmp_path, fmt):
    path = tmp_path / f"plain{SUFFIX[fmt]}"
    small_image().save(path)
    meta = read_image_metadata(path)
    assert (meta.source, meta.params, meta.infotext, meta.unmapped) == ("none", {}, "", [])


def test_unreadable_inputs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="image data is not a readable image .*PNG, JPEG or WebP"):
        read_image_metadata(b"\x00garbage, not an image at all" * 10)
    good = io.BytesIO()
    small_image().save(good, "PNG")
    with pytest.raises(InputError, match="not a readable image"):
        read_image_metadata(good.getvalue()[:60])  # truncated inside the pixel data
    gif = tmp_path / "anim.gif"
    small_image().save(gif)
    with pytest.raises(InputError, match="'anim.gif' is a GIF image; accepted formats: PNG, JPEG or WebP"):
        read_image_metadata(gif)
    with pytest.raises(InputError, match="'missing.png' does not exist"):
        read_image_metadata(tmp_path / "missing.png")


def test_save_image_refuses_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="format='gif' is not supported; allowed: png, jpeg, webp"):
        save_image(small_image(), tmp_path / "a.gif", "x", None, "gif")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="'a.png' does not fit format='jpeg'"):
        save_image(small_image(), tmp_path / "a.png", "x", None, "jpeg")
    with pytest.raises(InputError, match="quality=0 must be an integer from 1 to 100"):
        save_image(small_image(), tmp_path / "a.jpg", "x", None, "jpeg", quality=0)
    assert list(tmp_path.iterdir()) == []


def test_rgba_to_jpeg_notes_the_dropped_alpha(tmp_path):
    saved = save_image(small_image("RGBA"), tmp_path / "a.jpg", SHORT_INFOTEXT, None, "jpeg")
    assert saved.notes == ("the alpha channel of the RGBA image was dropped: JPEG has none",)
    assert read_image_metadata(saved.path).infotext == SHORT_INFOTEXT


def test_oversized_text_in_jpeg_never_corrupts_the_file(tmp_path):
    long_prompt = "a very detailed prompt, " * 1700  # ~40k ASCII characters: 80 KB as UTF-16
    infotext = f"{long_prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x48"
    path = tmp_path / "long.jpg"
    recipe = make_recipe()
    recipe["request"]["prompt"] = recipe["request"]["negative_prompt"] = long_prompt  # ~80 KB of JSON
    saved = save_image(small_image(), path, infotext, recipe, "jpeg")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
    meta = read_image_metadata(path)
    assert meta.source == "a1111" and meta.infotext == infotext  # the infotext is kept ...
    assert any(
        n.startswith("the recipe was not stored") for n in saved.notes
    )  # ... the recipe dropped, said so
    assert any("EXIF ASCII prefix" in n for n in saved.notes)

    before = path.read_bytes()
    wide = "é" * 40000 + "\nSteps: 20, Sampler: Euler a, Seed: 1"  # no ASCII fallback possible
    with pytest.raises(InputError, match="needs 80.* bytes of EXIF; a JPEG holds at most 65533"):
        save_image(small_image(), path, wide, None, "jpeg")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["long.jpg"]
    webp = save_image(small_image(), tmp_path / "wide.webp", wide, recipe, "webp")
    assert webp.notes == () and read_image_metadata(webp.path).infotext == wide  # WebP has no 64 KB limit
