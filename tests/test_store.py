"""Database and files: concurrent writers, atomic writes, hashes, infotext round trip."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import text

from engine.artifacts import TMP_PREFIX, atomic_write, folder_hash, lora_short_hash, safetensors_header
from engine.gallery.infotext import build_infotext, parse_infotext
from engine.store.database import Database, Job


def hammer(db: Database, seconds: float, writers: int = 8) -> list[Exception]:
    errors: list[Exception] = []
    stop = time.monotonic() + seconds

    def write(n: int) -> None:
        while time.monotonic() < stop:
            try:
                with db.session() as s:
                    job = Job(kind="generate", request={"writer": n})
                    s.add(job)
                    s.commit()
                    job.status = "running"
                    s.add(job)
                    s.commit()
            except Exception as e:  # collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_writers_never_see_database_locked(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.create_all()
    assert hammer(db, seconds=4) == []
    with db.engine.connect() as c:
        assert c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"


@pytest.mark.slow
def test_concurrent_writers_for_a_minute(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.create_all()
    assert hammer(db, seconds=60, writers=10) == []
    with db.engine.connect() as c:
        assert c.execute(text("PRAGMA integrity_check")).scalar() == "ok"


def test_postgres_url_uses_same_code_without_sqlite_tricks():
    url = os.environ.get("STUDIONOVA_TEST_POSTGRES_URL")
    if not url:
        db = Database("postgresql+psycopg://user:pw@127.0.0.1:1/none")
        assert not db.is_sqlite  # no PRAGMA / BEGIN IMMEDIATE listeners for this dialect
        pytest.skip(
            "set STUDIONOVA_TEST_POSTGRES_URL to run against a live PostgreSQL (tests/run_slow.sh does)"
        )
    db = Database(url)
    db.create_all()
    assert hammer(db, seconds=3) == []


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_safetensors_header_refuses_absurd_sizes(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="impossible"):
        safetensors_header(bad)
    bad.write_bytes((5).to_bytes(8, "little") + b"[1,2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        safetensors_header(bad)


def test_lora_short_hash_skips_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(3)}, str(a), metadata={"ss_output_name": "a"})
    save_file({"x": torch.ones(3)}, str(b), metadata={"ss_output_name": "a different, longer name"})
    assert lora_short_hash(a) == lora_short_hash(b) and len(lora_short_hash(a)) == 12
    save_file({"x": torch.ones(3)}, str(b), metadata={"sshs_model_hash": "abcdef0123456789"})
    assert lora_short_hash(b) == "abcdef012345"


def test_folder_hash_depends_on_every_file():
    h = folder_hash({"unet/w.safetensors": "aa", "vae/w.safetensors": "bb"})
    assert len(h) == 10 and h == folder_hash({"vae/w.safetensors": "bb", "unet/w.safetensors": "aa"})
    assert h != folder_hash({"unet/w.safetensors": "aa", "vae/w.safetensors": "bc"})


def test_infotext_quotes_and_round_trips():
    params = {
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": 1,
        "Size": "512x768",
        "Model": "my, model: v2",
        "Lora hashes": "a: 0123456789ab, b: ba9876543210",
    }
    text_ = build_infotext("line one\nline two", "bad hands", params, "StudioNOVA 0.1.0")
    lines = text_.split("\n")
    assert lines[2] == "Negative prompt: bad hands" and lines[-1].startswith("Steps: 20, Sampler: DPM++ 2M,")
    assert 'Model: "my, model: v2"' in lines[-1] and lines[-1].endswith("Version: StudioNOVA 0.1.0")
    parsed = parse_infotext(text_)
    assert parsed["Prompt"] == "line one\nline two" and parsed["Model"] == "my, model: v2"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768"
    assert parsed["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"
    assert "Negative prompt:" not in build_infotext("p", "", params, "v")
