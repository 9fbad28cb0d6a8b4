"""LoRA training as a durable, resumable job: a character's approved set in, a kohya-format LoRA out.

`build_train_request` turns a character, a base model, a preset and options into a validated
request (nothing is written when anything is wrong). The runner trains in
`<data>/training/<job id>/` (checkpoints there, so resuming the same job continues from the last
complete one), then exports `models/loras/<slug>-v<k>.safetensors` in kohya format (ComfyUI and
A1111 load it), registers it as the character's next LoRA version and writes a training report
(config, dataset hash, loss curve, samples).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.artifacts import atomic_write, lora_short_hash, sha256_file
from engine.characters.characters import Characters
from engine.characters.datasets import normalise_caption
from engine.characters.ingest import scan_folder
from engine.errors import InputError
from engine.model_manager.checkpoints import CheckpointInfo, inspect_checkpoint
from engine.model_manager.inventory import ModelInventory
from engine.requests import RequestBase
from engine.settings import Settings
from engine.store.database import Character, Database, DatasetItem, LoraFile, utcnow
from engine.store.hashing import HashCache
from engine.training.export import kohya_metadata, peft_to_kohya, save_kohya_lora
from engine.training.trainer import (
    PRESETS,
    TrainLoraRequest,
    check_compatible,
    steps_for_epochs,
    train_lora,
)

EMIT_INTERVAL_S = 0.5  # progress events at most this often (the last step always)


class TrainJobRequest(RequestBase):
    character_id: str = Field(min_length=1, max_length=32)
    preset: str = Field(default="", max_length=20)
    dataset_hash: str = Field(default="", max_length=64)
    train: TrainLoraRequest


def training_family(folder: Path) -> str:
    """sd1 / sd2 / sdxl from a diffusers folder's configs; refiners and inpainting models are refused."""

    def config(rel: str) -> dict:
        p = Path(folder) / rel
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    cls = config("model_index.json").get("_class_name", "")
    if config("unet/config.json").get("in_channels") == 9:
        raise InputError(f"{Path(folder).name} is an inpainting model; train LoRAs on a base model")
    if "XL" in cls:
        if (config("model_index.json").get("text_encoder") or [None])[0] is None:
            raise InputError(f"{Path(folder).name} is an SDXL refiner; train LoRAs on the SDXL base model")
        return "sdxl"
    if cls.startswith("StableDiffusion"):
        return "sd2" if config("text_encoder/config.json").get("hidden_size") == 1024 else "sd1"
    raise InputError(
        f"{Path(folder).name}: model family {cls or 'unknown'!r} cannot be trained; allowed: "
        "SD1.x, SD2.x and SDXL base diffusers folders"
    )


def dataset_hash(images: list[dict]) -> str:
    """What was trained on: the images' content hashes and captions, in order."""
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.get('sha256', '')}\0{image['caption']}\n".encode())
    return h.hexdigest()


def run_train_job(req: TrainJobRequest, ctx) -> dict:
    rt = ctx.runtime
    settings = rt.settings
    work = settings.data_dir / "training" / ctx.job_id
    last = [0.0]
    losses: list[float] = []

    def emit(event: dict) -> None:
        if event.get("type") == "sample":  # live samples: copied where the UI may show them, never throttled
            out_dir = ctx.outputs / "training" / ctx.job_id / "live"
            out_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for p in event.get("paths") or []:
                dest = out_dir / Path(p).name
                shutil.copy2(p, dest)
                paths.append(str(dest))
            ctx.emit({"type": "sample", "step": event.get("step"), "paths": paths})
            return
        if "loss" in event:
            losses.append(float(event["loss"]))
        now = time.monotonic()
        if event.get("step") == event.get("total") or now - last[0] >= EMIT_INTERVAL_S or "step" not in event:
            last[0] = now
            ctx.emit({k: v for k, v in event.items() if k != "type"} if "step" in event else event)

    characters = ctx.characters
    character = characters.get(req.character_id)
    rt.make_room("train")  # training needs the memory the warm pipelines hold; they reload on the next job
    train = req.train
    if Path(train.model_path).is_file():  # a single-file checkpoint: trained from its diffusers conversion
        ctx.emit(
            {"step": 0, "total": train.max_train_steps, "desc": f"converting {train.model} to diffusers"}
        )
        folder = rt.models.diffusers_folder(Path(train.model_path))
        # model_path is outside the resume hash (NON_TRAJECTORY_FIELDS): a converted run resumes as usual
        train = TrainLoraRequest.build(**{**train.model_dump(), "model_path": str(folder)})
    result = train_lora(train, work, emit, ctx.is_cancelled, device=ctx.device)
    ctx.emit({"step": result["steps"], "total": req.train.max_train_steps, "desc": "exporting the LoRA"})
    return export_trained(req, ctx.job_id, result, characters, character, rt, work)


