"""LoRA training on a diffusers folder: `train_lora(request, work_dir, emit, is_cancelled, device) -> dict`.

The loop follows diffusers' `examples/text_to_image/train_text_to_image_lora.py` (and its SDXL twin):
a PEFT LoRA added to the frozen UNet (and text encoders), `noise_scheduler.add_noise`, an epsilon or
v-prediction target from the scheduler config, min-SNR weighting (`compute_snr`) and offset noise, with
accelerate for mixed precision and gradient accumulation.

Resume is exact. The data order, flips and caption augmentation of micro-batch g are a pure function of
(seed, g) (see `DataPlan`), the noise and timesteps of optimizer step s come from a generator seeded by
(seed, s), and a checkpoint holds the LoRA weights, optimizer, scheduler, grad-scaler and RNG states. A run
continued from a checkpoint therefore performs the same arithmetic as an uninterrupted one.

Layout of `work_dir`:
    checkpoints/step-000123/   unet_lora.safetensors (+ text_encoder*_lora), optimizer.pt, scheduler.pt,
                               rng.pt, state.json, complete   -- built in a temp folder, renamed into place
    samples/step-000123-0.png  sample renders
    final/<output_name>.safetensors (+ .text_encoder.safetensors ...)  PEFT state dicts in save_precision
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.artifacts import TMP_PREFIX, atomic_dir, atomic_write, safetensors_header, save_png
from engine.device import oom_guard, resolve_device
from engine.errors import InputError, JobCancelledError
from engine.generation.modes import open_image
from engine.requests import MAX_SEED, RequestBase

log = logging.getLogger(__name__)

# Smallest training resolution per family (SDXL was trained at 1024 and falls apart below 512).
FAMILY_MIN_RESOLUTION: dict[str, int] = {"sd1": 64, "sd2": 64, "sdxl": 512}
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LOCON_TARGETS = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
OPTIMIZER_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
    "prodigy": ("prodigyopt", "pip install prodigyopt"),
    "adafactor": ("transformers.optimization", "pip install 'transformers>=4.30'"),
}
MAX_GRAD_NORM = 1.0
SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 7.0
SAMPLE_SEED = 1234
COMPLETE_MARKER = "complete"
CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")
# Fields that change what is saved or shown, never the weights: a changed value still resumes. model_path is
# where this machine keeps `model` (a job may move), so the model's name counts, not its path.
NON_TRAJECTORY_FIELDS = frozenset(
    {
        "model_path",
        "output_name",
        "save_precision",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "sample_prompts",
    }
)
_TRAINING_LOCK = threading.Lock()  # accelerate's state is a process-wide singleton: one training at a time


class TrainLoraRequest(RequestBase):
    """Train a LoRA on approved dataset images. JSON-serialisable; `build()` validates."""

    model: str = Field(
        min_length=1, max_length=200, description="Base model: a diffusers folder name or path"
    )
    model_path: str = Field(
        default="",
        max_length=4096,
        description="Absolute path of the diffusers folder (filled in by the studio)",
    )
    family: Literal["sd1", "sd2", "sdxl"] = Field(default="sd1", description="Model family of the base model")
    images: list[dict] = Field(
        max_length=100000,
        description='[{"path": ..., "caption": ..., "repeats"?: int, "reg"?: bool}]: approved images, each concept '
        "with its own repeats; reg=True marks a regularisation (class) image",
    )
    output_name: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Name of the LoRA (letters, digits, - and _)",
    )
    rank: int = Field(default=16, ge=1, le=256, description="LoRA rank (network dim)")
    alpha: float = Field(
        default=16.0, gt=0, le=1024, description="LoRA alpha; the update is scaled by alpha/rank"
    )
    locon: bool = Field(default=False, description="Also train the convolution layers (LoCon)")
    learning_rate: float = Field(default=1e-4, gt=0, le=10.0, description="UNet learning rate")
    text_encoder_lr: float = Field(default=5e-5, gt=0, le=10.0, description="Text encoder learning rate")
    train_text_encoder: bool = Field(
        default=False, description="Also train LoRA layers in the text encoder(s)"
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = Field(
        default="adamw", description="Optimizer"
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"] = (
        Field(default="constant", description="Learning-rate schedule")
    )
    lr_warmup_steps: int = Field(default=0, ge=0, le=100000, description="Warm-up steps of the schedule")
    lr_num_cycles: int = Field(default=1, ge=1, le=100, description="Restarts of cosine_with_restarts")
    max_train_steps: int = Field(default=1000, ge=1, le=100000, description="Optimizer steps")
    max_train_epochs: int = Field(
        default=0,
        ge=0,
        le=10000,
        description="Epochs to train (0 = max_train_steps decides); see steps_for_epochs",
    )
    batch_size: int = Field(default=1, ge=1, le=64, description="Images per micro-batch")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=256, description="Micro-batches per step")
    resolution: int = Field(
        default=512, ge=64, le=2048, multiple_of=8, description="Training resolution (side)"
    )
    bucketing: bool = Field(default=True, description="Aspect-ratio buckets of about resolution^2 pixels")
    repeats: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Times each image appears per epoch (an image's own repeats wins)",
    )
    prior_loss_weight: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Loss weight of regularisation images (kohya's prior_loss_weight)",
    )
    random_flip: bool = Field(default=False, description="Flip images horizontally at random")
    caption_dropout: float = Field(default=0.0, ge=0.0, le=1.0, description="Chance of an empty caption")
    shuffle_captions: bool = Field(default=False, description="Shuffle comma-separated caption tags")
    keep_tokens: int = Field(default=1, ge=0, le=100, description="Leading caption tags kept in place")
    noise_offset: float = Field(default=0.0, ge=0.0, le=1.0, description="Offset noise (0 = off)")
    min_snr_gamma: float = Field(
        default=0.0, ge=0.0, le=100.0, description="Min-SNR weighting gamma (0 = off)"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="Mixed precision")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory")
    cache_latents: bool = Field(default=True, description="Encode every image once before training")
    save_precision: Literal["fp16", "bf16", "float"] = Field(
        default="fp16", description="dtype of the saved LoRA"
    )
    seed: int = Field(default=42, ge=0, le=MAX_SEED, description="Seed of data order, noise and init")
    checkpoint_every: int = Field(
        default=100, ge=0, le=100000, description="Steps between checkpoints (0 = end)"
    )
    keep_checkpoints: int = Field(default=3, ge=1, le=100, description="Checkpoints kept")
    sample_every: int = Field(
        default=0, ge=0, le=100000, description="Steps between sample renders (0 = off)"
    )
    sample_prompts: list[str] = Field(
        default_factory=list, max_length=16, description="Prompts of the samples"
    )
    resume_from: str = Field(
        default="", max_length=4096, description="A LoRA .safetensors (PEFT or kohya) to continue training"
    )

    @field_validator("images")
    @classmethod
    def _check_images(cls, v: list[dict]) -> list[dict]:
        if not v:
            raise ValueError("the dataset has no approved images")
        for n, item in enumerate(v):
            if not isinstance(item.get("path"), str) or not item["path"]:
                raise ValueError(f'image {n} has no "path"; each image is {{"path": str, "caption": str}}')
            if not isinstance(item.get("caption", ""), str):
                raise ValueError(f"image {n}: caption must be a string")
            repeats = item.get("repeats", 1)
            if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 1000:
                raise ValueError(f"image {n}: repeats={repeats!r}; allowed: an integer from 1 to 1000")
            if not isinstance(item.get("reg", False), bool):
                raise ValueError(f"image {n}: reg={item['reg']!r} must be true or false")
        if all(item.get("reg") for item in v):
            raise ValueError(
                "every image is a regularisation image; training needs at least one of the concept's"
            )
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> TrainLoraRequest:
        resolution_problem(self.family, self.resolution, raise_as=ValueError)
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ValueError(
                f"lr_warmup_steps={self.lr_warmup_steps} has no effect with lr_scheduler='constant'; "
                "use 'constant_with_warmup' or set lr_warmup_steps to 0"
            )
        if self.lr_warmup_steps > self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps={self.lr_warmup_steps} is more than max_train_steps={self.max_train_steps}"
            )
        if self.sample_every and not self.sample_prompts:
            raise ValueError(f"sample_every={self.sample_every} needs at least one sample_prompts entry")
        if self.resume_from and not self.resume_from.endswith(".safetensors"):
            raise ValueError(f"resume_from={self.resume_from!r} must be a .safetensors LoRA file")
        return self

    @property
    def target_modules(self) -> list[str]:
        return UNET_TARGETS + (LOCON_TARGETS if self.locon else [])


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "rank": 8,
        "alpha": 8.0,
        "learning_rate": 2e-4,
        "max_train_steps": 400,
        "lr_scheduler": "constant",
        "checkpoint_every": 100,
        "cache_latents": True,
    },
    "balanced": {
        "rank": 16,
        "alpha": 16.0,
        "learning_rate": 1e-4,
        "max_train_steps": 1200,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        "min_snr_gamma": 5.0,
        "noise_offset": 0.03,
        "random_flip": True,
        "checkpoint_every": 200,
    },
    "quality": {
        "rank": 32,
        "alpha": 16.0,
        "learning_rate": 1e-4,
        "max_train_steps": 3000,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "min_snr_gamma": 5.0,
        "noise_offset": 0.05,
        "train_text_encoder": True,
        "text_encoder_lr": 5e-5,
        "shuffle_captions": True,
        "keep_tokens": 1,
        "gradient_checkpointing": True,
        "checkpoint_every": 250,
    },
}


def resolution_problem(family: str, resolution: int, raise_as: type[Exception] = InputError) -> None:
    minimum = FAMILY_MIN_RESOLUTION[family]
    if resolution < minimum:
        raise raise_as(
            f"resolution={resolution} is below the {family} minimum of {minimum}; use {minimum} or more"
        )


def check_compatible(req: TrainLoraRequest, device: str, packages: bool = True) -> None:
    """Refuse a request this device or this installation cannot run, naming the field and the fix.
    packages=False skips the optimizer-package check (another trainer, with its own environment, runs it)."""
    import importlib

    resolution_problem(req.family, req.resolution)
    if device == "auto" or device.startswith("cuda"):
        device = resolve_device(device).device  # InputError when that GPU is not there
    if device == "cpu" and req.mixed_precision == "fp16":
        raise InputError("mixed_precision='fp16' is not supported on the CPU; use 'bf16' or 'no'")
    if device.startswith("cuda") and req.mixed_precision == "bf16":
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise InputError(f"mixed_precision='bf16' is not supported by the GPU of {device}; use 'fp16'")
    if packages and req.optimizer in OPTIMIZER_PACKAGES:
        module, install = OPTIMIZER_PACKAGES[req.optimizer]
        try:
            importlib.import_module(module)
        except ImportError:
            raise InputError(
                f"optimizer={req.optimizer!r} needs the {module.split('.')[0]} package ({install}); "
                "or use optimizer='adamw'"
            ) from None
        if req.optimizer == "adamw8bit" and not device.startswith("cuda"):
            raise InputError(f"optimizer='adamw8bit' needs a CUDA device, not {device!r}; use 'adamw'")


def request_hash(req: TrainLoraRequest) -> str:
    """Hash of everything that shapes the weights: a checkpoint resumes only a request with the same hash."""
    data = req.model_dump(exclude=set(NON_TRAJECTORY_FIELDS))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _mix(seed: int, *parts: Any) -> int:
    """A 63-bit seed derived from (seed, parts): independent streams for order, noise, captions."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# --- buckets ------------------------------------------------------------------------------------------


