"""Video generation: Stable Video Diffusion, LTX-Video and AnimateDiff.

`VIDEO_FAMILIES` is the registry (family -> pipeline classes, frame/size rules, defaults); adding a
family is one entry there, one loader and one call-arguments function. `check_video_spec` fills
defaults and validates; `VideoPipelines` keeps one loaded pipeline; `render_video` runs it and
returns PIL frames, which engine.media.clips' `write_mp4` encodes (H.264, yuv420p, faststart, with the
recipe in the container metadata). torch and diffusers are imported inside functions only.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.artifacts import TMP_PREFIX
from engine.device import free_memory, oom_guard
from engine.errors import InputError, JobCancelledError, NotFoundError
from engine.media.clips import whole_number
from engine.paths import MODEL_FOLDERS, ModelRoots

if TYPE_CHECKING:
    from engine.device import DevicePlan

MODES = ("img2video", "txt2video")


@dataclass(frozen=True)
class VideoFamily:
    key: str
    label: str
    modes: tuple[str, ...]
    pipelines: dict[str, str]  # mode -> diffusers pipeline class name
    frame_multiple: int  # allowed frame counts: k * frame_multiple + frame_offset
    frame_offset: int
    min_frames: int
    max_frames: int
    default_frames: int
    default_fps: int
    size_multiple: int
    default_size: tuple[int, int]  # (width, height)
    max_side: int
    default_steps: int
    default_guidance: float
    uses_motion_strength: bool  # SVD: motion_bucket_id / noise_aug_strength
    min_side: int = 64
    # `_class_name` values (model_index.json, or config.json for adapters) that detect this family
    index_classes: tuple[str, ...] = ()

    def allows_frames(self, frames: int) -> bool:
        return (
            self.min_frames <= frames <= self.max_frames
            and (frames - self.frame_offset) % self.frame_multiple == 0
        )

    def frames_rule(self) -> str:
        if self.frame_multiple == 1:
            return f"between {self.min_frames} and {self.max_frames} frames"
        return f"{self.frame_multiple}k+{self.frame_offset} frames between {self.min_frames} and {self.max_frames}"

    def nearest_frames(self, frames: int) -> tuple[int, int]:
        """The allowed counts just below and above `frames` (clamped to the range)."""
        step, first = self.frame_multiple, self.frame_offset

        def clamp(n: int) -> int:
            return min(self.max_frames, max(self.min_frames, n))

        k = (frames - first) / step
        low, high = clamp(math.floor(k) * step + first), clamp(math.ceil(k) * step + first)
        if low == high:
            low, high = (low, low + step) if low + step <= self.max_frames else (low - step, low)
        return low, high


VIDEO_FAMILIES: dict[str, VideoFamily] = {
    "svd": VideoFamily(
        key="svd",
        label="Stable Video Diffusion",
        modes=("img2video",),
        pipelines={"img2video": "StableVideoDiffusionPipeline"},
        frame_multiple=1,
        frame_offset=0,
        min_frames=2,
        max_frames=48,
        default_frames=14,
        default_fps=7,
        size_multiple=64,
        default_size=(1024, 576),
        max_side=1280,
        default_steps=25,
        default_guidance=3.0,
        uses_motion_strength=True,
        index_classes=("StableVideoDiffusionPipeline",),
    ),
    "ltx": VideoFamily(
        key="ltx",
        label="LTX-Video",
        modes=("txt2video", "img2video"),
        pipelines={"txt2video": "LTXPipeline", "img2video": "LTXImageToVideoPipeline"},
        # the VAE compresses time by 8 after a first frame of its own: 8k+1 frames
        frame_multiple=8,
        frame_offset=1,
        min_frames=9,
        max_frames=257,
        default_frames=121,
        default_fps=25,
        size_multiple=32,
        default_size=(704, 480),
        max_side=1280,
        default_steps=50,
        default_guidance=3.0,
        uses_motion_strength=False,
        index_classes=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    ),
    "animatediff": VideoFamily(
        key="animatediff",
        label="AnimateDiff (SD1.5 + motion adapter)",
        modes=("txt2video",),
        pipelines={"txt2video": "AnimateDiffPipeline"},
        # motion modules' positional encoding holds 32 frames (v2/v3; v1 holds 24: checked at render)
        frame_multiple=1,
        frame_offset=0,
        min_frames=2,
        max_frames=32,
        default_frames=16,
        default_fps=8,
        size_multiple=8,
        default_size=(512, 512),
        max_side=1024,
        default_steps=25,
        default_guidance=7.5,
        uses_motion_strength=False,
        index_classes=("MotionAdapter",),
    ),
}

MAX_SEED = 2**32 - 1
MAX_FPS = 60
SVD_MIN_GUIDANCE = 1.0  # guidance on the first frame; it rises linearly to spec.guidance on the last
LTX_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"
_MOTION_KEY = re.compile(r"^(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.")


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class VideoModel:
    name: str  # as listed: "svd-xt", "animatediff_models/mm_sd15_v3"
    path: Path
    family: str


def _class_name(config: Path) -> str | None:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def _family_of_class(name: str | None) -> str | None:
    for family in VIDEO_FAMILIES.values():
        if name in family.index_classes:
            return family.key
    return None


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte length + JSON), without torch."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 1024 * 1024:
            raise ValueError("safetensors header too large")
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def _load_checkpoint(path: Path) -> dict:
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path.name}: holds no state dict")
    return state


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        return _safetensors_keys(path)
    return list(_load_checkpoint(path))


def detect_video_family(path: Path) -> str | None:
    """ "svd" / "ltx" for diffusers pipeline folders, "animatediff" for a MotionAdapter folder or a
    motion-module file (original AnimateDiff or diffusers key names); None for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _family_of_class(_class_name(path / "model_index.json"))
        if (path / "config.json").is_file():
            return _family_of_class(_class_name(path / "config.json"))
        return None
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".ckpt", ".pth", ".pt"):
        return None
    try:
        keys = _checkpoint_keys(path)
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError):
        return None  # unreadable or not a state dict: not a model we can list
    return "animatediff" if any(_MOTION_KEY.match(k) for k in keys) else None