def export_trained(
    req: TrainJobRequest, job_id: str, result: dict, characters, character, rt, work: Path
) -> dict:
    """The final PEFT weights -> kohya file in models/loras, registered as the character's next version."""
    from safetensors.torch import load_file

    train = req.train
    unet_state = load_file(result["peft_state"])
    te_states = {
        part: load_file(path) for part, path in (result.get("peft_state_text_encoders") or {}).items()
    }
    tensors = peft_to_kohya(unet_state, te_states, train.alpha, train.family)
    name, version = next_lora_version(rt, character)
    model_hash = rt.models.model_hash(Path(train.model_path))
    meta = kohya_metadata(
        family=train.family,
        rank=train.rank,
        alpha=train.alpha,
        base_model_name=train.model,
        base_model_hash=model_hash,
        resolution=(train.resolution, train.resolution),
        steps=result["steps"],
        epochs=result.get("epochs", 0) or 1,
        learning_rate=train.learning_rate,
        name=name,
        extra={
            "ss_dataset_hash": req.dataset_hash,
            "ss_num_train_images": str(len(train.images)),
            "studionova_job": job_id,
            "studionova_character": character.slug,
        },
    )
    # the PEFT copy for internal use and the report live beside the training run
    peft_dir = work / "peft"
    peft_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(result["peft_state"], peft_dir / "unet.safetensors")
    return register_lora_version(req, job_id, result, character, rt, work, name, version, tensors, meta)


def next_lora_version(rt, character) -> tuple[str, int]:
    """(`<slug>-v<k>`, k): the character's next LoRA version, skipping names already taken in models/loras."""
    from sqlmodel import select

    with rt.db.session() as s:
        versions = s.exec(select(LoraFile.version).where(LoraFile.character_id == character.id)).all()
    version = max(versions, default=0) + 1
    taken = set(rt.models.roots.list_files("loras"))
    while f"{character.slug}-v{version}" in taken:
        version += 1
    return f"{character.slug}-v{version}", version


