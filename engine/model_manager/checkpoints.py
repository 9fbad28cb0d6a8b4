"""Single-file checkpoints: safe reading, family detection and offline loading configs.

- `.safetensors` are read with safetensors; `.ckpt/.pt/.pth/.bin` only through
  `torch.load(weights_only=True)`, so a pickle that needs code (a `__reduce__` payload) is refused
  before any of it runs.
- The family (SD1.x, SD2.x, SDXL base/refiner, inpainting variants, turbo, v-prediction) comes
  from the key layout with diffusers' own `infer_diffusers_model_type`, fed the tensor shapes from
  the safetensors header (nothing is loaded to scan a .safetensors file).
- diffusers' `from_single_file` fetches component configs from the Hub unless given a local
  folder: `config_folder` prepares one per family from the configs shipped in
  engine/model_configs (tokenizer vocab built from the shipped CLIP merges), so loading is offline.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.artifacts import atomic_dir, safetensors_header
from engine.errors import InputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."

# diffusers model type -> (family label, shipped config folder or "" when StudioNOVA cannot load it)
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "v1": ("SD1.x", "sd1"),
    "inpainting": ("SD1.x inpainting", "sd1"),
    "v2": ("SD2.x", "sd2"),
    "inpainting_v2": ("SD2.x inpainting", "sd2"),
    "xl_base": ("SDXL", "sdxl"),
    "xl_inpaint": ("SDXL inpainting", "sdxl"),
    "xl_refiner": ("SDXL refiner", "sdxl-refiner"),
    "playground-v2-5": ("Playground v2.5", ""),
    "upscale": ("SD x4 upscaler", ""),
}
TURBO = {"v2": "SD-Turbo", "xl_base": "SDXL-Turbo", "v1": "SD1.x turbo"}
# A1111 names v-prediction checkpoints like this ("768-v", "v-pred", "vpred", "v_prediction")
_V_NAME = re.compile(r"(?i)(?:^|[^a-z0-9])(?:768-v|v[-_ ]?pred(?:iction)?)(?:$|[^a-z0-9])")
_TURBO_NAME = re.compile(r"(?i)turbo|lightning|lcm")


@dataclass(frozen=True)
class CheckpointInfo:
    model_type: str  # diffusers' name: v1, v2, xl_base, xl_refiner, ...
    family: str  # what users read: "SD2.x (v-prediction)", "SDXL-Turbo", ...
    prediction_type: str  # epsilon | v_prediction
    turbo: bool
    config: str  # shipped config folder ("" = not loadable here)
    prediction_source: str  # why that prediction type: key, metadata, yaml, file name, default

    def encode(self) -> str:  # fits FileHash.sha256 (64 chars) so detection is cached like a hash
        return "|".join(
            [self.model_type, self.prediction_type, "turbo" if self.turbo else "", self.prediction_source]
        )

    @classmethod
    def decode(cls, text: str) -> CheckpointInfo:
        model_type, prediction, turbo, source = text.split("|")
        return describe(model_type, prediction, bool(turbo), source)


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    path: Path
    family: str
    prediction_type: str
    size: int
    sha256: str
    short_hash: str  # A1111's model hash: first 10 hex of the SHA-256
    error: str = ""


# --- reading --------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, Any]:
    """All tensors of a weights file (nested dicts kept, a top-level "state_dict" unwrapped).

    Pickles load only through torch.load(weights_only=True): code in them never runs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path.name} is not a readable .safetensors file: {e}") from None
    if suffix in PICKLE_SUFFIXES:
        obj = _load_tensor_pickle(path)
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputError(f"{path.name} holds a {type(obj).__name__}, not a dict of weights")
        return obj
    raise InputError(
        f"{path.name}: unsupported weights file type {suffix!r}; allowed: "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def _load_tensor_pickle(path: Path) -> Any:
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{path.name} is a pickle that needs code to load, which StudioNOVA refuses to run "
            f"(torch.load weights_only=True said: {first[:300]}); allowed: .safetensors, or a .ckpt/.pt "
            "holding only tensors. Convert it to .safetensors where you trust its source."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path.name} is not a readable PyTorch weights file: {e}") from None


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor name -> shape, and the metadata, without loading tensors from .safetensors."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            _, header = safetensors_header(path)
        except ValueError as e:
            raise InputError(str(e)) from None
        meta = header.pop("__metadata__", None) or {}
        return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}, meta
    sd = read_state_dict(path)
    return {k: tuple(getattr(v, "shape", ())) for k, v in sd.items() if hasattr(v, "shape")}, {}


