"""A LoRA training request, checked before a job exists, for the trainer the caller picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.characters.characters import Characters
from engine.errors import InputError
from engine.model_manager.inventory import ModelInventory
from engine.settings import Settings
from engine.store.database import Database
from engine.training.job import TrainJobRequest, build_train_request
from engine.training.kohya import TRAINING_BACKENDS, build_kohya_request


@dataclass(frozen=True)
class TrainingService:
    settings: Settings
    db: Database
    characters: Characters
    models: ModelInventory
    device: str

    def train_request(self, values: dict[str, Any]) -> tuple[str, TrainJobRequest]:
        """(job kind, request) for a LoRA on a character's approved images (see engine.training.job).
        values["backend"]: "builtin" (default) or "kohya" (a configured sd-scripts; engine.training.kohya)."""
        values = dict(values)
        backend = values.pop("backend", None) or "builtin"
        if backend not in TRAINING_BACKENDS:
            raise InputError(f"backend={backend!r}; allowed: {', '.join(TRAINING_BACKENDS)}")
        kind, build = (
            ("train_lora_kohya", build_kohya_request)
            if backend == "kohya"
            else ("train_lora", build_train_request)
        )
        req = build(
            values,
            settings=self.settings,
            db=self.db,
            characters=self.characters,
            models=self.models,
            device=self.device,
        )
        return kind, req
