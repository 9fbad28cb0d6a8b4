"""Generation metadata in image files: read it from any PNG/JPEG/WebP, and write it as A1111 does.

Reading (`read_image_metadata`) takes the first of these that the file holds:
1. StudioNOVA's recipe (JSON): the PNG text chunk `studionova` (RECIPE_CHUNK), or in JPEG/WebP the
   `studionova:recipe` element of the XMP packet (namespace XMP_NS);
2. A1111/Forge infotext: the PNG text chunk `parameters`, or the EXIF UserComment of a JPEG/WebP
   (A1111 writes it with piexif as b"UNICODE\\0" + UTF-16-BE; the ASCII prefix and the little-endian
   and BOM variants other tools write are read too);
3. ComfyUI's `prompt` chunk (the API-format graph; SaveAnimatedWEBP puts it in EXIF Model as
   "prompt:<json>"), mapped node by node (`params_from_comfy_graph`).
Whatever the source, `params` uses GenerateRequest's field names, `infotext` is A1111 text (rebuilt
with `infotext_from_params` when the file has none) and `unmapped` says, in words, what was left out.

Writing (`save_image`): PNG gets the text chunks `parameters` and `studionova`; JPEG and WebP get
the infotext as EXIF UserComment byte for byte as piexif.dump writes it (a big-endian TIFF block:
IFD0 holds only the Exif IFD pointer, the Exif IFD only UserComment, type UNDEFINED) and the recipe
as XMP. The EXIF block is packed here with struct: Pillow's Image.Exif stores a bytes UserComment as
type BYTE, which piexif (so A1111) reads back as a tuple of ints and cannot decode. A JPEG segment
holds at most 64 KiB: a recipe that does not fit is dropped with a note, an ASCII infotext that does
not fit as UTF-16 is written with the EXIF ASCII prefix (piexif reads it), and anything longer is
refused before a byte is written.

COMFY_SAMPLERS / COMFY_SCHEDULERS are the one table of ComfyUI <-> A1111 sampler names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.artifacts import atomic_write, save_png
from engine.errors import InputError, NotFoundError
from engine.gallery.infotext import build_infotext, parse_infotext
from engine.paths import MODEL_FOLDERS
from engine.prompt_tags import extract_lora_tags
from engine.requests import MAX_SEED
from engine.samplers import SAMPLER_NAMES, SAMPLERS

MetadataSource = Literal["studionova", "a1111", "comfyui", "none"]
ImageFormat = Literal["png", "jpeg", "webp"]

RECIPE_CHUNK = (
    "studionova"  # PNG text chunk with the recipe JSON (engine.generation.generate.save_generated writes it)
)
PARAMETERS_CHUNK = "parameters"  # A1111's PNG text chunk
COMFY_PROMPT_CHUNK = "prompt"  # ComfyUI: API-format graph; "workflow" holds the UI graph (kept in raw only)
XMP_NS = "urn:studionova:xmp:1.0/"
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {  # format -> (Pillow name, file suffixes)
    "png": ("PNG", (".png",)),
    "jpeg": ("JPEG", (".jpg", ".jpeg")),
    "webp": ("WEBP", (".webp",)),
}
READABLE = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}  # Pillow format -> ours
ACCEPTED = "PNG, JPEG or WebP"

# EXIF (CIPA DC-008): UserComment = 8-byte character-code prefix + text, in the Exif IFD.
EXIF_IFD_POINTER, USER_COMMENT, EXIF_MAKE, EXIF_MODEL = 0x8769, 0x9286, 0x010F, 0x0110
UNICODE_PREFIX, ASCII_PREFIX, JIS_PREFIX, UNDEFINED_PREFIX = (
    b"UNICODE\0",
    b"ASCII\0\0\0",
    b"JIS\0\0\0\0\0",
    bytes(8),
)
JPEG_MAX_EXIF = 65533  # APP1 payload, "Exif\0\0" included (the segment length field is 16 bits)
JPEG_MAX_XMP = 65533 - len(b"http://ns.adobe.com/xap/1.0/\0")

# A1111 infotext key -> (params key, type). Read both ways; Sampler, Schedule type, Size, Denoising
# strength under hires fix and the hash lists need more than a rename and are handled beside it.
A1111_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "VAE hash": ("vae_hash", str),
    "VAE": ("vae", str),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "Mask blur": ("mask_blur", int),
    "Masked content": ("masked_content", str),
    "Masked area padding": ("inpaint_padding", int),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Version": ("version", str),
}
HASH_LISTS = {"Lora hashes": "lora_hashes", "TI hashes": "ti_hashes"}
INPAINT_KEYS = ("Mask blur", "Masked content", "Masked area padding", "Inpaint area")
OUTPAINT_SIDES = ("left", "right", "up", "down")

# A1111's schedule for "Automatic" (sd_samplers_kdiffusion options['scheduler']); others: the model's own.
A1111_DEFAULT_SCHEDULE = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2S a": "Karras",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "Restart": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 3M SDE": "Exponential",
}
# Spacings StudioNOVA's plain samplers (diffusers' default timesteps) stand for.
PLAIN_SCHEDULES = ("", "Uniform", "Normal")

# ComfyUI sampler_name -> A1111 sampler label. Read left to right for comfy -> A1111; A1111 -> comfy
# takes the first name with that label (so the non-"_gpu" one).
COMFY_SAMPLERS: dict[str, str] = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_gpu": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
}
# ComfyUI scheduler -> A1111 "Schedule type" label (A1111 1.10 sd_schedulers).
COMFY_SCHEDULERS: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
}
# ComfyUI LatentUpscale(By) upscale_method -> A1111 hires upscaler.
COMFY_LATENT_UPSCALERS = {
    "bilinear": "Latent",
    "bicubic": "Latent (bicubic)",
    "nearest-exact": "Latent (nearest-exact)",
}

COMFY_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
COMFY_CHECKPOINT_NODES = ("CheckpointLoaderSimple", "CheckpointLoader")
COMFY_LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")
COMFY_EMPTY_LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage")
COMFY_PRIMITIVE_NODES = (
    "PrimitiveInt",
    "PrimitiveFloat",
    "PrimitiveString",
    "PrimitiveStringMultiline",
    "PrimitiveBoolean",
)
COMFY_PASSIVE_NODES = ("VAEDecode", "SaveImage", "PreviewImage")  # carry no generation setting
COMFY_CONDITIONING_JOINS = {  # class -> (its two inputs, the A1111 prompt syntax with the same effect)
    "ConditioningCombine": (("conditioning_1", "conditioning_2"), " AND "),
    "ConditioningConcat": (("conditioning_to", "conditioning_from"), " BREAK "),
}
MODEL_SUFFIXES = tuple(sorted({s for _, suffixes in MODEL_FOLDERS.values() for s in suffixes}))


@dataclass
class ImageMetadata:
    """What an image file says about how it was made."""

    source: MetadataSource
    params: dict[str, Any] = field(default_factory=dict)  # GenerateRequest field names + extras
    infotext: str = ""  # A1111 text: as stored, or rebuilt from params
    unmapped: list[str] = field(default_factory=list)  # what was not mapped, in words
    raw: dict[str, str] = field(default_factory=dict)  # the metadata as found (chunk / tag name -> text)
    format: str = ""  # "png" | "jpeg" | "webp"
    size: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class SavedImage:
    path: Path
    format: ImageFormat
    notes: tuple[str, ...] = ()  # what did not fit or changed (a dropped recipe, a dropped alpha channel)


# --------------------------------------------------------------------------------------------- reading


def read_image_metadata(source: Path | str | bytes) -> ImageMetadata:
    """Generation metadata of a PNG/JPEG/WebP file (path) or its bytes.

    No metadata gives source "none"; a missing, corrupt or non-image input raises InputError.
    """
    fmt, size, raw, notes = _read_chunks(source)
    meta = ImageMetadata("none", raw=raw, unmapped=notes, format=fmt, size=size)
    recipe = _recipe(raw, meta.unmapped)
    infotext = raw.get(PARAMETERS_CHUNK) or next(
        (raw[k] for k in ("exif:UserComment", "comment") if k in raw and _looks_like_infotext(raw[k])), ""
    )
    if recipe is not None:
        meta.source = "studionova"
        meta.params, unmapped = params_from_recipe(recipe)
        meta.infotext = infotext or infotext_from_params(
            meta.params, meta.params.get("version", "StudioNOVA")
        )
    elif infotext:
        meta.source = "a1111"
        meta.infotext = infotext
        meta.params, unmapped = params_from_infotext(infotext)
    elif (graph := _comfy_graph(raw, meta.unmapped)) is not None:
        meta.source = "comfyui"
        meta.params, unmapped = params_from_comfy_graph(graph)
        meta.infotext = infotext_from_params(meta.params, "ComfyUI") if "steps" in meta.params else ""
    else:
        unmapped = []
    meta.unmapped.extend(unmapped)
    return meta


def _read_chunks(source: Path | str | bytes) -> tuple[str, tuple[int, int], dict[str, str], list[str]]:
    """(format, size, raw metadata, notes) of an image; InputError when it is not a readable image."""
    import io

    from PIL import ExifTags, Image

    if isinstance(source, bytes | bytearray):
        name, fp = "image data", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise NotFoundError(f"image {path.name!r} does not exist (expected a {ACCEPTED} file)")
        name, fp = repr(path.name), path
    try:
        with Image.open(fp) as im:
            pil_format = im.format or "unknown"
            if pil_format not in READABLE:
                raise InputError(f"{name} is a {pil_format} image; accepted formats: {ACCEPTED}")
            im.load()  # decodes to the end: PNG text chunks after the pixels are read, truncation is caught
            text = dict(getattr(im, "text", {}) or {})
            info, size = dict(im.info), im.size
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to open safely ({e}); accepted formats: {ACCEPTED}") from None
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name} is not a readable image ({e}); accepted formats: {ACCEPTED}") from None

    raw: dict[str, str] = {k: v for k, v in text.items() if isinstance(v, str)}
    notes: list[str] = []
    try:  # a broken EXIF block costs only what it holds: the pixels and other chunks are fine
        exif = im.getexif()  # from the loaded image's info; the file is not read again
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(USER_COMMENT)
        for tag, key in ((EXIF_MAKE, "exif:Make"), (EXIF_MODEL, "exif:Model")):
            value = exif.get(tag)
            if isinstance(value, str) and value.startswith(("prompt:", "workflow:")):
                raw[key] = value  # ComfyUI's SaveAnimatedWEBP
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        comment = None
        notes.append(f"the EXIF block could not be read ({e})")
    if comment:
        raw["exif:UserComment"] = decode_user_comment(comment)
    if isinstance(xmp := info.get("xmp"), bytes | str):
        raw["xmp"] = xmp.decode("utf-8", errors="replace") if isinstance(xmp, bytes) else xmp
    if isinstance(comment_chunk := info.get("comment"), bytes | str) and "comment" not in raw:
        raw["comment"] = (
            comment_chunk.decode("utf-8", errors="replace")
            if isinstance(comment_chunk, bytes)
            else comment_chunk
        )
    return READABLE[pil_format], size, raw, notes


def decode_user_comment(value: bytes | str | tuple) -> str:
    """EXIF UserComment -> text. A1111 (piexif) writes b"UNICODE\\0" + UTF-16-BE; other tools write
    little-endian, a BOM, or the ASCII/JIS prefixes, and some put UTF-8 under ASCII."""
    if isinstance(value, str):
        return value.rstrip("\0")
    data = bytes(value)
    prefix, body = data[:8], data[8:]
    if prefix == UNICODE_PREFIX:
        text = _decode_utf16(body)
    elif prefix in (ASCII_PREFIX, UNDEFINED_PREFIX):
        text = body.decode("utf-8", errors="replace")
    elif prefix == JIS_PREFIX:
        text = body.decode("shift_jis", errors="replace")
    else:  # no known prefix: what A1111 itself falls back to
        text = data.decode("utf-8", errors="ignore")
    return text.rstrip("\0")


def _decode_utf16(body: bytes) -> str:
    if body[:2] == b"\xfe\xff":
        return body[2:].decode("utf-16-be", errors="replace")
    if body[:2] == b"\xff\xfe":
        return body[2:].decode("utf-16-le", errors="replace")
    # No BOM: Latin text has its zero bytes first in big-endian, second in little-endian.
    sample = body[:512]
    little = sample[1::2].count(0) > sample[0::2].count(0)
    return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")


def _looks_like_infotext(text: str) -> bool:
    return any(k not in ("Prompt", "Negative prompt") for k in parse_infotext(text))


def _recipe(raw: dict[str, str], notes: list[str]) -> dict | None:
    text = raw.get(RECIPE_CHUNK)
    where = f"the {RECIPE_CHUNK!r} chunk"
    if text is None:
        for key in ("xmp", "XML:com.adobe.xmp"):
            if key in raw and XMP_NS in raw[key]:
                text, where = recipe_from_xmp(raw[key], notes), "the XMP recipe"
                break
    if text is None:
        return None
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as e:
        notes.append(f"{where} is not valid JSON ({e}); ignored")
        return None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("request", {}), dict):
        notes.append(f"{where} is not a StudioNOVA recipe (a JSON object with a 'request' object); ignored")
        return None
    return recipe


def recipe_of(raw: dict[str, str]) -> dict | None:
    """The StudioNOVA recipe in an image's raw metadata (PNG chunk or XMP), or None."""
    return _recipe(raw, [])


