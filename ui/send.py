"""Fill the Generate tab's form from a recipe (PNG info, gallery "reuse parameters", "send to img2img")."""

from __future__ import annotations

from typing import Any

import gradio as gr

# Form fields filled by "reuse parameters": recipe/PNG-info params with these names go straight in.
REUSED = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler",
    "model",
    "loras",
    "clip_skip",
    "denoising_strength",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_denoising_strength",
    "subseed",
    "subseed_strength",
    "vae",
    "styles",
    "refiner",
    "refiner_switch_at",
    "mask_blur",
    "inpaint_only_masked",
    "inpaint_padding",
    "masked_content",
    "character",
)


def form_targets(form: dict[str, Any]) -> list:
    return [form[name] for name in REUSED if name in form] + [form["init_image"], form["mask_image"]]


def form_updates(
    form: dict[str, Any], params: dict[str, Any], init_image: str | None = None, clear_init: bool = True
) -> list:
    """Values in form_targets order; fields the params do not mention keep what the user has."""
    out = []
    for name in REUSED:
        if name not in form:
            continue
        if name in params and params[name] is not None:
            value = params[name]
            if name == "character" and isinstance(value, dict):  # a recipe's snapshot -> the character's slug
                value = value.get("slug", "")
            if name == "loras" and isinstance(value, list):
                value = ", ".join(
                    v if isinstance(v, str) else f"{v['name']}:{v.get('weight', 1):g}" for v in value
                )
            out.append(value)
        else:
            out.append(gr.skip())
    out.append(init_image if init_image else (None if clear_init else gr.skip()))
    out.append(None if clear_init or init_image else gr.skip())
    return out