def register_lora_version(
    req: TrainJobRequest,
    job_id: str,
    result: dict,
    character,
    rt,
    work: Path,
    name: str,
    version: int,
    tensors,
    meta: dict[str, str],
    report_extra: dict | None = None,
) -> dict:
    """Save kohya-format `tensors` with `meta` as models/loras/<name>.safetensors, write `work`/report.json and
    copy the samples under outputs/, then add the LoraFile row as the character's active LoRA (the file goes
    again if the row cannot be written). Shared by the built-in trainer and the sd-scripts delegate;
    `result` carries steps, final_loss, losses, samples, resumed_from_step and seconds."""
    train = req.train
    folder = rt.models.roots.models_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    save_kohya_lora(target, tensors, meta)
    report = {
        "job_id": job_id,
        "character": character.slug,
        "lora": name,
        "version": version,
        "config": train.model_dump(mode="json", exclude={"images"}),
        "preset": req.preset,
        "dataset_hash": req.dataset_hash,
        "images": len(train.images),
        "losses": result.get("losses", []),
        "final_loss": result.get("final_loss"),
        "samples": result.get("samples", []),
        "resumed_from_step": result.get("resumed_from_step"),
        "seconds": result.get("seconds"),
        **(report_extra or {}),
    }
    with atomic_write(work / "report.json", "w") as f:
        f.write(json.dumps(report, indent=1, default=str))
    samples = []
    out_dir = rt.outputs_dir / "training" / job_id
    for i, path in enumerate(result.get("samples") or []):
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"sample-{i:03d}{Path(path).suffix}"
        shutil.copy2(path, dest)
        samples.append(str(dest))
    try:
        row = LoraFile(
            name=name,
            character_id=character.id,
            version=version,
            format="kohya",
            sha256=sha256_file(target),
            short_hash=lora_short_hash(target),
            size=target.stat().st_size,
            base_model=train.model[:200],
            meta={k: v for k, v in meta.items() if len(v) <= 2000},
            source="trained",
        )
        with rt.db.session() as s:
            s.add(row)
            c = s.get(type(character), character.id)
            c.active_lora_id, c.revision, c.updated_at = row.id, c.revision + 1, utcnow()
            s.add(c)
            s.commit()
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return {
        "lora": name,
        "version": version,
        "file": f"loras/{name}.safetensors",
        "short_hash": row.short_hash,
        "steps": result["steps"],
        "final_loss": result.get("final_loss"),
        "losses": result.get("losses", []),
        "samples": samples,
        "resumed_from_step": result.get("resumed_from_step"),
        "report": str(work / "report.json"),
        "seconds": result.get("seconds"),
    }


def _approved_images(settings: Settings, db: Database, character: Character) -> list[dict]:
    from sqlmodel import col, select

    with db.session() as s:
        items = list(
            s.exec(
                select(DatasetItem)
                .where(DatasetItem.character_id == character.id, DatasetItem.status == "approved")
                .order_by(col(DatasetItem.created_at), col(DatasetItem.id))
            )
        )
    minimum = settings.min_approved_images
    if not items:
        raise InputError(
            f"character {character.slug!r} has no approved images; approve some in the Review tab"
        )
    if len(items) < minimum:
        raise InputError(
            f"character {character.slug!r} has {len(items)} approved images; training needs at least "
            f"{minimum} (--min-approved-images)"
        )
    return [
        {
            "path": it.path,
            "caption": normalise_caption(it.caption, character.trigger_word) or character.trigger_word,
            "sha256": it.sha256,
        }
        for it in items
    ]


def _parse_concepts(value: Any) -> list[dict]:
    """[{"character": slug, "repeats": n}], also given as JSON text or "slug:repeats" lines (the form)."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"concepts is not valid JSON ({e.msg}); give a list of "
                    '{"character": slug, "repeats": n} or "slug:repeats" lines'
                ) from None
        else:
            value = []
            for line in filter(None, (part.strip() for part in text.replace(",", "\n").splitlines())):
                slug, _, repeats = line.partition(":")
                value.append({"character": slug.strip(), "repeats": repeats.strip() or 1})
    if not isinstance(value, list):
        raise InputError(f'concepts={value!r}; allowed: a list of {{"character": slug, "repeats": n}}')
    out = []
    for n, item in enumerate(value):
        if not isinstance(item, dict) or not item.get("character"):
            raise InputError(f'concepts[{n}]={item!r} needs a "character" (slug or id)')
        try:
            repeats = int(item.get("repeats", 1))
        except (TypeError, ValueError):
            raise InputError(f"concepts[{n}] repeats={item.get('repeats')!r} is not a whole number") from None
        if not 1 <= repeats <= 1000:
            raise InputError(f"concepts[{n}] repeats={repeats}; allowed: 1 to 1000")
        out.append({"character": str(item["character"]), "repeats": repeats})
    return out


def regularization_images(settings: Settings, folder: str, caption: str) -> list[dict]:
    """Class images for prior preservation from a server folder inside the allowed ingest roots (a kohya
    reg folder works as it is): each image's caption is its .txt sidecar, else `caption`."""
    paths = scan_folder(Path(folder).expanduser(), settings.ingest_root_paths, set())
    if not paths:
        raise InputError(f"regularisation folder {folder!r} has no images (.png .jpg .jpeg .webp)")
    images = []
    for path in paths:
        sidecar = path.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        if not (text or caption):
            raise InputError(
                f"regularisation image {path.name} has no .txt caption; give reg_caption (the class "
                "prompt, for example 'woman')"
            )
        images.append({"path": str(path), "caption": text or caption, "reg": True})
    return images