def recipe_from_xmp(xmp: str, notes: list[str] | None = None) -> str | None:
    """The recipe JSON in an XMP packet (element or attribute studionova:recipe), or None."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xmp.strip().strip("\0").strip())
    except ET.ParseError as e:
        if notes is not None:
            notes.append(f"the XMP packet is not valid XML ({e}); its recipe was not read")
        return None
    tag = f"{{{XMP_NS}}}recipe"
    if (element := root.find(f".//{tag}")) is not None:
        return element.text or ""
    return next((el.get(tag) for el in root.iter() if el.get(tag) is not None), None)


def _comfy_graph(raw: dict[str, str], notes: list[str]) -> dict | None:
    text = raw.get(COMFY_PROMPT_CHUNK)
    if text is None and raw.get("exif:Model", "").startswith("prompt:"):
        text = raw["exif:Model"].removeprefix("prompt:")
    if text is None:
        return None
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as e:
        notes.append(f"ComfyUI's {COMFY_PROMPT_CHUNK!r} chunk is not valid JSON ({e}); ignored")
        return None
    if not isinstance(graph, dict) or not all(
        isinstance(n, dict) and isinstance(n.get("class_type"), str) for n in graph.values()
    ):
        notes.append(f"ComfyUI's {COMFY_PROMPT_CHUNK!r} chunk is not an API-format graph; ignored")
        return None
    return graph


# ------------------------------------------------------------------------------------ mapping: A1111


def params_from_infotext(text: str) -> tuple[dict[str, Any], list[str]]:
    """A1111 infotext -> (params with GenerateRequest field names + extras, unmapped items).

    `<lora:name:w>` tags stay in the prompt (StudioNOVA applies them) and are also listed in `loras`.
    Under hires fix A1111's "Denoising strength" is the hires one, so it goes to hr_denoising_strength.
    """
    parsed = parse_infotext(text)
    params: dict[str, Any] = {
        "prompt": parsed.pop("Prompt"),
        "negative_prompt": parsed.pop("Negative prompt"),
    }
    unmapped: list[str] = []
    try:
        _, tags = extract_lora_tags(params["prompt"])
    except InputError as e:
        tags = []
        unmapped.append(str(e))
    if tags:
        params["loras"] = [f"{name}:{_decimal(weight)}" for name, weight in tags]
    if "Size-1" in parsed:
        _set_typed(params, unmapped, "Size", "width", int, parsed.pop("Size-1"))
        _set_typed(params, unmapped, "Size", "height", int, parsed.pop("Size-2", ""))
    if sampler := parsed.pop("Sampler", ""):
        _set_sampler(params, unmapped, sampler, parsed.pop("Schedule type", ""))
    hires = any(k in parsed for k in ("Hires upscale", "Hires upscaler", "Hires steps", "Hires resize-1"))
    inpaint = any(k in parsed for k in INPAINT_KEYS)
    for key, value in parsed.items():
        if key in A1111_FIELDS:
            name, kind = A1111_FIELDS[key]
            if key == "Denoising strength" and hires:
                name = "hr_denoising_strength"
            _set_typed(params, unmapped, key, name, kind, value)
        elif key in HASH_LISTS:
            params[HASH_LISTS[key]] = _hash_list(value)
        elif key == "Inpaint area":
            params["inpaint_only_masked"] = value == "Only masked"
        elif key == "Outpaint":  # StudioNOVA's own: "left=8 right=0 up=0 down=0"
            sides = dict(part.partition("=")[::2] for part in value.split())
            for side in OUTPAINT_SIDES:
                _set_typed(params, unmapped, key, f"outpaint_{side}", int, sides.get(side, "0"))
        elif key.endswith("-1") and f"{key[:-2]}-2" in parsed:  # a "WxH" value parse_infotext split
            unmapped.append(f"{key[:-2]}: {value}x{parsed[key[:-2] + '-2']}")
        elif not key.endswith("-2") or f"{key[:-2]}-1" not in parsed:
            unmapped.append(f"{key}: {value}")
    if hires:
        params["enable_hr"] = True
    for key, file_key in (("model", "model_file"), ("vae", "vae_file")):
        if key in params and (shown := display_name(params[key])) != params[key]:
            params[file_key], params[key] = params[key], shown
    if "Outpaint" in parsed:
        params["mode"] = "outpaint"
    elif inpaint:
        params["mode"] = "inpaint"
    else:
        params["mode"] = "img2img" if "denoising_strength" in params else "txt2img"
    return params, unmapped


def _set_typed(params: dict, unmapped: list[str], key: str, name: str, kind: type, value: str) -> None:
    try:
        params[name] = kind(value)
    except ValueError:
        unmapped.append(f"{key}: {value!r} is not {'an integer' if kind is int else 'a number'}")


def _hash_list(value: str) -> dict[str, str]:
    """'name: hash, other: hash' -> {name: hash}."""
    pairs = (item.rpartition(":") for item in value.split(","))
    return {name.strip(): h.strip() for name, sep, h in pairs if sep and name.strip()}


def _set_sampler(params: dict, unmapped: list[str], sampler: str, schedule: str) -> None:
    sampler, schedule = split_legacy_sampler(sampler, schedule)
    params["a1111_sampler"] = sampler
    if schedule:
        params["schedule_type"] = schedule
    if name := studionova_sampler(sampler, schedule):
        params["sampler"] = name
    else:
        unmapped.append(
            f"Sampler: {sampler}{f' with Schedule type {schedule}' if schedule else ''} is not one StudioNOVA "
            f"has; available: {', '.join(SAMPLER_NAMES)}"
        )


def split_legacy_sampler(sampler: str, schedule: str = "") -> tuple[str, str]:
    """A1111 < 1.9 wrote "DPM++ 2M Karras" where newer versions write Sampler + Schedule type."""
    if schedule:
        return sampler, schedule
    for label in sorted(
        set(COMFY_SCHEDULERS.values()) | {"Uniform", "Polyexponential"}, key=len, reverse=True
    ):
        if sampler.endswith(f" {label}") and sampler[: -len(label) - 1] in set(COMFY_SAMPLERS.values()):
            return sampler[: -len(label) - 1], label
    return sampler, ""


def studionova_sampler(a1111_sampler: str, schedule_type: str = "") -> str | None:
    """The StudioNOVA sampler (a key of engine.samplers.SAMPLERS) for an A1111 Sampler + Schedule type,
    or None when StudioNOVA has no such pair. "Automatic" means A1111's default for that sampler."""
    if schedule_type == "Automatic":
        schedule_type = A1111_DEFAULT_SCHEDULE.get(a1111_sampler, "")
    for name, spec in SAMPLERS.items():
        if spec.a1111_sampler != a1111_sampler:
            continue
        if spec.a1111_schedule == schedule_type or (
            not spec.a1111_schedule and schedule_type in PLAIN_SCHEDULES
        ):
            return name
    return None


