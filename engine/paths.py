"""Model folders (ComfyUI layout, A1111 names accepted) and the one path resolver per root.

No torch or diffusers here: the UI lists models through this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError, NotFoundError

# kind -> (folder names tried in order: ComfyUI first, then A1111's), accepted file suffixes
MODEL_FOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "checkpoints": (("checkpoints", "Stable-diffusion"), (".safetensors", ".ckpt", ".pt")),
    "diffusers": (("diffusers",), ()),  # folders with model_index.json
    "loras": (("loras", "Lora", "LyCORIS"), (".safetensors",)),
    "vae": (("vae", "VAE"), (".safetensors", ".pt", ".ckpt")),
    "upscale_models": (("upscale_models", "ESRGAN", "RealESRGAN"), (".pth", ".safetensors")),
    "embeddings": (("embeddings",), (".safetensors", ".pt", ".bin")),
    "controlnet": (("controlnet", "ControlNet"), (".safetensors", ".pth")),
    "ipadapter": (("ipadapter",), (".safetensors", ".bin", ".pt", ".pth")),
    "clip_vision": (("clip_vision",), (".safetensors",)),  # or transformers folders (config.json)
    # ComfyUI-AnimateDiff-Evolved's folder: motion-module files, or diffusers MotionAdapter folders (config.json)
    "animatediff_models": (("animatediff_models",), (".safetensors", ".ckpt", ".pth")),
}
KIND_LABELS = {
    "diffusers": "model",
    "checkpoints": "checkpoint",
    "loras": "lora",
    "vae": "VAE",
    "upscale_models": "upscale model",
    "embeddings": "embedding",
    "controlnet": "ControlNet",
    "ipadapter": "IP-Adapter",
    "clip_vision": "image encoder",
    "animatediff_models": "motion adapter",
}


# Diffusers folders that are not text-to-image models: the Video tab and the upscalers list them.
NOT_IMAGE_PIPELINES = (
    "StableVideoDiffusion",
    "LTX",
    "Wan",
    "CogVideoX",
    "AnimateDiff",
    "HunyuanVideo",
    "Mochi",
    "StableDiffusionUpscale",
    "StableDiffusionLatentUpscale",
)


def _pipeline_class(folder: Path) -> str:
    import json

    try:
        return str(json.loads((folder / "model_index.json").read_text()).get("_class_name") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def within(root: Path, candidate: Path) -> bool:
    root, candidate = Path(os.path.realpath(root)), Path(os.path.realpath(candidate))
    return os.path.commonpath([root, candidate]) == str(root)


def resolve_under(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` and symlinks that leave `root`."""
    if not relative or relative.startswith(("/", "\\")) or "\0" in relative or Path(relative).is_absolute():
        raise InputError(f"{what} {relative!r} must be a name inside {root.name}/, not a path")
    candidate = Path(root) / relative
    if not within(root, candidate):
        raise InputError(f"{what} {relative!r} escapes {root.name}/; give a name inside it")
    return candidate


@dataclass(frozen=True)
class ModelRoots:
    models_dir: Path

    def folders(self, kind: str) -> list[Path]:
        names, _ = MODEL_FOLDERS[kind]
        return [self.models_dir / n for n in names if (self.models_dir / n).is_dir()]

    def create_layout(self) -> None:
        for kind, (names, _) in MODEL_FOLDERS.items():
            if not self.folders(kind):
                (self.models_dir / names[0]).mkdir(parents=True, exist_ok=True)

    def list_files(self, kind: str) -> dict[str, Path]:
        """name (relative to its folder, without suffix for LoRAs) -> path; temp files never listed."""
        _, suffixes = MODEL_FOLDERS[kind]
        found: dict[str, Path] = {}
        for folder in self.folders(kind):
            for p in sorted(folder.rglob("*")):
                if p.name.startswith(TMP_PREFIX) or not p.is_file() or p.suffix.lower() not in suffixes:
                    continue
                if any(part.startswith(TMP_PREFIX) for part in p.relative_to(folder).parts):
                    continue
                name = p.relative_to(folder).with_suffix("").as_posix()
                found.setdefault(name, p)
        return found

    def list_diffusers_folders(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for kind in ("diffusers", "checkpoints"):
            for folder in self.folders(kind):
                for index in sorted(folder.glob("*/model_index.json")):
                    if not index.parent.name.startswith(TMP_PREFIX):
                        found.setdefault(index.parent.name, index.parent)
        return found

    def list_checkpoint_files(self) -> dict[str, Path]:
        """Single-file checkpoints: name (relative path with suffix, as A1111 shows it) -> file.
        Files inside diffusers folders (a model_index.json above them) are parts of those models."""
        out: dict[str, Path] = {}
        folders = self.folders("checkpoints")
        for path in self.list_files("checkpoints").values():
            folder = next(f for f in folders if path.is_relative_to(f))
            rel = path.relative_to(folder)
            if any(
                (folder / Path(*rel.parts[:i]) / "model_index.json").is_file()
                for i in range(1, len(rel.parts))
            ):
                continue
            out.setdefault(rel.as_posix(), path)
        return out

    def list_models(self) -> dict[str, Path]:
        """Every image model: diffusers folders (not video or upscaler pipelines: those have their own
        lists), then single-file checkpoints."""
        found = {
            name: path
            for name, path in self.list_diffusers_folders().items()
            if not _pipeline_class(path).startswith(NOT_IMAGE_PIPELINES)
        }
        for name, path in self.list_checkpoint_files().items():
            found.setdefault(name, path)
        return found

    def resolve(self, kind: str, name: str, available: dict[str, Path]) -> Path:
        if name in available:
            path = available[name]
            if not any(within(folder, path) for folder in self.folders(kind) + self.folders("checkpoints")):
                raise InputError(f"{kind} {name!r} resolves outside {self.models_dir}")
            return path
        listing = (
            ", ".join(sorted(available))
            or f"none: put files in {self.models_dir / MODEL_FOLDERS[kind][0][0]}"
        )
        raise NotFoundError(f"{KIND_LABELS.get(kind, kind)} {name!r} not found; available: {listing}")