def _hidden(rel: Path) -> bool:
    return any(part.startswith(TMP_PREFIX) for part in rel.parts)


def list_video_models(models_dir: Path) -> list[VideoModel]:
    """Video pipelines under models/diffusers/ and motion adapters under models/animatediff_models/
    (folders with config.json, or single files). Temp files and folders are never listed."""
    roots = ModelRoots(Path(models_dir))
    found: dict[str, VideoModel] = {}
    for folder in roots.folders("diffusers"):
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(TMP_PREFIX):
                family = detect_video_family(child)
                if family in ("svd", "ltx"):
                    found.setdefault(child.name, VideoModel(child.name, child, family))
    suffixes = MODEL_FOLDERS["animatediff_models"][1]
    for folder in roots.folders("animatediff_models"):
        adapter_dirs = sorted(
            p.parent for p in folder.rglob("config.json") if not _hidden(p.relative_to(folder))
        )
        for d in adapter_dirs:
            if detect_video_family(d) == "animatediff":
                name = f"{folder.name}/{d.relative_to(folder).as_posix()}"
                found.setdefault(name, VideoModel(name, d, "animatediff"))
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if not p.is_file() or p.suffix.lower() not in suffixes or _hidden(rel):
                continue
            if any(p.is_relative_to(d) for d in adapter_dirs):
                continue  # the weights of an adapter folder, not a model of their own
            if detect_video_family(p) == "animatediff":
                name = f"{folder.name}/{rel.with_suffix('').as_posix()}"
                found.setdefault(name, VideoModel(name, p, "animatediff"))
    return list(found.values())


# ------------------------------------------------------------------------------------------------ spec