def comfy_to_a1111(sampler_name: str, scheduler: str) -> tuple[str, str]:
    """ComfyUI (sampler_name, scheduler) -> A1111 (Sampler, Schedule type); InputError when there is none."""
    if sampler_name not in COMFY_SAMPLERS:
        raise InputError(
            f"ComfyUI sampler_name {sampler_name!r} has no A1111 equivalent; "
            f"known: {', '.join(COMFY_SAMPLERS)}"
        )
    if scheduler not in COMFY_SCHEDULERS:
        raise InputError(
            f"ComfyUI scheduler {scheduler!r} has no A1111 equivalent; known: {', '.join(COMFY_SCHEDULERS)}"
        )
    return COMFY_SAMPLERS[sampler_name], COMFY_SCHEDULERS[scheduler]


def a1111_to_comfy(sampler: str, schedule_type: str = "") -> tuple[str, str]:
    """A1111 (Sampler, Schedule type) -> ComfyUI (sampler_name, scheduler); no schedule = A1111's default
    for the sampler (else ComfyUI's "normal"). InputError when ComfyUI has no equivalent."""
    sampler, schedule_type = split_legacy_sampler(sampler, schedule_type)
    comfy_sampler = next((k for k, v in COMFY_SAMPLERS.items() if v == sampler), None)
    if comfy_sampler is None:
        raise InputError(
            f"sampler {sampler!r} has no ComfyUI equivalent; "
            f"known: {', '.join(dict.fromkeys(COMFY_SAMPLERS.values()))}"
        )
    if schedule_type in ("", "Automatic"):
        schedule_type = A1111_DEFAULT_SCHEDULE.get(sampler, "Normal")
    scheduler = next((k for k, v in COMFY_SCHEDULERS.items() if v == schedule_type), None)
    if scheduler is None:
        raise InputError(
            f"Schedule type {schedule_type!r} has no ComfyUI equivalent; "
            f"known: {', '.join(COMFY_SCHEDULERS.values())}"
        )
    return comfy_sampler, scheduler


