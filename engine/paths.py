"""Model folders (ComfyUI layout, A1111 names accepted) and the one path resolver per root.

No torch or diffusers here: the UI lists models through this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError, NotFoundError

# Diffusers configs (and tokenizer merges) for single-file checkpoints, shipped so loading stays offline.
SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"

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


# Model listings are cached by the modification times of every directory walked: adding, removing or
# renaming an entry changes its directory's mtime, so a changed folder is re-walked on the next listing.
RACY_NS = 2_000_000_000
_Walk = tuple[dict[str, Path], dict[str, int]]  # (name -> path, directory -> st_mtime_ns)


@dataclass(frozen=True)
class _Listing:
    folders: tuple[Path, ...]
    stamps: dict[str, int]
    found: dict[str, Path]

    def unchanged(self) -> bool:
        try:
            return all(os.stat(d).st_mtime_ns == mtime for d, mtime in self.stamps.items())
        except OSError:
            return False


_LISTINGS: dict[tuple[Path, str], _Listing] = {}


def _walk_tree(folder: Path, stamps: dict[str, int]) -> list[Path]:
    """Every file under `folder` (as `folder.rglob("*")` finds them: symlinked folders not entered),
    skipping temp entries; records each directory's mtime, read before it is listed."""
    files: list[Path] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            stamps[str(directory)] = os.stat(directory).st_mtime_ns
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith(TMP_PREFIX):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(directory / entry.name)
                    elif entry.is_file():
                        files.append(directory / entry.name)
        except (PermissionError, FileNotFoundError):
            continue
    return files


def _files_by_name(folders: list[Path], suffixes: tuple[str, ...]) -> _Walk:
    found: dict[str, Path] = {}
    stamps: dict[str, int] = {}
    for folder in folders:
        for p in sorted(_walk_tree(folder, stamps)):
            if p.suffix.lower() in suffixes:
                found.setdefault(p.relative_to(folder).with_suffix("").as_posix(), p)
    return found, stamps


def _diffusers_folders(folders: list[Path]) -> _Walk:
    found: dict[str, Path] = {}
    stamps: dict[str, int] = {}
    for folder in folders:
        try:
            stamps[str(folder)] = os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            continue
        for child in sorted(folder.iterdir()):
            if child.name.startswith(TMP_PREFIX) or not child.is_dir():
                continue
            stamps[str(child)] = os.stat(child).st_mtime_ns
            if (child / "model_index.json").exists():
                found.setdefault(child.name, child)
    return found, stamps


def _checkpoint_files(folders: list[Path], suffixes: tuple[str, ...]) -> _Walk:
    files, stamps = _files_by_name(folders, suffixes)
    out: dict[str, Path] = {}
    for path in files.values():
        folder = next(f for f in folders if path.is_relative_to(f))
        rel = path.relative_to(folder)
        if any(
            (folder / Path(*rel.parts[:i]) / "model_index.json").is_file() for i in range(1, len(rel.parts))
        ):
            continue
        out.setdefault(rel.as_posix(), path)
    return out, stamps


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
        folders = self.folders(kind)
        return self._listing(kind, folders, lambda: _files_by_name(folders, suffixes))

    def list_diffusers_folders(self) -> dict[str, Path]:
        folders = self.folders("diffusers") + self.folders("checkpoints")
        return self._listing("diffusers folders", folders, lambda: _diffusers_folders(folders))

    def list_checkpoint_files(self) -> dict[str, Path]:
        """Single-file checkpoints: name (relative path with suffix, as A1111 shows it) -> file.
        Files inside diffusers folders (a model_index.json above them) are parts of those models."""
        folders = self.folders("checkpoints")
        suffixes = MODEL_FOLDERS["checkpoints"][1]
        return self._listing("checkpoint files", folders, lambda: _checkpoint_files(folders, suffixes))

    def _listing(self, what: str, folders: list[Path], walk: Callable[[], _Walk]) -> dict[str, Path]:
        """`walk()`'s result, re-walked only when the folders or a directory it walked changed."""
        key = (self.models_dir, what)
        entry = _LISTINGS.get(key)
        if entry is None or entry.folders != tuple(folders) or not entry.unchanged():
            started = time.time_ns()
            found, stamps = walk()
            entry = _Listing(tuple(folders), stamps, found)
            # A directory changed within the last RACY_NS may change again within the same mtime tick
            # unseen (coarse filesystem clocks): such a walk is used once and not cached.
            if all(mtime < started - RACY_NS for mtime in stamps.values()):
                _LISTINGS[key] = entry
            else:
                _LISTINGS.pop(key, None)
        return dict(entry.found)

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