@dataclass
class VideoSpec:
    family: str
    mode: str  # "img2video" | "txt2video"
    prompt: str = ""
    negative_prompt: str = ""
    image: object | None = None  # a PIL image; required for img2video
    frames: int = 0  # 0 = the family's default
    fps: int = 0
    width: int = 0  # 0 = the family's default (img2video: the image's size, rounded to size_multiple)
    height: int = 0
    steps: int = 0
    guidance: float = 0.0  # 0 = the family's default
    seed: int = 0
    motion_strength: float = 0.5  # 0-1; SVD: motion_bucket_id = round(1 + 254 * s)
    decode_chunk_size: int = 0  # frames decoded at once (SVD, AnimateDiff); 0 = auto from the device
    noise_aug_strength: float = 0.02  # SVD: noise added to the conditioning image, 0-1


def _float(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: must be a number, {low:g}-{high:g}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(f"{name}={value!r}: must be {low:g}-{high:g}")
    return number


def _side(name: str, value: int, family: VideoFamily) -> int:
    rule = f"must be a multiple of {family.size_multiple}, {family.min_side}-{family.max_side}"
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InputError(f"{name}={value!r}: {rule}")
    value = int(value)
    if value % family.size_multiple or not family.min_side <= value <= family.max_side:
        raise InputError(f"{name}={value}: {rule} ({family.label})")
    return value


def _size_from_image(image, family: VideoFamily) -> tuple[int, int]:
    """The image's size scaled down (never up) to fit the family's default longest side, each side
    rounded to size_multiple and kept within min_side..max_side."""
    iw, ih = image.size
    scale = min(1.0, max(family.default_size) / max(iw, ih))
    m = family.size_multiple

    def fit(v: float) -> int:
        return int(min(family.max_side, max(family.min_side, round(v * scale / m) * m)))

    return fit(iw), fit(ih)


def check_video_spec(spec: VideoSpec) -> VideoSpec:
    """A copy of `spec` with defaults filled, or InputError naming the value and what is allowed."""
    family = VIDEO_FAMILIES.get(spec.family)
    if family is None:
        raise InputError(f"family={spec.family!r}: unknown; allowed: {', '.join(VIDEO_FAMILIES)}")
    if spec.mode not in family.modes:
        raise InputError(f"mode={spec.mode!r}: {family.label} supports {', '.join(family.modes)}")
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(spec, name), str):
            raise InputError(f"{name} must be text, got {type(getattr(spec, name)).__name__}")
    image = spec.image
    if spec.mode == "img2video":
        if image is None:
            raise InputError(f"mode='img2video' needs an image; {family.label} animates the image given")
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InputError(f"image must be a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                background = Image.new("RGB", image.size, (255, 255, 255))  # transparency -> white
                background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
                image = background
            else:
                image = image.convert("RGB")
        if min(image.size) < 16:
            raise InputError(f"image is {image.size[0]}x{image.size[1]}: at least 16x16")
    elif image is not None:
        raise InputError("mode='txt2video' takes no image; use mode='img2video' to animate one")

    frames = spec.frames or family.default_frames
    if isinstance(frames, bool) or not isinstance(frames, int | float) or frames != int(frames):
        raise InputError(
            f"frames={frames!r}: must be a whole number; {family.label} needs {family.frames_rule()}"
        )
    frames = int(frames)
    if not family.allows_frames(frames):
        low, high = family.nearest_frames(frames)
        raise InputError(
            f"frames={frames}: {family.label} needs {family.frames_rule()}, e.g. {low} or {high}"
        )
    fps = whole_number("fps", spec.fps or family.default_fps, 1, MAX_FPS)
    if spec.width and spec.height:
        width, height = spec.width, spec.height
    else:
        default = _size_from_image(image, family) if image is not None else family.default_size
        width, height = spec.width or default[0], spec.height or default[1]
    width, height = _side("width", width, family), _side("height", height, family)
    steps = whole_number("steps", spec.steps or family.default_steps, 1, 150)
    guidance = _float("guidance", spec.guidance or family.default_guidance, 0.0, 30.0)
    seed = whole_number("seed", spec.seed, 0, MAX_SEED)
    motion = _float("motion_strength", spec.motion_strength, 0.0, 1.0)
    noise_aug = _float("noise_aug_strength", spec.noise_aug_strength, 0.0, 1.0)
    chunk = whole_number("decode_chunk_size", spec.decode_chunk_size, 0, frames, " (0 = auto)")
    return replace(
        spec,
        image=image,
        frames=frames,
        fps=fps,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        motion_strength=motion,
        noise_aug_strength=noise_aug,
        decode_chunk_size=chunk,
    )


# ------------------------------------------------------------------------------------------- pipelines


def _has_variant(folder: Path, variant: str) -> bool:
    """Weights saved as `<name>.fp16.safetensors` in the folder (an adapter) or its component folders."""
    return any(
        any(folder.glob(f"{pattern}.{variant}.{ext}"))
        for pattern in ("*", "*/*")
        for ext in ("safetensors", "bin")
    )


def _pretrained_kwargs(folder: Path, plan: DevicePlan) -> dict:
    kwargs = {"local_files_only": True, "torch_dtype": plan.torch_dtype()}
    if plan.dtype == "float16" and _has_variant(folder, "fp16"):
        kwargs["variant"] = "fp16"  # half the download and the load; real SVD/LTX repos ship these
    return kwargs


def _require_folder(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{what} {str(path)!r} does not exist")
    return path


def _motion_adapter_config(state: dict) -> dict:
    """A MotionAdapter config read off an original-format motion-module state dict (what
    `from_single_file` would otherwise fetch from the Hub): channels and layer counts from the
    weights' shapes; heads and norm groups as every AnimateDiff release has them (8, 32)."""
    channels: dict[int, int] = {}
    layers: dict[int, set[int]] = {}
    transformer_layers: set[int] = set()
    mid_modules: set[int] = set()
    mid_transformer_layers: set[int] = set()
    max_seq = 32
    for key, tensor in state.items():
        m = re.match(r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.(?:temporal_transformer\.)?(.*)", key)
        if m:
            block, module, rest = int(m[1]), int(m[2]), m[3]
            layers.setdefault(block, set()).add(module)
            if rest == "proj_in.weight":
                channels[block] = int(tensor.shape[0])
            t = re.match(r"transformer_blocks\.(\d+)\.", rest)
            if t and block == 0 and module == 0:
                transformer_layers.add(int(t[1]))
        m = re.match(r"mid_block\.motion_modules\.(\d+)\.(?:temporal_transformer\.)?(.*)", key)
        if m:
            mid_modules.add(int(m[1]))
            t = re.match(r"transformer_blocks\.(\d+)\.", m[2])
            if t:
                mid_transformer_layers.add(int(t[1]))
        if key.endswith(("pos_encoder.pe", "pos_embed.pe")):
            max_seq = int(tensor.shape[1])
    if not channels:
        raise InputError("not an AnimateDiff motion module: no down_blocks.N.motion_modules weights")
    config = {
        "_class_name": "MotionAdapter",
        "block_out_channels": [channels[i] for i in sorted(channels)],
        "motion_layers_per_block": max(len(v) for v in layers.values()),
        "motion_transformer_layers_per_block": max(transformer_layers, default=0) + 1,
        "motion_mid_block_layers_per_block": max(len(mid_modules), 1),
        "motion_transformer_layers_per_mid_block": max(mid_transformer_layers, default=0) + 1,
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32,
        "motion_max_seq_length": max_seq,
        "use_motion_mid_block": bool(mid_modules),
    }
    if "conv_in.weight" in state:
        config["conv_in_channels"] = int(state["conv_in.weight"].shape[1])
    return config


def load_motion_adapter(path: Path, plan: DevicePlan):
    """A MotionAdapter from a diffusers folder or from one motion-module file (the original guoyww
    layout, converted by diffusers' own single-file loader; its config is read off the weights so
    nothing is fetched)."""
    from diffusers import MotionAdapter

    path = _require_folder(path, "motion adapter")
    if path.is_dir():
        return MotionAdapter.from_pretrained(path, **_pretrained_kwargs(path, plan))
    state = _load_checkpoint(path)
    config = _motion_adapter_config(state)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return MotionAdapter.from_single_file(
            state, config=tmp, local_files_only=True, torch_dtype=plan.torch_dtype()
        )


def _load_svd(model: VideoModel, mode: str, base_model: Path | None, plan: DevicePlan):
    from diffusers import StableVideoDiffusionPipeline

    return StableVideoDiffusionPipeline.from_pretrained(model.path, **_pretrained_kwargs(model.path, plan))


def _load_ltx(model: VideoModel, mode: str, base_model: Path | None, plan: DevicePlan):
    import diffusers

    cls = getattr(diffusers, VIDEO_FAMILIES["ltx"].pipelines[mode])
    return cls.from_pretrained(model.path, **_pretrained_kwargs(model.path, plan))


def _load_animatediff(model: VideoModel, mode: str, base_model: Path | None, plan: DevicePlan):
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    if base_model is None:
        raise InputError(
            f"motion adapter {model.name!r} needs base_model: an SD1.5 diffusers folder (models/diffusers/...)"
        )
    base = _require_folder(base_model, "base model")
    index = base / "model_index.json"
    if not index.is_file():
        raise InputError(f"base model {base.name!r} is not a diffusers folder (no model_index.json)")
    if _class_name(index) != "StableDiffusionPipeline":
        raise InputError(
            f"base model {base.name!r} is a {_class_name(index)}; AnimateDiff needs a StableDiffusionPipeline"
            " (SD1.5) folder"
        )
    adapter = load_motion_adapter(model.path, plan)
    unet_channels = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))[
        "block_out_channels"
    ]
    if list(adapter.config.block_out_channels) != list(unet_channels)[
        : len(adapter.config.block_out_channels)
    ] or len(adapter.config.block_out_channels) != len(unet_channels):
        raise InputError(
            f"motion adapter {model.name!r} has blocks {list(adapter.config.block_out_channels)} but base model"
            f" {base.name!r} has {list(unet_channels)}; use an adapter made for this base (SD1.5 vs SDXL)"
        )
    pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=adapter, **_pretrained_kwargs(base, plan))
    # diffusers' AnimateDiff docs: DDIM, linear betas, no clipping, linspace spacing
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config,
        beta_schedule="linear",
        clip_sample=False,
        timestep_spacing="linspace",
        steps_offset=1,
    )
    return pipe