# ------------------------------------------------------------------------------- mapping: StudioNOVA


def params_from_recipe(recipe: dict) -> tuple[dict[str, Any], list[str]]:
    """A StudioNOVA recipe (see engine.generation.generate.save_generated) -> (params, unmapped)."""
    params: dict[str, Any] = dict(recipe.get("request") or {})
    unmapped: list[str] = []
    if "seed" in recipe:
        params["seed"] = recipe["seed"]  # this image's seed, not the batch's first
    params["loras"] = [
        f"{lora['name']}:{_decimal(lora.get('weight', 1.0))}" if isinstance(lora, dict) else str(lora)
        for lora in params.get("loras") or []
    ]
    for key in ("model", "model_hash", "mode"):
        if recipe.get(key):
            params[key] = recipe[key]
    if lora_hashes := {x["name"]: x["hash"] for x in recipe.get("loras") or [] if x.get("hash")}:
        params["lora_hashes"] = lora_hashes
    if recipe.get("embeddings"):
        params["ti_hashes"] = dict(recipe["embeddings"])
    if isinstance(vae := recipe.get("vae"), dict):
        params["vae"], params["vae_hash"] = vae.get("name", params.get("vae", "")), vae.get("hash")
    if (spec := SAMPLERS.get(params.get("sampler", ""))) is not None:
        params["a1111_sampler"] = spec.a1111_sampler
        if spec.a1111_schedule:
            params["schedule_type"] = spec.a1111_schedule
    if recipe.get("version"):
        params["version"] = f"StudioNOVA {recipe['version']}"
    if params.get("mode", "txt2img") != "txt2img":
        unmapped.append(f"mode {params['mode']}: the source image (and mask) are not stored in the file")
    return params, unmapped


