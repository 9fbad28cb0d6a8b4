"""IP-Adapter: an image prompt for SD1.x/SDXL pipelines, from local files only (ComfyUI layout).

- Adapter weights live in models/ipadapter (`.safetensors` with `image_proj.` / `ip_adapter.` key
  prefixes, or a torch pickle holding {"image_proj": {...}, "ip_adapter": {...}}), image encoders
  in models/clip_vision (a transformers folder with config.json, or one `.safetensors` in
  transformers key layout whose config is inferred from the tensor shapes).
- Pickles are read only through `torch.load(weights_only=True)` (engine.model_manager.checkpoints.read_state_dict):
  code in them never runs. The adapter reaches diffusers' `pipe.load_ip_adapter` as a state dict,
  with the image encoder and feature extractor already set on the pipe, so diffusers never looks
  for anything on the Hub.
- `detach_ip_adapter` undoes everything `attach_ip_adapter` changed (attention processors, image
  encoder, feature extractor), so the pipe then produces exactly the images it did before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.artifacts import TMP_PREFIX, sha256_file
from engine.errors import InputError, NotFoundError
from engine.model_manager.checkpoints import read_state_dict
from engine.paths import resolve_under

ADAPTER_FOLDER = "ipadapter"
ENCODER_FOLDER = "clip_vision"
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ENCODER_SUFFIXES = (".safetensors",)
DEFAULT_CLIP_SIZE = 224
_STATE_ATTR = "_studionova_ip_adapter"
_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class IPAdapterFiles:
    adapter: Path  # file in models/ipadapter
    image_encoder: Path  # folder or .safetensors in models/clip_vision


# --- finding ----------------------------------------------------------------------------------
def _missing_message(models_dir: Path) -> str:
    return (
        "IP-Adapter weights not found: put an IP-Adapter model (for example ip-adapter_sd15.safetensors "
        f"from h94/IP-Adapter) in {models_dir / ADAPTER_FOLDER} and its image encoder (models/image_encoder "
        f"from the same repo, or a CLIP-ViT-H-14 .safetensors) in {models_dir / ENCODER_FOLDER}"
    )


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith((TMP_PREFIX, ".")) for part in path.relative_to(folder).parts)


def list_ip_adapters(models_dir: Path) -> dict[str, Path]:
    """Adapter file name (relative to models/ipadapter, with its suffix) -> path, sorted by name."""
    folder = Path(models_dir) / ADAPTER_FOLDER
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in ADAPTER_SUFFIXES and not _hidden(p, folder):
            found[p.relative_to(folder).as_posix()] = p
    return found


def list_image_encoders(models_dir: Path) -> dict[str, Path]:
    """Encoder name (a folder with config.json, or a .safetensors file name) -> path, sorted by name."""
    folder = Path(models_dir) / ENCODER_FOLDER
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.iterdir()):
        if _hidden(p, folder):
            continue
        if (p.is_dir() and (p / "config.json").is_file()) or (
            p.is_file() and p.suffix.lower() in ENCODER_SUFFIXES
        ):
            found[p.name] = p
    return found


def _pick(found: dict[str, Path], name: str, root: Path, what: str) -> Path:
    if not name:
        return next(iter(found.values()))
    resolve_under(root, name, what)  # refuses absolute paths and `..`
    if name in found:
        return found[name]
    by_stem = [p for key, p in found.items() if Path(key).with_suffix("").as_posix() == name]
    if len(by_stem) == 1:
        return by_stem[0]
    raise NotFoundError(f"{what} {name!r} not found in {root}; available: {', '.join(found)}")


def find_ip_adapter(models_dir: Path, name: str = "", image_encoder: str = "") -> IPAdapterFiles:
    """The adapter file `name` in models/ipadapter and the encoder `image_encoder` in
    models/clip_vision ("" = the first one by name); InputError saying what to put where if missing."""
    models_dir = Path(models_dir)
    adapters, encoders = list_ip_adapters(models_dir), list_image_encoders(models_dir)
    if not adapters or not encoders:
        raise InputError(_missing_message(models_dir))
    adapter = _pick(adapters, name, models_dir / ADAPTER_FOLDER, "IP-Adapter")
    encoder = _pick(encoders, image_encoder, models_dir / ENCODER_FOLDER, "IP-Adapter image encoder")
    return IPAdapterFiles(adapter=adapter, image_encoder=encoder)


# --- reading ----------------------------------------------------------------------------------
def read_ip_adapter(path: Path) -> dict[str, dict[str, Any]]:
    """{"image_proj": {...}, "ip_adapter": {...}} from a .safetensors (flat, prefixed keys) or a
    tensor-only pickle (nested, or flat with the same prefixes)."""
    path = Path(path)
    raw = read_state_dict(path)  # pickles: torch.load(weights_only=True) only
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in raw.items():
        if key in nested and isinstance(value, dict):
            nested[key].update(value)
            continue
        prefix, _, rest = key.partition(".")
        if prefix in nested and rest:
            nested[prefix][rest] = value
    if not nested["image_proj"] or not nested["ip_adapter"]:
        raise InputError(
            f"{path.name} is not an IP-Adapter model: it needs 'image_proj' and 'ip_adapter' weights "
            "(as in h94/IP-Adapter's ip-adapter_*.safetensors / .bin)"
        )
    return nested


def _encoder_config_from_shapes(shapes: dict[str, tuple[int, ...]], name: str):
    from transformers import CLIPVisionConfig

    need = (
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "visual_projection.weight",
    )
    missing = [k for k in need if k not in shapes]
    if missing:
        raise InputError(
            f"{name} is not a CLIP vision encoder in transformers layout (missing {', '.join(missing)}); "
            "allowed: a CLIPVisionModelWithProjection .safetensors (vision_model.* + visual_projection.weight) "
            "or a folder with config.json + model.safetensors"
        )
    hidden, channels, patch, _ = shapes[need[0]]
    grid = round((shapes[need[1]][0] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER_RE.match(k)))
    projection = shapes[need[3]][0]
    heads = {1024: 16, 1280: 16, 1664: 16, 768: 12}.get(hidden, max(1, hidden // 64))
    # laion CLIP (ViT-H/bigG, what IP-Adapters use) is GELU; OpenAI's ViT-L/14 is quick-GELU
    act = "quick_gelu" if (hidden, projection) == (1024, 768) else "gelu"
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[need[2]][0],
        projection_dim=projection,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )


def load_image_encoder(path: Path, dtype=None, device=None):
    """A transformers CLIPVisionModelWithProjection from a folder or a single .safetensors, offline."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    dtype = dtype or torch.float32
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(
                f"image encoder folder {path.name} has no config.json; allowed: a transformers "
                "CLIPVisionModelWithProjection folder (config.json + model.safetensors)"
            )
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise InputError(f"image encoder folder {path.name} could not be loaded: {e}") from None
    elif path.suffix.lower() in ENCODER_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path.name} is not a readable .safetensors file: {e}") from None
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        sd.pop("vision_model.embeddings.position_ids", None)  # a buffer older transformers saved
        config = _encoder_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, path.name)
        with torch.device("meta"):
            model = CLIPVisionModelWithProjection(config)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise InputError(f"{path.name} does not match a CLIP vision encoder: {str(e)[:500]}") from None
        embeddings = model.vision_model.embeddings  # non-persistent buffer: not in the file, still on meta
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
        model = model.to(dtype=dtype)
    else:
        raise InputError(
            f"image encoder {path.name}: allowed are a folder with config.json or a .safetensors file"
        )
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# --- attaching --------------------------------------------------------------------------------
def _check_compatible(state: dict[str, dict[str, Any]], unet, encoder, name: str) -> None:
    proj, ip = state["image_proj"], state["ip_adapter"]
    if "perceiver_resampler.proj_in.weight" in proj or (
        "proj.weight" not in proj and "norm.weight" in proj and "proj.3.weight" not in proj
    ):
        raise InputError(
            f"{name} is an IP-Adapter FaceID model, which needs insightface face embeddings; "
            "allowed: IP-Adapter, Plus, Plus-Face and Full-Face models"
        )
    if "proj.weight" in proj:
        wanted, have, what = proj["proj.weight"].shape[-1], encoder.config.projection_dim, "projection_dim"
    elif "proj.3.weight" in proj:
        wanted, have, what = proj["proj.0.weight"].shape[1], encoder.config.hidden_size, "hidden_size"
    elif "proj_in.weight" in proj:
        wanted, have, what = proj["proj_in.weight"].shape[1], encoder.config.hidden_size, "hidden_size"
    else:
        raise InputError(f"{name}: unknown IP-Adapter image_proj layout ({', '.join(list(proj)[:6])})")
    if wanted != have:
        raise InputError(
            f"{name} expects an image encoder with {what} {wanted}, the chosen one has {have}: "
            "pick the image encoder that belongs to this IP-Adapter"
        )
    n_cross = sum(1 for k in unet.attn_processors if not k.endswith("attn1.processor"))
    n_ip = sum(1 for k in ip if k.endswith(".to_k_ip.weight"))
    cross = unet.config.cross_attention_dim
    first = ip.get("1.to_k_ip.weight")
    if n_ip != n_cross or first is None or first.shape[1] != cross:
        got = f"{n_ip} layers, context {first.shape[1] if first is not None else '?'}"
        raise InputError(
            f"{name} does not fit this model ({got}; the model has {n_cross} cross-attention "
            f"layers, context {cross}): use an IP-Adapter made for this model family"
        )


