"""Gallery engine: filters, paging, ordering, thumbnails, trash and empty trash, metadata, schema upgrade.

Rows and tiny image files are written directly (no diffusion), as save_generated writes them.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import inspect, text
from sqlalchemy.dialects import postgresql
from sqlmodel import select

from engine.errors import InputError, NotFoundError
from engine.gallery import records as gallery
from engine.gallery.records import (
    GalleryQuery,
    backfill_lora_index,
    delete_generations,
    empty_trash,
    ensure_thumbnail,
    fill_thumbnails,
    gallery_page,
    generation_detail,
    index_generation,
    page_statement,
    restore,
    thumbnail_path,
    trash,
)
from engine.store.database import Asset, Database, Generation, GenerationLora

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture
def db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'studio.db'}")
    db.create_all()
    yield db
    db.dispose()


@pytest.fixture
def outputs(tmp_path) -> Path:
    out = tmp_path / "outputs"
    out.mkdir()
    return out


def add_image(
    db: Database,
    outputs: Path,
    *,
    prompt: str = "a cat",
    negative: str = "",
    model: str = "m1",
    loras: tuple[str, ...] = (),
    character: str | None = None,
    mode: str = "txt2img",
    created_at: datetime = T0,
    size: tuple[int, int] = (40, 30),
    seed: int = 1,
    path: Path | None = None,
) -> Generation:
    """An image file + its Asset, Generation and index rows in one transaction, as save_generated does."""
    path = path or outputs / created_at.strftime("%Y-%m-%d") / f"img-{seed}-{os.urandom(4).hex()}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (seed * 37 % 256, 90, 160)).save(path)
    asset = Asset(
        kind="image",
        path=str(path),
        sha256="ab" * 32,
        size=path.stat().st_size,
        width=size[0],
        height=size[1],
        job_id="job1",
        created_at=created_at,
    )
    recipe = {"seed": seed, "loras": [{"name": n, "weight": 0.8, "hash": "0123456789ab"} for n in loras]}
    gen = Generation(
        asset_id=asset.id,
        job_id="job1",
        mode=mode,
        model=model,
        model_hash="abcdef0123",
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=4,
        cfg_scale=7.0,
        sampler="Euler a",
        width=size[0],
        height=size[1],
        loras=recipe["loras"],
        infotext=f"{prompt}\nSteps: 4",
        recipe=recipe,
        created_at=created_at,
        character=character,
    )
    with db.session() as s:
        s.add(asset)
        s.add(gen)
        index_generation(s, gen)
        s.commit()
    return gen


def ids(page) -> list[str]:
    return [item.generation_id for item in page.items]


def query(db: Database, **kw) -> list[str]:
    return ids(gallery_page(db, GalleryQuery(page_size=200, **kw)))


def count_rows(db: Database, table) -> int:
    with db.session() as s:
        return len(s.exec(select(table)).all())


# --- filters ------------------------------------------------------------------------------------------
def test_each_filter_selects_exactly_its_matches(db, outputs):
    cat = add_image(db, outputs, prompt="A Cat on a roof", model="m1", loras=("style_a",), seed=1)
    dog = add_image(
        db,
        outputs,
        prompt="a dog",
        negative="blurry CAT",
        model="m2",
        seed=2,
        loras=("style_a", "style_b"),
        character="mira",
        created_at=T0 + timedelta(days=1),
    )
    lake = add_image(
        db,
        outputs,
        prompt="50% off_sale lake",
        model="m2",
        mode="img2img",
        seed=3,
        created_at=T0 + timedelta(days=3),
    )
    other = add_image(
        db,
        outputs,
        prompt="50 percent off sale",
        model="m3",
        character="jon",
        seed=4,
        created_at=T0 - timedelta(days=2),
    )

    assert set(query(db)) == {cat.id, dog.id, lake.id, other.id}
    # text: case-insensitive substring over prompt and negative prompt; % and _ are literal
    assert set(query(db, text="cat")) == {cat.id, dog.id}
    assert query(db, text="ROOF") == [cat.id]
    assert query(db, text="50%") == [lake.id]
    assert query(db, text="off_") == [lake.id]
    assert query(db, text="nothing like this") == []
    # exact names
    assert set(query(db, model="m2")) == {dog.id, lake.id}
    assert query(db, model="m") == []
    assert set(query(db, lora="style_a")) == {cat.id, dog.id}
    assert query(db, lora="style_b") == [dog.id]
    assert query(db, lora="style") == []
    assert query(db, character="mira") == [dog.id]
    assert query(db, mode="img2img") == [lake.id]
    assert set(query(db, mode="txt2img")) == {cat.id, dog.id, other.id}
    # dates: a date covers its whole UTC day; datetimes are inclusive bounds
    assert query(db, date_from=date(2025, 3, 11), date_to=date(2025, 3, 11)) == [dog.id]
    assert set(query(db, date_from="2025-03-10")) == {cat.id, dog.id, lake.id}
    assert query(db, date_to="2025-03-09") == [other.id]
    assert query(db, date_from=T0 + timedelta(days=3), date_to=T0 + timedelta(days=3)) == [lake.id]
    assert query(db, date_from=datetime(2025, 3, 13, 12, 0)) == [lake.id]  # naive = UTC
    assert query(db, date_from="2025-03-13T14:00:00+02:00") == [lake.id]  # same instant, other zone
    # combined
    assert query(db, model="m2", lora="style_a", text="dog") == [dog.id]
    assert query(db, model="m2", lora="style_a", mode="img2img") == []


def test_postgres_compiles_the_same_query_with_ilike():
    sql = str(
        page_statement(GalleryQuery(text="Cat", lora="x", date_from="2025-01-01")).compile(
            dialect=postgresql.dialect()
        )
    )
    assert "ILIKE" in sql and "generationlora" in sql and "LIMIT" in sql


# --- paging and ordering -----------------------------------------------------------------------------
def test_paging_math(db, outputs):
    assert (lambda p: (p.total, p.pages, p.items))(gallery_page(db, GalleryQuery())) == (0, 1, [])
    gens = [add_image(db, outputs, seed=i, created_at=T0 + timedelta(minutes=i)) for i in range(7)]
    newest = [g.id for g in reversed(gens)]
    pages = [gallery_page(db, GalleryQuery(page=n, page_size=3)) for n in (1, 2, 3, 4)]
    assert [(p.total, p.pages, p.page, p.page_size) for p in pages] == [(7, 3, n, 3) for n in (1, 2, 3, 4)]
    assert [ids(p) for p in pages] == [newest[0:3], newest[3:6], newest[6:7], []]
    assert gallery_page(db, GalleryQuery(page_size=7)).pages == 1
    assert gallery_page(db, GalleryQuery(page_size=6)).pages == 2
    filtered = gallery_page(db, GalleryQuery(page=2, page_size=2, text="nothing"))
    assert (filtered.total, filtered.pages, filtered.items) == (0, 1, [])


def test_ordering_newest_oldest_and_ties_are_stable_across_pages(db, outputs):
    same = [add_image(db, outputs, seed=i, created_at=T0) for i in range(5)]
    early = add_image(db, outputs, seed=9, created_at=T0 - timedelta(hours=1))
    late = add_image(db, outputs, seed=10, created_at=T0 + timedelta(hours=1))
    newest = query(db)
    oldest = query(db, sort="oldest")
    assert newest[0] == late.id and newest[-1] == early.id
    assert oldest == list(reversed(newest))
    assert newest[1:6] == sorted((g.id for g in same), reverse=True)  # ties broken by id
    paged = [i for n in (1, 2, 3, 4) for i in ids(gallery_page(db, GalleryQuery(page=n, page_size=2)))]
    assert paged == newest  # nothing repeated or skipped between pages


# --- items, thumbnails ----------------------------------------------------------------------------------
def test_item_fields_and_no_image_opened_by_gallery_page(db, outputs, monkeypatch):
    gen = add_image(
        db,
        outputs,
        prompt="p",
        negative="n",
        model="m9",
        loras=("a", "b"),
        character="mira",
        mode="img2img",
        size=(48, 20),
        seed=77,
    )

    def refuse(*a, **k):
        raise AssertionError("gallery_page opened an image")

    monkeypatch.setattr(Image, "open", refuse)
    (item,) = gallery_page(db, GalleryQuery()).items
    assert (item.generation_id, item.asset_id, item.prompt, item.negative_prompt, item.model) == (
        gen.id,
        gen.asset_id,
        "p",
        "n",
        "m9",
    )
    assert (item.loras, item.seed, item.size, item.mode, item.character) == (
        ("a", "b"),
        77,
        "48x20",
        "img2img",
        "mira",
    )
    assert item.created_at == T0 and item.trashed_at is None and Path(item.image_path).is_file()
    assert item.thumbnail_path is None  # not made yet; gallery_page does not make it
    monkeypatch.undo()

    filled = fill_thumbnails(gallery_page(db, GalleryQuery()))
    thumb = Path(filled.items[0].thumbnail_path)
    assert thumb == thumbnail_path(item.image_path) and thumb.parent.name == "thumbs"
    monkeypatch.setattr(Image, "open", refuse)
    assert gallery_page(db, GalleryQuery()).items[0].thumbnail_path == str(thumb)


def test_thumbnail_made_once_small_webp_and_remade_when_image_changes(outputs, monkeypatch):
    image = outputs / "2025-03-10" / "big.png"
    image.parent.mkdir()
    Image.new("RGB", (1024, 512), "red").save(image)
    thumb = ensure_thumbnail(image)
    assert thumb == outputs / "2025-03-10" / "thumbs" / "big.png.webp"
    with Image.open(thumb) as t:
        assert t.format == "WEBP" and t.size == (256, 128)
    assert not [p for p in thumb.parent.iterdir() if p.name.startswith(".tmp-")]

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    mtime = thumb.stat().st_mtime_ns
    assert ensure_thumbnail(Asset(kind="image", path=str(image), sha256="x")) == thumb
    assert opened == [] and thumb.stat().st_mtime_ns == mtime  # second call: no decode, no write

    Image.new("RGB", (100, 300), "blue").save(image)
    os.utime(image, ns=(mtime + 10**9, mtime + 10**9))
    ensure_thumbnail(image)
    assert len(opened) == 1
    with real_open(thumb) as t:
        assert t.size == (85, 256)
    small = outputs / "tiny.png"
    Image.new("RGBA", (20, 10)).save(small)
    with real_open(ensure_thumbnail(small)) as t:
        assert t.size == (20, 10) and t.mode == "RGBA"  # never enlarged; alpha kept
    with pytest.raises(NotFoundError, match="missing.png"):
        ensure_thumbnail(outputs / "missing.png")


def test_fill_thumbnails_skips_a_missing_image(db, outputs):
    gone = add_image(db, outputs, seed=1)
    ok = add_image(db, outputs, seed=2, created_at=T0 + timedelta(seconds=1))
    Path(generation_detail(db, gone.id).image_path).unlink()
    items = {i.generation_id: i for i in fill_thumbnails(gallery_page(db, GalleryQuery())).items}
    assert items[gone.id].thumbnail_path is None and Path(items[ok.id].thumbnail_path).is_file()


# --- trash --------------------------------------------------------------------------------------------
def test_trash_hides_and_restore_brings_back(db, outputs):
    a, b, c = (add_image(db, outputs, seed=i, created_at=T0 + timedelta(minutes=i)) for i in range(3))
    assert trash(db, [a.id, b.id]) == 2
    assert trash(db, [a.id]) == 0  # already trashed
    assert query(db) == [c.id]
    assert query(db, only_trashed=True) == [b.id, a.id]
    assert query(db, include_trashed=True) == [c.id, b.id, a.id]
    (item,) = gallery_page(db, GalleryQuery(only_trashed=True, lora="", page_size=1)).items
    assert item.trashed_at is not None
    assert restore(db, [b.id, c.id]) == 1
    assert query(db) == [c.id, b.id]
    with pytest.raises(NotFoundError, match="'nope'"):
        trash(db, [c.id, "nope"])
    assert query(db) == [c.id, b.id]  # all or nothing
    with pytest.raises(NotFoundError, match="'nope'"):
        restore(db, ["nope"])
    with pytest.raises(InputError, match="generation_ids"):
        trash(db, [None])


def test_empty_trash_deletes_files_and_rows_and_keeps_the_rest(db, outputs):
    keep = add_image(db, outputs, seed=1, loras=("style_a",))
    doomed = [add_image(db, outputs, seed=i, loras=("style_a", "style_b")) for i in (2, 3)]
    for gen in (keep, *doomed):
        ensure_thumbnail(generation_detail(db, gen.id).image_path)
    files = {g.id: (Path(generation_detail(db, g.id).image_path),) for g in (keep, *doomed)}
    files = {gid: (img, thumbnail_path(img)) for gid, (img,) in files.items()}
    trash(db, [g.id for g in doomed])

    result = empty_trash(db, outputs)
    assert (result.deleted, result.failed, result.complete) == (2, {}, True)
    for g in doomed:
        assert not any(f.exists() for f in files[g.id])
        with pytest.raises(NotFoundError, match=g.id):
            generation_detail(db, g.id)
    assert all(f.is_file() for f in files[keep.id])
    assert count_rows(db, Generation) == count_rows(db, Asset) == 1
    with db.session() as s:
        assert s.exec(select(GenerationLora.generation_id)).all() == [keep.id]
    assert query(db, lora="style_a") == [keep.id]
    assert empty_trash(db, outputs).deleted == 0  # nothing left to do


def test_interrupted_empty_trash_is_consistent_and_a_retry_finishes(db, outputs, monkeypatch):
    gens = [add_image(db, outputs, seed=i, created_at=T0 + timedelta(minutes=i)) for i in range(4)]
    keep = gens[3]
    for g in gens:
        ensure_thumbnail(generation_detail(db, g.id).image_path)
    trash(db, [g.id for g in gens[:3]])
    stuck = gens[1]
    stuck_image = Path(generation_detail(db, stuck.id).image_path)
    # A file killed mid-empty: the image of `stuck` cannot be removed (its thumbnail already went).
    real_unlink = Path.unlink

    def flaky_unlink(self, missing_ok=False):
        if self == stuck_image:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", flaky_unlink)
    result = empty_trash(db, outputs)
    assert result.deleted == 2 and list(result.failed) == [stuck.id]
    assert "Permission denied" in result.failed[stuck.id] and stuck_image.name in result.failed[stuck.id]
    # consistent: the stuck row still exists, still trashed, and its image is still there
    detail = generation_detail(db, stuck.id)
    assert detail.trashed_at is not None and detail.file_exists
    assert query(db) == [keep.id] and query(db, only_trashed=True) == [stuck.id]
    assert count_rows(db, Generation) == count_rows(db, Asset) == 2

    monkeypatch.undo()
    assert empty_trash(db, outputs).deleted == 1
    assert not stuck_image.exists() and not thumbnail_path(stuck_image).exists()
    assert count_rows(db, Generation) == count_rows(db, Asset) == 1
    assert generation_detail(db, keep.id).file_exists


def test_empty_trash_finishes_rows_whose_files_are_already_gone(db, outputs):
    # A crash after the files went but before the rows did leaves this state.
    gen = add_image(db, outputs, seed=1)
    trash(db, [gen.id])
    Path(generation_detail(db, gen.id).image_path).unlink()
    assert empty_trash(db, outputs).deleted == 1
    assert count_rows(db, Generation) == count_rows(db, Asset) == 0


def test_delete_refuses_files_outside_outputs(db, outputs, tmp_path):
    inside = add_image(db, outputs, seed=1)
    outside = add_image(db, outputs, seed=2, path=tmp_path / "elsewhere" / "precious.png")
    escape_dir = outputs / "link"
    escape_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    via_link = add_image(db, outputs, seed=3, path=escape_dir / "also-precious.png")
    trash(db, [inside.id, outside.id])
    with pytest.raises(InputError, match=f"{outside.id}.*outside the outputs folder"):
        empty_trash(db, outputs)
    assert count_rows(db, Generation) == 3  # refused before anything was deleted
    assert Path(generation_detail(db, inside.id).image_path).is_file()
    assert (tmp_path / "elsewhere" / "precious.png").is_file()
    with pytest.raises(InputError, match="outside the outputs folder"):
        delete_generations(db, [via_link.id], outputs)
    assert generation_detail(db, via_link.id).trashed_at is None  # not even trashed
    assert (tmp_path / "elsewhere" / "also-precious.png").is_file()
    restore(db, [outside.id])
    assert empty_trash(db, outputs).deleted == 1


def test_delete_generations_now(db, outputs):
    a, b = add_image(db, outputs, seed=1), add_image(db, outputs, seed=2)
    image = Path(generation_detail(db, a.id).image_path)
    assert delete_generations(db, [a.id], outputs).deleted == 1
    assert not image.exists() and query(db, include_trashed=True) == [b.id]
    with pytest.raises(NotFoundError, match=a.id):
        delete_generations(db, [a.id], outputs)


def test_shared_asset_file_stays_while_another_generation_uses_it(db, outputs):
    first = add_image(db, outputs, seed=1)
    second = Generation(**{**first.model_dump(), "id": "f" * 32, "seed": 2})
    with db.session() as s:
        s.add(second)
        s.commit()
    image = Path(generation_detail(db, first.id).image_path)
    assert delete_generations(db, [first.id], outputs).deleted == 1
    assert image.is_file() and generation_detail(db, second.id).file_exists
    assert delete_generations(db, [second.id], outputs).deleted == 1
    assert not image.exists() and count_rows(db, Asset) == 0


# --- metadata -----------------------------------------------------------------------------------------
def test_generation_detail_has_the_full_record(db, outputs):
    gen = add_image(db, outputs, prompt="p", negative="n", loras=("style_a",), size=(24, 16), seed=5)
    d = generation_detail(db, gen.id)
    assert (d.generation_id, d.asset_id, d.job_id, d.prompt, d.negative_prompt, d.seed) == (
        gen.id,
        gen.asset_id,
        "job1",
        "p",
        "n",
        5,
    )
    assert (d.width, d.height, d.steps, d.sampler, d.cfg_scale, d.model_hash) == (
        24,
        16,
        4,
        "Euler a",
        7.0,
        "abcdef0123",
    )
    assert d.loras == [{"name": "style_a", "weight": 0.8, "hash": "0123456789ab"}]
    assert d.recipe["seed"] == 5 and d.infotext.startswith("p\n") and d.sha256 == "ab" * 32
    assert d.file_exists and d.file_size == Path(d.image_path).stat().st_size and d.created_at == T0
    with pytest.raises(NotFoundError, match="'no-such-id'"):
        generation_detail(db, "no-such-id")


def test_a_row_without_sampling_lists_and_details_as_none(db, outputs):
    """An upscaled upload or a camera clip has no seed, steps, CFG or sampler: None, never a made-up zero."""
    gen = add_image(db, outputs, mode="upscale", seed=6)
    with db.session() as s:
        row = s.get(Generation, gen.id)
        row.seed = row.steps = row.cfg_scale = row.sampler = None
        s.add(row)
        s.commit()
    (item,) = gallery_page(db, GalleryQuery(mode="upscale")).items
    assert item.generation_id == gen.id and item.seed is None
    d = generation_detail(db, gen.id)
    assert (d.seed, d.steps, d.cfg_scale, d.sampler, d.mode) == (None, None, None, None, "upscale")


# --- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page": 0}, "page=0"),
        ({"page": "2"}, "page='2'"),
        ({"page": 1.5}, "page=1.5"),
        ({"page_size": 0}, "page_size=0.*1 to 200"),
        ({"page_size": 201}, "page_size=201.*1 to 200"),
        ({"mode": "video"}, "mode='video'.*txt2img"),
        ({"sort": "random"}, "sort='random'.*newest, oldest"),
        ({"text": "x" * 501}, "text is 501 characters"),
        ({"model": 3}, "model=3"),
        ({"date_from": "yesterday"}, "date_from='yesterday'"),
        ({"date_to": 17}, "date_to=17"),
        ({"date_from": "2025-03-02", "date_to": "2025-03-01"}, "date_from=2025-03-02 is after date_to"),
        ({"include_trashed": True, "only_trashed": True}, "include_trashed and only_trashed"),
        ({"only_trashed": "yes"}, "only_trashed='yes'"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(InputError, match=message):
        GalleryQuery(**kwargs)


def test_query_accepts_form_values():
    q = GalleryQuery(page=2.0, page_size=10, model=None, date_from="", date_to="2025-03-01")
    assert (q.page, q.model, q.date_from, q.date_to) == (2, "", None, date(2025, 3, 1))


# --- index rows and schema upgrade --------------------------------------------------------------------
def test_backfill_indexes_loras_of_generations_saved_before_the_index(db, outputs):
    old = add_image(db, outputs, seed=1, loras=("style_a",))
    plain = add_image(db, outputs, seed=2)
    with db.session() as s:
        s.exec(text("DELETE FROM generationlora"))
        s.commit()
    assert query(db, lora="style_a") == []
    assert backfill_lora_index(db, batch=1) == 1
    assert backfill_lora_index(db) == 0
    assert query(db, lora="style_a") == [old.id] and plain.id in query(db)


def test_create_all_adds_new_columns_and_indexes_to_an_old_database(tmp_path, outputs):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    db.create_all()
    with db.engine.begin() as c:  # the schema as it was before the gallery
        for stmt in (
            "DROP TABLE generationlora",
            "DROP INDEX ix_generation_character",
            "DROP INDEX ix_generation_gallery",
            "DROP INDEX ix_generation_model_gallery",
            "DROP INDEX ix_generation_mode_gallery",
            "ALTER TABLE generation DROP COLUMN character",
            "ALTER TABLE generation DROP COLUMN trashed_at",
        ):
            c.exec_driver_sql(stmt)
    db.dispose()
    db = Database(url)
    db.create_all()
    insp = inspect(db.engine)
    assert {"character", "trashed_at"} <= {c["name"] for c in insp.get_columns("generation")}
    indexes = {i["name"] for i in insp.get_indexes("generation")}
    assert {
        "ix_generation_gallery",
        "ix_generation_model_gallery",
        "ix_generation_mode_gallery",
        "ix_generation_character",
    } <= indexes
    db.create_all()  # idempotent
    gen = add_image(db, outputs, loras=("x",), character="mira")
    assert query(db, lora="x", character="mira") == [gen.id]
    db.dispose()


def test_gallery_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, engine.gallery.records; heavy = {'gradio', 'torch', 'diffusers', 'PIL.Image'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert gallery.THUMB_SIZE == 256