def infotext_from_params(params: dict[str, Any], version: str) -> str:
    """params (as the readers here produce them) -> A1111 infotext. LoRAs in `loras` that the prompt does
    not already name are appended to it as `<lora:name:weight>` tags, which is how A1111 takes them."""
    a1111: dict[str, Any] = {}
    for key, (name, _) in A1111_FIELDS.items():
        if key != "Version" and params.get(name) not in (None, ""):
            a1111[key] = _decimal(params[name]) if isinstance(params[name], float) else params[name]
    sampler = params.get("a1111_sampler")
    if not sampler and (spec := SAMPLERS.get(params.get("sampler", ""))) is not None:
        sampler, a1111["Schedule type"] = spec.a1111_sampler, spec.a1111_schedule
    a1111["Sampler"] = sampler
    a1111.setdefault("Schedule type", params.get("schedule_type"))
    if params.get("width") and params.get("height"):
        a1111["Size"] = f"{params['width']}x{params['height']}"
    mode = params.get("mode", "txt2img")
    hires = bool(params.get("enable_hr")) and mode == "txt2img"
    drop = ["Hires upscale", "Hires steps", "Hires upscaler"] if not hires else []
    if hires:
        a1111["Denoising strength"] = (
            _decimal(params["hr_denoising_strength"]) if "hr_denoising_strength" in params else None
        )
        a1111["Hires steps"] = params.get("hr_second_pass_steps") or None
    elif mode == "txt2img":
        drop.append("Denoising strength")
    if not params.get("subseed_strength"):
        drop += ["Variation seed", "Variation seed strength"]
    if int(params.get("clip_skip") or 1) <= 1:
        drop.append("Clip skip")
    if mode not in ("inpaint", "outpaint"):
        drop += ["Mask blur", "Masked content", "Masked area padding"]
    elif params.get("inpaint_only_masked"):
        a1111["Inpaint area"] = "Only masked"
    else:
        drop.append("Masked area padding")
    for key in drop:
        a1111.pop(key, None)
    for key, name in HASH_LISTS.items():
        if params.get(name):
            a1111[key] = ", ".join(f"{n}: {h}" for n, h in params[name].items())
    prompt = params.get("prompt", "")
    named = {n for n, _ in _safe_lora_tags(prompt)}
    tags = [f"<lora:{spec}>" for spec in params.get("loras") or [] if spec.rpartition(":")[0] not in named]
    prompt = ", ".join(p for p in [prompt, *tags] if p) if tags else prompt
    return build_infotext(prompt, params.get("negative_prompt", ""), a1111, version)


def _safe_lora_tags(prompt: str) -> list[tuple[str, float]]:
    try:
        return extract_lora_tags(prompt)[1]
    except InputError:
        return []


# ---------------------------------------------------------------------------------- mapping: ComfyUI


def params_from_comfy_graph(graph: dict[str, dict]) -> tuple[dict[str, Any], list[str]]:
    """ComfyUI API-format graph -> (params, unmapped).

    The first KSampler/KSamplerAdvanced (the one with no sampler upstream of it) gives the settings;
    a second one fed through LatentUpscale(By) by the first is read as hires fix; any other sampler,
    and every node this mapping does not read, is listed as "node <id> (<class_type>)".
    """
    return _ComfyReader(graph).read()