# family -> loader(model, mode, base_model, plan)
_LOADERS: dict[str, Callable] = {"svd": _load_svd, "ltx": _load_ltx, "animatediff": _load_animatediff}


def _place(pipe, plan: DevicePlan):
    """Offload or move to the device; on a GPU slice the VAE where it can (tiling is set per call,
    from the size: see _set_vae_tiling)."""
    if plan.cpu_offload:
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    vae = getattr(pipe, "vae", None)
    if plan.is_gpu and hasattr(vae, "use_slicing"):
        vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class VideoPipelines:
    """Keeps one loaded video pipeline (they are big): keyed by (path, family, mode, base_model,
    device, dtype); a different key frees the previous one (engine.device.free_memory)."""

    def __init__(self, plan: DevicePlan):
        self.plan = plan
        self.loaded_key: tuple | None = None
        self._pipe = None

    def _key(self, model: VideoModel, mode: str, base_model: Path | None) -> tuple:
        base = str(Path(base_model).resolve()) if base_model is not None else None
        return (str(Path(model.path).resolve()), model.family, mode, base, self.plan.device, self.plan.dtype)

    def get(self, model: VideoModel, mode: str, base_model: Path | None = None):
        family = VIDEO_FAMILIES.get(model.family)
        if family is None:
            raise InputError(f"family={model.family!r}: unknown; allowed: {', '.join(VIDEO_FAMILIES)}")
        if mode not in family.modes:
            raise InputError(f"mode={mode!r}: {family.label} supports {', '.join(family.modes)}")
        _require_folder(model.path, family.label)
        key = self._key(model, mode, base_model)
        if key == self.loaded_key:
            return self._pipe

        previous, previous_key = self._pipe, self.loaded_key
        self._pipe, self.loaded_key = None, None
        advice = (
            f"out of memory loading {family.label} {model.name!r} on {self.plan.device}:"
            " enable CPU offload or free the GPU"
        )
        try:
            with oom_guard(self.plan.device, advice):
                if previous is not None and _same_ltx_weights(key, previous_key):
                    # LTX text->video and image->video share every component: build one from the other
                    import diffusers

                    if self.plan.cpu_offload:
                        previous.remove_all_hooks()
                    pipe = getattr(diffusers, family.pipelines[mode]).from_pipe(previous)
                else:
                    previous = None  # drop it before loading the next one
                    free_memory(self.plan.device)
                    pipe = _LOADERS[family.key](model, mode, base_model, self.plan)
                self._pipe = _place(pipe, self.plan)
        except Exception:
            self._pipe = previous = None
            free_memory(self.plan.device)
            raise
        self.loaded_key = key
        return self._pipe

    def unload(self) -> None:
        if self._pipe is None:
            return
        self._pipe, self.loaded_key = None, None
        free_memory(self.plan.device)