def _adapter_hash(path: Path) -> str:
    return sha256_file(path)[:10]


def attach_ip_adapter(pipe, files: IPAdapterFiles, scale: float = 0.6) -> str:
    """Load the image encoder and adapter onto `pipe` and set the scale; returns sha256[:10] of the
    adapter file. Calling again with the same files only sets the scale; other files replace them."""
    if not hasattr(pipe, "load_ip_adapter") or not hasattr(pipe, "image_encoder"):
        raise InputError(f"{type(pipe).__name__} does not support IP-Adapter; allowed: SD1.x/SDXL pipelines")
    adapter, encoder_path = Path(files.adapter), Path(files.image_encoder)
    state = getattr(pipe, _STATE_ATTR, None)
    if state is not None and state["files"] == (adapter, encoder_path):
        pipe.set_ip_adapter_scale(float(scale))
        return state["hash"]
    if state is not None:
        detach_ip_adapter(pipe)

    from transformers import CLIPImageProcessor

    ip_state = read_ip_adapter(adapter)
    encoder = load_image_encoder(encoder_path, dtype=pipe.unet.dtype, device=pipe.unet.device)
    _check_compatible(ip_state, pipe.unet, encoder, adapter.name)
    digest = _adapter_hash(adapter)
    saved = {
        "files": (adapter, encoder_path),
        "hash": digest,
        "attn_processors": dict(pipe.unet.attn_processors),
        "image_encoder": getattr(pipe, "image_encoder", None),
        "feature_extractor": getattr(pipe, "feature_extractor", None),
    }
    size = int(getattr(encoder.config, "image_size", 0) or DEFAULT_CLIP_SIZE)
    pipe.register_modules(
        image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size)
    )
    try:
        pipe.load_ip_adapter(
            ip_state,
            subfolder=None,
            weight_name=adapter.name,
            image_encoder_folder=None,
            local_files_only=True,
        )
    except (RuntimeError, KeyError, ValueError) as e:
        _restore(pipe, saved)
        raise InputError(
            f"{adapter.name} could not be loaded as an IP-Adapter for this model: {str(e)[:500]}"
        ) from None
    setattr(pipe, _STATE_ATTR, saved)
    pipe.set_ip_adapter_scale(float(scale))
    return digest


def _restore(pipe, saved: dict[str, Any]) -> None:
    unet = pipe.unet
    if unet.config.encoder_hid_dim_type == "ip_image_proj":
        pipe.unload_ip_adapter()
    unet.set_attn_processor(saved["attn_processors"])
    pipe.register_modules(image_encoder=saved["image_encoder"], feature_extractor=saved["feature_extractor"])


def detach_ip_adapter(pipe) -> None:
    """Remove the IP-Adapter (processors, projection, encoder); a no-op when none is attached."""
    saved = getattr(pipe, _STATE_ATTR, None)
    if saved is not None:
        _restore(pipe, saved)
        delattr(pipe, _STATE_ATTR)
    elif (
        getattr(getattr(pipe, "unet", None), "config", None) is not None
        and pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"
    ):
        pipe.unload_ip_adapter()
