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

from engine.artifacts import folder_files, folder_hash, lora_short_hash
from engine.characters import ingest
from engine.characters.captioning import VisionConfig, suggest_character
from engine.characters.characters import STYLE_KEYS, Characters, compose_negative, merge_terms
from engine.characters.datasets import CaptionRequest, Datasets, IngestRequest
from engine.characters.reference_sheet import ReferenceSheetRequest
from engine.comfyui.generate import check_comfy_request, pool_for, templates
from engine.comfyui.pool import parse_server_spec, server_models
from engine.comfyui.templates import add_user_template, user_templates_dir
from engine.device import resolve_device
from engine.errors import InputError, NotFoundError, StudioError
from engine.gallery.pnginfo import save_image
from engine.gallery.records import (
    GalleryQuery,
    empty_trash,
    fill_thumbnails,
    gallery_page,
    generation_detail,
    restore,
    trash,
)
from engine.generation.ip_adapter import find_ip_adapter
from engine.generation.prompts import extract_lora_tags
from engine.generation.request import GenerateRequest
from engine.generation.styles import StyleBook
from engine.generation.xyz import XYZPlotRequest, parse_values
from engine.jobs.executor import InProcessExecutor
from engine.jobs.kinds import COMFY_QUEUE, JOB_KINDS
from engine.jobs.service import JobService
from engine.media.ffmpeg import VIDEO_SUFFIXES
from engine.media.library import Library, public_item
from engine.media.tts import SpeechRequest, list_voices, speak
from engine.media.variants import (
    CleanupRequest,
    JoinClipsRequest,
    MotionClipRequest,
    VariantsRequest,
    expired_batches,
    library_root,
    plan,
)
from engine.model_manager.checkpoints import folder_family, scan_checkpoints
from engine.model_manager.demo_model import DEMO_MODEL_NAME, ensure_demo_model, is_demo_folder
from engine.model_manager.downloads import DownloadRequest
from engine.model_manager.pipelines import lora_format, model_label
from engine.paths import ModelRoots, within
from engine.requests import MAX_SEED, LoraSpec, parse_loras
from engine.runtime import WorkerRuntime
from engine.settings import Settings
from engine.store.database import Asset, Database, Generation, Job, MediaItem, Project
from engine.store.hashing import HashCache
from engine.training.job import build_train_request
from engine.training.kohya import TRAINING_BACKENDS, build_kohya_request
from engine.training.resume import interrupted_trainings
from engine.upscale.job import UpscaleRequest, _sources, list_upscalers, resolve_upscaler
from engine.upscale.upscalers import inspect_upscaler
from engine.video.generate import VIDEO_FAMILIES, list_video_models
from engine.video.job import VideoRequest, check_video_request, find_video_model

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
        settings.ensure_dirs()
        ModelRoots(settings.models_dir).create_layout()
        if settings.demo:
            ensure_demo_model(settings.models_dir)
        plan = resolve_device(settings.device, settings.dtype, settings.cpu_offload)
        db = Database(settings.resolved_database_url)
        db.create_all()
        jobs = JobService(db, daily_gpu_minutes=settings.daily_gpu_minutes)
        ver = app_version()

        def runtime_factory(device: str):
            return WorkerRuntime.create(
                plan,
                settings.models_dir,
                db,
                settings.outputs_dir,
                ver,
                settings.data_dir / "styles.csv",
                settings.model_configs_path,
                settings.cache_dir,
                settings,
            )

        comfy_workers = len(parse_server_spec(settings.comfyui_urls)) * int(settings.comfyui_max_inflight)
        executor = InProcessExecutor(
            jobs,
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
        """Expired variant batches are removed by a "cleanup" job now and then every hour."""
        import threading

        self._cleanup_stop = threading.Event()

        def loop() -> None:
            while not self._cleanup_stop.is_set():
                try:
                    if expired_batches(self.db):
                        self.jobs.submit("cleanup", self._cleanup_request(), owner="system")
                except Exception:  # the database may be closing; try again next round
                    log.exception("could not queue the cleanup job")
                self._cleanup_stop.wait(self.CLEANUP_INTERVAL_S)

        threading.Thread(target=loop, name="batch-cleanup", daemon=True).start()

    def _cleanup_request(self):
        return CleanupRequest.build()

    def close(self) -> None:
        if getattr(self, "_cleanup_stop", None) is not None:
            self._cleanup_stop.set()
        self.executor.stop()
        self.db.dispose()

    # --- models ------------------------------------------------------------------------------
    @property
    def roots(self) -> ModelRoots:
        return ModelRoots(self.settings.models_dir)

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for a dropdown; the demo model says it is random weights."""
        return [(model_label(name, path), name) for name, path in self.roots.list_models().items()]

    def match_model(self, name: str) -> str:
        """The local model an infotext's `Model: name` means: an exact name, else a checkpoint file
        whose name or file stem matches (A1111 writes the stem: "v1-5-pruned" for v1-5-pruned.safetensors)."""
        models = self.roots.list_models()
        if not name or name in models:
            return name
        for candidate, path in models.items():
            if path.is_file() and name in (Path(candidate).with_suffix("").as_posix(), path.stem):
                return candidate
        return name

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
        self._apply_character(values)
        if values.get("seed") is None or int(values["seed"]) == -1:
            values["seed"] = secrets.randbelow(MAX_SEED + 1)
        comfy = values.get("engine") == "comfyui"
        if comfy:  # a checkpoint on the ComfyUI server, checked against its /object_info when the job runs
            if not str(values.get("model") or "").strip():
                raise InputError(
                    "engine='comfyui' needs model= a checkpoint name as the server lists it "
                    "(the Generate tab's ComfyUI refresh shows them)"
                )
        else:
            values["model"] = self.match_model(values.get("model") or "") or self.default_model()
        if values.get("subseed") is None or int(values["subseed"]) == -1:
            values["subseed"] = secrets.randbelow(MAX_SEED + 1)
        for key in ("init_image", "mask_image", "control_image", "ip_adapter_image"):
            if values.get(key):
                values[key] = self.checked_upload(values[key], key)
        # <lora:name:weight> in the prompt joins the LoRA list (the prompt's weight wins for a name given twice)
        _, tags = extract_lora_tags(values.get("prompt") or "")
        if tags:
            merged = {s.name: s.weight for s in parse_loras(values.get("loras"))}
            merged.update(tags)
            values["loras"] = [{"name": n, "weight": w} for n, w in merged.items()]
        req = GenerateRequest.build(**values)
        if comfy:
            check_comfy_request(req, self.settings, self.settings.data_dir)
            styles = self.styles()
            for name in req.styles:
                styles.get(name)
            return req
        models = self.roots.list_models()
        self.roots.resolve("diffusers", req.model, models)  # unknown model -> NotFoundError now, not later
        loras = self.roots.list_files("loras")
        for spec in req.loras:
            lora_format(self.roots.resolve("loras", spec.name, loras))  # LyCORIS etc. refused here
        if req.vae:
            self.roots.resolve("vae", req.vae, self.roots.list_files("vae"))
        if req.refiner:
            self.roots.resolve("diffusers", req.refiner, models)
        if req.controlnet and req.controlnet not in self.controlnet_names():
            raise NotFoundError(
                f"controlnet {req.controlnet!r} not found; available: "
                f"{', '.join(self.controlnet_names()) or 'none (put models in models/controlnet)'}"
            )
        if req.ip_adapter_image:  # no weights: refused now, saying what to put where
            find_ip_adapter(self.settings.models_dir, req.ip_adapter, req.ip_adapter_encoder)
        styles = self.styles()
        for name in req.styles:
            styles.get(name)
        if req.enable_hr and req.hr_upscaler not in self.hires_upscalers():
            raise InputError(f"hr_upscaler={req.hr_upscaler!r}; allowed: {', '.join(self.hires_upscalers())}")
        return req

    def build_xyz_request(self, base_values: dict[str, Any], axes: dict[str, Any]):
        """X/Y/Z plot: the base recipe validated like a generation, then every cell validated too."""
        base = self.build_generate_request({**base_values, "batch_size": 1, "batch_count": 1})
        axes = dict(axes)
        for key in ("x", "y", "z"):  # A1111: a seed of -1 on an axis means a random one, fixed now
            if axes.get(f"{key}_type") in ("Seed", "Var. seed"):
                vals = parse_values(axes[f"{key}_type"], axes.get(f"{key}_values", ""))
                axes[f"{key}_values"] = ", ".join(
                    str(secrets.randbelow(MAX_SEED + 1) if v == -1 else v) for v in vals
                )
        req = XYZPlotRequest.build(base=base, **axes)
        models = self.roots.list_models()
        for _, cell in req.cells():
            self.roots.resolve("diffusers", cell.model, models)
            if cell.vae:
                self.roots.resolve("vae", cell.vae, self.roots.list_files("vae"))
        return req

    def submit_xyz(self, base_values: dict[str, Any], axes: dict[str, Any], owner: str = "anonymous"):
        return self.jobs.submit("xyz_plot", self.build_xyz_request(base_values, axes), owner=owner)

    # --- model manager ---------------------------------------------------------------------------
    def submit_download(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        return self.jobs.submit("download", DownloadRequest.build(**values), owner=owner)

    def models_relative(self, path: str) -> str:
        """A path under models/ as users name it ("checkpoints/x.safetensors"), never the server path."""
        p = Path(path)
        return (
            p.relative_to(self.settings.models_dir).as_posix()
            if p.is_relative_to(self.settings.models_dir)
            else p.name
        )

    def unload_models(self) -> None:
        self.executor.unload_models()

    def model_inventory(self) -> list[dict]:
        """Every model under models/ with family, size, SHA-256 and A1111 short hash (cached)."""
        rows: list[dict] = []
        for entry in scan_checkpoints(self.roots, self.hashes):
            rows.append(
                {
                    "kind": "checkpoints",
                    "name": entry.name,
                    "family": entry.family,
                    "size": entry.size,
                    "sha256": entry.sha256,
                    "short_hash": entry.short_hash,
                    "error": entry.error or "",
                }
            )
        for name, path in self.roots.list_diffusers_folders().items():
            files = {p.relative_to(path).as_posix(): self.hashes.sha256(p) for p in folder_files(path)}
            family = folder_family(path) + (" · demo, random weights" if is_demo_folder(path) else "")
            rows.append(
                {
                    "kind": "diffusers",
                    "name": name,
                    "family": family,
                    "size": sum(p.stat().st_size for p in folder_files(path)),
                    "sha256": "",
                    "short_hash": folder_hash(files),
                }
            )
        for kind in ("loras", "vae", "embeddings", "controlnet", "upscale_models"):
            for name, path in self.roots.list_files(kind).items():
                sha = self.hashes.sha256(path)
                short = self.hashes.cached(path, "lora12", lora_short_hash) if kind == "loras" else sha[:10]
                rows.append(
                    {
                        "kind": kind,
                        "name": name,
                        "family": "",
                        "size": path.stat().st_size,
                        "sha256": sha,
                        "short_hash": short,
                    }
                )
        for folder in self.roots.folders("controlnet"):  # diffusers-format ControlNets are folders
            for config in sorted(folder.rglob("config.json")):
                files = {
                    p.relative_to(config.parent).as_posix(): self.hashes.sha256(p)
                    for p in folder_files(config.parent)
                }
                rows.append(
                    {
                        "kind": "controlnet",
                        "name": config.parent.relative_to(folder).as_posix(),
                        "family": "diffusers folder",
                        "size": sum(p.stat().st_size for p in folder_files(config.parent)),
                        "sha256": "",
                        "short_hash": folder_hash(files),
                    }
                )
        return rows

    @property
    def hashes(self):
        if not hasattr(self, "_hashes"):
            self._hashes = HashCache(self.db)
        return self._hashes

    # --- gallery ----------------------------------------------------------------------------------
    def gallery(self, **query: Any):
        """A page of the history (filters: text, model, lora, character, date_from, date_to, mode,
        only_trashed, page, page_size), with thumbnails."""
        return fill_thumbnails(gallery_page(self.db, GalleryQuery(**query)))

    def generation(self, generation_id: str):
        return generation_detail(self.db, generation_id)

    def export_image(self, generation_id: str, format: str = "jpeg", quality: int = 90) -> Path:
        """A copy of a generated image as PNG, JPEG or WebP, carrying its infotext (EXIF UserComment for
        JPEG/WebP, as A1111 writes it) and recipe, under outputs/exports/."""
        from PIL import Image

        d = self.generation(generation_id)
        if not d.file_exists:
            raise NotFoundError(f"generation {generation_id!r} has no image file any more")
        suffix = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}.get(format)
        if suffix is None:
            raise InputError(f"format={format!r}; allowed: png, jpeg, webp")
        target = self.settings.outputs_dir / "exports" / f"{Path(d.image_path).stem}{suffix}"
        with Image.open(d.image_path) as img:
            save_image(
                img.convert("RGB"), target, d.infotext, d.recipe or None, format=format, quality=int(quality)
            )
        return target

    def trash(self, generation_ids: list[str]) -> int:
        return trash(self.db, generation_ids)

    def restore(self, generation_ids: list[str]) -> int:
        return restore(self.db, generation_ids)

    def empty_trash(self):
        return empty_trash(self.db, self.settings.outputs_dir)

    def checked_upload(self, path: str, what: str) -> str:
        """Inputs must be files Gradio received (or our own outputs), never arbitrary server paths."""
        if not any(within(root, Path(path)) for root in self.allowed_input_roots()):
            raise InputError(f"{what} must be an uploaded file; server paths are not accepted")
        return str(Path(path).resolve())

    def styles(self) -> StyleBook:
        return StyleBook(self.settings.data_dir / "styles.csv")

    def hires_upscalers(self) -> list[str]:
        return ["Latent", "Latent (nearest)", "Lanczos", *sorted(self.roots.list_files("upscale_models"))]

    def vae_names(self) -> list[str]:
        return sorted(self.roots.list_files("vae"))

    def controlnet_names(self) -> list[str]:
        names = {
            n
            for n, p in self.roots.list_files("controlnet").items()
            if not (p.parent / "config.json").exists()
        }
        for folder in self.roots.folders("controlnet"):
            names |= {p.parent.relative_to(folder).as_posix() for p in folder.rglob("config.json")}
        return sorted(names)

    def embedding_names(self) -> list[str]:
        return sorted(Path(n).name for n in self.roots.list_files("embeddings"))

    # --- characters and datasets ----------------------------------------------------------------
    @property
    def characters(self):
        return Characters(self.db, self.settings.models_dir)

    @property
    def datasets(self):
        return Datasets(self.db, self.settings.outputs_dir, self.characters)

    def _apply_character(self, values: dict[str, Any]) -> None:
        """`character` (a slug or id) -> its frozen snapshot; its style preset joins the styles and its
        active LoRA version the LoRA list (unless the caller already names that LoRA)."""
        ref = values.get("character")
        use_style = bool(values.pop("use_character_style", False))
        lora_pin = values.pop("character_lora", None) or None
        if not ref:
            values["character"] = None
            return
        if isinstance(ref, dict):  # already a snapshot (a retried or re-run job)
            return

        character = self.characters.get(str(ref))
        style = {k: v["value"] for k, v in self.characters.effective_style(character).items()}
        if use_style:  # the character's (or its project's) sampler, steps, CFG, size and clip skip
            values.update({k: v for k, v in style.items() if k in STYLE_KEYS and v not in (None, "")})
        elif not values.get("model") and style.get("model"):
            values["model"] = style["model"]
        if not values.get("engine") and style.get(
            "engine"
        ):  # who renders: the character's or project's default
            values["engine"] = style["engine"]
        snap = self.characters.snapshot(character.id, lora_pin)
        values["character"] = snap.model_dump(mode="json")
        if character.style_preset:
            styles = values.get("styles") or []
            styles = (
                [p.strip() for p in styles.split(",") if p.strip()]
                if isinstance(styles, str)
                else list(styles)
            )
            if character.style_preset not in styles:
                values["styles"] = [*styles, character.style_preset]
        if snap.lora:
            # other versions of this character's LoRA (from a reused recipe) give way to the snapshot's
            versions = {r.name for r in self.characters.loras(character.id)} - {snap.lora["name"]}
            specs = [x for x in parse_loras(values.get("loras")) if x.name not in versions]
            if snap.lora["name"] not in {x.name for x in specs}:
                specs.append(LoraSpec(name=snap.lora["name"], weight=snap.lora["weight"]))
            values["loras"] = [{"name": x.name, "weight": x.weight} for x in specs]

    def character_view(self, ref: str) -> dict:
        """Everything the Characters tab shows of one character (no server paths)."""
        from sqlmodel import select

        chars = self.characters
        c = chars.get(ref)
        project = None
        if c.project_id:
            with self.db.session() as s:
                p = s.get(Project, c.project_id)
                project = p.slug if p else None
        with self.db.session() as s:
            sheets = [
                self._outputs_relative(a.path)
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
            "references": [self._outputs_relative(p) for p in c.references],
            "active_lora": c.active_lora_id,
            "lora_weight": c.lora_weight,
            "revision": c.revision,
            "effective_style": chars.effective_style(c),
            "effective_negative": [t.model_dump() for t in chars.effective_negative(c)],
            "readiness": self.datasets.readiness(c.id, self.settings.min_approved_images),
            "loras": [self._lora_public(r) for r in chars.loras(c.id)],
            "sheets": sheets,
        }

    def _lora_public(self, row) -> dict:
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

    def _outputs_relative(self, path: str) -> str:
        p = Path(path)
        return (
            p.relative_to(self.settings.outputs_dir).as_posix()
            if p.is_relative_to(self.settings.outputs_dir)
            else p.name
        )

    def list_characters(self, project: str = "") -> list[dict]:
        out = []
        for c in self.characters.list(project):
            out.append(
                {
                    "id": c.id,
                    "slug": c.slug,
                    "name": c.name,
                    "trigger_word": c.trigger_word,
                    **self.datasets.readiness(c.id, self.settings.min_approved_images),
                }
            )
        return out

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
        report = ingest.ingest_files([Path(self.checked_upload(p, "reference image")) for p in paths], folder)
        if report.skipped:
            for cand in report.candidates:
                cand.path.unlink(missing_ok=True)
            raise InputError("; ".join(f"{s.source}: {s.reason}" for s in report.skipped))
        kept = [*c.references, *(str(cand.path) for cand in report.candidates)]
        self.characters.update(c.id, {"references": kept})
        return self.character_view(c.id)

    def submit_ingest(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        values = dict(values)
        character = self.characters.get(values.pop("character", "") or values.get("character_id", ""))
        values["character_id"] = character.id
        values["files"] = [self.checked_upload(p, "files") for p in values.get("files") or []]
        if values.get("folder"):  # outside the allowed roots / missing: refused before a job exists
            ingest.scan_folder(Path(values["folder"]).expanduser(), self.settings.ingest_root_paths, set())
            values["folder"] = str(Path(values["folder"]).expanduser().resolve())
        if values.get("url") and not str(values["url"]).lower().startswith(("http://", "https://")):
            raise InputError(f"url={values['url']!r}: only http:// and https:// URLs can be ingested")
        return self.jobs.submit("ingest", IngestRequest.build(**values), owner=owner)

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
        out["readiness"] = self.datasets.readiness(c.id, self.settings.min_approved_images)
        return out

    def submit_captions(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        s = self.settings
        if VisionConfig.from_settings(s.vision_url, s.vision_model, s.vision_api_key) is None:
            raise InputError(
                "auto-captioning needs a vision endpoint: start with --vision-url (for example "
                "http://127.0.0.1:11434/v1 for Ollama) and --vision-model"
            )
        values = dict(values)
        values["character_id"] = self.characters.get(
            values.pop("character", "") or values.get("character_id", "")
        ).id
        return self.jobs.submit("caption", CaptionRequest.build(**values), owner=owner)

    def suggest_character(self, item_id: str) -> dict:
        """Ask the vision endpoint which known character a dataset image shows."""
        s = self.settings
        config = VisionConfig.from_settings(s.vision_url, s.vision_model, s.vision_api_key)
        if config is None:
            raise InputError("character suggestions need a vision endpoint: start with --vision-url")
        item = self.datasets.item(item_id)
        chars = self.characters.list()
        choices = [
            (c.name, ", ".join(p for p in (c.trigger_word, c.design_prompt[:200]) if p)) for c in chars
        ]
        name = suggest_character(config, Path(item.path), choices)
        match = next((c for c in chars if c.name == name), None)
        return {
            "item_id": item_id,
            "suggested": match.slug if match else None,
            "current": next((c.slug for c in chars if c.id == item.character_id), None),
        }

    def regenerate_rejected(self, character: str, owner: str = "anonymous") -> dict:
        """Re-render the character's rejected generated images with its refined negatives (same recipe and
        seed); the new images join the review queue."""
        c = self.characters.get(character)
        jobs, skipped = [], []
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
                req = self.build_generate_request(values)
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
            jid, _ = self.jobs.submit(req.job_kind, req, owner=owner)
            self.datasets.mark_regenerated(item.id, jid)
            jobs.append({"item_id": item.id, "job_id": jid})
        return {
            "jobs": jobs,
            "skipped": skipped,
            "negative_prompt": ", ".join(t.term for t in self.characters.effective_negative(c)),
        }

    def submit_train_lora(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        """Train a LoRA on a character's approved images (see engine.training.job); checked before a job exists.
        values["backend"]: "builtin" (default) or "kohya" (a configured sd-scripts; engine.training.kohya)."""
        values = dict(values)
        backend = values.pop("backend", None) or "builtin"
        if backend == "kohya":
            return self.jobs.submit("train_lora_kohya", build_kohya_request(self, values), owner=owner)
        if backend != "builtin":
            raise InputError(f"backend={backend!r}; allowed: {', '.join(TRAINING_BACKENDS)}")
        return self.jobs.submit("train_lora", build_train_request(self, values), owner=owner)

    # --- ComfyUI engine ---------------------------------------------------------------------------
    def comfy_template_names(self) -> list[str]:
        return sorted(templates(self.settings.data_dir))

    def comfy_models(self) -> dict[str, list[str]]:
        """Checkpoints, LoRAs and upscale models the ComfyUI pool's servers have (from /object_info)."""
        if not self.settings.comfyui_urls.strip():
            raise InputError(
                "no ComfyUI server is configured; start with --comfyui-urls http://127.0.0.1:8188"
            )
        return server_models(pool_for(self.settings).object_info())

    def add_comfy_workflow(self, workflow_json: str, manifest_json: str, overwrite: bool = False) -> dict:
        """A user's ComfyUI workflow (exported with "Save (API format)") and its manifest, checked and kept
        under <data-dir>/workflows; usable as comfy_template at once."""
        import json

        try:
            manifest = json.loads(manifest_json)
        except json.JSONDecodeError as e:
            raise InputError(f"the manifest is not valid JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(manifest, dict):
            raise InputError("the manifest must be a JSON object with name, kind, bindings and outputs")
        template = add_user_template(
            workflow_json, manifest, user_templates_dir(self.settings.data_dir), overwrite=overwrite
        )
        return {
            "name": template.manifest.name,
            "kind": template.manifest.kind,
            "bindings": sorted(template.manifest.bindings),
        }

    def comfy_servers(self) -> list[dict]:
        """Each configured ComfyUI server: healthy, jobs in flight, limit, last error."""
        return pool_for(self.settings).status() if self.settings.comfyui_urls.strip() else []

    def interrupted_trainings(self) -> list[dict]:
        """Training runs a crash or restart interrupted, with the checkpoint step a resume continues from."""
        return interrupted_trainings(self.db, self.settings.data_dir)

    def submit_reference_sheet(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
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
        req = self.build_generate_request(base)
        return self.jobs.submit(
            "reference_sheet", ReferenceSheetRequest.build(base=req, **sheet), owner=owner
        )

    # --- upscaling and video ------------------------------------------------------------------
    def upscalers(self) -> list[dict]:
        """Lanczos, every Real-ESRGAN family file in models/upscale_models (architecture and scale, as spandrel
        reads them) and every SD x4 upscaler folder."""
        return list_upscalers(self.roots)

    def submit_upscale(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        """values: images (uploads), generation_ids (gallery), video (an upload), upscaler, scale or width+height,
        tile, and the SD x4 options (prompt, negative_prompt, noise_level, steps, cfg_scale, seed)."""
        values = {k: v for k, v in values.items() if v is not None}
        images = values.get("images") or []
        if isinstance(images, str):
            images = [p.strip() for p in images.replace("\n", ",").split(",") if p.strip()]
        values["images"] = [self.checked_upload(p, "images") for p in images]
        if values.get("video"):
            values["video"] = self.checked_upload(values["video"], "video")
        if values.get("seed") is not None and int(values["seed"]) == -1:
            values["seed"] = secrets.randbelow(MAX_SEED + 1)
        req = UpscaleRequest.build(**values)
        kind, path = resolve_upscaler(
            self.roots, req.upscaler
        )  # unknown upscaler: refused before a job exists
        if kind == "model":
            inspect_upscaler(
                path, req.upscaler
            )  # a file spandrel cannot read: likewise (cached by size + mtime)
        _sources(req, self.db)  # unknown or deleted generations: likewise
        return self.jobs.submit("upscale", req, owner=owner)

    def video_models(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "family": m.family,
                "label": VIDEO_FAMILIES[m.family].label,
                "modes": list(VIDEO_FAMILIES[m.family].modes),
            }
            for m in list_video_models(self.roots.models_dir)
        ]

    def video_families(self) -> list[dict]:
        """The registry as the Video tab and API show it: modes, frame rule, sizes and defaults per family."""
        import dataclasses

        return [dataclasses.asdict(f) for f in VIDEO_FAMILIES.values()]

    def submit_video(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        """values: mode (img2video, txt2video, camera), model, base_model (AnimateDiff), prompt, negative_prompt,
        image (upload) or generation_id (gallery) or first_frame_prompt (+ first_frame_model: generate it),
        frames, fps, width, height, steps, cfg_scale, seed, motion_strength, decode_chunk_size, loras,
        camera_moves, camera_strength, duration, interpolate_fps. Every limit of the family is checked here,
        before a job exists."""
        values = {k: v for k, v in values.items() if v is not None and k != "first_frame"}  # built here only
        if values.get("seed") is None or int(values["seed"]) == -1:
            values["seed"] = secrets.randbelow(MAX_SEED + 1)
        if values.get("image"):
            values["image"] = self.checked_upload(values["image"], "image")
        first_prompt = str(values.pop("first_frame_prompt", "") or "").strip()
        first_model = str(values.pop("first_frame_model", "") or "")
        req = VideoRequest.build(**values)
        family = None
        if req.mode != "camera":
            if not req.model:
                names = [m["name"] for m in self.video_models()]
                raise InputError(
                    f"mode={req.mode!r} needs model= a video model; available: {', '.join(names) or 'none'}"
                )
            family = find_video_model(self.roots.models_dir, req.model).family
            if family == "animatediff":
                values["base_model"] = self._animatediff_base(req.base_model)
                loras = self.roots.list_files("loras")
                for spec in req.loras:
                    lora_format(self.roots.resolve("loras", spec.name, loras))
            elif req.loras:
                raise InputError(
                    f"loras: only AnimateDiff (SD1.5) videos take LoRAs; {req.model!r} is {family}"
                )
        if first_prompt and req.needs_first_frame() and not (req.image or req.generation_id):
            default_w, default_h = VIDEO_FAMILIES[family].default_size if family else (512, 512)
            values["first_frame"] = self.build_generate_request(
                {
                    "prompt": first_prompt,
                    "negative_prompt": req.negative_prompt,
                    "model": first_model,
                    "seed": req.seed,
                    "width": req.width or default_w,
                    "height": req.height or default_h,
                }
            )
        req = VideoRequest.build(**values)
        path = req.image
        if req.generation_id:
            d = self.generation(req.generation_id)
            if not d.file_exists or not d.image_path or d.image_path.lower().endswith(VIDEO_SUFFIXES):
                raise InputError(
                    f"generation_id={req.generation_id!r} is not an image with its file (a clip "
                    "cannot be a first frame)"
                )
            path = d.image_path
        image = None
        if path and req.needs_first_frame():
            from PIL import Image

            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, Image.DecompressionBombError) as e:
                raise InputError(f"image: not a readable image ({e}); allowed: PNG, JPEG, WebP") from None
        check_video_request(req, family, image)
        return self.jobs.submit("generate_video", req, owner=owner)

    def _animatediff_base(self, name: str) -> str:
        """The SD1.5 model AnimateDiff animates: the one named, or the first SD1.5 diffusers folder."""
        import json

        models = self.roots.list_models()

        def is_sd15(path: Path) -> bool:
            try:
                return (
                    json.loads((path / "model_index.json").read_text()).get("_class_name")
                    == "StableDiffusionPipeline"
                )
            except (OSError, ValueError):
                return False

        if name:
            base = self.match_model(name) or name
            path = self.roots.resolve("diffusers", base, models)
            if path.is_dir() and not is_sd15(path):
                raise InputError(
                    f"base_model={name!r} is not an SD1.5 model; AnimateDiff motion adapters animate "
                    "SD1.5 models (StableDiffusionPipeline folders or SD1 checkpoints)"
                )
            return base
        for candidate, path in models.items():
            if path.is_dir() and is_sd15(path):
                return candidate
        raise InputError("AnimateDiff needs base_model= an SD1.5 model, and none is in models/diffusers")

    # --- media library and variants -----------------------------------------------------------
    @property
    def library(self):
        return Library(self.db, library_root(self.settings.outputs_dir))

    def build_variants_request(self, values: dict[str, Any]):
        req = VariantsRequest.build(**values)
        return req, plan(req, self.library)  # nothing selected, unknown ids, over the limit: refused now

    def preview_variants(self, values: dict[str, Any]) -> dict:
        """How many variants a selection makes and which, without rendering anything."""
        req, assignments = self.build_variants_request(values)
        return {"count": len(assignments), "mode": req.mode, "variants": [a.describe() for a in assignments]}

    def submit_variants(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req, _ = self.build_variants_request(values)
        return self.jobs.submit("variants", req, owner=owner)

    def speak(
        self, values: dict[str, Any], name: str = "", tags: str = "tts", collection_id: str = ""
    ) -> dict:
        """Text to speech (built-in espeak-ng voice or an OpenAI-compatible server), saved as a library audio."""
        import tempfile

        req = SpeechRequest(**values)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-speech-", dir=self.settings.cache_dir))
        try:
            result = speak(req, tmp / "speech.wav")
            words = " ".join(req.text.split()[:6])
            item = self.library.add_file(
                result.path,
                name=name or f"speech: {words}",
                tags=tags,
                collection_id=collection_id or None,
                kind="audio",
            )
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return {
            **public_item(item, self.library.root),
            "voice": result.voice,
            "backend": result.backend,
            "sample_rate": result.sample_rate,
            "speech_seconds": round(result.duration, 3),
        }

    def submit_motion_clip(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req = MotionClipRequest.build(**values)
        if self.library.item(req.image_id).kind != "image":
            raise InputError(f"image_id={req.image_id!r} is not an image in the library")
        return self.jobs.submit("motion_clip", req, owner=owner)

    def submit_join_clips(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        values = dict(values)
        if values.get("subtitles"):
            path = Path(self.checked_upload(values["subtitles"], "subtitles"))
            if path.suffix.lower() != ".srt":
                raise InputError(f"subtitles {path.name!r} must be an .srt file")
            values["subtitles"] = str(path)
        req = JoinClipsRequest.build(**values)
        if not req.clips:
            raise InputError("clips: pick at least one library video to join")
        for item_id in req.clips:
            self.library.item(item_id)  # unknown ids are refused before a job exists
        return self.jobs.submit("join_clips", req, owner=owner)

    def run_and_wait(self, job_id: str) -> dict:
        """Wait for a short media job; its result, or a StudioError saying how it ended."""
        for event in self.watch(job_id):
            if event["type"] == "done":
                return event["result"]
            if event["type"] in ("failed", "cancelled", "interrupted"):
                raise StudioError(f"job {job_id} {event['type']}: {event.get('error', '')}")
        raise StudioError(f"job {job_id} ended without a result")

    def voices(self) -> list[str]:
        return sorted({v.name for v in list_voices()} | {"en", "en-us"})

    def batch_zip(self, batch_id: str) -> str:
        job = self.jobs.status(batch_id)
        if job["kind"] != "variants":
            raise InputError(f"job {batch_id!r} is a {job['kind']} job, not a variants batch")
        if job["status"] != "succeeded":
            raise InputError(f"batch {batch_id!r} is {job['status']}; a ZIP exists once it has succeeded")
        result = job.get("result") or {}
        if result.get("expired"):
            raise NotFoundError(f"batch {batch_id!r} has expired and its files were removed")
        path = self.settings.outputs_dir / result["zip"]
        if not path.is_file():
            raise NotFoundError(f"batch {batch_id!r}: its ZIP is gone")
        return str(path)

    def submit_generate(self, values: dict[str, Any], owner: str = "anonymous") -> tuple[str, str]:
        req = self.build_generate_request(values)
        return self.jobs.submit(req.job_kind, req, owner=owner)

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

    def usage_by_kind(self):
        return self.jobs.usage_by_kind()

    def budget(self) -> dict:
        return {
            "daily_gpu_minutes": self.jobs.daily_gpu_minutes,
            "used_minutes": self.jobs.gpu_seconds_today() / 60,
        }

    def storage(self):
        """Bytes and files per kind: library media, generated images, variant batches, models, database."""
        import pandas as pd
        from sqlalchemy import func
        from sqlmodel import select

        rows: list[dict] = []
        with self.db.session() as s:
            for kind, n, size in s.exec(
                select(MediaItem.kind, func.count(), func.coalesce(func.sum(MediaItem.size), 0)).group_by(
                    MediaItem.kind
                )
            ):
                rows.append({"kind": f"library {kind}s", "files": n, "bytes": int(size)})
            for kind, n, size in s.exec(
                select(Asset.kind, func.count(), func.coalesce(func.sum(Asset.size), 0)).group_by(Asset.kind)
            ):
                label = "variant batches" if kind == "video" else f"generated {kind}s"
                rows.append({"kind": label, "files": n, "bytes": int(size)})
        n, size = _tree_size(self.settings.models_dir)
        rows.append({"kind": "models", "files": n, "bytes": size})
        if self.db.is_sqlite:
            db_files = [p for p in self.settings.data_dir.glob("studio.db*") if p.is_file()]
            rows.append(
                {"kind": "database", "files": len(db_files), "bytes": sum(p.stat().st_size for p in db_files)}
            )
        df = pd.DataFrame(rows, columns=["kind", "files", "bytes"])
        df["MB"] = (df["bytes"] / 1e6).round(1)
        return df

    def job_kinds(self) -> list[str]:
        return list(JOB_KINDS)


def _tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) under root, symlinks not followed."""
    import os

    count = size = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            count += 1
            size += st.st_size
    return count, size
