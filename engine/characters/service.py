"""The Characters and Review tabs' engine side: what a character looks like to the UI, saving it with its
reference images, and the checked requests of its dataset jobs (ingest, captions); the generations made for it (reference
sheets, re-rendering rejected images) are engine.generation.character_jobs'."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import select

from engine.characters import captioning, ingest
from engine.characters.captioning import VisionConfig
from engine.characters.characters import Characters
from engine.characters.datasets import CaptionRequest, Datasets, IngestRequest
from engine.errors import InputError
from engine.settings import Settings
from engine.store.database import Asset, Database, LoraFile, Project
from engine.uploads import checked_upload, outputs_relative


def lora_public(row: LoraFile) -> dict:
    """A character's LoRA version as the UI and API show it."""
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "format": row.format,
        "short_hash": row.short_hash,
        "sha256": row.sha256,
        "size": row.size,
        "base_model": row.base_model,
        "metadata": row.meta,
        "source": row.source,
    }


@dataclass(frozen=True)
class CharacterService:
    settings: Settings
    db: Database
    characters: Characters
    datasets: Datasets

    def readiness(self, character_id: str) -> dict:
        return self.datasets.readiness(character_id, self.settings.min_approved_images)

    def character_view(self, ref: str) -> dict:
        """Everything the Characters tab shows of one character (no server paths)."""
        chars = self.characters
        c = chars.get(ref)
        project = None
        if c.project_id:
            with self.db.session() as s:
                p = s.get(Project, c.project_id)
                project = p.slug if p else None
        with self.db.session() as s:
            sheets = [
                outputs_relative(self.settings, a.path)
                for a in s.exec(
                    select(Asset)
                    .where(Asset.kind == "sheet", Asset.character_id == c.id)
                    .order_by(Asset.created_at)
                )
            ]
        return {
            "id": c.id,
            "name": c.name,
            "slug": c.slug,
            "project": project,
            "trigger_word": c.trigger_word,
            "design_prompt": c.design_prompt,
            "negative_prompt": c.negative_prompt,
            "style_preset": c.style_preset,
            "style": c.style,
            "references": [outputs_relative(self.settings, p) for p in c.references],
            "active_lora": c.active_lora_id,
            "lora_weight": c.lora_weight,
            "revision": c.revision,
            "effective_style": chars.effective_style(c),
            "effective_negative": [t.model_dump() for t in chars.effective_negative(c)],
            "readiness": self.readiness(c.id),
            "loras": [lora_public(r) for r in chars.loras(c.id)],
            "sheets": sheets,
        }

    def list_characters(self, project: str = "") -> list[dict]:
        return [
            {
                "id": c.id,
                "slug": c.slug,
                "name": c.name,
                "trigger_word": c.trigger_word,
                **self.readiness(c.id),
            }
            for c in self.characters.list(project)
        ]

    def save_character(self, values: dict[str, Any], ref: str = "") -> dict:
        """Create (no ref) or update a character; reference images are copied into outputs/characters/."""
        values = {k: v for k, v in values.items() if v is not None}
        refs = values.pop("reference_images", None)
        chars = self.characters
        c = chars.update(ref, values) if ref else chars.create(values)
        if refs:
            try:
                self.add_references(c.id, refs)
            except InputError:
                if not ref:  # a new character with bad references is not half-created
                    chars.delete(c.id, self.settings.outputs_dir)
                raise
        return self.character_view(c.id)

    def add_references(self, ref: str, paths: list[str]) -> dict:
        """Validated copies of reference images (decodable PNG/JPEG/WebP) become the character's references."""
        c = self.characters.get(ref)
        folder = self.settings.outputs_dir / "characters" / c.id
        folder.mkdir(parents=True, exist_ok=True)
        uploads = [Path(checked_upload(self.settings, p, "reference image")) for p in paths]
        report = ingest.ingest_files(uploads, folder)
        if report.skipped:
            for cand in report.candidates:
                cand.path.unlink(missing_ok=True)
            raise InputError("; ".join(f"{s.source}: {s.reason}" for s in report.skipped))
        kept = [*c.references, *(str(cand.path) for cand in report.candidates)]
        self.characters.update(c.id, {"references": kept})
        return self.character_view(c.id)

    def ingest_request(self, values: dict[str, Any]) -> IngestRequest:
        values = dict(values)
        character = self.characters.get(values.pop("character", "") or values.get("character_id", ""))
        values["character_id"] = character.id
        values["files"] = [checked_upload(self.settings, p, "files") for p in values.get("files") or []]
        if values.get("folder"):  # outside the allowed roots / missing: refused before a job exists
            ingest.scan_folder(Path(values["folder"]).expanduser(), self.settings.ingest_root_paths, set())
            values["folder"] = str(Path(values["folder"]).expanduser().resolve())
        if values.get("url") and not str(values["url"]).lower().startswith(("http://", "https://")):
            raise InputError(f"url={values['url']!r}: only http:// and https:// URLs can be ingested")
        return IngestRequest.build(**values)

    def review(
        self, character: str, item_ids: list[str], action: str, reasons=None, reason_text: str = ""
    ) -> dict:
        c = self.characters.get(character)
        out = self.datasets.review(c.id, item_ids, action, reasons, reason_text)
        out["min_approved"] = self.settings.min_approved_images
        out["trainable"] = out["approved"] >= self.settings.min_approved_images
        return out

    def undo_review(self, character: str, action_id: str = "") -> dict:
        return self.datasets.undo(self.characters.get(character).id, action_id)

    def review_queue(
        self, character: str, status: str = "pending", page: int = 1, page_size: int = 50
    ) -> dict:
        c = self.characters.get(character)
        out = self.datasets.queue(c.id, status, page, page_size)
        out["readiness"] = self.readiness(c.id)
        return out

    def vision(self) -> VisionConfig | None:
        s = self.settings
        return VisionConfig.from_settings(s.vision_url, s.vision_model, s.vision_api_key)

    def caption_request(self, values: dict[str, Any]) -> CaptionRequest:
        if self.vision() is None:
            raise InputError(
                "auto-captioning needs a vision endpoint: start with --vision-url (for example "
                "http://127.0.0.1:11434/v1 for Ollama) and --vision-model"
            )
        values = dict(values)
        values["character_id"] = self.characters.get(
            values.pop("character", "") or values.get("character_id", "")
        ).id
        return CaptionRequest.build(**values)

    def suggest_character(self, item_id: str) -> dict:
        """Ask the vision endpoint which known character a dataset image shows."""
        config = self.vision()
        if config is None:
            raise InputError("character suggestions need a vision endpoint: start with --vision-url")
        item = self.datasets.item(item_id)
        chars = self.characters.list()
        choices = [
            (c.name, ", ".join(p for p in (c.trigger_word, c.design_prompt[:200]) if p)) for c in chars
        ]
        name = captioning.suggest_character(config, Path(item.path), choices)
        match = next((c for c in chars if c.name == name), None)
        return {
            "item_id": item_id,
            "suggested": match.slug if match else None,
            "current": next((c.slug for c in chars if c.id == item.character_id), None),
        }
