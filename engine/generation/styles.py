"""Saved styles: named prompt/negative pairs in A1111's styles.csv format (name, prompt, negative_prompt),
so a user can copy their A1111 styles.csv into the data folder and keep using it.

Applying follows A1111: a style prompt containing `{prompt}` has the user's prompt put there,
otherwise the style text is appended after ", ".
"""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.artifacts import atomic_write
from engine.errors import InputError, NotFoundError

FIELDS = ("name", "prompt", "negative_prompt")
_lock = threading.Lock()


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge(style_text: str, text: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    if not style_text.strip():
        return text
    if not text.strip():
        return style_text
    return f"{text}, {style_text}"


class StyleBook:
    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None

    def load(self) -> dict[str, Style]:
        if self.path is None or not self.path.is_file():
            return {}
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
        return {
            r["name"]: Style(r["name"], r.get("prompt") or "", r.get("negative_prompt") or "")
            for r in rows
            if r.get("name")
        }

    def names(self) -> list[str]:
        return list(self.load())

    def get(self, name: str) -> Style:
        styles = self.load()
        if name not in styles:
            raise NotFoundError(f"style {name!r} not found; saved styles: {', '.join(styles) or 'none yet'}")
        return styles[name]

    def apply(self, names: list[str], prompt: str, negative: str) -> tuple[str, str]:
        for name in names:
            style = self.get(name)
            prompt, negative = merge(style.prompt, prompt), merge(style.negative_prompt, negative)
        return prompt, negative

    def save(self, name: str, prompt: str, negative_prompt: str) -> Style:
        name = (name or "").strip()
        if not name or len(name) > 100 or any(c in name for c in "\n\r,"):
            raise InputError(f"style name {name!r}: give 1-100 characters without commas or line breaks")
        with _lock:
            styles = self.load()
            styles[name] = Style(name, prompt or "", negative_prompt or "")
            self._write(styles)
        return styles[name]

    def delete(self, name: str) -> None:
        with _lock:
            styles = self.load()
            if name not in styles:
                raise NotFoundError(f"style {name!r} not found")
            del styles[name]
            self._write(styles)

    def _write(self, styles: dict[str, Style]) -> None:
        if self.path is None:
            raise InputError("styles need a data folder; none is configured")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for s in styles.values():
            writer.writerow({"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt})
        with atomic_write(self.path, "wb") as f:
            f.write(buf.getvalue().encode("utf-8"))
