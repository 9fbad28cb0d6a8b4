"""The generation request: txt2img, img2img, inpaint, hires fix, refiner, ControlNet, IP-Adapter, on the
local engine or ComfyUI; and what a generation returns. Defaults, ranges and help live here once."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from engine.characters.characters import STYLE_KEYS, StyleRules
from engine.generation.styles import StyleSnapshot
from engine.requests import MAX_SEED, CharacterSnapshot, LoraSpec, RequestBase, parse_loras
from engine.samplers import SAMPLER_NAMES


class GenerateRequest(RequestBase):
    """txt2img, or img2img when `init_image` is set."""

    prompt: str = Field(default="", max_length=20000, description="What to draw")
    negative_prompt: str = Field(default="", max_length=20000, description="What to avoid")
    model: str = Field(
        default="", max_length=200, description="Model name from the model list; empty = default"
    )
    seed: int = Field(
        default=-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed (the real seed is recorded)"
    )
    steps: int = Field(default=20, ge=1, le=150, description="Sampling steps")
    cfg_scale: float = Field(default=7.0, ge=1.0, le=30.0, description="Classifier-free guidance scale")
    sampler: str = Field(default="Euler a", description="Sampler (A1111 names)")
    width: int = Field(
        default=512, ge=64, le=2048, multiple_of=8, description="Width in pixels (multiple of 8)"
    )
    height: int = Field(
        default=512, ge=64, le=2048, multiple_of=8, description="Height in pixels (multiple of 8)"
    )
    batch_size: int = Field(default=1, ge=1, le=8, description="Images per batch (sampled together)")
    batch_count: int = Field(default=1, ge=1, le=16, description="Batches run one after another")
    clip_skip: int = Field(
        default=1, ge=1, le=12, description="A1111 numbering: 1 = last CLIP layer, 2 = skip one"
    )
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16, description="LoRAs with weights")
    engine: Literal["local", "comfyui"] = Field(
        default="local",
        description="Who renders: local diffusers, or the ComfyUI server pool (--comfyui-urls)",
    )
    comfy_template: str = Field(
        default="", max_length=100, description="ComfyUI workflow template (workflows/); empty = by mode"
    )
    init_image: str | None = Field(
        default=None, description="img2img source image path (server-side, uploaded)"
    )
    denoising_strength: float = Field(
        default=0.75, ge=0.0, le=1.0, description="img2img: how much to change the source"
    )

    # --- inpaint / outpaint (need init_image) ---
    mask_image: str | None = Field(
        default=None, description="Inpaint mask path (white = repaint); drawn in the browser or uploaded"
    )
    mask_blur: int = Field(default=4, ge=0, le=64, description="Inpaint: mask edge blur in pixels")
    inpaint_only_masked: bool = Field(
        default=False, description="Inpaint only the masked area at full resolution, then paste it back"
    )
    inpaint_padding: int = Field(
        default=32, ge=0, le=256, description="Inpaint 'only masked': context padding in pixels"
    )
    masked_content: Literal["original", "fill", "latent noise", "latent nothing"] = Field(
        default="original", description="Inpaint: what the masked area starts from"
    )
    outpaint_left: int = Field(
        default=0, ge=0, le=1024, multiple_of=8, description="Outpaint: pixels added left"
    )
    outpaint_right: int = Field(
        default=0, ge=0, le=1024, multiple_of=8, description="Outpaint: pixels added right"
    )
    outpaint_up: int = Field(
        default=0, ge=0, le=1024, multiple_of=8, description="Outpaint: pixels added on top"
    )
    outpaint_down: int = Field(
        default=0, ge=0, le=1024, multiple_of=8, description="Outpaint: pixels added below"
    )
    # --- hires fix (txt2img) ---
    enable_hr: bool = Field(default=False, description="Hires fix: upscale, then a second img2img pass")
    hr_scale: float = Field(default=2.0, ge=1.0, le=4.0, description="Hires fix: upscale factor")
    hr_upscaler: str = Field(
        default="Latent",
        max_length=200,
        description="Hires fix upscaler: Latent, Latent (nearest), Lanczos, or a model in upscale_models",
    )
    hr_second_pass_steps: int = Field(default=0, ge=0, le=150, description="Hires steps (0 = same as steps)")
    hr_denoising_strength: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Hires fix denoising strength"
    )
    # --- SDXL refiner ---
    refiner: str = Field(default="", max_length=200, description="SDXL refiner model (empty = none)")
    refiner_switch_at: float = Field(
        default=0.8, ge=0.01, le=1.0, description="Switch to the refiner at this fraction"
    )
    # --- variation seed (A1111 "Extra") ---
    subseed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="Variation seed (-1 = random)")
    subseed_strength: float = Field(default=0.0, ge=0.0, le=1.0, description="Variation strength (0 = off)")
    # --- model parts ---
    vae: str = Field(
        default="", max_length=200, description="VAE: empty = the model's own, else a file in vae/"
    )
    controlnet: str = Field(
        default="", max_length=200, description="ControlNet model in controlnet/ (empty = off)"
    )
    control_image: str | None = Field(default=None, description="ControlNet input image path")
    control_preprocessor: Literal["none", "canny"] = Field(
        default="none", description="ControlNet preprocessing: none (the image is already a map) or canny"
    )
    controlnet_scale: float = Field(default=1.0, ge=0.0, le=2.0, description="ControlNet weight")
    styles: list[str] = Field(default_factory=list, max_length=16, description="Saved styles to apply")
    # filled in by the studio from styles.csv at submission; None only in jobs submitted before it existed
    style_snapshot: list[StyleSnapshot] | None = Field(
        default=None,
        max_length=16,
        description="The styles as they were at submission: the job's prompt is composed from these",
    )
    # --- IP-Adapter (an image prompt; weights in models/ipadapter + models/clip_vision) ---
    ip_adapter_image: str | None = Field(
        default=None, description="Reference image for IP-Adapter (empty = off)"
    )
    ip_adapter: str = Field(
        default="",
        max_length=200,
        description="IP-Adapter file in models/ipadapter (empty = the only one there)",
    )
    ip_adapter_encoder: str = Field(
        default="",
        max_length=200,
        description="Image encoder in models/clip_vision (empty = the only one there)",
    )
    ip_adapter_scale: float = Field(default=0.6, ge=0.0, le=2.0, description="IP-Adapter strength")
    # --- character (filled in by the studio from the character's slug at submission) ---
    character: CharacterSnapshot | None = Field(
        default=None,
        description="The character whose trigger word, design prompt and negatives are composed in",
    )
    dataset_review: bool = Field(
        default=False, description="Queue the images for review in the character's dataset"
    )

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        if v not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler; allowed: {', '.join(SAMPLER_NAMES)}")
        return v

    @field_validator("loras", mode="before")
    @classmethod
    def _parse_loras(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(item, str) for item in v):
            return parse_loras(v)
        return parse_loras(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _pixel_budget(self) -> GenerateRequest:
        pixels = self.width * self.height * self.batch_size
        if pixels > 2048 * 2048 * 2:
            raise ValueError(
                f"width x height x batch_size = {self.width}x{self.height}x{self.batch_size} is too large; "
                f"at most {2048 * 2048 * 2} pixels per batch"
            )
        return self

    @field_validator("styles", mode="before")
    @classmethod
    def _parse_styles(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _mode_inputs(self) -> GenerateRequest:
        if (self.mask_image or any(self.outpaints)) and not self.init_image:
            raise ValueError("mask_image / outpaint_* need an init_image to paint into")
        if self.mask_image and any(self.outpaints):
            raise ValueError("give either mask_image (inpaint) or outpaint_* (outpaint), not both")
        if self.controlnet and not self.control_image:
            raise ValueError(f"controlnet={self.controlnet!r} needs a control_image")
        if self.ip_adapter_image and (self.enable_hr or self.refiner):
            raise ValueError("IP-Adapter cannot be combined with hires fix or the SDXL refiner yet")
        if self.dataset_review and self.character is None:
            raise ValueError("dataset_review needs a character whose dataset the images join")
        if self.style_snapshot is not None and [s.name for s in self.style_snapshot] != self.styles:
            raise ValueError("style_snapshot must hold the styles named in styles, in the same order")
        return self

    @property
    def outpaints(self) -> tuple[int, int, int, int]:
        return (self.outpaint_left, self.outpaint_right, self.outpaint_up, self.outpaint_down)

    @property
    def mode(self) -> str:
        if self.init_image and any(self.outpaints):
            return "outpaint"
        if self.init_image and self.mask_image:
            return "inpaint"
        return "img2img" if self.init_image else "txt2img"

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the saved images."""
        left, right, up, down = self.outpaints
        w, h = self.width + left + right, self.height + up + down
        if self.enable_hr and not self.init_image:
            w, h = hr_size(w, self.hr_scale), hr_size(h, self.hr_scale)
        return w, h

    @property
    def job_kind(self) -> str:
        """The job kind that renders this request: a ComfyUI server's queue or the local device's."""
        return "comfy_generate" if self.engine == "comfyui" else "generate"


def hr_size(side: int, scale: float) -> int:
    """A1111's hires target: side x scale, rounded down to a multiple of 8."""
    return max(64, int(side * scale) // 8 * 8)


class GeneratedImage(BaseModel):
    path: str
    seed: int
    infotext: str
    asset_id: str
    generation_id: str


# what a project's or character's generation style may hold, checked as a request checks it (for Characters)
GENERATION_STYLE = StyleRules(
    defaults={k: GenerateRequest.model_fields[k].default for k in STYLE_KEYS}, validate=GenerateRequest.build
)


class GenerateResult(BaseModel):
    images: list[GeneratedImage]
    seed: int
    model: str
    model_hash: str
    lora_hashes: dict[str, str] = {}
    device: str
    timings: dict[str, float] = {}
