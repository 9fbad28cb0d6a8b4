"""Saved styles: named prompt/negative pairs in A1111's styles.csv format (name, prompt, negative_prompt),
so a user can copy their A1111 styles.csv into the data folder and keep using it.

Applying follows A1111: a style prompt containing `{prompt}` has the user's prompt put there,
otherwise the style text is appended after ", ".

A job never reads styles.csv: at submission `resolve_styles` copies the named styles into the request
(`GenerateRequest.style_snapshot`, as a character becomes a CharacterSnapshot), and the runner composes the
prompt from that copy, so editing a style later changes neither a retried job nor its records.
"""

from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.artifacts import atomic_write
from engine.errors import InputError, NotFoundError

FIELDS = ("name", "prompt", "negative_prompt")
_lock = threading.Lock()


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


class StyleSnapshot(BaseModel):
    """A saved style as styles.csv held it when the job was submitted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=100)
    prompt: str = Field(default="", max_length=20000)
    negative_prompt: str = Field(default="", max_length=20000)


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
        return apply_snapshots(resolve_styles(names, self), prompt, negative)

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


def resolve_styles(names: list[str], book: StyleBook) -> list[StyleSnapshot]:
    """The named styles as the book holds them now, frozen, in order; an unknown name -> NotFoundError."""
    styles = book.load()
    missing = [n for n in names if n not in styles]
    if missing:
        raise NotFoundError(
            f"style {missing[0]!r} not found; saved styles: {', '.join(styles) or 'none yet'}"
        )
    return [StyleSnapshot(**vars(styles[n])) for n in names]


def apply_snapshots(styles: list[StyleSnapshot], prompt: str, negative: str) -> tuple[str, str]:
    """The styles applied one after another, as A1111 does."""
    for style in styles:
        prompt, negative = merge(style.prompt, prompt), merge(style.negative_prompt, negative)
    return prompt, negative