def bucket_step(resolution: int) -> int:
    """Grid of the bucket sides: resolution/8 rounded down to a multiple of 8, between 8 and 64.

    512 and above use kohya's 64; a tiny test resolution of 64 gets 8, so it still has a 2:1 bucket."""
    return max(8, min(64, resolution // 8 // 8 * 8))


@lru_cache(maxsize=32)
def bucket_sizes(resolution: int) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets: sides on the `bucket_step` grid between resolution/2 and 2*resolution,
    each with the largest area not above resolution^2 (kohya's rule)."""
    step = bucket_step(resolution)
    area = resolution * resolution
    low, high = max(step, resolution // 2 // step * step), resolution * 2
    sizes = {(resolution, resolution)}
    for w in range(low, high + 1, step):
        h = area // w // step * step
        if low <= h <= high:
            sizes.add((w, h))
            sizes.add((h, w))
    return tuple(sorted(sizes))


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (ties: the larger area)."""
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def augment_caption(caption: str, rng: random.Random, dropout: float, shuffle: bool, keep_tokens: int) -> str:
    """Caption dropout (empty caption), then shuffling of comma-separated tags after the first keep_tokens."""
    drop = rng.random() < dropout  # drawn even at 0 so the stream does not depend on the setting
    if drop:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


@dataclass(frozen=True)
class Sample:
    image: int  # index into the request's images
    flip: bool
    caption: str


class DataPlan:
    """Which images, flips and captions make micro-batch g: a pure function of (seed, g).

    An epoch groups the (repeated) images by bucket, shuffles inside each bucket, cuts batches of
    batch_size (a batch never mixes buckets) and shuffles the batches, all from a generator seeded by
    (seed, epoch). Every epoch has the same number of batches, so g -> (epoch, index) needs no history."""

    def __init__(self, req: TrainLoraRequest, buckets: list[tuple[int, int]]):
        self.seed, self.batch_size = req.seed, req.batch_size
        self.random_flip = req.random_flip
        self.caption_args = (req.caption_dropout, req.shuffle_captions, req.keep_tokens)
        self.captions = [str(item.get("caption", "")) for item in req.images]
        self.groups: dict[tuple[int, int], list[int]] = {}
        train, reg = [], []
        for index, item in enumerate(req.images):
            (reg if item.get("reg") else train).extend([index] * int(item.get("repeats", req.repeats)))
        # as kohya: regularisation images are cycled (or cut) to as many as the repeated training images
        reg = [reg[i % len(reg)] for i in range(len(train))] if reg else []
        for index in train + reg:
            self.groups.setdefault(buckets[index], []).append(index)
        self.weights = [req.prior_loss_weight if item.get("reg") else 1.0 for item in req.images]
        self.batches_per_epoch = sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: self._shuffle(epoch)}  # one epoch at a time is all a run needs
        return self._epochs[epoch]

    def _shuffle(self, epoch: int) -> list[list[int]]:
        import torch

        gen = torch.Generator().manual_seed(_mix(self.seed, "order", epoch))
        batches = []
        for bucket in sorted(self.groups):
            items = self.groups[bucket]
            order = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def position(self, g: int) -> tuple[int, int]:
        return divmod(g, self.batches_per_epoch)

    def micro_batch(self, g: int) -> list[Sample]:
        epoch, index = self.position(g)
        out = []
        for slot, image in enumerate(self.epoch_batches(epoch)[index]):
            rng = random.Random(_mix(self.seed, "sample", epoch, index, slot))
            flip = self.random_flip and rng.random() < 0.5
            out.append(Sample(image, flip, augment_caption(self.captions[image], rng, *self.caption_args)))
        return out

    def steps_for(self, epochs: int, accumulation: int) -> int:
        """Optimizer steps that cover `epochs` whole epochs (kohya's max_train_epochs)."""
        return max(1, math.ceil(epochs * self.batches_per_epoch / accumulation))


def steps_for_epochs(req: TrainLoraRequest) -> int:
    """max_train_steps for req.max_train_epochs, from the real buckets of its images (which decide the
    number of batches in an epoch)."""
    plan = DataPlan(req, [item.bucket for item in prepare_images(req)])
    return plan.steps_for(req.max_train_epochs, req.gradient_accumulation_steps)


# --- images -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    path: Path
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int]  # (width, height) trained at

    def crop_box(self) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """(resized size, (left, top, right, bottom)): scale to cover the bucket, then a centre crop."""
        (w, h), (bw, bh) = self.size, self.bucket
        scale = max(bw / w, bh / h)
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
        left, top = (rw - bw) // 2, (rh - bh) // 2
        return (rw, rh), (left, top, left + bw, top + bh)

    def time_ids(self, flip: bool) -> list[int]:
        """SDXL micro-conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
        (rw, _), (left, top, _, _) = self.crop_box()
        if flip:
            left = rw - self.bucket[0] - left
        return [self.size[1], self.size[0], top, left, self.bucket[1], self.bucket[0]]

    def pixels(self, flip: bool):
        """CHW float tensor in [-1, 1] at the bucket size."""
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        img = ImageOps.exif_transpose(open_image(self.path, "images entry")).convert("RGB")
        resized, box = self.crop_box()
        img = img.resize(resized, Image.Resampling.LANCZOS).crop(box)
        if flip:
            img = ImageOps.mirror(img)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def prepare_images(req: TrainLoraRequest) -> list[ImageItem]:
    """Verify every image and give it its bucket (or the square resolution when bucketing is off)."""
    from PIL import ImageOps

    items = []
    for item in req.images:
        path = Path(item["path"])
        img = ImageOps.exif_transpose(open_image(path, "images entry"))
        size = (img.width, img.height)
        bucket = bucket_for(*size, req.resolution) if req.bucketing else (req.resolution, req.resolution)
        items.append(ImageItem(path, size, bucket))
    return items


# --- model parts --------------------------------------------------------------------------------------


@dataclass
class Parts:
    family: str
    tokenizers: list
    text_encoders: list
    vae: Any
    unet: Any
    noise_scheduler: Any

    @property
    def te_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]


def _model_path(req: TrainLoraRequest) -> Path:
    path = Path(req.model_path or req.model)
    if not (path / "model_index.json").is_file() or not path.is_absolute():
        raise InputError(
            f"model_path={req.model_path!r} is not the absolute path of a diffusers folder "
            "(with model_index.json); "
            f"the studio fills it in from model={req.model!r}"
        )
    return path


def load_parts(req: TrainLoraRequest) -> Parts:
    """Tokenizer(s), text encoder(s), VAE, UNet and a DDPMScheduler from the folder, local files only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = _model_path(req)
    sdxl = req.family == "sdxl"
    needed = ["tokenizer", "text_encoder", "vae", "unet", "scheduler"] + (
        ["tokenizer_2", "text_encoder_2"] * sdxl
    )
    missing = [name for name in needed if not (path / name).is_dir()]
    if missing:
        raise InputError(f"model {req.model!r} ({req.family}) has no {', '.join(missing)} folder in {path}")
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    if (unet.config.addition_embed_type == "text_time") != sdxl:
        actual = "an SDXL" if not sdxl else "not an SDXL"
        raise InputError(
            f"family={req.family!r} but model {req.model!r} is {actual} model; set family to match"
        )
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(
            f"model {req.model!r}: prediction_type {scheduler.config.prediction_type!r} cannot be trained; "
            "allowed: epsilon, v_prediction"
        )
    return Parts(req.family, tokenizers, encoders, vae, unet, scheduler)


def add_lora_adapters(req: TrainLoraRequest, parts: Parts) -> dict[str, Any]:
    """Freeze the base weights and add the PEFT LoRA ("default" adapter); returns name -> trained model.

    The gaussian init draws from a forked RNG seeded by the request, so it never disturbs the caller."""
    import torch
    from peft import LoraConfig

    for model in [parts.unet, parts.vae, *parts.text_encoders]:
        model.requires_grad_(False)
    trained = {"unet": parts.unet}
    if req.train_text_encoder:
        trained.update(zip(parts.te_names, parts.text_encoders, strict=True))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(req.seed, "init"))
        for name, model in trained.items():
            targets = req.target_modules if name == "unet" else TEXT_ENCODER_TARGETS
            model.add_adapter(
                LoraConfig(
                    r=req.rank, lora_alpha=req.alpha, init_lora_weights="gaussian", target_modules=targets
                )
            )
    return trained


def lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" would look up the base model's config (possibly on the Hub)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def set_lora_state(model, state: dict, what: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise InputError(f"{what} has LoRA layers this model has not (for example {unexpected[0]!r})")


_RESUME_ADAPTER = "resume_from"


def load_resume_from(req: TrainLoraRequest, parts: Parts, trained: dict[str, Any]) -> list[str]:
    """Start from the weights of a LoRA file (ours, diffusers/PEFT or kohya); returns the parts loaded.

    A file with another alpha is rescaled (lora_B x its scale / ours) so it means the same update;
    another rank, or layers outside this run's targets, is an InputError."""
    path = Path(req.resume_from)
    if not path.is_absolute() or not path.is_file():
        raise InputError(f"resume_from={req.resume_from!r} is not an existing LoRA file (an absolute path)")
    try:
        _, header = safetensors_header(path)
    except ValueError as e:
        raise InputError(f"resume_from: {e}") from None
    meta = header.get("__metadata__") or {}
    if meta.get("studionova_format") == "peft":
        return _load_own_lora(req, path, meta, trained)
    return _load_foreign_lora(req, path, parts, trained)


def _load_own_lora(req: TrainLoraRequest, path: Path, meta: dict, trained: dict[str, Any]) -> list[str]:
    from safetensors.torch import load_file

    if int(meta["rank"]) != req.rank:
        raise InputError(
            f"resume_from {path.name} has rank {meta['rank']}, but rank={req.rank}; use the same rank"
        )
    factor = (float(meta["lora_alpha"]) / int(meta["rank"])) / (req.alpha / req.rank)
    stem = path.name.removesuffix(".safetensors")
    loaded = []
    for name, model in trained.items():
        file = path if name == "unet" else path.with_name(f"{stem}.{name}.safetensors")
        if not file.is_file():
            continue
        state = {k: v * factor if ".lora_B." in k else v for k, v in load_file(file).items()}
        set_lora_state(model, state, f"resume_from {file.name}")
        loaded.append(name)
    return loaded


def _load_foreign_lora(req: TrainLoraRequest, path: Path, parts: Parts, trained: dict[str, Any]) -> list[str]:
    """Through diffusers' own loaders (which know kohya and diffusers layouts) into a scratch adapter,
    then copied into the trained adapter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    loader = StableDiffusionXLPipeline if req.family == "sdxl" else StableDiffusionPipeline
    try:
        state, alphas = loader.lora_state_dict(str(path), unet_config=parts.unet.config)
        if not any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in state):
            state = {f"unet.{k}": v for k, v in state.items()}  # a bare PEFT UNet state dict
        loaded = []
        for name, model in trained.items():
            if not any(k.startswith(f"{name}.") for k in state):
                continue
            if name == "unet":
                loader.load_lora_into_unet(state, alphas, model, adapter_name=_RESUME_ADAPTER)
            else:
                loader.load_lora_into_text_encoder(
                    state, alphas, model, prefix=name, adapter_name=_RESUME_ADAPTER
                )
            _adopt_adapter(model, req, path, name)
            loaded.append(name)
    except InputError:
        raise
    except (ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"resume_from {path.name} does not fit model {req.model!r}: {e}") from None
    if not loaded:
        raise InputError(
            f"resume_from {path.name} has no LoRA layers for the parts trained here ({', '.join(trained)})"
        )
    return loaded


def _adopt_adapter(model, req: TrainLoraRequest, path: Path, part: str) -> None:
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or _RESUME_ADAPTER not in module.lora_A:
                continue
            if "default" not in module.lora_A:
                raise InputError(
                    f"resume_from {path.name} trains {part}.{module_name}, which this run does not "
                    f"(targets {req.target_modules if part == 'unet' else TEXT_ENCODER_TARGETS}); "
                    "set locon to match"
                )
            src_a, dst_a = module.lora_A[_RESUME_ADAPTER].weight, module.lora_A["default"].weight
            if src_a.shape != dst_a.shape:
                raise InputError(
                    f"resume_from {path.name} has rank {src_a.shape[0]} at {part}.{module_name}, "
                    f"but rank={req.rank}"
                )
            factor = module.scaling[_RESUME_ADAPTER] / module.scaling["default"]
            dst_a.copy_(src_a)
            module.lora_B["default"].weight.copy_(module.lora_B[_RESUME_ADAPTER].weight * factor)
    if hasattr(model, "delete_adapters"):
        model.delete_adapters(_RESUME_ADAPTER)
    else:
        model.delete_adapter(_RESUME_ADAPTER)
    model.set_adapter("default")


# --- loss ---------------------------------------------------------------------------------------------


def encode_captions(
    parts: Parts, captions: list[str], device, encoders: list | None = None
) -> tuple[Any, Any]:
    """(encoder_hidden_states, pooled or None), as the diffusers pipelines encode prompts."""
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(parts.tokenizers, encoders or parts.text_encoders, strict=True):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        if parts.family != "sdxl":
            embeds.append(encoder(ids)[0])
            continue
        out = encoder(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
        pooled = out[0]  # text_encoder_2's projected pooled output (the last encoder wins)
    return torch.cat(embeds, dim=-1), pooled


def diffusion_loss(parts: Parts, req: TrainLoraRequest, latents, embeds, added, gen, unet=None, weights=None):
    """MSE of the UNet's prediction against the epsilon (or v) target at random timesteps; min-SNR
    weighting when gamma > 0, offset noise when > 0 (diffusers' train_text_to_image_lora.py); `weights`
    (one per sample: regularisation images' prior_loss_weight) scale each sample's loss as kohya does."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    sched = parts.noise_scheduler
    unet = unet if unet is not None else parts.unet
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    if req.noise_offset:
        noise = noise + req.noise_offset * torch.randn(
            (b, c, 1, 1), generator=gen, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen, device=latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "epsilon":
        target = noise
    else:
        target = sched.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
    if not req.min_snr_gamma and weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if weights is not None:
        loss = loss * torch.as_tensor(weights, device=loss.device, dtype=loss.dtype)
    if req.min_snr_gamma:
        snr = compute_snr(sched, timesteps)
        snr_weights = torch.clamp(snr, max=req.min_snr_gamma)
        snr_weights = (
            snr_weights / snr if sched.config.prediction_type == "epsilon" else snr_weights / (snr + 1)
        )
        loss = loss * snr_weights
    return loss.mean()


class LatentSource:
    """Latents of a micro-batch: from the cache (encoded once before training) or encoded now."""

    def __init__(
        self, parts: Parts, items: list[ImageItem], device, vae_dtype, seed: int, flips: tuple[bool, ...]
    ):
        self.parts, self.items, self.device, self.vae_dtype, self.seed = parts, items, device, vae_dtype, seed
        self.flips = flips
        self.cache: dict[tuple[int, bool], Any] = {}

    def encode(self, image: int, flip: bool, gen):
        import torch

        vae = self.parts.vae
        pixels = self.items[image].pixels(flip).unsqueeze(0).to(self.device, dtype=self.vae_dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist.sample(generator=gen)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()[0]

    def fill_cache(self, on_progress: Callable[[int, int], None]) -> None:
        import torch

        keys = [(i, f) for i in range(len(self.items)) for f in self.flips]
        for n, (image, flip) in enumerate(keys):
            on_progress(n, len(keys))
            gen = torch.Generator(device=self.device).manual_seed(_mix(self.seed, "cache", image, flip))
            self.cache[(image, flip)] = self.encode(image, flip, gen)

    def batch(self, samples: list[Sample], gen):
        import torch

        if self.cache:
            return torch.stack([self.cache[(s.image, s.flip)] for s in samples])
        return torch.stack([self.encode(s.image, s.flip, gen) for s in samples])


def _conditioning(parts: Parts, items: list[ImageItem], samples: list[Sample], device, dtype, encoders=None):
    import torch

    embeds, pooled = encode_captions(parts, [s.caption for s in samples], device, encoders)
    if parts.family != "sdxl":
        return embeds, None
    time_ids = torch.tensor([items[s.image].time_ids(s.flip) for s in samples], device=device, dtype=dtype)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids}


def evaluate_loss(
    req: TrainLoraRequest, lora: Path | None = None, device: str = "cpu", seed: int = 0, draws: int = 4
) -> float:
    """Mean loss over every image (plain captions, no flip) and `draws` fixed noise/timestep draws, with
    the base model or with a LoRA saved by `train_lora` (its `peft_state`). The same draws every call,
    so two values are comparable: a test of whether training learned."""
    import torch

    parts = load_parts(req)
    if lora is not None:
        trained = add_lora_adapters(req, parts)
        _load_own_lora(req, Path(lora), safetensors_header(lora)[1].get("__metadata__") or {}, trained)
    for model in [parts.unet, parts.vae, *parts.text_encoders]:
        model.to(device).eval()
    items = prepare_images(req)
    source = LatentSource(parts, items, device, torch.float32, seed, (False,))
    total, count = 0.0, 0
    with torch.no_grad():
        for image in range(len(items)):
            sample = Sample(image, False, str(req.images[image].get("caption", "")))
            gen = torch.Generator(device=device).manual_seed(_mix(seed, "eval-latent", image))
            latents = source.batch([sample], gen)
            embeds, added = _conditioning(parts, items, [sample], device, torch.float32)
            for d in range(draws):
                gen = torch.Generator(device=device).manual_seed(_mix(seed, "eval", image, d))
                total += float(diffusion_loss(parts, req, latents, embeds, added, gen))
                count += 1
    return total / count


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _remove(folder: Path) -> None:
    """Rename out of the checkpoint namespace first, so a crash mid-delete leaves only a temp name."""
    doomed = folder.with_name(f"{TMP_PREFIX}rm-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def scan_checkpoints(root: Path, wanted_hash: str) -> list[Checkpoint]:
    """Complete checkpoints of this request, oldest first. Partial ones (a temp name, or no `complete`
    marker) are removed; complete ones of another request are left alone and ignored."""
    found = []
    if not root.is_dir():
        return found
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX) or (
            CHECKPOINT_NAME.match(p.name) and not (p / COMPLETE_MARKER).is_file()
        ):
            log.warning("removing partial training checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
            continue
        m = CHECKPOINT_NAME.match(p.name)
        if not m:
            continue
        try:
            state = json.loads((p / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("removing unreadable training checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
            continue
        if state.get("request_hash") != wanted_hash:
            log.warning("ignoring checkpoint %s of another request (%s)", p, state.get("request_hash"))
            continue
        found.append(Checkpoint(p, int(m.group(1)), state))
    return sorted(found, key=lambda c: c.step)


def _rng_state() -> dict:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_torch(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# --- the run ------------------------------------------------------------------------------------------


def _weight_dtype(mixed_precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _make_accelerator(req: TrainLoraRequest, device: str):
    """A fresh accelerate state for this run (its state objects are process-wide singletons)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return Accelerator(
        mixed_precision=req.mixed_precision,
        gradient_accumulation_steps=req.gradient_accumulation_steps,
        cpu=device == "cpu",
    )


def _enable_checkpointing(text_encoder) -> None:
    # transformers 5.x renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _make_optimizer(req: TrainLoraRequest, groups: list[dict]):
    import torch

    if req.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=1e-2)
    if req.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    if req.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, weight_decay=1e-2, safeguard_warmup=True, use_bias_correction=True)
    from transformers.optimization import Adafactor

    return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False)


def _metadata(req: TrainLoraRequest, part: str, steps: int, fmt: str = "peft") -> dict[str, str]:
    targets = req.target_modules if part == "unet" else TEXT_ENCODER_TARGETS
    return {
        "studionova_format": fmt,
        "target": part,
        "rank": str(req.rank),
        "lora_alpha": repr(req.alpha),
        "target_modules": json.dumps(targets),
        "family": req.family,
        "base_model": req.model,
        "steps": str(steps),
        "request_hash": request_hash(req),
        "output_name": req.output_name,
    }


def train_lora(
    req: TrainLoraRequest,
    work_dir: Path,
    emit: Callable[[dict], None],
    is_cancelled: Callable[[], bool],
    device: str = "cpu",
) -> dict:
    """Train (or resume) the LoRA described by `req` in `work_dir`; see the module docstring for the layout.

    Emits a progress dict every step; on cancel writes a checkpoint and raises JobCancelledError. Returns
    {"steps", "final_loss", "losses", "checkpoint", "peft_state", "peft_state_text_encoders", "samples",
    "resumed_from_step", "epochs", "seconds"}."""
    if device == "auto":
        device = resolve_device("auto").device
    check_compatible(req, device)
    while not _TRAINING_LOCK.acquire(timeout=1.0):
        if is_cancelled():
            raise JobCancelledError("training was cancelled while waiting for another training to finish")

    advice = (
        f"out of memory on {device} training at resolution={req.resolution}, batch_size={req.batch_size}: "
        "lower batch_size or resolution, or turn on gradient_checkpointing, mixed_precision or cache_latents "
        "(the last checkpoint is kept; the job resumes from it)"
    )
    try:
        with oom_guard(device, advice):
            return _Run(req, Path(work_dir), emit, is_cancelled, device).run()
    finally:
        _TRAINING_LOCK.release()


class _Run:
    def __init__(self, req, work_dir: Path, emit, is_cancelled, device: str):
        self.req, self.work_dir, self.emit, self.is_cancelled, self.device = (
            req,
            work_dir,
            emit,
            is_cancelled,
            device,
        )
        self.hash = request_hash(req)
        self.ckpt_root = work_dir / "checkpoints"
        self.started = time.monotonic()

    # setup ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        req = self.req
        self.items = prepare_images(req)
        self.plan = DataPlan(req, [it.bucket for it in self.items])
        self.has_reg = any(item.get("reg") for item in req.images)
        parts = self.parts = load_parts(req)
        self.accelerator = acc = _make_accelerator(req, self.device)
        self.dev = acc.device
        self.weight_dtype = _weight_dtype(req.mixed_precision)
        # SDXL's VAE overflows in fp16 (diffusers' SDXL example keeps it in fp32 too)
        self.vae_dtype = torch.float32 if req.family == "sdxl" else self.weight_dtype
        # as diffusers' example: base weights to the device in the compute dtype, then the adapters, whose
        # trainable weights are cast back to fp32
        parts.unet.to(self.dev, dtype=self.weight_dtype)
        parts.vae.to(self.dev, dtype=self.vae_dtype)
        for te in parts.text_encoders:
            te.to(self.dev, dtype=self.weight_dtype)
        trained = add_lora_adapters(req, parts)
        cast_training_params(list(trained.values()), dtype=torch.float32)
        if req.resume_from:
            load_resume_from(req, parts, trained)
        for model in trained.values():
            for pname, param in model.named_parameters():
                param.requires_grad_(".lora_" in pname and ".default" in pname)
        if req.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            for name in trained:
                if name != "unet":
                    _enable_checkpointing(trained[name])
        groups = []
        for name, model in trained.items():
            params = [p for p in model.parameters() if p.requires_grad]
            groups.append(
                {"params": params, "lr": req.learning_rate if name == "unet" else req.text_encoder_lr}
            )
        self.params = [p for g in groups for p in g["params"]]
        optimizer = _make_optimizer(req, groups)
        scheduler = get_scheduler(
            req.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=req.lr_warmup_steps * acc.num_processes,
            num_training_steps=req.max_train_steps * acc.num_processes,
            num_cycles=req.lr_num_cycles,
        )
        names = list(trained)
        prepared = acc.prepare(*trained.values(), optimizer, scheduler)
        self.trained = dict(zip(names, prepared[: len(names)], strict=True))
        self.optimizer, self.scheduler = prepared[len(names)], prepared[len(names) + 1]
        self.encoders = [
            self.trained.get(n, te) for n, te in zip(parts.te_names, parts.text_encoders, strict=True)
        ]
        for model in self.trained.values():
            model.train()

    def raw(self, name: str):
        return self.accelerator.unwrap_model(self.trained[name])

    # checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        import torch
        from safetensors.torch import save_file

        target = self.ckpt_root / f"step-{step:06d}"
        with atomic_dir(target) as tmp:
            for name in self.trained:
                state = {k: v.float() for k, v in lora_state(self.raw(name)).items()}
                save_file(state, tmp / f"{name}_lora.safetensors", metadata=_metadata(self.req, name, step))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            epoch, index = self.plan.position(step * self.req.gradient_accumulation_steps)
            state = {
                "step": step,
                "request_hash": self.hash,
                "epoch": epoch,
                "batch_in_epoch": index,
                "micro_batches_done": step * self.req.gradient_accumulation_steps,
                "losses": self.losses,
                "request": self.req.model_dump(),
            }
            (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
            _fsync_tree(tmp)
            (tmp / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
            _fsync_tree(tmp)
        self.saved_step = step
        for old in scan_checkpoints(self.ckpt_root, self.hash)[: -self.req.keep_checkpoints]:
            _remove(old.path)
        return target

    def try_resume(self) -> int | None:
        """Restore the newest readable checkpoint of this request; returns its step (None: fresh start)."""
        for ckpt in reversed(scan_checkpoints(self.ckpt_root, self.hash)):
            try:  # read everything first, so a damaged checkpoint changes nothing and the older one is tried
                from safetensors.torch import load_file

                weights = {name: load_file(ckpt.path / f"{name}_lora.safetensors") for name in self.trained}
                optimizer = _load_torch(ckpt.path / "optimizer.pt")
                scheduler = _load_torch(ckpt.path / "scheduler.pt")
                scaler = _load_torch(ckpt.path / "scaler.pt") if (ckpt.path / "scaler.pt").is_file() else None
                rng = _load_torch(ckpt.path / "rng.pt")
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("training checkpoint %s is unreadable (%s); trying an older one", ckpt.path, e)
                continue
            for name, state in weights.items():
                set_lora_state(self.raw(name), state, f"checkpoint {ckpt.path.name}")
            self.optimizer.load_state_dict(optimizer)
            self.scheduler.load_state_dict(scheduler)
            if scaler is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(scaler)
            self.rng = rng
            self.losses = [float(x) for x in ckpt.state.get("losses", [])][: ckpt.step]
            self.saved_step = ckpt.step
            return ckpt.step
        return None

    # samples ----------------------------------------------------------------------------------------
    def render_samples(self, step: int) -> list[str]:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        parts, req = self.parts, self.req
        unet = self.raw("unet")
        encoders = [
            self.raw(n) if n in self.trained else te
            for n, te in zip(parts.te_names, parts.text_encoders, strict=True)
        ]
        scheduler = EulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
        if req.family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=parts.vae,
                text_encoder=encoders[0],
                text_encoder_2=encoders[1],
                tokenizer=parts.tokenizers[0],
                tokenizer_2=parts.tokenizers[1],
                unet=unet,
                scheduler=scheduler,
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=parts.vae,
                text_encoder=encoders[0],
                tokenizer=parts.tokenizers[0],
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        paths = []
        models = list(self.trained.values())
        for m in models:
            m.eval()
        cuda = [self.dev] if self.dev.type == "cuda" else []
        try:  # own generators and a forked RNG: sampling never changes the training trajectory
            with torch.random.fork_rng(devices=cuda), torch.no_grad(), self.accelerator.autocast():
                for k, prompt in enumerate(req.sample_prompts):
                    gen = torch.Generator(device=self.dev).manual_seed(SAMPLE_SEED + k)
                    latents = pipe(
                        prompt,
                        num_inference_steps=SAMPLE_STEPS,
                        guidance_scale=SAMPLE_GUIDANCE,
                        height=req.resolution,
                        width=req.resolution,
                        generator=gen,
                        output_type="latent",
                    ).images
                    image = pipe.image_processor.postprocess(self.decode(latents), output_type="pil")[0]
                    path = self.work_dir / "samples" / f"step-{step:06d}-{k}.png"
                    save_png(image, path, {"parameters": f"{prompt}\nStep: {step}, Seed: {SAMPLE_SEED + k}"})
                    paths.append(str(path))
        finally:
            for m in models:
                m.train()
        self.emit({"type": "sample", "step": step, "paths": paths})
        return paths

    def decode(self, latents):
        """Latents -> image tensor with the VAE in its own dtype and autocast off (SDXL's VAE stays fp32:
        an fp16 decode overflows)."""
        import torch

        vae = self.parts.vae
        cfg = vae.config
        latents = latents.to(self.vae_dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.autocast(device_type=self.dev.type, enabled=False):
            return vae.decode(latents, return_dict=False)[0]

    # final ------------------------------------------------------------------------------------------
    def write_final(self) -> tuple[Path, dict[str, str]]:
        import torch
        from safetensors.torch import save

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}[
            self.req.save_precision
        ]
        name = self.req.output_name
        target = self.work_dir / "final"
        with atomic_dir(target) as tmp:
            for part in self.trained:
                state = {k: v.to(dtype) for k, v in lora_state(self.raw(part)).items()}
                file = tmp / (f"{name}.safetensors" if part == "unet" else f"{name}.{part}.safetensors")
                with atomic_write(file) as f:
                    f.write(save(state, metadata=_metadata(self.req, part, self.req.max_train_steps)))
        te = {part: str(target / f"{name}.{part}.safetensors") for part in self.trained if part != "unet"}
        return target / f"{name}.safetensors", te

    # loop -------------------------------------------------------------------------------------------
    def cancel(self, step: int):
        where = ""
        if step > 0:
            path = (
                self.save_checkpoint(step) if self.saved_step != step else self.ckpt_root / f"step-{step:06d}"
            )
            where = f"; checkpoint {path}"
        raise JobCancelledError(f"training cancelled at step {step}/{self.req.max_train_steps}{where}")

    def run(self) -> dict:
        from accelerate.utils import set_seed

        req, n = self.req, self.req.max_train_steps
        self.losses: list[float] = []
        self.saved_step: int | None = None
        self.rng: dict | None = None
        self.setup()
        resumed = self.try_resume()
        step = resumed or 0
        if step < n:
            flips = (False, True) if req.random_flip else (False,)
            self.source = LatentSource(self.parts, self.items, self.dev, self.vae_dtype, req.seed, flips)
            if req.cache_latents:
                self.source.fill_cache(self._caching_progress(step))
                if not req.sample_every and self.dev.type != "cpu":
                    self.parts.vae.to("cpu")  # not needed again: its memory goes to training
        # global RNGs matter only to code that draws from them (dropout); set or restored just before the loop
        if self.rng is not None:
            _set_rng_state(self.rng)
        else:
            set_seed(req.seed)
        samples: list[str] = []
        loop_started, first = time.monotonic(), step
        while step < n:
            if self.is_cancelled():
                self.cancel(step)
            loss = self.train_step(step)
            step += 1
            self.losses.append(loss)
            lr = float(self.scheduler.get_last_lr()[0])
            eta = (time.monotonic() - loop_started) / (step - first) * (n - step)
            self.emit(
                {
                    "step": step,
                    "total": n,
                    "eta": round(eta, 1),
                    "desc": f"step {step}/{n} loss {loss:.4f}",
                    "loss": loss,
                    "lr": lr,
                }
            )
            if req.checkpoint_every and step % req.checkpoint_every == 0 and step < n:
                self.save_checkpoint(step)
            if req.sample_every and step % req.sample_every == 0:
                samples += self.render_samples(step)
        last = self.save_checkpoint(n) if self.saved_step != n else self.ckpt_root / f"step-{n:06d}"
        peft_state, te_states = self.write_final()
        samples_dir = self.work_dir / "samples"
        all_samples = (
            sorted(str(p) for p in samples_dir.glob("step-*.png")) if samples_dir.is_dir() else samples
        )
        return {
            "steps": n,
            "final_loss": self.losses[-1] if self.losses else float("nan"),
            "losses": self.losses,
            "checkpoint": str(last),
            "peft_state": str(peft_state),
            "peft_state_text_encoders": te_states,
            "samples": all_samples,
            "resumed_from_step": resumed,
            "epochs": math.ceil(n * req.gradient_accumulation_steps / self.plan.batches_per_epoch),
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def _caching_progress(self, step: int) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            if self.is_cancelled():
                raise JobCancelledError(f"training cancelled while caching latents ({done}/{total})")
            self.emit(
                {
                    "step": step,
                    "total": self.req.max_train_steps,
                    "eta": None,
                    "desc": f"caching latents {done + 1}/{total}",
                }
            )

        return progress

    def train_step(self, step: int) -> float:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns their mean loss."""
        import torch

        req, acc = self.req, self.accelerator
        accum = req.gradient_accumulation_steps
        gen = torch.Generator(device=self.dev).manual_seed(_mix(req.seed, "noise", step))
        total = 0.0
        for micro in range(accum):
            samples = self.plan.micro_batch(step * accum + micro)
            with acc.accumulate(*self.trained.values()):
                latents = self.source.batch(samples, gen)
                with torch.set_grad_enabled(req.train_text_encoder):
                    embeds, added = _conditioning(
                        self.parts, self.items, samples, self.dev, self.weight_dtype, self.encoders
                    )
                weights = [self.plan.weights[s.image] for s in samples] if self.has_reg else None
                loss = diffusion_loss(
                    self.parts, req, latents, embeds, added, gen, unet=self.trained["unet"], weights=weights
                )
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.params, MAX_GRAD_NORM)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) / accum
        return total
