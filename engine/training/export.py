"""Export trained PEFT LoRA weights as kohya-format .safetensors that ComfyUI, A1111/Forge and kohya load.

kohya names a module by its path in the model kohya trains on, every `.` replaced by `_`: for SD1/SD2
that is the diffusers UNet, for SDXL the sgm ("original") UNet (`input_blocks`/`middle_block`/
`output_blocks`). Each module carries `lora_down`/`lora_up` and an explicit `alpha`, the trained
lora_alpha (scale = alpha / rank). diffusers' own `convert_state_dict_to_kohya` writes alpha = rank and
keeps diffusers block names for SDXL, so it is used here only for the lora_A/lora_B renaming.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.artifacts import atomic_write
from engine.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class LoraFamily:
    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture (SAI ModelSpec id + "/lora")
    implementation: str  # modelspec.implementation: whose module names the keys use
    text_encoders: dict[str, str]  # text_encoder_states key -> kohya prefix
    sgm_unet: bool  # UNet keys on the sgm layout (SDXL) instead of diffusers module paths


_SAI_IMPL = "https://github.com/Stability-AI/generative-models"
# family -> how kohya names and describes a LoRA for it (kohya sd-scripts library/sai_model_spec.py)
FAMILIES: dict[str, LoraFamily] = {
    "sd1": LoraFamily("sd_v1", "stable-diffusion-v1/lora", "diffusers", {"te1": "lora_te"}, False),
    "sd2": LoraFamily("sd_v2", "stable-diffusion-v2-512/lora", "diffusers", {"te1": "lora_te"}, False),
    "sdxl": LoraFamily(
        "sdxl_base_v1-0",
        "stable-diffusion-xl-v1-base/lora",
        _SAI_IMPL,
        {"te1": "lora_te1", "te2": "lora_te2"},
        True,
    ),
}

# SDXL's UNet (and so kohya's sgm layout) has two resnets per down level and three per up level.
_SDXL_LAYERS_PER_BLOCK = 2
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", *dict.fromkeys(k.split(".")[0] for k in _SGM_TOP))
# kohya (and ComfyUI/A1111) name CLIP modules under text_model., as transformers 4 did; transformers 5's
# CLIPTextModel has no text_model level, so its paths get it added
_TE_ROOTS = ("text_model", "text_projection")
_TE_FLAT_ROOTS = ("encoder", "embeddings", "final_layer_norm")
_PEFT_WRAPPER = "base_model.model."
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _family(family: str) -> LoraFamily:
    if family not in FAMILIES:
        raise InputError(f"family {family!r} is not supported; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _split_peft_key(key: str, roots: tuple[str, ...], what: str) -> tuple[str, str]:
    """(module path, ".lora_A.weight" | ".lora_B.weight") of one get_peft_model_state_dict key."""
    path = key.removeprefix(_PEFT_WRAPPER)
    suffix = next((s for s in _PEFT_SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise InputError(
            f"{what} key {key!r} is not a plain LoRA weight; allowed: *.lora_A.weight, "
            "*.lora_B.weight (DoRA, biases and embedding LoRAs cannot be exported)"
        )
    module = path[: -len(suffix)]
    if module.split(".", 1)[0] not in roots:
        raise InputError(
            f"{what} key {key!r} is not a module path of the model (allowed roots: "
            f"{', '.join(roots)}; pass get_peft_model_state_dict(model))"
        )
    return module, suffix


def _resnet_to_sgm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, (_SGM_RESNET.get(head, head), tail)))


def diffusers_to_sgm(module: str) -> str:
    """The sgm (SDXL "original" UNet) path of a diffusers SDXL UNet module path, as kohya names it."""
    n = _SDXL_LAYERS_PER_BLOCK
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    parts = module.split(".")
    try:
        if parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv
                return f"input_blocks.{(n + 1) * (i + 1)}.0.op"
            j, rest = int(parts[3]), ".".join(parts[4:])
            idx = (n + 1) * i + j + 1
            if kind == "resnets":
                return f"input_blocks.{idx}.0.{_resnet_to_sgm(rest)}"
            if kind == "attentions":
                return f"input_blocks.{idx}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                return f"middle_block.{2 * j}.{_resnet_to_sgm(rest)}"
            if kind == "attentions":
                return f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                # the upsampler follows the block's resnet and attention; every SDXL up block that
                # upsamples has attention, so it sits at index 2
                return f"output_blocks.{(n + 1) * i + n}.2.{'.'.join(parts[4:])}"
            j, rest = int(parts[3]), ".".join(parts[4:])
            idx = (n + 1) * i + j
            if kind == "resnets":
                return f"output_blocks.{idx}.0.{_resnet_to_sgm(rest)}"
            if kind == "attentions":
                return f"output_blocks.{idx}.1.{rest}"
    except (IndexError, ValueError):
        pass
    raise InputError(
        f"UNet module {module!r} has no sgm (SDXL original) name; allowed: down_blocks.*, "
        f"mid_block.*, up_blocks.*, {', '.join(_SGM_TOP)}"
    )


PART_NAMES = {"text_encoder": "te1", "text_encoder_2": "te2"}


def peft_to_kohya(
    unet_state: Mapping[str, Tensor],
    text_encoder_states: Mapping[str, Mapping[str, Tensor]],
    alpha: float,
    family: str,
) -> dict[str, Tensor]:
    """kohya-format tensors for PEFT LoRA state dicts (get_peft_model_state_dict of the UNet and of each
    text encoder, keyed "te1"/"te2" or by component, "text_encoder"/"text_encoder_2"). Every module gets `.alpha` = `alpha` (the trained lora_alpha);
    conv (LoCon) weights keep their 4-D shapes."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    spec = _family(family)
    # the trainer's part names (diffusers component names) mean the same encoders
    text_encoder_states = {PART_NAMES.get(k, k): v for k, v in text_encoder_states.items()}
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise InputError(f"alpha {alpha!r} must be a positive number (the trained lora_alpha)")
    unknown = set(text_encoder_states) - set(spec.text_encoders)
    if unknown:
        raise InputError(
            f"text encoder {sorted(unknown)[0]!r} does not exist in family {family!r}; allowed: "
            f"{', '.join(spec.text_encoders)}"
        )
    if not unet_state and not any(text_encoder_states.values()):
        raise InputError("nothing to export: unet_state and text_encoder_states hold no LoRA weights")

    # diffusers' converter turns "<component>.<path>.lora_A.weight" into "lora_<c>_<path>.lora_down.weight"
    # with c = unet | te1 | te2; the prefixes are then set to the family's (SD1/SD2: lora_te)
    staged: dict[str, Tensor] = {}

    def stage(name: str, key: str, tensor: Tensor) -> None:
        if name in staged:  # e.g. the same weight with and without PEFT's base_model.model. prefix
            raise InputError(f"LoRA key {key!r} names a module already given by another key")
        staged[name] = tensor

    for key, tensor in unet_state.items():
        module, suffix = _split_peft_key(key, _UNET_ROOTS, "UNet")
        stage(f"unet.{diffusers_to_sgm(module) if spec.sgm_unet else module}{suffix}", key, tensor)
    prefixes = {"lora_unet_": "lora_unet_"}
    for te, state in text_encoder_states.items():
        component, converted_prefix = (
            ("text_encoder", "lora_te1_") if te == "te1" else ("text_encoder_2", "lora_te2_")
        )
        prefixes[converted_prefix] = spec.text_encoders[te] + "_"
        for key, tensor in state.items():
            module, suffix = _split_peft_key(key, _TE_ROOTS + _TE_FLAT_ROOTS, f"text encoder {te}")
            if module.split(".", 1)[0] in _TE_FLAT_ROOTS:
                module = f"text_model.{module}"
            stage(f"{component}.{module}{suffix}", key, tensor)

    out: dict[str, Tensor] = {}
    for key, tensor in convert_state_dict_to_kohya(staged).items():
        if key.endswith(".alpha"):
            continue  # diffusers writes alpha = rank; set below from the trained alpha
        converted_prefix = next(p for p in prefixes if key.startswith(p))
        out[prefixes[converted_prefix] + key[len(converted_prefix) :]] = (
            tensor.detach().to("cpu").contiguous()
        )
    modules = {k.rsplit(".", 2)[0] for k in out}
    for module in modules:
        down, up = out.get(f"{module}.lora_down.weight"), out.get(f"{module}.lora_up.weight")
        if down is None or up is None:
            raise InputError(
                f"LoRA module {module!r} lacks its {'lora_A' if down is None else 'lora_B'} weight"
            )
        if down.shape[0] != up.shape[1]:
            raise InputError(
                f"LoRA module {module!r}: lora_A rank {down.shape[0]} != lora_B rank {up.shape[1]}"
            )
        out[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return dict(sorted(out.items()))


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} {value!r} must be an integer >= {minimum}")
    return value


