"""A1111 infotext: write it as A1111 does, and parse it back with A1111's own regex."""

from __future__ import annotations

import json
import re
from typing import Any

# Order of fixed keys in A1111's create_infotext; extras follow, then Version.
FIXED_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Clip skip",
)
PARAM_RE = re.compile(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any], version: str) -> str:
    """params: A1111 keys -> values; None/"" are left out. Fixed keys first, extras, then Version."""
    items = {k: v for k, v in params.items() if v is not None and v != ""}
    ordered = [k for k in FIXED_ORDER if k in items] + [k for k in items if k not in FIXED_ORDER]
    line = ", ".join(f"{k}: {quote(items[k])}" for k in ordered)
    line = f"{line}, Version: {version}" if line else f"Version: {version}"
    neg = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{neg}\n{line}"


def parse_infotext(text: str) -> dict[str, Any]:
    """The inverse, following A1111's parse_generation_parameters."""
    *lines, last = text.strip().split("\n")
    if len(PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM_RE.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        if m := SIZE_RE.match(value):
            result[f"{key}-1"], result[f"{key}-2"] = m[1], m[2]
        else:
            result[key] = value
    return result
