"""The database: SQLModel tables and the one object that owns the engine and sessions.

SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE write transactions (SQLAlchemy's pysqlite
recipe) so concurrent writers queue instead of failing with "database is locked". Those tricks are
applied only for the sqlite dialect; the same code runs on PostgreSQL by URL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Index, MetaData, case, event, inspect, update
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateColumn, CreateTable
from sqlmodel import JSON, Column, Field, Session, SQLModel, create_engine, select

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "interrupted"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Job(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    kind: str = Field(index=True, max_length=40)
    # queued | running | succeeded | failed | cancelled | interrupted
    status: str = Field(default="queued", index=True, max_length=16)
    owner: str = Field(default="anonymous", index=True, max_length=120)
    cancel_token_hash: str = Field(default="", max_length=64)
    request: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    progress: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str = Field(default="")
    error_type: str = Field(default="", max_length=60)
    device: str = Field(default="", max_length=20)
    model_key: str = Field(default="", index=True, max_length=200)
    attempt: int = 1
    max_attempts: int = 3
    retry_of: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    run_seconds: float = 0.0
    gpu_seconds: float = 0.0
    cancel_requested: bool = False


class Asset(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    kind: str = Field(index=True, max_length=20)  # image, video, audio, model, ...
    path: str = Field(unique=True)
    sha256: str = Field(index=True, max_length=64)
    size: int = 0
    width: int | None = None
    height: int | None = None
    job_id: str | None = Field(default=None, index=True, max_length=32)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    character_id: str | None = Field(default=None, index=True, max_length=32)  # a character's sheet


class Generation(SQLModel, table=True):
    """The recipe of one image: everything needed to make it again."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    asset_id: str = Field(index=True, max_length=32)
    job_id: str = Field(index=True, max_length=32)
    mode: str = Field(max_length=16)  # txt2img / img2img
    model: str = Field(max_length=200)
    model_hash: str = Field(index=True, max_length=10)
    prompt: str = ""
    negative_prompt: str = ""
    # None where they do not apply: an upscale by a model, a camera clip, a video's missing sampler
    seed: int | None = Field(default=None, index=True)
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = Field(default=None, max_length=40)
    width: int
    height: int
    denoising_strength: float | None = None
    clip_skip: int = 1
    loras: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    infotext: str = ""
    recipe: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    character: str | None = Field(default=None, index=True, max_length=200)
    trashed_at: datetime | None = None  # set by the gallery's trash; the row and files go on empty_trash

    # The gallery lists untrashed rows newest first, alone or filtered by model or mode: index-ordered
    # pages and index-only counts.
    __table_args__ = (
        Index("ix_generation_gallery", "trashed_at", "created_at", "id"),
        Index("ix_generation_model_gallery", "model", "trashed_at", "created_at"),
        Index("ix_generation_mode_gallery", "mode", "trashed_at", "created_at"),
    )


class GenerationLora(SQLModel, table=True):
    """One LoRA name used by a generation: an indexed, dialect-neutral copy of `Generation.loras`
    (written in the same transaction as the Generation row) for the gallery's LoRA filter."""

    generation_id: str = Field(
        foreign_key="generation.id", ondelete="CASCADE", primary_key=True, max_length=32
    )
    name: str = Field(primary_key=True, max_length=200)

    __table_args__ = (Index("ix_generationlora_name", "name", "generation_id"),)