class _ComfyReader:
    def __init__(self, graph: dict[str, dict]):
        self.nodes = {str(k): v for k, v in graph.items()}
        self.used: set[str] = set()
        self.reported: set[str] = set()
        self.unmapped: list[str] = []
        self.params: dict[str, Any] = {}

    # --- graph helpers
    def cls(self, nid: str) -> str:
        return self.nodes[nid].get("class_type", "?")

    def inputs(self, nid: str) -> dict:
        value = self.nodes[nid].get("inputs")
        return value if isinstance(value, dict) else {}

    def link(self, value: Any) -> str | None:
        """The source node id when `value` is a link [node_id, output_index] to a node of the graph."""
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[1], int)
            and str(value[0]) in self.nodes
        ):
            return str(value[0])
        return None

    def source(self, nid: str, name: str) -> str | None:
        return self.link(self.inputs(nid).get(name))

    def report(self, nid: str, note: str = "") -> None:
        if nid not in self.reported:
            self.reported.add(nid)
            self.unmapped.append(f"node {nid} ({self.cls(nid)})" + (f": {note}" if note else ""))

    def value(self, nid: str, name: str) -> Any:
        """A literal input, through a core Primitive* node; a link to anything else is reported."""
        value = self.inputs(nid).get(name)
        if (src := self.link(value)) is None:
            return value
        if self.cls(src) in COMFY_PRIMITIVE_NODES and self.link(self.inputs(src).get("value")) is None:
            self.used.add(src)
            return self.inputs(src).get("value")
        self.report(src, f"feeds {name} of node {nid} ({self.cls(nid)}); not read")
        return None

    def ancestors(self, nid: str) -> set[str]:
        seen: set[str] = set()
        stack = [nid]
        while stack:
            for value in self.inputs(stack.pop()).values():
                if (src := self.link(value)) is not None and src not in seen:
                    seen.add(src)
                    stack.append(src)
        return seen

    # --- mapping
    def read(self) -> tuple[dict[str, Any], list[str]]:
        order = {nid: i for i, nid in enumerate(self.nodes)}
        samplers = [nid for nid in self.nodes if self.cls(nid) in COMFY_SAMPLER_NODES]
        if not samplers:
            self.unmapped.append("no KSampler/KSamplerAdvanced node: the sampling settings were not found")
        else:
            upstream = {nid: len(self.ancestors(nid) & set(samplers)) for nid in samplers}
            samplers.sort(key=lambda n: (upstream[n], int(n) if n.isdigit() else float("inf"), order[n]))
            first, others = samplers[0], samplers[1:]
            self.map_sampler(first)
            if others and self.map_hires(first, others[0]):
                others = others[1:]
            for nid in others:
                self.report(nid, "another sampler; only the first sampler's settings are mapped")
        self.map_vae()
        self.used.update(nid for nid in self.nodes if self.cls(nid) in COMFY_PASSIVE_NODES)
        for nid in self.nodes:
            if nid not in self.used:
                self.report(nid)
        return self.params, self.unmapped

    def map_sampler(self, nid: str) -> None:
        self.used.add(nid)
        p = self.params
        advanced = self.cls(nid) == "KSamplerAdvanced"
        seed = self.value(nid, "noise_seed" if advanced else "seed")
        for name, key, kind in (("steps", "steps", int), ("cfg", "cfg_scale", float)):
            if isinstance(v := self.value(nid, name), int | float):
                p[key] = kind(v)
        if isinstance(seed, int):
            p["seed"] = seed
            if not 0 <= seed <= MAX_SEED:
                self.unmapped.append(
                    f"seed {seed} is outside StudioNOVA's 0..{MAX_SEED} (ComfyUI seeds are 64-bit)"
                )
        self.map_sampler_names(nid)
        self.map_model(self.source(nid, "model"), nid)
        for role, key in (("positive", "prompt"), ("negative", "negative_prompt")):
            src = self.source(nid, role)
            text = self.text(src, nid, role) if src is not None else None
            if text is not None:
                p[key] = text
        denoise = 1.0 if advanced else self.value(nid, "denoise")
        if advanced:
            start, end = self.value(nid, "start_at_step") or 0, self.value(nid, "end_at_step")
            steps = p.get("steps") or 0
            if start or (isinstance(end, int) and end < steps):
                self.unmapped.append(
                    f"node {nid} (KSamplerAdvanced): runs steps {start} to {min(end or steps, steps)} "
                    f"of {steps}; mapped as if it ran all of them"
                )
            if self.value(nid, "add_noise") == "disable":
                self.unmapped.append(f"node {nid} (KSamplerAdvanced): add_noise is disabled")
        self.map_latent(self.source(nid, "latent_image"), nid, denoise)

    def map_sampler_names(self, nid: str) -> None:
        p = self.params
        sampler_name, scheduler = self.value(nid, "sampler_name"), self.value(nid, "scheduler")
        if not isinstance(sampler_name, str) or not isinstance(scheduler, str):
            return
        p["comfy_sampler"], p["comfy_scheduler"] = sampler_name, scheduler
        p["a1111_sampler"] = COMFY_SAMPLERS.get(sampler_name, sampler_name)
        p["schedule_type"] = COMFY_SCHEDULERS.get(scheduler, scheduler)
        for value, table, what in (
            (sampler_name, COMFY_SAMPLERS, "sampler_name"),
            (scheduler, COMFY_SCHEDULERS, "scheduler"),
        ):
            if value not in table:
                self.unmapped.append(f"ComfyUI {what} {value!r} has no A1111 equivalent; written as is")
        if name := studionova_sampler(p["a1111_sampler"], p["schedule_type"]):
            p["sampler"] = name
        else:
            self.unmapped.append(
                f"sampler {sampler_name} with scheduler {scheduler} is not one StudioNOVA has; "
                f"available: {', '.join(SAMPLER_NAMES)}"
            )

    def map_model(self, nid: str | None, consumer: str) -> None:
        loras: list[str] = []
        files: list[str] = []
        seen: set[str] = set()
        while nid is not None and nid not in seen:
            seen.add(nid)
            cls = self.cls(nid)
            if cls in COMFY_LORA_NODES:
                self.used.add(nid)
                name, strength = self.value(nid, "lora_name"), self.value(nid, "strength_model")
                clip = self.value(nid, "strength_clip") if cls == "LoraLoader" else strength
                if isinstance(name, str) and isinstance(strength, int | float):
                    loras.append(f"{display_name(name)}:{_decimal(strength)}")
                    files.append(name)
                    if isinstance(clip, int | float) and clip != strength:
                        self.unmapped.append(
                            f"node {nid} (LoraLoader): strength_clip {clip:g} differs from "
                            f"strength_model {strength:g}; StudioNOVA uses one weight"
                        )
                consumer, nid = nid, self.source(nid, "model")
            elif cls in COMFY_CHECKPOINT_NODES:
                self.used.add(nid)
                if isinstance(ckpt := self.value(nid, "ckpt_name"), str):
                    self.params["model"], self.params["model_file"] = display_name(ckpt), ckpt
                break
            else:  # report it, and look through it for the checkpoint and LoRAs behind it
                self.report(
                    nid, f"feeds model of node {consumer} ({self.cls(consumer)}); its effect is not mapped"
                )
                consumer, nid = nid, self.source(nid, "model")
        if loras:  # walked from the sampler back: reverse to the order they are applied
            self.params["loras"], self.params["lora_files"] = loras[::-1], files[::-1]

    def text(self, nid: str, consumer: str, role: str, depth: int = 0) -> str | None:
        cls = self.cls(nid)
        if cls == "CLIPTextEncode":
            self.used.add(nid)
            self.map_clip(self.source(nid, "clip"), nid, record=role == "positive")
            text = self.value(nid, "text")
            return text if isinstance(text, str) else None
        if cls in COMFY_CONDITIONING_JOINS and depth < 4:
            names, joiner = COMFY_CONDITIONING_JOINS[cls]
            sources = [self.source(nid, n) for n in names]
            parts = [self.text(s, nid, role, depth + 1) if s is not None else None for s in sources]
            if all(isinstance(part, str) for part in parts):
                self.used.add(nid)
                if joiner == " AND ":
                    self.unmapped.append(
                        f"node {nid} ({cls}): written as A1111's AND (composable diffusion), "
                        "which StudioNOVA reads as plain text"
                    )
                return joiner.join(parts)  # type: ignore[arg-type]
        self.report(nid, f"feeds {role} of node {consumer} ({self.cls(consumer)}); not read")
        return None

    def map_clip(self, nid: str | None, consumer: str, record: bool) -> None:
        seen: set[str] = set()
        while nid is not None and nid not in seen:
            seen.add(nid)
            cls = self.cls(nid)
            if cls == "CLIPSetLastLayer":
                self.used.add(nid)
                layer = self.value(nid, "stop_at_clip_layer")
                if record and isinstance(layer, int) and layer < 0 and "clip_skip" not in self.params:
                    self.params["clip_skip"] = -layer
            elif cls == "LoraLoader":
                pass  # read with the model chain; its CLIP output follows the same LoRA
            elif cls in COMFY_CHECKPOINT_NODES:
                return
            else:
                self.report(
                    nid, f"feeds clip of node {consumer} ({self.cls(consumer)}); its effect is not mapped"
                )
            consumer, nid = nid, self.source(nid, "clip")

    def map_latent(self, nid: str | None, consumer: str, denoise: Any) -> None:
        if nid is None:
            return
        p = self.params
        cls = self.cls(nid)
        if cls in COMFY_EMPTY_LATENT_NODES:
            self.used.add(nid)
            for name in ("width", "height", "batch_size"):
                if isinstance(v := self.value(nid, name), int):
                    p[name] = v
            p["mode"] = "txt2img"
            if isinstance(denoise, int | float) and denoise != 1:
                self.unmapped.append(
                    f"node {consumer}: denoise {denoise:g} on an empty latent has no A1111 "
                    "equivalent; mapped as 1"
                )
        elif cls == "VAEEncode":
            self.used.add(nid)
            p["mode"] = "img2img"
            if isinstance(denoise, int | float):
                p["denoising_strength"] = float(denoise)
            pixels = self.source(nid, "pixels")
            if pixels is not None and self.cls(pixels) == "LoadImage":
                self.used.add(pixels)
                self.unmapped.append(
                    f"node {pixels} (LoadImage): the img2img source {self.value(pixels, 'image')!r} "
                    "is not stored in the file"
                )
            elif pixels is not None:
                self.report(pixels, f"feeds pixels of node {nid} (VAEEncode); not read")
            self.map_vae_input(nid)
        else:
            self.report(nid, f"feeds latent_image of node {consumer} ({self.cls(consumer)}); not read")

    def map_hires(self, first: str, second: str) -> bool:
        """A second sampler fed through LatentUpscale(By) by the first, with the same model and prompts:
        A1111's hires fix with a latent upscaler."""
        up = self.source(second, "latent_image")
        if (
            up is None
            or self.cls(up) not in ("LatentUpscaleBy", "LatentUpscale")
            or self.source(up, "samples") != first
        ):
            return False
        if any(
            self.inputs(second).get(k) != self.inputs(first).get(k) for k in ("model", "positive", "negative")
        ):
            return False
        p = self.params
        if self.cls(up) == "LatentUpscaleBy":
            scale = self.value(up, "scale_by")
        else:
            width, height = self.value(up, "width"), self.value(up, "height")
            scale = width / p["width"] if isinstance(width, int) and width and p.get("width") else None
            if (
                scale
                and isinstance(height, int)
                and height
                and p.get("height")
                and height / p["height"] != scale
            ):
                scale = None
        if not isinstance(scale, int | float):
            return False
        self.used.update((second, up))
        method = self.value(up, "upscale_method")
        p.update(
            enable_hr=True, hr_scale=float(scale), hr_upscaler=COMFY_LATENT_UPSCALERS.get(method, "Latent")
        )
        if method not in COMFY_LATENT_UPSCALERS:
            self.unmapped.append(
                f"node {up} ({self.cls(up)}): upscale_method {method!r} mapped to A1111's Latent"
            )
        if isinstance(steps := self.value(second, "steps"), int):
            p["hr_second_pass_steps"] = steps
        if isinstance(denoise := self.value(second, "denoise"), int | float):
            p["hr_denoising_strength"] = float(denoise)
        for name in ("sampler_name", "scheduler", "cfg"):
            if self.value(second, name) != self.value(first, name):
                self.unmapped.append(
                    f"node {second} ({self.cls(second)}): hires pass {name} "
                    f"{self.value(second, name)!r} differs from the first pass; not mapped"
                )
        return True

    def map_vae(self) -> None:
        """The VAE of the VAEDecode nodes fed by a mapped sampler."""
        for nid in self.nodes:
            if self.cls(nid) == "VAEDecode" and self.source(nid, "samples") in self.used:
                self.map_vae_input(nid)

    def map_vae_input(self, nid: str) -> None:
        src = self.source(nid, "vae")
        if src is None or self.cls(src) in COMFY_CHECKPOINT_NODES:
            return
        if self.cls(src) == "VAELoader":
            self.used.add(src)
            if isinstance(name := self.value(src, "vae_name"), str):
                self.params["vae"], self.params["vae_file"] = display_name(name), name
        else:
            self.report(src, f"feeds vae of node {nid} ({self.cls(nid)}); not read")