def _same_ltx_weights(key: tuple, previous: tuple | None) -> bool:
    """`previous` loaded the same LTX weights for the other mode, so from_pipe can reuse them."""
    return previous is not None and key[1] == "ltx" and previous[:2] == key[:2] and previous[3:] == key[3:]


# ------------------------------------------------------------------------------------------- rendering


def _cover(image, size: tuple[int, int]):
    """Resize and centre-crop to `size` without distorting the image."""
    from PIL import ImageOps

    return ImageOps.fit(image, size, method=3, centering=(0.5, 0.5))  # 3 = bicubic


def auto_decode_chunk_size(frames: int, plan: DevicePlan) -> int:
    """Frames decoded at once: all of them on a GPU with room, fewer on small GPUs, 4 on CPU/MPS."""
    if plan.device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(plan.device)).total_memory
        gib = total / 1024**3
        chunk = frames if gib >= 40 else 8 if gib >= 20 else 4 if gib >= 12 else 2
        return max(1, min(frames, chunk))
    return max(1, min(frames, 4))


def _set_vae_tiling(pipe, plan: DevicePlan, on: bool) -> None:
    """Tile the VAE decode on a GPU when asked; set on every call so no earlier call's choice lingers."""
    vae = getattr(pipe, "vae", None)
    if hasattr(vae, "use_tiling"):  # SVD's temporal decoder has none: decode_chunk_size bounds it instead
        if plan.is_gpu and on:
            vae.enable_tiling()
        else:
            vae.disable_tiling()


