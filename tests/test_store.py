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
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (the test extra installs psycopg)")
    db = Database("postgresql+psycopg://user:pw@127.0.0.1:1/none")  # no connection is made here
    assert not db.is_sqlite  # no PRAGMA / BEGIN IMMEDIATE listeners for this dialect
    assert db.engine.dialect.name == "postgresql" and db.engine.dialect.driver == "psycopg"


def test_concurrent_writers_on_a_live_postgres():
    url = os.environ.get("STUDIONOVA_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            "set STUDIONOVA_TEST_POSTGRES_URL to run against a live PostgreSQL (tests/run_slow.sh does)"
        )
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (the test extra installs psycopg)")
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


# The generation table as StudioNOVA created it before upscale and video rows could leave sampling empty.
OLD_GENERATION_SCHEMA = """
CREATE TABLE generation (
    id VARCHAR(32) NOT NULL,
    asset_id VARCHAR(32) NOT NULL,
    job_id VARCHAR(32) NOT NULL,
    mode VARCHAR(16) NOT NULL,
    model VARCHAR(200) NOT NULL,
    model_hash VARCHAR(10) NOT NULL,
    prompt VARCHAR NOT NULL,
    negative_prompt VARCHAR NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    cfg_scale FLOAT NOT NULL,
    sampler VARCHAR(40) NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    denoising_strength FLOAT,
    clip_skip INTEGER NOT NULL,
    loras JSON NOT NULL,
    infotext VARCHAR NOT NULL,
    recipe JSON NOT NULL,
    created_at DATETIME NOT NULL,
    character VARCHAR(200),
    trashed_at DATETIME,
    PRIMARY KEY (id)
);
CREATE INDEX ix_generation_seed ON generation (seed);
CREATE INDEX ix_generation_gallery ON generation (trashed_at, created_at, id);
CREATE TABLE generationlora (
    generation_id VARCHAR(32) NOT NULL,
    name VARCHAR(200) NOT NULL,
    PRIMARY KEY (generation_id, name),
    FOREIGN KEY(generation_id) REFERENCES generation (id) ON DELETE CASCADE
);
CREATE INDEX ix_generationlora_name ON generationlora (name, generation_id);
"""
OLD_ROWS = [  # id, mode, seed, steps, cfg_scale, sampler
    ("up_upload", "upscale", 0, 0, 0.0, ""),  # an upscaled upload: zeros for sampling never done
    ("camera", "camera", 21, 0, 0.0, ""),  # a camera move: no noise, no steps
    ("up_of_gen", "upscale", 0, 20, 7.0, "Euler a"),  # an upscale carrying its source's recipe: kept
    ("txt", "txt2img", 0, 20, 7.0, "Euler a"),  # seed 0 is a real seed here
]


def _old_database(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE IF EXISTS generationlora")
        c.exec_driver_sql("DROP TABLE IF EXISTS generation")
        schema = OLD_GENERATION_SCHEMA
        if engine.dialect.name == "postgresql":
            schema = schema.replace("DATETIME", "TIMESTAMP WITHOUT TIME ZONE")
        for stmt in filter(str.strip, schema.split(";")):
            c.exec_driver_sql(stmt)
        for gid, mode, seed, steps, cfg, sampler in OLD_ROWS:
            c.execute(
                text(
                    "INSERT INTO generation VALUES (:id, :asset, 'j1', :mode, 'm', '', 'p', '', :seed, "
                    ":steps, :cfg, :sampler, 64, 64, NULL, 1, '[\"style_a\"]', '', '{}', "
                    "'2024-05-01 10:00:00', NULL, NULL)"
                ),
                {
                    "id": gid,
                    "asset": f"a-{gid}",
                    "mode": mode,
                    "seed": seed,
                    "steps": steps,
                    "cfg": cfg,
                    "sampler": sampler,
                },
            )
        c.exec_driver_sql("INSERT INTO generationlora VALUES ('txt', 'style_a')")
    engine.dispose()


def _check_migrated(db: Database) -> None:
    from sqlalchemy import inspect
    from sqlmodel import select

    from engine.store.database import Generation, GenerationLora

    columns = {c["name"]: c["nullable"] for c in inspect(db.engine).get_columns("generation")}
    assert all(columns[c] for c in ("seed", "steps", "cfg_scale", "sampler"))
    assert not columns["width"] and not columns["prompt"]
    with db.session() as s:
        rows = {g.id: (g.seed, g.steps, g.cfg_scale, g.sampler) for g in s.exec(select(Generation))}
        assert rows == {
            "up_upload": (None, None, None, None),
            "camera": (None, None, None, None),
            "up_of_gen": (0, 20, 7.0, "Euler a"),
            "txt": (0, 20, 7.0, "Euler a"),
        }
        assert s.exec(select(GenerationLora.generation_id)).all() == ["txt"]
        new = Generation(
            asset_id="a-new",
            job_id="j2",
            mode="upscale",
            model="Lanczos",
            model_hash="",
            width=128,
            height=128,
        )
        s.add(new)
        s.commit()
        s.delete(s.get(Generation, "txt"))  # the foreign key still cascades, to the new table
        s.commit()
        assert s.exec(select(GenerationLora)).all() == []
    indexes = {i["name"] for i in inspect(db.engine).get_indexes("generation")}
    assert {"ix_generation_seed", "ix_generation_gallery", "ix_generation_mode_gallery"} <= indexes


def test_old_generation_schema_migrates_to_nullable_sampling_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_database(url)
    db = Database(url)
    db.create_all()
    with db.engine.connect() as c:
        schema = c.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'generation'").scalar()
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    db.create_all()  # idempotent: nothing is rebuilt twice
    with db.engine.connect() as c:
        assert c.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'generation'").scalar() == schema
    _check_migrated(db)
    db.dispose()


def test_old_generation_schema_migrates_on_a_live_postgres():
    url = os.environ.get("STUDIONOVA_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(
            "set STUDIONOVA_TEST_POSTGRES_URL to run against a live PostgreSQL (tests/run_slow.sh does)"
        )
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (the test extra installs psycopg)")
    _old_database(url)
    db = Database(url)
    db.create_all()
    db.create_all()
    _check_migrated(db)
    db.dispose()