def display_name(file_name: str) -> str:
    """A model file name as StudioNOVA shows it: no folder, no weights suffix ("SD1.5/x.safetensors" -> "x")."""
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in MODEL_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _decimal(value: float) -> str:
    """A number as plain decimal text (never exponent form: `name:weight` and infotext parsers need that)."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".") or "0"


# --------------------------------------------------------------------------------------------- writing


def save_image(
    image,
    path: Path,
    infotext: str,
    recipe: dict | None = None,
    format: ImageFormat = "png",
    quality: int = 90,
) -> SavedImage:
    """Write `image` atomically with its infotext (A1111's way for each format) and the recipe.

    quality (1-100) applies to JPEG and WebP. The path's suffix must fit the format.
    """
    if format not in FORMATS:
        raise InputError(f"format={format!r} is not supported; allowed: {', '.join(FORMATS)}")
    pil_format, suffixes = FORMATS[format]
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InputError(
            f"path {path.name!r} does not fit format={format!r}; use a {' or '.join(suffixes)} name"
        )
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"quality={quality!r} must be an integer from 1 to 100")
    recipe_json = json.dumps(recipe, ensure_ascii=False) if recipe is not None else None
    notes: list[str] = []
    if format == "png":
        chunks = {PARAMETERS_CHUNK: infotext} if infotext else {}
        if recipe_json is not None:
            chunks[RECIPE_CHUNK] = recipe_json
        save_png(image, path, chunks)
        return SavedImage(path, format)

    exif = exif_user_comment(infotext) if infotext else b""
    xmp = recipe_xmp(recipe_json) if recipe_json is not None else b""
    if format == "jpeg":
        if image.mode not in ("RGB", "L", "CMYK"):
            if "A" in image.getbands() or "transparency" in image.info:
                notes.append(f"the alpha channel of the {image.mode} image was dropped: JPEG has none")
            image = image.convert("RGB")
        if len(exif) > JPEG_MAX_EXIF:
            exif = _fit_jpeg_exif(infotext, len(exif))
            notes.append(
                f"the infotext ({len(infotext)} characters) is too long for JPEG as UTF-16; "
                "it was written with the EXIF ASCII prefix, which A1111 reads too"
            )
        if len(xmp) > JPEG_MAX_XMP:
            notes.append(
                f"the recipe was not stored: its XMP is {len(xmp)} bytes and a JPEG segment holds "
                f"{JPEG_MAX_XMP}; the infotext is kept (save as PNG or WebP to keep both)"
            )
            xmp = b""
    with atomic_write(path) as f:
        image.save(f, format=pil_format, quality=quality, exif=exif, xmp=xmp)
    return SavedImage(path, format, tuple(notes))


def _fit_jpeg_exif(infotext: str, unicode_size: int) -> bytes:
    if infotext.isascii():
        exif = exif_user_comment(infotext, ascii_prefix=True)
        if len(exif) <= JPEG_MAX_EXIF:
            return exif
    raise InputError(
        f"infotext of {len(infotext)} characters needs {unicode_size} bytes of EXIF; a JPEG holds at most "
        f"{JPEG_MAX_EXIF}. Save as PNG or WebP, or shorten the prompt"
    )


def exif_user_comment(text: str, ascii_prefix: bool = False) -> bytes:
    """An EXIF block holding only UserComment, byte for byte what A1111 writes with
    piexif.dump({"Exif": {UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}}).

    Layout (big-endian TIFF, offsets from the "MM"): header, IFD0 at 8 with one entry (ExifIFDPointer,
    LONG) and a zero next-IFD offset, the Exif IFD at 26 with one entry (UserComment, UNDEFINED) and, as
    piexif writes it, no next-IFD offset, then the comment at 40.
    """
    comment = (
        ASCII_PREFIX + text.encode("ascii") if ascii_prefix else UNICODE_PREFIX + text.encode("utf-16-be")
    )
    exif_ifd_at = 8 + 2 + 12 + 4
    comment_at = exif_ifd_at + 2 + 12
    tiff = (
        b"MM\x00\x2a"
        + struct.pack(">I", 8)
        + struct.pack(">HHHII", 1, EXIF_IFD_POINTER, 4, 1, exif_ifd_at)
        + struct.pack(">I", 0)
        + struct.pack(">HHHII", 1, USER_COMMENT, 7, len(comment), comment_at)
    )
    return b"Exif\x00\x00" + tiff + comment


def recipe_xmp(recipe_json: str) -> bytes:
    """An XMP packet with the recipe JSON as the element studionova:recipe (namespace XMP_NS)."""
    from xml.sax.saxutils import escape

    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:studionova="{XMP_NS}">\n'
        f"   <studionova:recipe>{escape(recipe_json)}</studionova:recipe>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()