# --- detection ------------------------------------------------------------------------------
def describe(model_type: str, prediction: str, turbo: bool, source: str) -> CheckpointInfo:
    label, config = MODEL_TYPES.get(model_type, (model_type, ""))
    if turbo and model_type in TURBO:
        label = TURBO[model_type]
    if prediction == "v_prediction":
        label += " (v-prediction)"
    return CheckpointInfo(model_type, label, prediction, turbo, config, source)


def detect(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> CheckpointInfo:
    """Family from the key layout; prediction type and turbo from keys, metadata, an A1111 sidecar
    .yaml or the file name, in that order."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = Path(path)
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        hint = ""
        if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in shapes):
            hint = " (it looks like a LoRA: put it in models/loras)"
        elif any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in shapes):
            hint = " (it looks like a VAE: put it in models/vae)"
        raise InputError(f"{path.name} is not a Stable Diffusion checkpoint: no {UNET_PREFIX}* weights{hint}")
    model_type = infer_diffusers_model_type({k: SimpleNamespace(shape=s) for k, s in shapes.items()})
    if model_type == "v1":  # diffusers' probe keys sit in layer 9/23 of the text encoders: pruned or small
        # models fall through to "v1"; the text encoder's layout still says which family it is
        if any(k.startswith("conditioner.embedders.1.model.") for k in shapes):
            model_type = "xl_base"
        elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            model_type = "xl_refiner"
        elif any(k.startswith("cond_stage_model.model.") for k in shapes):
            model_type = "v2"
    meta_text = " ".join(
        str(metadata.get(k, ""))
        for k in ("modelspec.title", "modelspec.architecture", "modelspec.implementation")
    )
    turbo = bool(_TURBO_NAME.search(path.stem) or "turbo" in meta_text.lower())
    prediction, source = _prediction_type(path, model_type, shapes, metadata, turbo)
    return describe(model_type, prediction, turbo, source)


def _prediction_type(
    path: Path, model_type: str, shapes: dict, metadata: dict, turbo: bool
) -> tuple[str, str]:
    if "v_pred" in shapes:  # the marker key ComfyUI and kohya write into v-prediction checkpoints
        return "v_prediction", "key v_pred"
    meta = str(metadata.get("modelspec.prediction_type", "")).lower()
    if meta in ("v", "v_prediction", "epsilon", "eps"):
        return ("v_prediction" if meta.startswith("v") else "epsilon"), "metadata"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():  # A1111: an LDM config beside the checkpoint; parameterization: "v"
        text = sidecar.read_text(encoding="utf-8", errors="replace")
        return (
            "v_prediction" if re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", text, re.M) else "epsilon"
        ), "yaml"
    if _V_NAME.search(path.stem):
        return "v_prediction", "file name"
    if model_type in ("v2",) and not turbo:
        return "v_prediction", "SD2.x default (768-v)"
    return "epsilon", "default"


def folder_family(folder: Path) -> str:
    """The same family labels for a diffusers folder, from its configs (no weights read)."""
    folder = Path(folder)

    def config(rel: str) -> dict:
        p = folder / rel
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    cls = config("model_index.json").get("_class_name", "")
    unet = config("unet/config.json")
    if "XL" in cls:
        model_type = (
            "xl_refiner" if config("model_index.json").get("text_encoder", [None])[0] is None else "xl_base"
        )
        if unet.get("in_channels") == 9:
            model_type = "xl_inpaint"
    elif cls.startswith("StableDiffusion"):
        v2 = config("text_encoder/config.json").get("hidden_size") == 1024
        model_type = (
            ("inpainting_v2" if v2 else "inpainting")
            if unet.get("in_channels") == 9
            else ("v2" if v2 else "v1")
        )
    else:
        return cls or "unknown"
    prediction = config("scheduler/scheduler_config.json").get("prediction_type", "epsilon")
    turbo = bool(_TURBO_NAME.search(folder.name))
    return describe(model_type, prediction, turbo, "config").family


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    shapes, metadata = read_shapes(path)
    return detect(path, shapes, metadata)


def scan_checkpoints(roots, hashes) -> list[CheckpointEntry]:
    """Every single-file checkpoint under models/checkpoints with family, size and hashes (cached
    in the database by path + size + mtime, so a rescan reads nothing unchanged)."""
    entries: list[CheckpointEntry] = []
    for name, path in roots.list_checkpoint_files().items():
        size = path.stat().st_size
        try:
            info = CheckpointInfo.decode(
                hashes.cached(path, "family", lambda p: inspect_checkpoint(p).encode())
            )
            sha = hashes.sha256(path)
            entries.append(
                CheckpointEntry(name, path, info.family, info.prediction_type, size, sha, sha[:10])
            )
        except InputError as e:
            entries.append(CheckpointEntry(name, path, "unknown", "", size, "", "", str(e)))
    return entries


# --- offline configs --------------------------------------------------------------------------
def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's vocab.json from its BPE merges (bytes, bytes + '</w>', merges, start/end tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def config_folder(info: CheckpointInfo, config_root: Path, cache_dir: Path) -> Path:
    """A local diffusers config folder (no weights) for `info`, patched for its variant
    (inpainting in_channels, prediction type, turbo's trailing timesteps); built once, cached."""
    if not info.config:
        raise InputError(
            f"checkpoints of family {info.family} cannot be loaded yet; loadable: "
            f"{', '.join(sorted({v[0] for v in MODEL_TYPES.values() if v[1]}))}"
        )
    source = Path(config_root) / info.config
    if not (source / "model_index.json").is_file():
        raise InputError(
            f"no config for {info.family} in {config_root} (expected {info.config}/model_index.json)"
        )
    variant = f"{info.config}-{info.model_type}-{info.prediction_type}{'-turbo' if info.turbo else ''}"
    stamp = json.dumps(
        sorted(
            (p.relative_to(source).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
            for p in source.rglob("*")
            if p.is_file()
        )
    )
    import hashlib

    target = (
        Path(cache_dir)
        / "single_file_configs"
        / f"{variant}-{hashlib.sha256(stamp.encode()).hexdigest()[:8]}"
    )
    if (target / "model_index.json").is_file():
        return target
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        _patch_variant(Path(tmp), info, config_root)
    return target


def _patch_variant(folder: Path, info: CheckpointInfo, config_root: Path) -> None:
    def patch(rel: str, **changes) -> None:
        p = folder / rel
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            data.update(changes)
            p.write_text(json.dumps(data, indent=2), encoding="utf-8")

    if "inpaint" in info.model_type:
        patch("unet/config.json", in_channels=9)
        cls = (
            "StableDiffusionXLInpaintPipeline"
            if info.model_type == "xl_inpaint"
            else "StableDiffusionInpaintPipeline"
        )
        patch("model_index.json", _class_name=cls)
    sched = {"prediction_type": info.prediction_type}
    if info.prediction_type == "v_prediction" and info.model_type.startswith("xl"):
        sched["rescale_betas_zero_snr"] = False
    if info.turbo:
        sched["timestep_spacing"] = "trailing"
    patch("scheduler/scheduler_config.json", **sched)
    merges_gz = Path(config_root) / "clip_merges.txt.gz"
    for tok in folder.glob("tokenizer*"):
        if (tok / "vocab.json").is_file() or not merges_gz.is_file():
            continue
        text = gzip.decompress(merges_gz.read_bytes()).decode("utf-8")
        merges = [line for line in text.splitlines()[1:] if line]
        (tok / "merges.txt").write_text(text, encoding="utf-8")
        (tok / "vocab.json").write_text(json.dumps(clip_vocab(merges)), encoding="utf-8")


def pipeline_class_name(folder: Path) -> str:
    return json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
