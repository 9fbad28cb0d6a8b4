"""The engine facade the UI and scripts use: submit, watch, query, cancel; each method a one-line hand-off
to its room, which gets explicit dependencies (built once in __post_init__), never this object. Never hands
out pipelines or sessions. Built by `Studio.start(settings)`; nothing happens at import time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.characters.characters import Characters
from engine.characters.datasets import Datasets
from engine.characters.service import CharacterService, lora_public
from engine.comfyui import service as comfy
from engine.comfyui.pool import parse_server_spec
from engine.device import resolve_device
from engine.gallery import records
from engine.gallery.export import export_image
from engine.generation.character_jobs import CharacterJobs
from engine.generation.request import GENERATION_STYLE, GenerateRequest
from engine.generation.styles import StyleBook
from engine.generation.submit import GenerationService, style_book
from engine.jobs.executor import InProcessExecutor
from engine.jobs.kinds import COMFY_QUEUE
from engine.jobs.service import JobService
from engine.jobs.wait import wait_for_result
from engine.media import service as media
from engine.media.library import Library
from engine.media.variants import library_root
from engine.model_manager.demo_model import ensure_demo_model
from engine.model_manager.downloads import DownloadRequest
from engine.model_manager.inventory import ModelInventory
from engine.paths import ModelRoots
from engine.registry import job_kinds
from engine.runtime import WorkerRuntime
from engine.settings import Settings
from engine.store.database import Database, Job
from engine.store.hashing import HashCache
from engine.store.usage import storage
from engine.training.resume import interrupted_trainings
from engine.training.submit import TrainingService
from engine.uploads import checked_upload, outputs_relative
from engine.upscale.job import list_upscalers
from engine.upscale.submit import build_upscale_request
from engine.version import app_version
from engine.video.submit import build_video_request, video_families, video_models

log = logging.getLogger(__name__)


@dataclass
class Studio:
    settings: Settings
    db: Database
    jobs: JobService
    executor: InProcessExecutor
    device: str
    dtype: str
    # the rooms' services, built once in __post_init__ from the parts above
    models: ModelInventory = field(init=False, repr=False)
    characters: Characters = field(init=False, repr=False)
    datasets: Datasets = field(init=False, repr=False)
    library: Library = field(init=False, repr=False)
    generator: GenerationService = field(init=False, repr=False)
    people: CharacterService = field(init=False, repr=False)
    character_jobs: CharacterJobs = field(init=False, repr=False)
    training: TrainingService = field(init=False, repr=False)

    def __post_init__(self) -> None:
        s, db = self.settings, self.db
        self.models = ModelInventory(s, HashCache(db))
        self.characters = Characters(db, s.models_dir, GENERATION_STYLE)
        self.datasets = Datasets(db, s.outputs_dir, self.characters)
        self.library = Library(db, library_root(s.outputs_dir))
        self.generator = GenerationService(s, self.models, self.characters, comfy.request_check(s))
        self.people = CharacterService(s, db, self.characters, self.datasets)
        self.character_jobs = CharacterJobs(db, self.characters, self.datasets, self.generator)
        self.training = TrainingService(s, db, self.characters, self.models, self.device)

    @classmethod
    def start(cls, settings: Settings, recover: bool = True) -> Studio:
        settings.ensure_dirs()
        ModelRoots(settings.models_dir).create_layout()
        if settings.demo:
            ensure_demo_model(settings.models_dir)
        plan = resolve_device(settings.device, settings.dtype, settings.cpu_offload)
        db = Database(settings.resolved_database_url)
        db.create_all()
        kinds = job_kinds()  # every room's job kinds; the service and its executor share this one registry
        jobs = JobService(db, kinds, daily_gpu_minutes=settings.daily_gpu_minutes)
        ver = app_version()

        def runtime_factory(device: str):
            return WorkerRuntime.create(
                plan,
                settings.models_dir,
                db,
                settings.outputs_dir,
                ver,
                settings.styles_path,
                settings.model_configs_path,
                settings.cache_dir,
                settings,
            )

        comfy_workers = len(parse_server_spec(settings.comfyui_urls)) * int(settings.comfyui_max_inflight)
        executor = InProcessExecutor(
            jobs,
            kinds,
            [plan.device],
            settings.jobs_per_device,
            runtime_factory,
            extra_queues={COMFY_QUEUE: comfy_workers},
        )
        jobs.attach(executor)
        executor.start()
        studio = cls(settings, db, jobs, executor, plan.device, plan.dtype)
        if recover:
            log.info("recovered jobs: %s", jobs.recover())
            if settings.auto_resume:
                log.info("resumed interrupted jobs: %s", jobs.resume_interrupted())
        if studio.default_model():
            executor.warm(studio.default_model())
        studio.start_cleanup_timer()
        return studio

    CLEANUP_INTERVAL_S = 3600.0

    def start_cleanup_timer(self) -> None:
        self._cleanup_stop = media.start_cleanup_timer(self.db, self.jobs, self.CLEANUP_INTERVAL_S)

    def close(self) -> None:
        if getattr(self, "_cleanup_stop", None) is not None:
            self._cleanup_stop.set()
        self.executor.stop()
        self.db.dispose()

    def health(self) -> dict:
        """The job executor's health (workers alive, what runs, queue sizes) and its capacity per queue."""
        return {**self.executor.health(), "capacity": self.executor.capacity()}

    def model_choices(self) -> list[tuple[str, str]]:
        return self.models.model_choices()

    def match_model(self, name: str) -> str:
        return self.models.match_model(name)

    def default_model(self) -> str:
        return self.models.default_model()

    def lora_names(self) -> list[str]:
        return self.models.lora_names()

    def vae_names(self) -> list[str]:
        return self.models.vae_names()

    def controlnet_names(self) -> list[str]:
        return self.models.controlnet_names()

    def embedding_names(self) -> list[str]:
        return self.models.embedding_names()

    def hires_upscalers(self) -> list[str]:
        return self.models.hires_upscalers()

    def models_relative(self, path: str) -> str:
        return self.models.models_relative(path)

    def model_inventory(self) -> list[dict]:
        return self.models.model_inventory()

    def unload_models(self) -> None:
        self.executor.unload_models()

    def submit_download(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("download", DownloadRequest.build(**values), owner=owner)

    def checked_upload(self, path: str, what: str) -> str:
        return checked_upload(self.settings, path, what)

    def styles(self) -> StyleBook:
        return style_book(self.settings)

    def build_generate_request(self, values: dict[str, Any]) -> GenerateRequest:
        return self.generator.build_generate_request(values)

    def submit_generate(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req = self.build_generate_request(values)
        return self.jobs.submit(req.job_kind, req, owner=owner)

    def submit_xyz(self, base_values: dict[str, Any], axes: dict[str, Any], owner: str = "anonymous"):
        return self.jobs.submit("xyz_plot", self.generator.build_xyz_request(base_values, axes), owner=owner)

    def gallery(self, **query: Any):  # filters: see GalleryQuery
        return records.fill_thumbnails(records.gallery_page(self.db, records.GalleryQuery(**query)))

    def generation(self, generation_id: str):
        return records.generation_detail(self.db, generation_id)

    def export_image(self, generation_id: str, format: str = "jpeg", quality: int = 90) -> Path:
        return export_image(self.db, self.settings.outputs_dir, generation_id, format, quality)

    def trash(self, generation_ids: list[str]) -> int:
        return records.trash(self.db, generation_ids)

    def restore(self, generation_ids: list[str]) -> int:
        return records.restore(self.db, generation_ids)

    def empty_trash(self):
        return records.empty_trash(self.db, self.settings.outputs_dir)

    def character_view(self, ref: str) -> dict:
        return self.people.character_view(ref)

    def _lora_public(self, row) -> dict:
        return lora_public(row)

    def _outputs_relative(self, path: str) -> str:
        return outputs_relative(self.settings, path)

    def list_characters(self, project: str = "") -> list[dict]:
        return self.people.list_characters(project)

    def save_character(self, values: dict[str, Any], ref: str = "") -> dict:
        return self.people.save_character(values, ref)

    def submit_ingest(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("ingest", self.people.ingest_request(values), owner=owner)

    def review(
        self, character: str, item_ids: list[str], action: str, reasons=None, reason_text: str = ""
    ) -> dict:
        return self.people.review(character, item_ids, action, reasons, reason_text)

    def undo_review(self, character: str, action_id: str = "") -> dict:
        return self.people.undo_review(character, action_id)

    def review_queue(
        self, character: str, status: str = "pending", page: int = 1, page_size: int = 50
    ) -> dict:
        return self.people.review_queue(character, status, page, page_size)

    def submit_captions(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("caption", self.people.caption_request(values), owner=owner)

    def suggest_character(self, item_id: str) -> dict:
        return self.people.suggest_character(item_id)

    def regenerate_rejected(self, character: str, owner: str = "anonymous") -> dict:
        return self.character_jobs.regenerate_rejected(self.jobs, character, owner)

    def submit_reference_sheet(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit(
            "reference_sheet", self.character_jobs.reference_sheet_request(values), owner=owner
        )

    def submit_train_lora(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        kind, req = self.training.train_request(values)
        return self.jobs.submit(kind, req, owner=owner)

    def interrupted_trainings(self) -> list[dict]:
        return interrupted_trainings(self.db, self.settings.data_dir)

    def comfy_template_names(self) -> list[str]:
        return comfy.comfy_template_names(self.settings)

    def comfy_models(self) -> dict[str, list[str]]:
        return comfy.comfy_models(self.settings)

    def add_comfy_workflow(self, workflow_json: str, manifest_json: str, overwrite: bool = False) -> dict:
        return comfy.add_comfy_workflow(self.settings, workflow_json, manifest_json, overwrite)

    def comfy_servers(self) -> list[dict]:
        return comfy.comfy_servers(self.settings)

    def upscalers(self) -> list[dict]:
        return list_upscalers(self.models.roots)

    def submit_upscale(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("upscale", build_upscale_request(values, self.settings, self.db), owner=owner)

    def video_models(self) -> list[dict]:
        return video_models(self.settings.models_dir)

    def video_families(self) -> list[dict]:
        return video_families()

    def submit_video(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req = build_video_request(values, settings=self.settings, db=self.db, generation=self.generator)
        return self.jobs.submit("generate_video", req, owner=owner)

    def preview_variants(self, values: dict[str, Any]) -> dict:
        return media.preview_variants(values, self.library)

    def submit_variants(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("variants", media.variants_request(values, self.library)[0], owner=owner)

    def speak(
        self, values: dict[str, Any], name: str = "", tags: str = "tts", collection_id: str = ""
    ) -> dict:
        return media.speak_to_library(values, self.settings, self.library, name, tags, collection_id)

    def submit_motion_clip(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("motion_clip", media.motion_clip_request(values, self.library), owner=owner)

    def submit_join_clips(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req = media.join_clips_request(values, self.settings, self.library)
        return self.jobs.submit("join_clips", req, owner=owner)

    def batch_zip(self, batch_id: str) -> str:
        return media.batch_zip(self.settings.outputs_dir, batch_id, self.jobs.status(batch_id))

    def watch(self, job_id: str) -> Iterator[dict]:
        return self.jobs.watch(job_id)

    def run_and_wait(self, job_id: str) -> dict:
        return wait_for_result(self.jobs, job_id)

    def job_status(self, job_id: str) -> dict:
        return self.jobs.status(job_id)

    def cancel(self, job_id: str, user: str | None = None, token: str | None = None) -> str:
        return self.jobs.cancel(job_id, user, token)

    def retry(self, job_id: str, user: str | None = None, token: str | None = None) -> tuple[str, str]:
        return self.jobs.retry(job_id, user, token)

    def resume(self, job_id: str, user: str | None = None, token: str | None = None) -> str:
        return self.jobs.resume(job_id, user, token)

    def recent_jobs(self, limit: int = 100) -> list[Job]:
        return self.db.jobs(limit)

    def usage(self):
        return self.jobs.usage()

    def usage_by_kind(self):
        return self.jobs.usage_by_kind()

    def budget(self) -> dict:
        return {
            "daily_gpu_minutes": self.jobs.daily_gpu_minutes,
            "used_minutes": self.jobs.gpu_seconds_today() / 60,
        }

    def storage(self):
        return storage(self.settings, self.db)