def _svd_args(pipe, spec: VideoSpec, plan: DevicePlan) -> dict:
    return {
        "image": _cover(spec.image, (spec.width, spec.height)),
        "height": spec.height,
        "width": spec.width,
        "num_frames": spec.frames,
        "num_inference_steps": spec.steps,
        "min_guidance_scale": min(SVD_MIN_GUIDANCE, spec.guidance),
        "max_guidance_scale": spec.guidance,
        "fps": spec.fps,
        "motion_bucket_id": round(1 + 254 * spec.motion_strength),
        "noise_aug_strength": spec.noise_aug_strength,
        "decode_chunk_size": spec.decode_chunk_size or auto_decode_chunk_size(spec.frames, plan),
    }


def _ltx_args(pipe, spec: VideoSpec, plan: DevicePlan) -> dict:
    args = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or LTX_NEGATIVE_PROMPT,
        "height": spec.height,
        "width": spec.width,
        "num_frames": spec.frames,
        "frame_rate": spec.fps,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance,
    }
    if spec.mode == "img2video":
        args["image"] = _cover(spec.image, (spec.width, spec.height))
    _set_vae_tiling(pipe, plan, True)  # the video VAE decodes every frame at once: tiles keep it in memory
    if getattr(pipe.vae.config, "timestep_conditioning", False):
        # LTX-Video 0.9.1+ decoders are timestep-conditioned: the values its model card uses
        args.update(decode_timestep=0.03, decode_noise_scale=0.025)
    return args


