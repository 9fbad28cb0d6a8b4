"""File hashes computed once and cached in the database by path + size + mtime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from engine.artifacts import sha256_file
from engine.store.database import Database, FileHash


class HashCache:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def cached(self, path: Path, kind: str, compute: Callable[[Path], str]) -> str:
        st = Path(path).stat()
        key = f"{Path(path).resolve()}#{kind}"
        memo_key = (key, st.st_size, st.st_mtime_ns)
        with self._lock:
            if memo_key in self._memo:
                return self._memo[memo_key]
        with self.db.session() as s:
            row = s.get(FileHash, key)
            if row and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns:
                value = row.sha256
            else:
                value = compute(Path(path))
                row = row or FileHash(path=key, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=value)
                row.size, row.mtime_ns, row.sha256 = st.st_size, st.st_mtime_ns, value
                s.add(row)
                s.commit()
        with self._lock:
            self._memo[memo_key] = value
        return value

    def sha256(self, path: Path) -> str:
        return self.cached(path, "sha256", sha256_file)