class MediaCollection(SQLModel, table=True):
    """A named group of library videos or audios (the variant generator picks whole collections)."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    kind: str = Field(index=True, max_length=10)  # video | audio
    name: str = Field(max_length=120)
    created_at: datetime = Field(default_factory=utcnow)

    __table_args__ = (Index("ux_mediacollection_kind_name", "kind", "name", unique=True),)


class MediaItem(SQLModel, table=True):
    """A video, audio or image in the media library; its file lives under <data>/library/."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    kind: str = Field(index=True, max_length=10)  # video | audio | image
    name: str = Field(index=True, max_length=200)
    path: str = Field(unique=True)
    size: int = 0
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    has_audio: bool = False
    tags: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    collection_id: str | None = Field(
        default=None, foreign_key="mediacollection.id", ondelete="SET NULL", index=True, max_length=32
    )
    thumbnail: str = ""  # a poster frame (video/image) or a waveform (audio), beside the file
    sha256: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Hook(SQLModel, table=True):
    """A short text (a hook line) with a category, overlaid on variants."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    text: str = Field(max_length=500)
    category: str = Field(default="general", index=True, max_length=80)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Project(SQLModel, table=True):
    """A group of characters with its own default generation style (characters inherit it)."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(max_length=120)
    slug: str = Field(unique=True, max_length=80)
    style: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Character(SQLModel, table=True):
    """The single source of truth for a character's look. `revision` grows with every edit; a job keeps
    the snapshot it was submitted with, so editing never rewrites a past image's recipe."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    project_id: str | None = Field(
        default=None, foreign_key="project.id", ondelete="SET NULL", index=True, max_length=32
    )
    name: str = Field(max_length=120)
    slug: str = Field(unique=True, max_length=80)
    trigger_word: str = Field(default="", max_length=80)
    design_prompt: str = Field(default="", max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    style_preset: str = Field(default="", max_length=100)  # a style of styles.csv
    style: dict = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )  # overrides of the project's
    references: list = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )  # paths under outputs/
    active_lora_id: str | None = Field(default=None, max_length=32)
    lora_weight: float = 0.8
    revision: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class LoraFile(SQLModel, table=True):
    """A LoRA file under models/loras registered with StudioNOVA (uploaded or trained), with its
    metadata and hashes; attached to a character it is one of the character's LoRA versions."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(unique=True, max_length=200)  # path under models/loras, as the LoRA list names it
    character_id: str | None = Field(
        default=None, foreign_key="character.id", ondelete="SET NULL", index=True, max_length=32
    )
    version: int = 1
    format: str = Field(default="", max_length=20)  # kohya | diffusers
    sha256: str = Field(default="", max_length=64)
    short_hash: str = Field(default="", max_length=12)  # A1111's LoRA hash
    size: int = 0
    base_model: str = Field(default="", max_length=200)
    meta: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # ss_* / modelspec.*
    source: str = Field(default="upload", max_length=20)  # upload | trained
    created_at: datetime = Field(default_factory=utcnow)


class DatasetItem(SQLModel, table=True):
    """One image of a character's training set, with where it came from and its review state."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    character_id: str = Field(foreign_key="character.id", ondelete="CASCADE", index=True, max_length=32)
    path: str = Field(unique=True)
    sha256: str = Field(max_length=64)
    phash: str = Field(default="", max_length=32)
    width: int = 0
    height: int = 0
    source: str = Field(default="", max_length=1000)
    status: str = Field(default="pending", index=True, max_length=10)  # pending | approved | rejected
    reasons: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reason_text: str = Field(default="", max_length=1000)
    caption: str = Field(default="", max_length=4000)
    generation_id: str | None = Field(default=None, index=True, max_length=32)
    regenerated_by: str | None = Field(default=None, max_length=32)  # the job that re-rendered it
    created_at: datetime = Field(default_factory=utcnow, index=True)
    reviewed_at: datetime | None = None

    __table_args__ = (
        Index("ux_datasetitem_character_sha", "character_id", "sha256", unique=True),
        Index("ix_datasetitem_queue", "character_id", "status", "created_at"),
    )


class ReviewAction(SQLModel, table=True):
    """One approve/reject/reset over some items, with their state before it: undo puts it back."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    character_id: str = Field(index=True, max_length=32)
    action: str = Field(max_length=10)
    before: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    undone_at: datetime | None = None


class RejectionTerm(SQLModel, table=True):
    """The editable mapping from a rejection reason to negative-prompt terms."""

    reason: str = Field(primary_key=True, max_length=40)
    terms: str = Field(default="", max_length=2000)


class FileHash(SQLModel, table=True):
    """SHA-256 of a file, cached by path + size + mtime (hashing multi-GB weights is slow)."""

    path: str = Field(primary_key=True)
    size: int
    mtime_ns: int
    sha256: str = Field(max_length=64)


SAMPLING_COLUMNS = ("seed", "steps", "cfg_scale", "sampler")
IMAGE_MODES = ("txt2img", "img2img", "inpaint", "outpaint")  # GenerateRequest.mode: always sampled


