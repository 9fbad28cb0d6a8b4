"""Model manager: load, cache and free pipelines and LoRA adapters for one device.

One warm pipeline per device, keyed by (model hash, dtype, device): a second generation with the
same model reloads nothing; img2img shares the txt2img components; LoRAs are loaded once per
file hash as named PEFT adapters and switched with `set_adapters`, never by reloading the base.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.artifacts import atomic_dir, folder_files, folder_hash, lora_short_hash, safetensors_header
from engine.device import DevicePlan, free_memory
from engine.errors import InputError
from engine.model_manager.checkpoints import (
    PICKLE_SUFFIXES,
    CheckpointInfo,
    config_folder,
    inspect_checkpoint,
    pipeline_class_name,
    read_state_dict,
)
from engine.model_manager.demo_model import DEMO_LABEL, DEMO_MODEL_NAME, is_demo_folder
from engine.paths import SHIPPED_CONFIGS, ModelRoots
from engine.requests import LoraSpec
from engine.store.hashing import HashCache

log = logging.getLogger(__name__)

# diffusers pipeline classes a model folder may hold (model_index.json "_class_name")
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLInpaintPipeline",
)

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
    variants: dict[tuple[str, str], Any] = field(default_factory=dict)  # (task, controlnet) -> pipeline
    adapters: dict[str, str] = field(default_factory=dict)  # lora file hash -> adapter name
    lora_enabled: bool = False
    original_vae: Any = None
    vae_name: str = ""
    embeddings: dict[str, str] = field(default_factory=dict)  # token -> short hash


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

    def __init__(
        self,
        models_dir: Path,
        plan: DevicePlan,
        hashes: HashCache,
        configs_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:

        self.roots = ModelRoots(Path(models_dir))
        self.configs_dir = Path(configs_dir) if configs_dir else SHIPPED_CONFIGS
        self.cache_dir = Path(cache_dir) if cache_dir else Path(models_dir) / ".cache"
        self.plan = plan
        self.hashes = hashes
        self.loaded: LoadedModel | None = None
        self.refiner: LoadedModel | None = None
        self.load_count = 0
        self._lock = threading.RLock()
        self._controlnets: dict[str, Any] = {}

    # --- listing ---------------------------------------------------------------------
    def models(self) -> dict[str, Path]:
        return self.roots.list_models()

    def loras(self) -> dict[str, Path]:
        return self.roots.list_files("loras")

    def model_hash(self, path: Path) -> str:
        """A1111's model hash: SHA-256[:10] of a checkpoint file; for a diffusers folder, 10 hex over
        its files' hashes."""
        if Path(path).is_file():
            return self.hashes.sha256(path)[:10]
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
        from diffusers import DiffusionPipeline

        if path.is_file():
            return self._load_single_file(name, path, mhash)
        log.info("loading %s (%s) on %s/%s", name, mhash, self.plan.device, self.plan.dtype)
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        cls = index.get("_class_name", "")
        if cls not in SUPPORTED_PIPELINES:
            raise InputError(
                f"model {name!r} is a {cls or 'unknown'} pipeline; supported: "
                f"{', '.join(SUPPORTED_PIPELINES)}"
            )
        extra = (
            {"safety_checker": None, "requires_safety_checker": False}
            if cls.startswith("StableDiffusion") and "XL" not in cls
            else {}
        )
        pipe = DiffusionPipeline.from_pretrained(
            path,
            dtype=self.plan.torch_dtype(),
            local_files_only=True,
            use_safetensors=any(path.rglob("*.safetensors")),
            **extra,
        )
        return self._finish_load(name, path, mhash, pipe)

    def checkpoint_info(self, path: Path):
        return CheckpointInfo.decode(
            self.hashes.cached(path, "family", lambda p: inspect_checkpoint(p).encode())
        )

    def _load_single_file(self, name: str, path: Path, mhash: str) -> LoadedModel:
        """A .safetensors/.ckpt checkpoint through diffusers' from_single_file with the family's
        shipped config folder, so nothing is fetched from the Hub."""
        import diffusers
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        info = self.checkpoint_info(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            read_state_dict(path)  # refuses a code pickle here, whatever diffusers would do
        folder = config_folder(info, self.configs_dir, self.cache_dir)
        cls = pipeline_class_name(folder)
        if cls not in SUPPORTED_PIPELINES:
            raise InputError(
                f"checkpoint {name!r} ({info.family}) needs a {cls}; supported: "
                f"{', '.join(SUPPORTED_PIPELINES)}"
            )
        log.info(
            "loading checkpoint %s (%s, %s) on %s/%s",
            name,
            info.family,
            mhash,
            self.plan.device,
            self.plan.dtype,
        )
        extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls else {}
        try:
            pipe = getattr(diffusers, cls).from_single_file(
                str(path),
                config=str(folder),
                local_files_only=True,
                torch_dtype=self.plan.torch_dtype(),
                **extra,
            )
        except (SingleFileComponentError, ValueError, KeyError, RuntimeError, OSError) as e:
            if "out of memory" in str(e).lower():
                raise
            raise InputError(f"checkpoint {name!r} does not load as {info.family}: {str(e)[:400]}") from None
        return self._finish_load(name, path, mhash, pipe)

    def diffusers_folder(self, path: Path) -> Path:
        """A single-file checkpoint as a diffusers folder (what training reads), converted once on the CPU in
        float32 and cached under the checkpoint's hash; a crash mid-save leaves no folder."""
        import diffusers

        target = self.cache_dir / "converted" / self.model_hash(path)
        if (target / "model_index.json").is_file():
            return target
        info = self.checkpoint_info(path)
        folder = config_folder(info, self.configs_dir, self.cache_dir)
        cls = pipeline_class_name(folder)
        extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls else {}
        log.info("converting checkpoint %s (%s) to a diffusers folder in %s", path.name, info.family, target)
        pipe = getattr(diffusers, cls).from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=None, **extra
        )
        with atomic_dir(target) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        return target

    def _finish_load(self, name: str, path: Path, mhash: str, pipe) -> LoadedModel:
        base_config = dict(pipe.scheduler.config)
        if self.plan.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.plan.device)
        else:
            pipe.to(self.plan.device)
        pipe.set_progress_bar_config(disable=True)
        self.load_count += 1
        return LoadedModel(name, path, mhash, model_label(name, path), pipe, base_config)

    def get_refiner(self, name: str) -> LoadedModel:
        """An SDXL refiner kept beside the main model (A1111's refiner switch-over)."""
        with self._lock:
            path = self.roots.resolve("diffusers", name, self.models())
            mhash = self.model_hash(path)
            if self.refiner and self.refiner.model_hash == mhash:
                return self.refiner
            self.refiner = None
            free_memory(self.plan.device)
            refiner = self._load(name, path, mhash)
            if (
                type(refiner.pipe).__name__ != "StableDiffusionXLImg2ImgPipeline"
                or getattr(refiner.pipe, "text_encoder", None) is not None
            ):
                raise InputError(f"refiner {name!r} is not an SDXL refiner (a {type(refiner.pipe).__name__})")
            self.refiner = refiner
            return refiner

    def unload(self) -> None:
        with self._lock:
            self.refiner = None
            if self.loaded is None:
                return
            self.loaded = None
            self._controlnets = {}
            free_memory(self.plan.device)

    def variant(self, model: LoadedModel, task: str, controlnet: str = ""):
        """The pipeline for `task` (txt2img, img2img, inpaint), optionally with a ControlNet, sharing
        every module with the loaded one (diffusers' AutoPipeline.from_pipe: no copy, no reload)."""
        if task == "txt2img" and not controlnet:
            return model.pipe
        key = (task, controlnet)
        if key not in model.variants:
            from diffusers import (
                AutoPipelineForImage2Image,
                AutoPipelineForInpainting,
                AutoPipelineForText2Image,
            )

            auto = {
                "txt2img": AutoPipelineForText2Image,
                "img2img": AutoPipelineForImage2Image,
                "inpaint": AutoPipelineForInpainting,
            }[task]
            extra = {"controlnet": self.controlnet(controlnet)} if controlnet else {}
            pipe = auto.from_pipe(model.pipe, **extra)
            pipe.set_progress_bar_config(disable=True)
            model.variants[key] = pipe
        return model.variants[key]

    def _all_pipes(self, model: LoadedModel) -> list:
        return [model.pipe, *model.variants.values()]

    # --- VAE -----------------------------------------------------------------------------
    def set_vae(self, model: LoadedModel, name: str) -> tuple[str, str] | None:
        """Use the model's own VAE (name "") or a file from models/vae; returns (name, hash10) or None."""
        if model.original_vae is None:
            model.original_vae = model.pipe.vae
        if not name:
            if model.vae_name:
                for p in self._all_pipes(model):
                    p.vae = model.original_vae
                model.vae_name = ""
            return None
        path = self.roots.resolve("vae", name, self.roots.list_files("vae"))
        vhash = self.hashes.sha256(path)[:10]
        if model.vae_name != f"{name}#{vhash}":
            vae = self._load_vae(path, model)
            for p in self._all_pipes(model):
                p.vae = vae
            model.vae_name = f"{name}#{vhash}"
        return name, vhash

    def _load_vae(self, path: Path, model: LoadedModel):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = read_state_dict(path)
        if any(k.startswith(("first_stage_model.", "encoder.down.", "decoder.up.")) for k in sd):
            sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items()}
            sd = convert_ldm_vae_checkpoint(sd, dict(model.original_vae.config))
        vae = AutoencoderKL.from_config(model.original_vae.config)
        missing, unexpected = vae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise InputError(
                f"VAE {path.name} does not fit model {model.name!r}: {len(missing)} missing and "
                f"{len(unexpected)} unexpected weights (e.g. {(missing or unexpected)[:3]})"
            )
        return vae.to(device=model.original_vae.device, dtype=model.original_vae.dtype)

    # --- textual inversion ---------------------------------------------------------------
    def ensure_embeddings(self, model: LoadedModel, texts: list[str]) -> dict[str, str]:
        """Load the embeddings in models/embeddings whose names appear in `texts` (as A1111 does);
        returns name -> short hash (12 hex) of those used."""
        import re

        available = self.roots.list_files("embeddings")
        joined = "\n".join(texts)
        used: dict[str, str] = {}
        for rel, path in available.items():
            token = Path(rel).name
            if not re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", joined):
                continue
            short = self.hashes.sha256(path)[:12]
            if model.embeddings.get(token) != short:
                self._load_embedding(model, token, path)
                model.embeddings[token] = short
            used[token] = short
        return used

    def _load_embedding(self, model: LoadedModel, token: str, path: Path) -> None:
        sd = read_state_dict(path)
        pipe = model.pipe
        try:
            if "clip_l" in sd or "clip_g" in sd:  # SDXL embedding
                if getattr(pipe, "text_encoder_2", None) is None:
                    raise InputError(f"embedding {path.name} is for SDXL; model {model.name!r} is not SDXL")
                pipe.load_textual_inversion(
                    sd["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
                )
                pipe.load_textual_inversion(
                    sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
                )
            else:
                if isinstance(sd.get("string_to_param"), dict):  # A1111 .pt layout: {"*": vectors}
                    sd = {token: sd["string_to_param"]["*"]}
                pipe.load_textual_inversion(sd, token=token)
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"embedding {path.name} does not fit model {model.name!r}: {e}") from None

    # --- ControlNet ----------------------------------------------------------------------
    def controlnet(self, name: str):
        """A ControlNet from models/controlnet: a diffusers folder or a single file."""
        if name in self._controlnets:
            return self._controlnets[name]
        from diffusers import ControlNetModel

        path = self.controlnet_path(name)
        if path.is_dir():
            cn = ControlNetModel.from_pretrained(
                path, local_files_only=True, torch_dtype=self.plan.torch_dtype()
            )
        else:
            cn = self._controlnet_from_file(path)
        cn = cn.to(self.plan.device)
        self._controlnets = {name: cn}  # one at a time: switching frees the previous
        return cn

    def controlnet_path(self, name: str) -> Path:
        """A diffusers ControlNet folder (config.json) or a single file in models/controlnet."""
        files = self.roots.list_files("controlnet")
        folders = {
            p.parent.relative_to(f).as_posix(): p.parent
            for f in self.roots.folders("controlnet")
            for p in f.rglob("config.json")
        }
        return self.roots.resolve(
            "controlnet",
            name,
            {**{k: v for k, v in files.items() if not (v.parent / "config.json").exists()}, **folders},
        )

    def _controlnet_from_file(self, path: Path):
        from diffusers import ControlNetModel
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        if self.loaded is None:
            raise InputError("load a model before choosing a ControlNet")
        sd = read_state_dict(path)
        cn = ControlNetModel.from_unet(self.loaded.pipe.unet)
        if any(k.startswith(("control_model.", "input_blocks.", "zero_convs.")) for k in sd):
            sd = {k.removeprefix("control_model."): v for k, v in sd.items()}
            sd = convert_controlnet_checkpoint(sd, dict(cn.config))
        missing, unexpected = cn.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise InputError(
                f"ControlNet {path.name} does not fit model {self.loaded.name!r}: {len(missing)} missing and "
                f"{len(unexpected)} unexpected weights (e.g. {(missing or unexpected)[:3]})"
            )
        return cn.to(dtype=self.plan.torch_dtype())

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