def _animatediff_args(pipe, spec: VideoSpec, plan: DevicePlan) -> dict:
    limit = getattr(pipe.unet.config, "motion_max_seq_length", None)
    if limit is not None and spec.frames > limit:
        raise InputError(f"frames={spec.frames}: this motion adapter holds at most {limit} frames, 2-{limit}")
    _set_vae_tiling(pipe, plan, spec.width * spec.height > plan.vae_tiling_above_px)
    return {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt or None,
        "num_frames": spec.frames,
        "height": spec.height,
        "width": spec.width,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance,
        "decode_chunk_size": spec.decode_chunk_size or auto_decode_chunk_size(spec.frames, plan),
    }


# family -> call arguments for its pipeline (besides generator, output type and callbacks)
_CALL_ARGS: dict[str, Callable] = {"svd": _svd_args, "ltx": _ltx_args, "animatediff": _animatediff_args}


def render_video(
    pipe,
    spec: VideoSpec,
    *,
    plan: DevicePlan,
    callback_on_step_end=None,
    cancelled: Callable[[], bool] | None = None,
) -> list:
    """Run `pipe` for `spec`: exactly spec.frames RGB PIL frames of spec.width x spec.height.

    The noise comes from a CPU generator seeded with spec.seed, so a seed gives the same video on any
    device. `callback_on_step_end(pipe, step, timestep, kwargs) -> kwargs` runs after every step;
    `cancelled()` is checked there too and raises JobCancelledError. Out of memory frees the device
    and raises OutOfMemoryError saying what to lower.
    """
    import torch

    spec = check_video_spec(spec)
    family = VIDEO_FAMILIES[spec.family]
    expected = family.pipelines[spec.mode]
    if type(pipe).__name__ != expected:
        raise InputError(f"{family.label} {spec.mode} needs a {expected}, got a {type(pipe).__name__}")

    def on_step(p, step: int, timestep, kwargs: dict) -> dict:
        if cancelled is not None and cancelled():
            raise JobCancelledError(f"video cancelled at step {step + 1} of {spec.steps}")
        if callback_on_step_end is not None:
            out = callback_on_step_end(p, step, timestep, kwargs)
            kwargs = kwargs if out is None else out
        return kwargs

    args = _CALL_ARGS[family.key](pipe, spec, plan)
    chunk = args.get("decode_chunk_size")
    hint = f", decode_chunk_size (now {chunk})" if chunk else ""
    offload = "" if plan.cpu_offload else " or enable CPU offload"
    advice = (
        f"out of memory rendering {spec.frames} frames at {spec.width}x{spec.height} with {family.label} on"
        f" {plan.device}: lower frames, width/height{hint}{offload}"
    )
    try:
        with oom_guard(plan.device, advice):
            result = pipe(
                **args,
                generator=torch.Generator("cpu").manual_seed(spec.seed),
                output_type="pil",
                callback_on_step_end=on_step,
                callback_on_step_end_tensor_inputs=["latents"],
            )
    except JobCancelledError:
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()  # offloaded models go back to the CPU
        free_memory(plan.device)
        raise
    if getattr(pipe, "_interrupt", False) or (cancelled is not None and cancelled()):
        raise JobCancelledError(
            "video cancelled"
        )  # a callback set pipe._interrupt: the frames are unfinished
    frames = [f.convert("RGB") for f in result.frames[0]]
    if len(frames) != spec.frames or any(f.size != (spec.width, spec.height) for f in frames):
        raise InputError(
            f"{type(pipe).__name__} returned {len(frames)} frames of {frames[0].size if frames else None},"
            f" not {spec.frames} of {(spec.width, spec.height)}: the model's VAE does not fit these settings"
        )
    return frames