def build_train_request(
    values: dict[str, Any],
    *,
    settings: Settings,
    db: Database,
    characters: Characters,
    models: ModelInventory,
    device: str,
    own_packages: bool = True,
) -> TrainJobRequest:
    """Validate everything before a job exists: the character's approved set (plus any other concepts and
    regularisation images), the base model and its family, the preset and options, and their combination
    on this device (own_packages=False: the optimizer's package is another trainer's business)."""
    values = {k: v for k, v in dict(values).items() if v is not None}
    character = characters.get(values.pop("character", "") or "")
    preset = values.pop("preset", "") or ""
    if preset and preset not in PRESETS:
        raise InputError(f"preset={preset!r}; allowed: {', '.join(PRESETS)}")
    concepts = _parse_concepts(values.pop("concepts", None))
    reg_dir = str(values.pop("reg_dir", "") or "").strip()
    reg_caption = str(values.pop("reg_caption", "") or "").strip()
    images = _approved_images(settings, db, character)
    seen = {character.id}
    for concept in concepts:
        other = characters.get(concept["character"])
        if other.id in seen:
            raise InputError(f"concepts: character {other.slug!r} is given twice; each concept once")
        seen.add(other.id)
        images += [
            {**image, "repeats": concept["repeats"]} for image in _approved_images(settings, db, other)
        ]
    if reg_dir:
        images += regularization_images(settings, reg_dir, reg_caption)
    elif reg_caption:
        raise InputError("reg_caption is set but reg_dir is empty; give the folder of regularisation images")
    style = {k: v["value"] for k, v in characters.effective_style(character).items()}
    model = values.pop("model", "") or style.get("model") or models.default_model()
    roots = models.roots
    name = models.match_model(model)
    path = roots.resolve("diffusers", name, roots.list_models())
    family = training_family(path) if path.is_dir() else checkpoint_training_family(models.hashes, name, path)
    if values.get("resume_from"):  # continue from a LoRA in models/loras, by name (never any server path)
        loras = roots.list_files("loras")
        wanted = str(values["resume_from"]).removesuffix(".safetensors")
        values["resume_from"] = str(roots.resolve("loras", wanted, loras))
    train_values = {**PRESETS.get(preset, {}), **values}
    train_values.update(
        model=model,
        model_path=str(path),
        family=family,
        output_name=f"{character.slug}-lora",
        images=[{k: v for k, v in i.items() if k != "sha256"} for i in images],
    )
    if "resolution" not in values and family == "sdxl":
        train_values.setdefault("resolution", 1024)
    train = TrainLoraRequest.build(**train_values)
    if train.max_train_epochs:  # epochs decide: the steps that cover them, from the images' real buckets
        steps = steps_for_epochs(train)
        train = TrainLoraRequest.build(**{**train.model_dump(), "max_train_steps": steps})
    check_compatible(train, device, packages=own_packages)
    return TrainJobRequest.build(
        character_id=character.id, preset=preset, dataset_hash=dataset_hash(images), train=train
    )


def checkpoint_training_family(hashes: HashCache, name: str, path: Path) -> str:
    """A single-file checkpoint trains too: its family from the checkpoint inspection (the job converts it
    to a diffusers folder once, cached by the checkpoint's hash)."""
    info = CheckpointInfo.decode(hashes.cached(path, "family", lambda p: inspect_checkpoint(p).encode()))
    family = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl"}.get(info.model_type)
    if family is None:
        raise InputError(
            f"checkpoint {name!r} is {info.family}; LoRAs train on SD1.x, SD2.x and SDXL base checkpoints"
        )
    return family
