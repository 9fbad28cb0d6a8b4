"""A1111's extra-network tag syntax (`<lora:name:weight>`): prompt vocabulary shared by generation
(which applies the tags as LoRAs) and gallery metadata (which reads them back from infotext)."""

from __future__ import annotations

import re

from engine.errors import InputError

# A1111's extra-network syntax: <kind:name[:weight[:...]]>
EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`<lora:name:weight>` tags -> (prompt without them, [(name, weight)]). Other extra-network tags
    (`<hypernet:...>`) are not supported and are named in the error."""
    tags: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, args = m[1], m[2].split(":")
        if kind.lower() not in ("lora", "lyco"):
            raise InputError(f"prompt tag <{kind}:{m[2]}> is not supported; only <lora:name:weight> is")
        name = args[0].strip()
        try:
            weight = float(args[1]) if len(args) > 1 and args[1].strip() else 1.0
        except ValueError:
            raise InputError(f"<lora:{m[2]}>: weight {args[1]!r} is not a number") from None
        tags.append((name, weight))
        return ""

    cleaned = EXTRA_NETWORK_RE.sub(take, prompt or "")
    return re.sub(r"\s+,", ",", re.sub(r"[ \t]{2,}", " ", cleaned)).strip(), tags
