"""Form and API values -> a checked GenerateRequest (or X/Y/Z plot), before a job exists: a real seed, the
character's snapshot applied, uploads and LoRA tags taken in, and every named model, LoRA, VAE, ControlNet,
IP-Adapter, style and hires upscaler resolved now rather than when the job runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.characters.characters import STYLE_KEYS, Characters
from engine.errors import InputError, NotFoundError
from engine.generation.ip_adapter import find_ip_adapter
from engine.generation.request import GenerateRequest
from engine.generation.styles import StyleBook, resolve_styles
from engine.generation.xyz import XYZPlotRequest, parse_values
from engine.model_manager.inventory import ModelInventory
from engine.model_manager.pipelines import lora_format
from engine.prompt_tags import extract_lora_tags
from engine.requests import LoraSpec, parse_loras, resolve_seed
from engine.settings import Settings
from engine.uploads import checked_upload

UPLOAD_FIELDS = ("init_image", "mask_image", "control_image", "ip_adapter_image")


def style_book(settings: Settings) -> StyleBook:
    return StyleBook(settings.styles_path)


@dataclass(frozen=True)
class GenerationService:
    settings: Settings
    models: ModelInventory
    characters: Characters
    # the submit-time check of an engine='comfyui' request, supplied by the facade from engine.comfyui (which
    # saves through this room, so this room never imports it); None: such requests are refused
    remote_check: Callable[[GenerateRequest], None] | None = None

    def build_generate_request(self, values: dict[str, Any]) -> GenerateRequest:
        """Validate form/API values into a request with a real seed and a checked model."""
        values = dict(values)
        values.pop("style_snapshot", None)  # a new submission takes the styles as styles.csv holds them now
        self.apply_character(values)
        values["seed"] = resolve_seed(values.get("seed"))
        comfy = values.get("engine") == "comfyui"
        if comfy:  # a checkpoint on the ComfyUI server, checked against its /object_info when the job runs
            if not str(values.get("model") or "").strip():
                raise InputError(
                    "engine='comfyui' needs model= a checkpoint name as the server lists it "
                    "(the Generate tab's ComfyUI refresh shows them)"
                )
        else:
            values["model"] = (
                self.models.match_model(values.get("model") or "") or self.models.default_model()
            )
        values["subseed"] = resolve_seed(values.get("subseed"))
        for key in UPLOAD_FIELDS:
            if values.get(key):
                values[key] = checked_upload(self.settings, values[key], key)
        # <lora:name:weight> in the prompt joins the LoRA list (the prompt's weight wins for a name given twice)
        _, tags = extract_lora_tags(values.get("prompt") or "")
        if tags:
            merged = {s.name: s.weight for s in parse_loras(values.get("loras"))}
            merged.update(tags)
            values["loras"] = [{"name": n, "weight": w} for n, w in merged.items()]
        req = GenerateRequest.build(**values)
        if comfy:
            if self.remote_check is None:
                raise InputError(
                    "engine='comfyui' is not available: this generation service has no ComfyUI check"
                )
            self.remote_check(req)
            return self.resolve_styles(req)
        roots = self.models.roots
        models = roots.list_models()
        roots.resolve("diffusers", req.model, models)  # unknown model -> NotFoundError now, not later
        loras = roots.list_files("loras")
        for spec in req.loras:
            lora_format(roots.resolve("loras", spec.name, loras))  # LyCORIS etc. refused here
        if req.vae:
            roots.resolve("vae", req.vae, roots.list_files("vae"))
        if req.refiner:
            roots.resolve("diffusers", req.refiner, models)
        if req.controlnet and req.controlnet not in self.models.controlnet_names():
            raise NotFoundError(
                f"controlnet {req.controlnet!r} not found; available: "
                f"{', '.join(self.models.controlnet_names()) or 'none (put models in models/controlnet)'}"
            )
        if req.ip_adapter_image:  # no weights: refused now, saying what to put where
            find_ip_adapter(self.settings.models_dir, req.ip_adapter, req.ip_adapter_encoder)
        req = self.resolve_styles(req)
        hires = self.models.hires_upscalers()
        if req.enable_hr and req.hr_upscaler not in hires:
            raise InputError(f"hr_upscaler={req.hr_upscaler!r}; allowed: {', '.join(hires)}")
        return req

    def resolve_styles(self, req: GenerateRequest) -> GenerateRequest:
        """The request with its saved styles copied in (a missing one: NotFoundError): the job composes its
        prompt from this copy, so a retry renders the same prompt after styles.csv changes."""
        snapshot = resolve_styles(req.styles, style_book(self.settings))
        return req.model_copy(update={"style_snapshot": snapshot})

    def apply_character(self, values: dict[str, Any]) -> None:
        """`character` (a slug or id) -> its frozen snapshot; its style preset joins the styles and its
        active LoRA version the LoRA list (unless the caller already names that LoRA)."""
        ref = values.get("character")
        use_style = bool(values.pop("use_character_style", False))
        lora_pin = values.pop("character_lora", None) or None
        if not ref:
            values["character"] = None
            return
        if isinstance(ref, dict):  # already a snapshot (a retried or re-run job)
            return

        character = self.characters.get(str(ref))
        style = {k: v["value"] for k, v in self.characters.effective_style(character).items()}
        if use_style:  # the character's (or its project's) sampler, steps, CFG, size and clip skip
            values.update({k: v for k, v in style.items() if k in STYLE_KEYS and v not in (None, "")})
        elif not values.get("model") and style.get("model"):
            values["model"] = style["model"]
        if not values.get("engine") and style.get(
            "engine"
        ):  # who renders: the character's or project's default
            values["engine"] = style["engine"]
        snap = self.characters.snapshot(character.id, lora_pin)
        values["character"] = snap.model_dump(mode="json")
        if character.style_preset:
            styles = values.get("styles") or []
            styles = (
                [p.strip() for p in styles.split(",") if p.strip()]
                if isinstance(styles, str)
                else list(styles)
            )
            if character.style_preset not in styles:
                values["styles"] = [*styles, character.style_preset]
        if snap.lora:
            # other versions of this character's LoRA (from a reused recipe) give way to the snapshot's
            versions = {r.name for r in self.characters.loras(character.id)} - {snap.lora["name"]}
            specs = [x for x in parse_loras(values.get("loras")) if x.name not in versions]
            if snap.lora["name"] not in {x.name for x in specs}:
                specs.append(LoraSpec(name=snap.lora["name"], weight=snap.lora["weight"]))
            values["loras"] = [{"name": x.name, "weight": x.weight} for x in specs]

    def build_xyz_request(self, base_values: dict[str, Any], axes: dict[str, Any]) -> XYZPlotRequest:
        """X/Y/Z plot: the base recipe validated like a generation, then every cell validated too."""
        base = self.build_generate_request({**base_values, "batch_size": 1, "batch_count": 1})
        axes = dict(axes)
        for key in ("x", "y", "z"):  # A1111: a seed of -1 on an axis means a random one, fixed now
            if axes.get(f"{key}_type") in ("Seed", "Var. seed"):
                vals = parse_values(axes[f"{key}_type"], axes.get(f"{key}_values", ""))
                axes[f"{key}_values"] = ", ".join(str(resolve_seed(v)) for v in vals)
        req = XYZPlotRequest.build(base=base, **axes)
        roots = self.models.roots
        models = roots.list_models()
        for _, cell in req.cells():
            roots.resolve("diffusers", cell.model, models)
            if cell.vae:
                roots.resolve("vae", cell.vae, roots.list_files("vae"))
        return req
