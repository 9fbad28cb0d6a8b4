"""Characters and projects: one source of truth for a character's look, and how it enters a prompt.

A character holds its trigger word, design prompt, negatives, style preset, default model and
generation style (sampler, steps, CFG, size; each inherited from its project unless overridden),
reference images and LoRA versions. `snapshot()` freezes what a job needs; `compose_prompt` /
`compose_negative` turn a snapshot plus the user's text into what the sampler sees:
trigger word + design prompt + prompt, and negatives merged (each term once, first spelling kept).

The effective negative prompt is the character's own negatives plus the terms its rejection history
maps to (`RejectionTerm`, editable), each shown with where it came from.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from engine.artifacts import atomic_write, lora_short_hash, safetensors_header, sha256_file
from engine.errors import InputError, NotFoundError
from engine.model_manager.pipelines import lora_format
from engine.paths import ModelRoots
from engine.requests import CharacterSnapshot, NegativeTerm
from engine.store.database import (
    Asset,
    Character,
    Database,
    DatasetItem,
    LoraFile,
    Project,
    RejectionTerm,
    ReviewAction,
    new_id,
    utcnow,
)

# Generation style keys a project or character may set; their defaults and checks come from GenerateRequest,
# handed in as StyleRules (engine.generation.request.GENERATION_STYLE): this room never imports generation.
STYLE_KEYS = ("model", "sampler", "steps", "cfg_scale", "width", "height", "clip_skip", "engine")


@dataclass(frozen=True)
class StyleRules:
    """What a project's or character's generation style is checked against."""

    defaults: Mapping[str, Any]  # each of STYLE_KEYS -> the request's default
    validate: Callable[..., Any]  # called with the style as keywords; InputError names field, value and range


# Structured rejection reasons (key -> label) and the negative terms each teaches by default.
REJECTION_REASONS: dict[str, str] = {
    "wrong_character": "wrong character",
    "bad_anatomy": "bad anatomy",
    "bad_hands": "bad hands",
    "blurry": "blurry",
    "off_style": "off-style",
    "wrong_outfit": "wrong outfit",
    "artifacts": "artifacts",
    "duplicate": "duplicate",
    "other": "other",
}
DEFAULT_REJECTION_TERMS: dict[str, str] = {
    "wrong_character": "",
    "bad_anatomy": "bad anatomy, deformed body, extra limbs, missing limbs",
    "bad_hands": "bad hands, extra fingers, missing fingers, fused fingers",
    "blurry": "blurry, out of focus, motion blur",
    "off_style": "inconsistent art style",
    "wrong_outfit": "wrong outfit",
    "artifacts": "jpeg artifacts, compression artifacts, noise, watermark",
    "duplicate": "",
    "other": "",
}
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:80].strip("-")
    return slug


def reason_key(reason: str) -> str:
    """A reason given as key ("bad_hands") or label ("bad hands") -> its key; anything else is refused."""
    r = str(reason).strip().lower()
    for key, label in REJECTION_REASONS.items():
        if r in (key, label, label.replace("-", " ")):
            return key
    raise InputError(
        f"rejection reason {reason!r} is unknown; allowed: {', '.join(REJECTION_REASONS.values())}"
    )


# --- prompt composition (pure) ----------------------------------------------------------------
def split_terms(text: str) -> list[str]:
    """Comma-separated terms, commas inside (), [], {} or <> kept: "(red, blue:1.2), x" -> 2 terms."""
    terms, depth, cur = [], 0, []
    for ch in text or "":
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth = max(0, depth - 1)
        if ch in ",\n" and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [" ".join(t.split()) for t in terms if t.strip()]


def merge_terms(*parts: str | list[str]) -> list[str]:
    """Terms of all parts in order, each once (case- and space-insensitive; the first spelling wins)."""
    out, seen = [], set()
    for part in parts:
        for term in split_terms(part) if isinstance(part, str) else part:
            key = " ".join(term.lower().split())
            if key and key not in seen:
                seen.add(key)
                out.append(term)
    return out


def compose_prompt(character: CharacterSnapshot | None, prompt: str) -> str:
    """trigger word + design prompt + the user's prompt (empty parts left out)."""
    if character is None:
        return prompt
    parts = [character.trigger_word, character.design_prompt, prompt]
    return ", ".join(p.strip() for p in parts if p and p.strip())