def kohya_metadata(
    *,
    family: str,
    rank: int,
    alpha: float,
    base_model_name: str,
    base_model_hash: str,
    resolution: tuple[int, int],
    steps: int,
    epochs: int,
    learning_rate: float,
    name: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya's ss_* training metadata and SAI ModelSpec keys for a LoRA, every value a string.
    `resolution` is (width, height); `extra` adds or overrides keys (non-string values JSON-encoded),
    e.g. ss_network_args, ss_tag_frequency, modelspec.trigger_phrase."""
    spec = _family(family)
    _positive_int("rank", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise InputError(f"alpha {alpha!r} must be a positive number")
    if (
        not isinstance(resolution, tuple | list)
        or len(resolution) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in resolution)
    ):
        raise InputError(f"resolution {resolution!r} must be (width, height), two positive integers")
    _positive_int("steps", steps, 0)
    _positive_int("epochs", epochs, 0)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not learning_rate > 0:
        raise InputError(f"learning_rate {learning_rate!r} must be a positive number")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"name {name!r} must be a non-empty string")
    width, height = resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_network_args": "{}",
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": spec.base_model_version,
        "ss_sd_model_name": str(base_model_name),
        "ss_sd_model_hash": str(base_model_hash),
        "ss_resolution": f"({width}, {height})",
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_learning_rate": _number(learning_rate),
        "ss_output_name": name,
        "ss_training_finished_at": str(int(datetime.now(UTC).timestamp())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec.architecture,
        "modelspec.implementation": spec.implementation,
        "modelspec.title": name,
        "modelspec.date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "epsilon",
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key:
            raise InputError(f"metadata key {key!r} must be a non-empty string")
        meta[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return meta


def _number(value: float) -> str:
    # kohya writes its float args with str(): 8.0 -> "8.0", 1e-4 -> "0.0001"
    return str(float(value))


def _data_section_sha256(blob: bytes) -> str:
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(memoryview(blob)[8 + n :]).hexdigest()


def _legacy_hash(blob: bytes) -> str:
    # sd-webui-additional-networks' old hash: 64 KiB at offset 1 MiB (empty for small files)
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def save_kohya_lora(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """Write `tensors` as .safetensors with `metadata` plus sshs_model_hash (SHA-256 of the data section,
    which A1111 reads as the LoRA hash) and sshs_legacy_hash, atomically; returns the file's SHA-256.

    As kohya does, both hashes are computed over the file saved with only the ss_* metadata; the data
    section does not depend on the metadata, so sshs_model_hash also matches the final file."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"LoRA path {path.name!r} must end in .safetensors")
    if not tensors:
        raise InputError("tensors is empty: nothing to save")
    bad = next((k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(
            f"metadata {bad!r} has a non-string value {metadata[bad]!r}; safetensors stores strings"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    training = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    final_meta = {
        **metadata,
        "sshs_model_hash": _data_section_sha256(training),
        "sshs_legacy_hash": _legacy_hash(training),
    }
    blob = save(tensors, metadata=final_meta)
    with atomic_write(path) as f:
        f.write(blob)
    return hashlib.sha256(blob).hexdigest()
