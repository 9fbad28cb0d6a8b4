"""Model manager: load, cache and free pipelines and LoRA adapters for one device.

One warm pipeline per device, keyed by (model hash, dtype, device): a second generation with the
same model reloads nothing; img2img shares the txt2img components; LoRAs are loaded once per
file hash as named PEFT adapters and switched with `set_adapters`, never by reloading the base.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.artifacts import folder_files, folder_hash, lora_short_hash, safetensors_header
from engine.demo_model import DEMO_LABEL, DEMO_MODEL_NAME, is_demo_folder
from engine.device import DevicePlan, free_memory
from engine.errors import InputError
from engine.hashing import HashCache
from engine.paths import ModelRoots
from engine.requests import LoraSpec

log = logging.getLogger(__name__)

# Key fragments of adapter types diffusers' LoRA loader cannot apply (LyCORIS family).
_LYCORIS_MARKERS = {
    "hada_w1": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w2": "LoKr",
    ".oft_": "OFT",
    "oft_blocks": "OFT",
    "lora_mid": "LoCon with CP decomposition (lora_mid)",
    ".diff": "LyCORIS full (diff)",
    "boft": "BOFT",
}


@dataclass
class LoadedModel:
    name: str
    path: Path
    model_hash: str
    label: str
    pipe: Any  # StableDiffusionPipeline
    base_scheduler_config: dict
    img2img: Any = None
    adapters: dict[str, str] = field(default_factory=dict)  # lora file hash -> adapter name
    lora_enabled: bool = False


def model_label(name: str, path: Path) -> str:
    return f"{name} — {DEMO_LABEL}" if is_demo_folder(path) else name


def lora_format(path: Path) -> str:
    """'kohya' or 'diffusers'; LyCORIS types and unknown layouts raise InputError naming the file."""
    try:
        _, header = safetensors_header(path)
    except ValueError as e:
        raise InputError(f"LoRA {path.name}: {e}") from None
    keys = [k for k in header if k != "__metadata__"]
    for key in keys:
        for marker, kind in _LYCORIS_MARKERS.items():
            if marker in key:
                raise InputError(
                    f"LoRA {path.name} is a {kind} (LyCORIS) network, which is not supported yet; allowed: plain "
                    "LoRA (kohya lora_down/lora_up or diffusers/PEFT lora_A/lora_B)"
                )
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    raise InputError(f"LoRA {path.name}: no LoRA keys found (expected lora_unet_*/lora_te* or *.lora_A.*)")


class ModelManager:
    """Owns the pipelines of one device. Not thread-safe by design: one worker uses it at a time."""

    def __init__(self, models_dir: Path, plan: DevicePlan, hashes: HashCache) -> None:
        self.roots = ModelRoots(Path(models_dir))
        self.plan = plan
        self.hashes = hashes
        self.loaded: LoadedModel | None = None
        self.load_count = 0
        self._lock = threading.RLock()

    # --- listing ---------------------------------------------------------------------
    def models(self) -> dict[str, Path]:
        return self.roots.list_diffusers_folders()

    def loras(self) -> dict[str, Path]:
        return self.roots.list_files("loras")

    def model_hash(self, path: Path) -> str:
        files = {p.relative_to(path).as_posix(): self.hashes.sha256(p) for p in folder_files(path)}
        return folder_hash(files)

    def lora_hash(self, path: Path) -> str:
        return self.hashes.cached(path, "lora12", lora_short_hash)

    # --- loading -----------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        """The warm pipeline for `name`, loading it (and freeing the previous one) if needed."""
        with self._lock:
            path = self.roots.resolve("diffusers", name or DEMO_MODEL_NAME, self.models())
            mhash = self.model_hash(path)
            if self.loaded and self.loaded.model_hash == mhash and self.loaded.path == path:
                return self.loaded
            self.unload()
            self.loaded = self._load(name or DEMO_MODEL_NAME, path, mhash)
            return self.loaded

    def _load(self, name: str, path: Path, mhash: str) -> LoadedModel:
        from diffusers import StableDiffusionPipeline

        log.info("loading %s (%s) on %s/%s", name, mhash, self.plan.device, self.plan.dtype)
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            dtype=self.plan.torch_dtype(),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=any(path.rglob("*.safetensors")),
        )
        base_config = dict(pipe.scheduler.config)
        if self.plan.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.plan.device)
        else:
            pipe.to(self.plan.device)
        pipe.set_progress_bar_config(disable=True)
        self.load_count += 1
        return LoadedModel(name, path, mhash, model_label(name, path), pipe, base_config)

    def unload(self) -> None:
        with self._lock:
            if self.loaded is None:
                return
            self.loaded = None
            free_memory(self.plan.device)

    def img2img(self, model: LoadedModel):
        if model.img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            # Shares every module with the txt2img pipeline: no copy, no reload.
            model.img2img = StableDiffusionImg2ImgPipeline(
                **model.pipe.components, requires_safety_checker=False
            )
            model.img2img.set_progress_bar_config(disable=True)
        return model.img2img

    # --- LoRAs ---------------------------------------------------------------------------
    def apply_loras(self, model: LoadedModel, specs: list[LoraSpec]) -> dict[str, str]:
        """Activate exactly `specs` (name -> weight) on the model; returns name -> short hash."""
        available = self.loras()
        wanted: list[tuple[str, str, float]] = []  # adapter, name, weight
        hashes: dict[str, str] = {}
        for spec in specs:
            path = self.roots.resolve("loras", spec.name, available)
            short = self.lora_hash(path)
            hashes[spec.name] = short
            if short not in model.adapters:
                lora_format(path)
                adapter = f"lora_{short}"
                try:
                    model.pipe.load_lora_weights(str(path), adapter_name=adapter)
                except (ValueError, KeyError, RuntimeError) as e:
                    raise InputError(f"LoRA {spec.name!r} does not fit model {model.name!r}: {e}") from None
                model.adapters[short] = adapter
            wanted.append((model.adapters[short], spec.name, spec.weight))
        if wanted:
            names = [a for a, _, _ in wanted]
            if len(set(names)) != len(names):
                raise InputError("loras: the same LoRA file is listed twice; give it once with one weight")
            if not model.lora_enabled:
                model.pipe.enable_lora()
            model.pipe.set_adapters(names, adapter_weights=[w for _, _, w in wanted])
            model.lora_enabled = True
        elif model.lora_enabled:
            model.pipe.disable_lora()
            model.lora_enabled = False
        return hashes

    def unload_lora(self, model: LoadedModel, short_hash: str) -> None:
        adapter = model.adapters.pop(short_hash, None)
        if adapter:
            model.pipe.delete_adapters(adapter)
            model.lora_enabled = False
            if model.adapters:
                model.pipe.disable_lora()

    def configure_for_size(self, model: LoadedModel, width: int, height: int) -> None:
        """VAE tiling only when an image is large (it changes pixels slightly and costs time)."""
        vae = model.pipe.vae
        if width * height > self.plan.vae_tiling_above_px:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
