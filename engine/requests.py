"""Typed, JSON-serialisable requests and results at the engine boundary.

Defaults, ranges and help text live here once; the UI reads them (see `field_spec`).
Construction validates: a bad value raises `InputError` naming the field, the value and what
is allowed.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import InputError

MAX_SEED = 2**32 - 1
LORA_SPEC = re.compile(r"^\s*(?P<name>[^:<>]+?)\s*(?::\s*(?P<weight>-?\d+(?:\.\d+)?)\s*)?$")


def resolve_seed(value: Any) -> Any:
    """A seed as the request records it: None or -1 means a random one, drawn now; anything else as given."""
    if value is None or int(value) == -1:
        return secrets.randbelow(MAX_SEED + 1)
    return value


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(default=1.0, ge=-4.0, le=4.0)


def parse_loras(text: str | list | None) -> list[LoraSpec]:
    """`"style:0.8, mychar"` (or a list of {"name","weight"} / "name:w" strings) -> LoraSpecs."""
    if not text:
        return []
    items = text if isinstance(text, list) else [p for p in re.split(r"[,\n]", text) if p.strip()]
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(LoraSpec(**item))
            continue
        m = LORA_SPEC.match(str(item))
        if not m:
            raise InputError(
                f"loras entry {item!r} is not 'name' or 'name:weight' (for example 'mystyle:0.8')"
            )
        weight = float(m["weight"]) if m["weight"] is not None else 1.0
        try:
            out.append(LoraSpec(name=m["name"], weight=weight))
        except ValidationError as e:
            raise InputError(f"loras entry {item!r}: weight must be between -4 and 4") from e
    return out


class NegativeTerm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    term: str
    source: str  # "character", "project", "rejected: bad hands x3", ...


class CharacterSnapshot(BaseModel):
    """A character as it was when a job was submitted: the job (and every image it makes) keeps this copy,
    so editing the character later never rewrites past recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    slug: str
    name: str
    revision: int = 1
    trigger_word: str = ""
    design_prompt: str = ""
    negative_terms: list[NegativeTerm] = []  # the effective negative prompt, with where each term came from
    lora: dict | None = None  # {"id", "name", "version", "weight", "hash"} of the LoRA version used


class RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def build(cls, **values: Any):
        """Construct, turning pydantic's errors into one InputError that names field and value."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise InputError(_describe(cls, e)) from None


def _describe(cls: type[BaseModel], err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or cls.__name__
        value = item.get("input")
        msg = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}={value!r}: {msg}" if item["loc"] else msg)
    return "; ".join(parts)


def field_spec(cls: type[BaseModel], name: str) -> dict[str, Any]:
    """Default, bounds and help of one request field, for building a UI control."""
    f = cls.model_fields[name]
    spec: dict[str, Any] = {"default": f.get_default(call_default_factory=True), "info": f.description or ""}
    for meta in f.metadata:
        for key in ("ge", "le", "multiple_of"):
            if hasattr(meta, key):
                spec[key] = getattr(meta, key)
    return spec
