"""Which input files a request may name: files Gradio received, or our own outputs; never server paths."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InputError
from engine.paths import within
from engine.settings import Settings


def allowed_input_roots(settings: Settings) -> list[Path]:
    return [settings.gradio_tmp_dir, settings.outputs_dir]


def checked_upload(settings: Settings, path: str, what: str) -> str:
    """The resolved path of an uploaded file (or one of our outputs); InputError for anything else."""
    if not any(within(root, Path(path)) for root in allowed_input_roots(settings)):
        raise InputError(f"{what} must be an uploaded file; server paths are not accepted")
    return str(Path(path).resolve())


def outputs_relative(settings: Settings, path: str) -> str:
    """A path under outputs/ as users name it, never the server path (a foreign path: its file name)."""
    p = Path(path)
    return (
        p.relative_to(settings.outputs_dir).as_posix() if p.is_relative_to(settings.outputs_dir) else p.name
    )
