"""Files we own: atomic writes (temp in the same folder + fsync + os.replace) and hashes.

After `kill -9` mid-write, either the old or the new file is whole; temp files start with
`.tmp-` so no listing (gallery, models/) ever shows them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Fill a temp folder beside `target`, then rename it into place: an interrupted build never
    leaves a half-written folder under the target's name (a concurrent winner is kept)."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_with(path: Path, writer: Callable[[IO], None]) -> Path:
    with atomic_write(path) as f:
        writer(f)
    return Path(path)


def save_png(image, path: Path, text_chunks: dict[str, str], icc_profile: bytes | None = None) -> Path:
    """Save a PIL image as PNG with tEXt/iTXt chunks (A1111 reads `parameters`) and an optional ICC profile."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    return atomic_write_with(
        path, lambda f: image.save(f, format="PNG", pnginfo=info, compress_level=4, **extra)
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path: Path, max_header: int = 100 * 1024 * 1024) -> tuple[int, dict]:
    """(header length, header dict) of a .safetensors file; refuses absurd or malformed headers."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{Path(path).name}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > max_header or n + 8 > size:
            raise ValueError(
                f"{Path(path).name}: safetensors header length {n} is impossible for a {size}-byte file"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{Path(path).name}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{Path(path).name}: safetensors header is not a JSON object")
    return n, header


def lora_short_hash(path: Path) -> str:
    """A1111's LoRA hash: first 12 hex of SHA-256 over the bytes after the safetensors header
    (or `sshs_model_hash` from the metadata when present)."""
    n, header = safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("sshs_model_hash"):
        return str(meta["sshs_model_hash"])[:12]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + n)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:12]


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX))


def folder_hash(file_hashes: dict[str, str]) -> str:
    """Model hash of a diffusers folder: first 10 hex of SHA-256 over its files' sorted hashes."""
    h = hashlib.sha256()
    for rel in sorted(file_hashes):
        h.update(f"{rel}\0{file_hashes[rel]}\n".encode())
    return h.hexdigest()[:10]