def compose_negative(character: CharacterSnapshot | None, negative: str) -> str:
    """The character's effective negatives merged with the user's (each term once)."""
    if character is None:
        return negative
    return ", ".join(merge_terms([t.term for t in character.negative_terms], negative))


# --- service ----------------------------------------------------------------------------------
def dataset_dir(outputs_dir: Path, character_id: str) -> Path:
    """Where a character's dataset images live."""
    return Path(outputs_dir) / "datasets" / character_id


@dataclass
class Characters:
    db: Database
    models_dir: Path
    style_rules: StyleRules

    # projects ---------------------------------------------------------------------------------
    def create_project(self, name: str, style: dict | None = None, slug: str = "") -> Project:
        name = _clean(name, "project name", 120)
        project = Project(
            name=name,
            slug=self._free_slug(Project, slug or name, "project"),
            style=check_style(style or {}, self.style_rules),
        )
        with self.db.session() as s:
            s.add(project)
            s.commit()
        return project

    def update_project(self, ref: str, name: str | None = None, style: dict | None = None) -> Project:
        with self.db.session() as s:
            project = self._get(s, Project, ref, "project")
            if name is not None:
                project.name = _clean(name, "project name", 120)
            if style is not None:
                project.style = check_style(style, self.style_rules)
            project.updated_at = utcnow()
            s.add(project)
            s.commit()
            return project

    def projects(self) -> list[Project]:
        with self.db.session() as s:
            return list(s.exec(select(Project).order_by(Project.name)))

    def project(self, ref: str) -> Project:
        with self.db.session() as s:
            return self._get(s, Project, ref, "project")

    # characters -------------------------------------------------------------------------------
    def create(self, values: dict[str, Any]) -> Character:
        values = dict(values)
        name = _clean(values.pop("name", ""), "name", 120)
        slug = values.pop("slug", "") or ""
        with self.db.session() as s:
            character = Character(name=name, slug=self._free_slug(Character, slug or name, "character", s))
            self._apply(s, character, values)
            s.add(character)
            s.commit()
            return character

    def update(self, ref: str, values: dict[str, Any]) -> Character:
        """Change some fields; the revision grows. Past jobs keep the snapshot they were submitted with."""
        values = dict(values)
        with self.db.session() as s:
            character = self._get(s, Character, ref, "character")
            if "name" in values:
                character.name = _clean(values.pop("name"), "name", 120)
            if values.get("slug") and values["slug"] != character.slug:
                character.slug = self._free_slug(Character, values.pop("slug"), "character", s)
            values.pop("slug", None)
            self._apply(s, character, values)
            character.revision += 1
            character.updated_at = utcnow()
            s.add(character)
            s.commit()
            return character

    def _apply(self, s, character: Character, values: dict[str, Any]) -> None:
        limits = {"trigger_word": 80, "design_prompt": 4000, "negative_prompt": 4000, "style_preset": 100}
        for key, value in values.items():
            if key in limits:
                text = (
                    " ".join(str(value or "").split()) if key == "trigger_word" else str(value or "").strip()
                )
                if len(text) > limits[key]:
                    raise InputError(f"{key} is {len(text)} characters long; at most {limits[key]}")
                if key == "trigger_word" and "," in text:
                    raise InputError(f"trigger_word={text!r} must not contain commas (it is one prompt term)")
                setattr(character, key, text)
            elif key == "project":
                character.project_id = self._get(s, Project, value, "project").id if value else None
            elif key == "style":
                character.style = check_style(value or {}, self.style_rules)
            elif key == "lora_weight":
                weight = float(value)
                if not -4 <= weight <= 4:
                    raise InputError(f"lora_weight={weight!r}; allowed: -4 to 4")
                character.lora_weight = weight
            elif key == "active_lora":
                character.active_lora_id = self._lora_of(s, character, value).id if value else None
            elif key == "references":
                character.references = [str(p) for p in value or []]
            else:
                raise InputError(
                    f"character field {key!r} is unknown; allowed: name, slug, "
                    f"{', '.join(limits)}, project, style, lora_weight, active_lora, references"
                )

    def get(self, ref: str) -> Character:
        with self.db.session() as s:
            return self._get(s, Character, ref, "character")

    def list(self, project: str = "") -> list[Character]:
        with self.db.session() as s:
            q = select(Character).order_by(Character.name)
            if project:
                q = q.where(Character.project_id == self._get(s, Project, project, "project").id)
            return list(s.exec(q))

    def delete(self, ref: str, outputs_dir: Path) -> dict:
        """The character, its dataset (rows and files) and review history; its LoRA files stay (detached)."""
        with self.db.session() as s:
            character = self._get(s, Character, ref, "character")
            items = list(s.exec(select(DatasetItem).where(DatasetItem.character_id == character.id)))
            for item in items:
                s.delete(item)
            for action in s.exec(select(ReviewAction).where(ReviewAction.character_id == character.id)):
                s.delete(action)
            for lora in s.exec(select(LoraFile).where(LoraFile.character_id == character.id)):
                lora.character_id = None
                s.add(lora)
            s.delete(character)
            s.commit()

        with self.db.session() as s:  # its reference sheets (rows, then files)
            sheets = list(s.exec(select(Asset).where(Asset.character_id == character.id)))
            for asset in sheets:
                s.delete(asset)
            s.commit()
        for asset in sheets:
            Path(asset.path).unlink(missing_ok=True)
        shutil.rmtree(dataset_dir(outputs_dir, character.id), ignore_errors=True)
        shutil.rmtree(Path(outputs_dir) / "characters" / character.id, ignore_errors=True)  # reference images
        return {"deleted": character.slug, "dataset_items": len(items), "sheets": len(sheets)}

    def effective_style(self, character: Character) -> dict[str, dict[str, Any]]:
        """key -> {"value", "source"}: GenerateRequest's default, then the project's, then the character's."""
        out = {k: {"value": self.style_rules.defaults[k], "source": "default"} for k in STYLE_KEYS}
        if character.project_id:
            with self.db.session() as s:
                project = s.get(Project, character.project_id)
            for k, v in (project.style if project else {}).items():
                out[k] = {"value": v, "source": f"project {project.name}"}
        for k, v in character.style.items():
            out[k] = {"value": v, "source": "character"}
        return out

    def effective_negative(self, character: Character) -> list[NegativeTerm]:
        """The character's negatives, then the terms its rejections map to (most frequent reason first)."""
        terms: list[NegativeTerm] = []
        seen: set[str] = set()

        def add(term: str, source: str) -> None:
            key = " ".join(term.lower().split())
            if key and key not in seen:
                seen.add(key)
                terms.append(NegativeTerm(term=term, source=source))

        for term in split_terms(character.negative_prompt):
            add(term, "character")
        counts = self.rejection_counts(character.id)
        mapping = self.rejection_terms()
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            for term in split_terms(mapping.get(reason, "")):
                add(term, f"rejected: {REJECTION_REASONS[reason]} x{n}")
        return terms

    def rejection_counts(self, character_id: str) -> Counter:
        with self.db.session() as s:
            rows = s.exec(
                select(DatasetItem.reasons).where(
                    DatasetItem.character_id == character_id, DatasetItem.status == "rejected"
                )
            )
            return Counter(r for reasons in rows for r in reasons or [] if r in REJECTION_REASONS)

    def rejection_terms(self) -> dict[str, str]:
        """reason key -> negative terms (the editable mapping; defaults until edited)."""
        mapping = dict(DEFAULT_REJECTION_TERMS)
        with self.db.session() as s:
            for row in s.exec(select(RejectionTerm)):
                if row.reason in mapping:
                    mapping[row.reason] = row.terms
        return mapping

    def set_rejection_terms(self, mapping: dict[str, str]) -> dict[str, str]:
        cleaned = {reason_key(k): ", ".join(split_terms(str(v or ""))) for k, v in mapping.items()}
        for key, terms in cleaned.items():
            if len(terms) > 2000:
                raise InputError(
                    f"terms for {REJECTION_REASONS[key]!r} are {len(terms)} characters; at most 2000"
                )
        with self.db.session() as s:
            for key, terms in cleaned.items():
                row = s.get(RejectionTerm, key) or RejectionTerm(reason=key)
                row.terms = terms
                s.add(row)
            s.commit()
        return self.rejection_terms()

    def snapshot(self, ref: str, lora: str | None = None) -> CharacterSnapshot:
        """What a job keeps of the character (see CharacterSnapshot). `lora`: a LoRA version id or name
        to use instead of the active one; "" for none."""
        character = self.get(ref)
        lora_info = None
        lora_ref = character.active_lora_id if lora is None else lora
        if lora_ref:
            with self.db.session() as s:
                row = self._lora_of(s, character, lora_ref)
            lora_info = {
                "id": row.id,
                "name": row.name,
                "version": row.version,
                "weight": character.lora_weight,
                "hash": row.short_hash,
            }
        return CharacterSnapshot(
            id=character.id,
            slug=character.slug,
            name=character.name,
            revision=character.revision,
            trigger_word=character.trigger_word,
            design_prompt=character.design_prompt,
            negative_terms=self.effective_negative(character),
            lora=lora_info,
        )

    # LoRA versions ----------------------------------------------------------------------------
    def add_lora(
        self, source: Path, name: str = "", character: str = "", set_active: bool = True
    ) -> LoraFile:
        """Validate an uploaded LoRA (.safetensors only; pickles refused), read its metadata, hash it,
        copy it into models/loras and register it (as the character's next version when given)."""
        source = Path(source)
        info = inspect_lora(source)
        stem = slugify(name or source.stem).replace("-", "_") or "lora"
        if not SLUG.match(stem.replace("_", "-")):
            raise InputError(f"LoRA name {name!r}: use letters, digits, '-' or '_'")
        folder = self.models_dir / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{stem}.safetensors"
        with self.db.session() as s:
            owner = self._get(s, Character, character, "character") if character else None

            taken = s.exec(select(LoraFile).where(LoraFile.name == stem)).first() is not None
            if taken or target.exists() or stem in ModelRoots(self.models_dir).list_files("loras"):
                raise InputError(f"a LoRA named {stem!r} already exists in models/loras; pick another name")
            version = 1
            if owner is not None:
                versions = s.exec(select(LoraFile.version).where(LoraFile.character_id == owner.id)).all()
                version = max(versions, default=0) + 1
        staged = folder / f".tmp-{stem}-{new_id()}.safetensors"
        with atomic_write(staged) as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
        try:
            os.link(staged, target)  # the final name is created exclusively: two uploads never share it
        except FileExistsError:
            raise InputError(
                f"a LoRA named {stem!r} already exists in models/loras; pick another name"
            ) from None
        finally:
            staged.unlink(missing_ok=True)
        try:
            row = LoraFile(
                name=stem,
                character_id=owner.id if owner else None,
                version=version,
                format=lora_format(target),
                sha256=sha256_file(target),
                short_hash=lora_short_hash(target),
                size=target.stat().st_size,
                base_model=info["base_model"],
                meta=info["metadata"],
                source="upload",
            )
            with self.db.session() as s:
                s.add(row)
                if owner is not None and set_active:
                    owner = s.get(Character, owner.id)
                    owner.active_lora_id = row.id
                    owner.revision += 1
                    owner.updated_at = utcnow()
                    s.add(owner)
                s.commit()
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return row

    def register_lora(self, name: str, character: str = "", set_active: bool = True) -> LoraFile:
        """Attach a LoRA already in models/loras (by its list name) to a character as its next version."""
        roots = ModelRoots(self.models_dir)
        path = roots.resolve("loras", name, roots.list_files("loras"))
        info = inspect_lora(path)
        with self.db.session() as s:
            row = s.exec(select(LoraFile).where(LoraFile.name == name)).first()
            owner = self._get(s, Character, character, "character") if character else None
            if row is None:
                row = LoraFile(
                    name=name,
                    format=lora_format(path),
                    sha256=sha256_file(path),
                    short_hash=lora_short_hash(path),
                    size=path.stat().st_size,
                    base_model=info["base_model"],
                    meta=info["metadata"],
                    source="upload",
                )
            if owner is not None and row.character_id not in (None, owner.id):
                other = s.get(Character, row.character_id)
                raise InputError(
                    f"LoRA {name!r} is a version of {other.slug if other else row.character_id!r}; "
                    "upload a copy under another name to use it for this character"
                )
            if owner is not None and row.character_id != owner.id:
                versions = s.exec(select(LoraFile.version).where(LoraFile.character_id == owner.id)).all()
                row.character_id, row.version = owner.id, max(versions, default=0) + 1
                if set_active:
                    owner.active_lora_id = row.id
                    owner.revision += 1
                    s.add(owner)
            s.add(row)
            s.commit()
            return row

    def loras(self, character: str = "") -> list[LoraFile]:
        with self.db.session() as s:
            q = select(LoraFile).order_by(LoraFile.name)
            if character:
                owner = self._get(s, Character, character, "character")
                q = select(LoraFile).where(LoraFile.character_id == owner.id).order_by(col(LoraFile.version))
            return list(s.exec(q))

    def delete_lora(self, ref: str) -> str:
        """Remove a registered LoRA: its row (and any character's pointer to it), then its file."""
        roots = ModelRoots(self.models_dir)
        with self.db.session() as s:
            row = s.get(LoraFile, ref) or s.exec(select(LoraFile).where(LoraFile.name == ref)).first()
            if row is None:
                raise NotFoundError(f"LoRA {ref!r} is not registered")
            path = roots.list_files("loras").get(row.name)
            for character in s.exec(select(Character).where(Character.active_lora_id == row.id)):
                character.active_lora_id = None
                character.revision += 1
                s.add(character)
            s.delete(row)
            s.commit()
        if path is not None:
            path.unlink(missing_ok=True)
        return row.name

    # helpers ------------------------------------------------------------------------------------
    def _lora_of(self, s, character: Character, ref: str) -> LoraFile:
        row = s.get(LoraFile, ref) or s.exec(select(LoraFile).where(LoraFile.name == ref)).first()
        if row is None or row.character_id != character.id:
            names = [r.name for r in s.exec(select(LoraFile).where(LoraFile.character_id == character.id))]
            raise NotFoundError(
                f"LoRA {ref!r} is not a version of {character.slug!r}; its versions: "
                f"{', '.join(names) or 'none yet'}"
            )
        return row

    def _get(self, s, table, ref: str, what: str):
        ref = str(ref or "").strip()
        row = s.get(table, ref) if ref else None
        if row is None and ref:
            row = s.exec(select(table).where(table.slug == ref)).first()
        if row is None:
            names = [r.slug for r in s.exec(select(table).order_by(table.slug).limit(20))]
            raise NotFoundError(f"{what} {ref!r} not found; {what}s: {', '.join(names) or 'none yet'}")
        return row

    def _free_slug(self, table, wanted: str, what: str, s=None) -> str:
        base = slugify(wanted)
        if not base:
            raise InputError(f"{what} {wanted!r} needs at least one letter or digit for its slug")
        if s is None:
            with self.db.session() as s2:
                return self._free_slug(table, wanted, what, s2)
        slug, n = base, 2
        while s.exec(select(table).where(table.slug == slug)).first() is not None:
            slug, n = f"{base[:75]}-{n}", n + 1
        return slug


