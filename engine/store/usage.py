"""Disk use per kind of file, as the Jobs & usage tab shows it."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import func
from sqlmodel import select

from engine.settings import Settings
from engine.store.database import Asset, Database, MediaItem


def storage(settings: Settings, db: Database):
    """Bytes and files per kind: library media, generated images, variant batches, models, database."""
    import pandas as pd

    rows: list[dict] = []
    with db.session() as s:
        for kind, n, size in s.exec(
            select(MediaItem.kind, func.count(), func.coalesce(func.sum(MediaItem.size), 0)).group_by(
                MediaItem.kind
            )
        ):
            rows.append({"kind": f"library {kind}s", "files": n, "bytes": int(size)})
        for kind, n, size in s.exec(
            select(Asset.kind, func.count(), func.coalesce(func.sum(Asset.size), 0)).group_by(Asset.kind)
        ):
            label = "variant batches" if kind == "video" else f"generated {kind}s"
            rows.append({"kind": label, "files": n, "bytes": int(size)})
    n, size = tree_size(settings.models_dir)
    rows.append({"kind": "models", "files": n, "bytes": size})
    if db.is_sqlite:
        db_files = [p for p in settings.data_dir.glob("studio.db*") if p.is_file()]
        rows.append(
            {"kind": "database", "files": len(db_files), "bytes": sum(p.stat().st_size for p in db_files)}
        )
    df = pd.DataFrame(rows, columns=["kind", "files", "bytes"])
    df["MB"] = (df["bytes"] / 1e6).round(1)
    return df


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under root, symlinks not followed."""
    count = size = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            count += 1
            size += st.st_size
    return count, size
