"""The engine facade the UI and scripts use: submit, watch, query, cancel. Never hands out
pipelines or sessions. Built by `Studio.start(settings)`; nothing happens at import time.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine.demo_model import DEMO_MODEL_NAME, ensure_demo_model
from engine.errors import InputError
from engine.jobs import JOB_KINDS, InProcessExecutor, JobService
from engine.paths import ModelRoots, within
from engine.pipelines import lora_format, model_label
from engine.requests import MAX_SEED, GenerateRequest
from engine.settings import Settings
from engine.store import Database, Job

log = logging.getLogger(__name__)


def app_version() -> str:
    try:
        return version("studionova")
    except PackageNotFoundError:
        return "0.1.0"


@dataclass
class Studio:
    settings: Settings
    db: Database
    jobs: JobService
    executor: InProcessExecutor
    device: str
    dtype: str

    @classmethod
    def start(cls, settings: Settings, recover: bool = True) -> Studio:
        from engine.device import resolve_device
        from engine.runtime import WorkerRuntime

        settings.ensure_dirs()
        ModelRoots(settings.models_dir).create_layout()
        if settings.demo:
            ensure_demo_model(settings.models_dir)
        plan = resolve_device(settings.device, settings.dtype, settings.cpu_offload)
        db = Database(settings.resolved_database_url)
        db.create_all()
        jobs = JobService(db)
        ver = app_version()

        def runtime_factory(device: str):
            return WorkerRuntime.create(plan, settings.models_dir, db, settings.outputs_dir, ver)

        executor = InProcessExecutor(jobs, [plan.device], settings.jobs_per_device, runtime_factory)
        jobs.attach(executor)
        executor.start()
        studio = cls(settings, db, jobs, executor, plan.device, plan.dtype)
        if recover:
            log.info("recovered jobs: %s", jobs.recover())
        if studio.default_model():
            executor.warm(studio.default_model())
        return studio

    def close(self) -> None:
        self.executor.stop()
        self.db.dispose()

    # --- models ------------------------------------------------------------------------------
    @property
    def roots(self) -> ModelRoots:
        return ModelRoots(self.settings.models_dir)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for a dropdown; the demo model says it is random weights."""
        return [(model_label(name, path), name) for name, path in self.roots.list_diffusers_folders().items()]

    def default_model(self) -> str:
        names = [n for _, n in self.model_choices()]
        if DEMO_MODEL_NAME in names and (self.settings.demo or len(names) == 1):
            return DEMO_MODEL_NAME
        return names[0] if names else ""

    def lora_names(self) -> list[str]:
        return sorted(self.roots.list_files("loras"))

    # --- jobs ---------------------------------------------------------------------------------
    def allowed_input_roots(self) -> list[Path]:
        return [self.settings.gradio_tmp_dir, self.settings.outputs_dir]

    def build_generate_request(self, values: dict[str, Any]) -> GenerateRequest:
        """Validate form/API values into a request with a real seed and a checked model."""
        values = dict(values)
        if values.get("seed") is None or int(values["seed"]) == -1:
            values["seed"] = secrets.randbelow(MAX_SEED + 1)
        if not values.get("model"):
            values["model"] = self.default_model()
        init = values.get("init_image")
        if init:
            if not any(within(root, Path(init)) for root in self.allowed_input_roots()):
                raise InputError("init_image must be an uploaded file; server paths are not accepted")
            values["init_image"] = str(Path(init).resolve())
        req = GenerateRequest.build(**values)
        models = self.roots.list_diffusers_folders()
        self.roots.resolve("diffusers", req.model, models)  # unknown model -> NotFoundError now, not later
        loras = self.roots.list_files("loras")
        for spec in req.loras:
            lora_format(self.roots.resolve("loras", spec.name, loras))  # LyCORIS etc. refused here
        return req

    def submit_generate(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("generate", self.build_generate_request(values), owner=owner)

    def watch(self, job_id: str) -> Iterator[dict]:
        return self.jobs.watch(job_id)

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

    def job_kinds(self) -> list[str]:
        return list(JOB_KINDS)
