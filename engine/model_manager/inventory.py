"""What models/ holds, as the forms and the Models tab list it: names per kind, the default model, the name
an infotext means, and the inventory with families and hashes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.artifacts import folder_files, folder_hash, lora_short_hash
from engine.model_manager.checkpoints import folder_family, scan_checkpoints
from engine.model_manager.demo_model import DEMO_MODEL_NAME, is_demo_folder
from engine.model_manager.pipelines import model_label
from engine.paths import ModelRoots
from engine.settings import Settings
from engine.store.hashing import HashCache

HIRES_BUILTIN = ("Latent", "Latent (nearest)", "Lanczos")


@dataclass(frozen=True)
class ModelInventory:
    settings: Settings
    hashes: HashCache

    @property
    def roots(self) -> ModelRoots:
        return ModelRoots(self.settings.models_dir)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for a dropdown; the demo model says it is random weights."""
        return [(model_label(name, path), name) for name, path in self.roots.list_models().items()]

    def match_model(self, name: str) -> str:
        """The local model an infotext's `Model: name` means: an exact name, else a checkpoint file
        whose name or file stem matches (A1111 writes the stem: "v1-5-pruned" for v1-5-pruned.safetensors)."""
        models = self.roots.list_models()
        if not name or name in models:
            return name
        for candidate, path in models.items():
            if path.is_file() and name in (Path(candidate).with_suffix("").as_posix(), path.stem):
                return candidate
        return name

    def default_model(self) -> str:
        names = [n for _, n in self.model_choices()]
        if DEMO_MODEL_NAME in names and (self.settings.demo or len(names) == 1):
            return DEMO_MODEL_NAME
        return names[0] if names else ""

    def lora_names(self) -> list[str]:
        return sorted(self.roots.list_files("loras"))

    def vae_names(self) -> list[str]:
        return sorted(self.roots.list_files("vae"))

    def hires_upscalers(self) -> list[str]:
        return [*HIRES_BUILTIN, *sorted(self.roots.list_files("upscale_models"))]

    def controlnet_names(self) -> list[str]:
        names = {
            n
            for n, p in self.roots.list_files("controlnet").items()
            if not (p.parent / "config.json").exists()
        }
        for folder in self.roots.folders("controlnet"):
            names |= {p.parent.relative_to(folder).as_posix() for p in folder.rglob("config.json")}
        return sorted(names)

    def embedding_names(self) -> list[str]:
        return sorted(Path(n).name for n in self.roots.list_files("embeddings"))

    def models_relative(self, path: str) -> str:
        """A path under models/ as users name it ("checkpoints/x.safetensors"), never the server path."""
        p = Path(path)
        models_dir = self.settings.models_dir
        return p.relative_to(models_dir).as_posix() if p.is_relative_to(models_dir) else p.name

    def model_inventory(self) -> list[dict]:
        """Every model under models/ with family, size, SHA-256 and A1111 short hash (cached)."""
        roots, hashes = self.roots, self.hashes
        rows: list[dict] = []
        for entry in scan_checkpoints(roots, hashes):
            rows.append(
                {
                    "kind": "checkpoints",
                    "name": entry.name,
                    "family": entry.family,
                    "size": entry.size,
                    "sha256": entry.sha256,
                    "short_hash": entry.short_hash,
                    "error": entry.error or "",
                }
            )
        for name, path in roots.list_diffusers_folders().items():
            files = {p.relative_to(path).as_posix(): hashes.sha256(p) for p in folder_files(path)}
            family = folder_family(path) + (" · demo, random weights" if is_demo_folder(path) else "")
            rows.append(
                {
                    "kind": "diffusers",
                    "name": name,
                    "family": family,
                    "size": sum(p.stat().st_size for p in folder_files(path)),
                    "sha256": "",
                    "short_hash": folder_hash(files),
                }
            )
        for kind in ("loras", "vae", "embeddings", "controlnet", "upscale_models"):
            for name, path in roots.list_files(kind).items():
                sha = hashes.sha256(path)
                short = hashes.cached(path, "lora12", lora_short_hash) if kind == "loras" else sha[:10]
                rows.append(
                    {
                        "kind": kind,
                        "name": name,
                        "family": "",
                        "size": path.stat().st_size,
                        "sha256": sha,
                        "short_hash": short,
                    }
                )
        for folder in roots.folders("controlnet"):  # diffusers-format ControlNets are folders
            for config in sorted(folder.rglob("config.json")):
                files = {
                    p.relative_to(config.parent).as_posix(): hashes.sha256(p)
                    for p in folder_files(config.parent)
                }
                rows.append(
                    {
                        "kind": "controlnet",
                        "name": config.parent.relative_to(folder).as_posix(),
                        "family": "diffusers folder",
                        "size": sum(p.stat().st_size for p in folder_files(config.parent)),
                        "sha256": "",
                        "short_hash": folder_hash(files),
                    }
                )
        return rows
