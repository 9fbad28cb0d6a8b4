"""Generations made for a character's dataset: re-rendering its rejected images with the negatives their
rejections taught, and the checked request of a reference sheet. Generation's side of the characters room
(which never imports this one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.characters.characters import Characters, compose_negative, merge_terms
from engine.characters.datasets import Datasets
from engine.errors import InputError
from engine.generation.reference_sheet import ReferenceSheetRequest
from engine.generation.submit import GenerationService
from engine.jobs.service import JobService
from engine.store.database import Database, Generation


@dataclass(frozen=True)
class CharacterJobs:
    db: Database
    characters: Characters
    datasets: Datasets
    generation: GenerationService

    def regenerate_rejected(self, jobs: JobService, character: str, owner: str = "anonymous") -> dict:
        """Re-render the character's rejected generated images with its refined negatives (same recipe and
        seed); the new images join the review queue."""
        c = self.characters.get(character)
        submitted, skipped = [], []
        for item in self.datasets.rejected_generations(c.id):
            with self.db.session() as s:
                gen = s.get(Generation, item.generation_id)
            recipe = (gen.recipe or {}) if gen else {}
            if (
                not gen
                or recipe.get("mode") != "txt2img"
                or "request" not in recipe
                or recipe.get("ip_adapter")
            ):
                skipped.append(
                    {
                        "id": item.id,
                        "reason": "only txt2img generations without an IP-Adapter image can "
                        "be re-rendered from their recipe (source images are not kept)",
                    }
                )
                continue
            values = dict(
                recipe["request"],
                seed=gen.seed,
                batch_size=1,
                batch_count=1,
                character=c.id,
                dataset_review=True,
            )
            # the character's LoRA comes from its current snapshot, not from the old recipe
            old_lora = ((recipe.get("character") or {}).get("lora") or {}).get("name")
            values["loras"] = [x for x in values.get("loras") or [] if x.get("name") != old_lora]
            try:
                req = self.generation.build_generate_request(values)
            except InputError as e:  # a model or LoRA of the recipe is gone: this item only
                skipped.append({"id": item.id, "reason": str(e)})
                continue

            if merge_terms(compose_negative(req.character, req.negative_prompt)) == merge_terms(
                gen.negative_prompt
            ):
                skipped.append(
                    {
                        "id": item.id,
                        "reason": "its rejection taught no new negative terms (edit the "
                        "mapping of its reasons), so a re-render would give the same picture",
                    }
                )
                continue
            jid, _ = jobs.submit(req.job_kind, req, owner=owner)
            self.datasets.mark_regenerated(item.id, jid)
            submitted.append({"item_id": item.id, "job_id": jid})
        return {
            "jobs": submitted,
            "skipped": skipped,
            "negative_prompt": ", ".join(t.term for t in self.characters.effective_negative(c)),
        }

    def reference_sheet_request(self, values: dict[str, Any]) -> ReferenceSheetRequest:
        """values: character, views, expressions, seed, prompt, source_image (img2img), use_ip_adapter,
        ip_adapter_scale, denoising_strength, add_to_dataset, plus any generation field; the character's
        effective style fills what is not given."""
        values = {k: v for k, v in values.items() if v is not None}
        c = self.characters.get(values.get("character") or "")
        sheet_keys = ("views", "expressions", "add_to_dataset")
        sheet = {k: values.pop(k) for k in sheet_keys if k in values}
        base = {k: v["value"] for k, v in self.characters.effective_style(c).items()}
        base.update(values)
        base["character"] = c.id
        source = base.pop("source_image", None)
        use_ip = bool(base.pop("use_ip_adapter", False))
        if source and not use_ip:
            base["init_image"] = source
        elif source:
            base["ip_adapter_image"] = source
        elif use_ip:
            raise InputError("use_ip_adapter needs a source_image")
        req = self.generation.build_generate_request(base)
        return ReferenceSheetRequest.build(base=req, **sheet)