def _sampling_zeros_to_null():
    """Old upscale/video rows wrote 0 / "" for sampling they never did (steps 0: no diffusion ran); a real
    generation always has steps >= 1, so only those placeholders change."""
    g = Generation.__table__.c
    return (
        update(Generation.__table__)
        .where(g.mode.not_in(IMAGE_MODES), g.steps == 0)
        .values(
            seed=None,
            steps=None,
            cfg_scale=None,
            sampler=case((g.sampler == "", None), else_=g.sampler),
        )
    )


def _sqlite_pragmas_and_immediate(engine: Engine) -> None:
    # SQLAlchemy pysqlite recipe: let SQLAlchemy own BEGIN so writes take the lock up front.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the SQLAlchemy engine; hands out short sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"json_serializer": lambda v: json.dumps(v, default=str)}
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if is_sqlite:
            _sqlite_pragmas_and_immediate(self.engine)
        self.is_sqlite = is_sqlite

    def create_all(self) -> None:
        SQLModel.metadata.create_all(self.engine)
        self._add_new_columns_and_indexes()
        self._relax_generation_sampling_columns()

    def _add_new_columns_and_indexes(self) -> None:
        """create_all makes missing tables but never alters existing ones: add the columns and indexes
        a table gained after an older StudioNOVA created it. Only nullable (or server-defaulted) columns
        can be added, so existing rows stay valid; anything else is refused by name."""
        insp = inspect(self.engine)
        tables = [t for t in SQLModel.metadata.sorted_tables if insp.has_table(t.name)]
        missing = {
            t.name: [c for c in t.columns if c.name not in {x["name"] for x in insp.get_columns(t.name)}]
            for t in tables
        }
        preparer = self.engine.dialect.identifier_preparer
        with self.engine.begin() as conn:
            for table in tables:
                for col in missing[table.name]:
                    if not col.nullable and col.server_default is None:
                        raise RuntimeError(
                            f"column {table.name}.{col.name} is new and NOT NULL without a "
                            "server default; it cannot be added to existing rows"
                        )
                    ddl = CreateColumn(col).compile(dialect=self.engine.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {ddl}")
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    def _relax_generation_sampling_columns(self) -> None:
        """Migration: Generation's seed/steps/cfg_scale/sampler were NOT NULL, so upscale and video rows held
        zeros where no sampling happened. Make them nullable (SQLite cannot ALTER COLUMN: the table is
        rebuilt, copied, dropped and renamed in one transaction) and turn those zeros into NULL. Does nothing
        once the columns are nullable."""
        strict = [
            c["name"]
            for c in inspect(self.engine).get_columns("generation")
            if c["name"] in SAMPLING_COLUMNS and not c["nullable"]
        ]
        if not strict:
            return
        table = Generation.__table__
        preparer = self.engine.dialect.identifier_preparer
        name = preparer.format_table(table)
        if not self.is_sqlite:
            with self.engine.begin() as conn:
                alters = ", ".join(f"ALTER COLUMN {preparer.quote(c)} DROP NOT NULL" for c in strict)
                conn.exec_driver_sql(f"ALTER TABLE {name} {alters}")
                conn.execute(_sampling_zeros_to_null())
            return
        # foreign_keys must be off while the table is swapped (or dropping it would cascade to
        # GenerationLora), and that pragma is ignored inside a transaction: set it on the bare connection.
        with self.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            raw.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    new = table.to_metadata(MetaData(), name="generation_migrating")
                    conn.execute(CreateTable(new))  # the table only: index names are taken until the drop
                    cols = ", ".join(preparer.quote(c.name) for c in table.columns)
                    conn.exec_driver_sql(
                        f"INSERT INTO generation_migrating ({cols}) SELECT {cols} FROM {name}"
                    )
                    conn.exec_driver_sql(f"DROP TABLE {name}")
                    conn.exec_driver_sql(f"ALTER TABLE generation_migrating RENAME TO {name}")
                    for index in table.indexes:
                        index.create(conn)
                    conn.execute(_sampling_zeros_to_null())
                    if conn.exec_driver_sql("PRAGMA foreign_key_check(generationlora)").first() is not None:
                        raise RuntimeError("generation table migration broke a foreign key; rolled back")
            finally:
                raw.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def jobs(self, limit: int = 200) -> list[Job]:
        with self.session() as s:
            return list(s.exec(select(Job).order_by(Job.created_at.desc()).limit(limit)))

    def dispose(self) -> None:
        self.engine.dispose()