def check_style(style: dict, rules: StyleRules) -> dict:
    """Only generation-style keys, each validated as GenerateRequest validates it (`rules.validate`)."""
    style = {k: v for k, v in dict(style).items() if v not in (None, "")}
    unknown = set(style) - set(STYLE_KEYS)
    if unknown:
        raise InputError(
            f"style keys {', '.join(sorted(unknown))} are unknown; allowed: {', '.join(STYLE_KEYS)}"
        )
    rules.validate(**style)  # names the bad field, value and range
    return style


def inspect_lora(path: Path) -> dict:
    """A LoRA file's format, metadata (ss_* / modelspec.*) and base model; anything that is not a
    plain-LoRA .safetensors (a pickle, a truncated or corrupt file, LyCORIS) is refused by name."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(
            f"{path.name}: a LoRA must be a .safetensors file; pickled .ckpt/.pt/.bin LoRAs are "
            "refused because loading them can run code"
        )
    try:
        _, header = safetensors_header(path)
        with safe_open(str(path), framework="pt") as f:  # checks every tensor's offsets against the file
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a valid safetensors file"
        raise InputError(f"{path.name} is not a valid .safetensors file: {e}") from None
    if not keys:
        raise InputError(f"{path.name} holds no tensors")
    fmt = lora_format(path)
    meta = {
        k: str(v)[:2000]
        for k, v in (header.get("__metadata__") or {}).items()
        if k.startswith(("ss_", "modelspec.", "sshs_"))
    }
    base = (
        meta.get("ss_sd_model_name")
        or meta.get("modelspec.architecture")
        or meta.get("ss_base_model_version", "")
    )
    return {"format": fmt, "metadata": meta, "base_model": str(base)[:200], "tensors": len(keys)}


def _clean(value: str, what: str, limit: int) -> str:
    value = " ".join(str(value or "").split())
    if not value or len(value) > limit:
        raise InputError(f"{what}={value!r} must be 1-{limit} characters")
    return value
