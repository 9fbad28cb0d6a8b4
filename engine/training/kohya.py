"""LoRA training delegated to a kohya_ss / sd-scripts install: the same validated request, another trainer.

With `--kohya-dir` set, a `train_lora` request with backend "kohya" becomes a `train_lora_kohya` job. The
runner writes, under `<data>/training/<job id>/kohya/`:

    dataset/<repeats>_<name>/00000.png + 00000.txt   each approved image (hard link, else copy) and its caption;
    dataset/<repeats>_reg/...                          one subset per (regularisation?, repeats) group
    dataset.toml   sd-scripts' dataset config ([general], [[datasets]], [[datasets.subsets]])
    config.toml    its training arguments (what `--config_file` reads)
    prompts.txt    sample prompts, when samples are on
    output/        sd-scripts' output_dir: <output_name>.safetensors, step checkpoints, *-state folders, sample/
    train.log      everything the process printed

and runs `<python> train_network.py --config_file config.toml --dataset_config dataset.toml` (SDXL:
sdxl_train_network.py) in its own process group. Progress and loss come from its tqdm bar, samples from
`output/sample/`; cancel ends the process group. The LoRA it saves is registered exactly like the built-in
trainer's (`engine.training.job.register_lora_version`).

Names checked against kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16):
library/train_util.py (add_sd_models_arguments, add_dataset_arguments, add_training_arguments,
add_optimizer_arguments, read_config_from_file, the *_STATE_NAME patterns), train_network.py (setup_parser,
the save/load state hooks writing train_state.json), library/config_util.py (ConfigSanitizer's schema),
library/custom_train_functions.py (min_snr_gamma) and networks/lora.py (conv_dim / conv_alpha).

Where the two trainers differ by design: sd-scripts' networks.lora picks its own layers (every Linear and
1x1 conv of the transformer blocks; with conv_dim also the ResNet 3x3 convs), where ours trains attention
(plus LOCON_TARGETS); its bucket grid step is at least 64 for SD1.x/SD2.x (sd-scripts asserts it), so below
resolution 512 its buckets are coarser than ours; `avr_loss` is its moving average, not the step's loss;
and its resume is its own (`--resume <state>`: it skips whole epochs, not steps; see sd-scripts issue
#1999 and pull request #1406), not our exact-trajectory resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.artifacts import atomic_dir, atomic_write, safetensors_header
from engine.characters.characters import Characters, inspect_lora
from engine.errors import InputError, JobCancelledError, OutOfMemoryError
from engine.model_manager.inventory import ModelInventory
from engine.model_manager.pipelines import lora_format
from engine.settings import Settings
from engine.store.database import Database
from engine.training.job import (
    EMIT_INTERVAL_S,
    TrainJobRequest,
    build_train_request,
    next_lora_version,
    register_lora_version,
)
from engine.training.trainer import MAX_GRAD_NORM, SAMPLE_GUIDANCE, SAMPLE_SEED, SAMPLE_STEPS, bucket_step

log = logging.getLogger(__name__)

TRAINING_BACKENDS = ("builtin", "kohya")
# the sd-scripts commit the argument and config names below were read from
SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
SCRIPTS = {"sd1": "train_network.py", "sd2": "train_network.py", "sdxl": "sdxl_train_network.py"}
# train_util.IMAGE_EXTENSIONS: sd-scripts silently skips any other file in an image_dir
SD_SCRIPTS_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# verify_bucket_reso_steps(): 64 in train_network.py, 32 in sdxl_train_network.py
MIN_BUCKET_STEP = {"sd1": 64, "sd2": 64, "sdxl": 32}
OPTIMIZER_TYPES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor"}
# The keyword arguments engine.training.trainer._make_optimizer gives each optimizer, so both trainers optimise alike
# (sd-scripts' Adafactor otherwise defaults to relative_step=True and replaces the schedule).
OPTIMIZER_ARGS = {
    "adamw": ["weight_decay=0.01"],
    "adamw8bit": ["weight_decay=0.01"],
    "prodigy": ["weight_decay=0.01", "safeguard_warmup=True", "use_bias_correction=True"],
    "adafactor": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
}
VENV_PYTHONS = ("venv/bin/python", ".venv/bin/python", "venv/Scripts/python.exe", ".venv/Scripts/python.exe")
TAIL_LINES = 20  # lines of output a failure quotes
TERMINATE_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
POLL_S = 0.25  # how often cancel and new samples are looked at
# accelerate's save_state writes random_states_<process>.pkl last, and train_network.py's hook train_state.json
STATE_COMPLETE_FILES = ("train_state.json", "random_states_0.pkl")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm's default bar: "steps:  12%|███▏      | 12/100 [00:05<00:40,  2.10it/s, avr_loss=0.123]"
_TQDM = re.compile(
    r"^(?:(?P<desc>[^|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+)(?P<rest>[^\]]*)\]"
)
_LOSS = re.compile(r"\bavr_loss=(?P<loss>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))")
_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "MPS backend out of memory")


# --- the install ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KohyaInstall:
    root: Path  # what kohya_dir names
    scripts_dir: Path  # where train_network.py lives (root, or root/sd-scripts in kohya_ss)
    python: Path

    def script(self, family: str) -> Path:
        path = self.scripts_dir / SCRIPTS[family]
        if not path.is_file():
            raise InputError(
                f"kohya_dir={str(self.root)!r} (--kohya-dir): {path} is missing; sd-scripts trains "
                f"{family} LoRAs with {SCRIPTS[family]}"
            )
        return path


def locate_install(settings) -> KohyaInstall:
    """The configured sd-scripts (a kohya_ss checkout keeps it in sd-scripts/) and its interpreter; an
    InputError names the setting, its flag and the paths looked at."""
    raw = (settings.kohya_dir or "").strip()
    if not raw:
        raise InputError(
            "backend='kohya' needs a kohya_ss or sd-scripts install, and kohya_dir is empty: set "
            "--kohya-dir (STUDIONOVA_KOHYA_DIR) to its folder, or use backend='builtin'"
        )
    root = Path(raw).expanduser().absolute()
    candidates = [root / "train_network.py", root / "sd-scripts" / "train_network.py"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise InputError(
            f"kohya_dir={raw!r} (--kohya-dir) holds no sd-scripts: looked for {candidates[0]} and "
            f"{candidates[1]}"
        )
    return KohyaInstall(root, found.parent, _interpreter(settings, root, found.parent))


def _interpreter(settings, root: Path, scripts_dir: Path) -> Path:
    raw = (settings.kohya_python or "").strip()
    if raw:
        # never resolved: a venv's python is a symlink to the base interpreter
        python = Path(raw).expanduser().absolute()
        if not python.is_file():
            raise InputError(
                f"kohya_python={raw!r} (--kohya-python) is not a file; give the interpreter of the "
                "kohya install, or leave it empty to use its venv"
            )
        return python
    for folder in dict.fromkeys([root, scripts_dir]):
        for rel in VENV_PYTHONS:
            if (folder / rel).is_file():
                return folder / rel
    return Path(sys.executable)


# --- checks before a job exists -----------------------------------------------------------------------------


def build_kohya_request(
    values: dict[str, Any],
    *,
    settings: Settings,
    db: Database,
    characters: Characters,
    models: ModelInventory,
    device: str,
) -> TrainJobRequest:
    """The TrainJobRequest of `values` (validated by build_train_request), after checking that the install
    is there and that sd-scripts can do what the request asks without changing its meaning."""
    install = locate_install(settings)
    req = build_train_request(  # prodigy etc. live in kohya's venv
        values,
        settings=settings,
        db=db,
        characters=characters,
        models=models,
        device=device,
        own_packages=False,
    )
    install.script(req.train.family)
    check_kohya_request(req.train)
    return req


def check_kohya_request(train) -> None:
    """Refuse what sd-scripts would silently do differently: a resume_from file it would not load as asked,
    a sample prompt its prompt-file syntax would misread."""
    if train.resume_from:
        _check_resume_file(train)
    for n, prompt in enumerate(train.sample_prompts):
        text = _prompt_line(prompt)
        if " --" in f" {text}" or text.startswith("#"):
            raise InputError(
                f"sample_prompts[{n}]={prompt!r}: sd-scripts reads ' --' as a prompt option and a "
                "leading '#' as a comment; reword it"
            )


def _check_resume_file(train) -> None:
    """sd-scripts loads network_weights with strict=False and keeps the file's alpha buffers while scaling by
    network_alpha: another format, rank, alpha or layer set would be ignored or mixed without a word."""
    from safetensors import safe_open

    path = Path(train.resume_from)
    if not path.is_file():
        raise InputError(f"resume_from={train.resume_from!r} is not an existing LoRA file")
    fmt = lora_format(path)
    if fmt != "kohya":
        raise InputError(
            f"resume_from {path.name} is a {fmt} LoRA; sd-scripts continues only from kohya-format "
            "files (lora_unet_*/lora_te*, as StudioNOVA exports to models/loras)"
        )
    _, header = safetensors_header(path)
    downs = {k: v["shape"] for k, v in header.items() if k.endswith(".lora_down.weight")}
    ranks = sorted({shape[0] for shape in downs.values()})
    if ranks != [train.rank]:
        raise InputError(
            f"resume_from {path.name} has rank {', '.join(map(str, ranks))}, but rank={train.rank}; "
            "use the file's rank"
        )
    if not train.locon and any(len(s) == 4 and s[2:] != [1, 1] for s in downs.values()):
        raise InputError(f"resume_from {path.name} has LoCon (3x3 convolution) layers; set locon=true")
    with safe_open(str(path), framework="pt") as f:
        names = [k for k in f.keys() if k.endswith(".alpha")]  # noqa: SIM118 - safe_open is not iterable
        alphas = sorted({round(float(f.get_tensor(k)), 6) for k in names})
    if alphas and alphas != [round(train.alpha, 6)]:
        raise InputError(
            f"resume_from {path.name} has alpha {', '.join(f'{a:g}' for a in alphas)}, but "
            f"alpha={train.alpha:g}; use the file's alpha"
        )


def _prompt_line(prompt: str) -> str:
    # one prompt per line in the prompts file; whitespace runs (newlines too) mean the same to the tokenizer
    return " ".join(str(prompt).split())


# --- the files sd-scripts reads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KohyaLayout:
    root: Path

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"

    @property
    def dataset_toml(self) -> Path:
        return self.root / "dataset.toml"

    @property
    def config_toml(self) -> Path:
        return self.root / "config.toml"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.txt"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def sample_dir(self) -> Path:
        return self.output_dir / "sample"  # train_util.sample_images_common: args.output_dir + "/sample"

    @property
    def tokenizers(self) -> Path:
        return self.root / "tokenizers"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "process.json"


def bucket_settings(train) -> dict[str, int]:
    """sd-scripts' min/max bucket side and grid for our bucket rule (engine.training.trainer.bucket_sizes): sides from
    resolution/2 to 2*resolution on a grid of bucket_step(resolution), at least sd-scripts' minimum step."""
    step = max(bucket_step(train.resolution), MIN_BUCKET_STEP[train.family])
    low = max(step, train.resolution // 2 // step * step)
    high = train.resolution * 2 // step * step
    return {"min_bucket_reso": low, "max_bucket_reso": high, "bucket_reso_steps": step}


def dataset_config(train, subsets: list[dict]) -> dict:
    """dataset.toml: caption options for every subset in [general], the batch and buckets in the dataset."""
    general = {
        "caption_extension": ".txt",
        "shuffle_caption": train.shuffle_captions,
        "keep_tokens": train.keep_tokens,
        "flip_aug": train.random_flip,
        "caption_dropout_rate": float(train.caption_dropout),
    }
    dataset: dict[str, Any] = {
        "resolution": train.resolution,
        "batch_size": train.batch_size,
        "enable_bucket": train.bucketing,
    }
    if train.bucketing:
        dataset |= bucket_settings(train)
    return {"general": general, "datasets": [{**dataset, "subsets": subsets}]}


def training_config(train, model_folder: Path, layout: KohyaLayout, v_prediction: bool) -> dict:
    """config.toml, grouped by topic (sd-scripts flattens the sections); see the module docstring for
    what has no equivalent."""
    model = {
        "pretrained_model_name_or_path": str(model_folder),
        "v2": train.family == "sd2",
        "v_parameterization": v_prediction,
    }
    network: dict[str, Any] = {
        "network_module": "networks.lora",
        "network_dim": train.rank,
        "network_alpha": float(train.alpha),
        "network_train_unet_only": not train.train_text_encoder,
    }
    if train.locon:  # LoCon: the 3x3 convolutions at the same rank and alpha
        network["network_args"] = [f"conv_dim={train.rank}", f"conv_alpha={float(train.alpha)}"]
    if train.resume_from:
        network["network_weights"] = train.resume_from
    optimizer: dict[str, Any] = {
        "optimizer_type": OPTIMIZER_TYPES[train.optimizer],
        "optimizer_args": OPTIMIZER_ARGS[train.optimizer],
        "learning_rate": float(train.learning_rate),
        "unet_lr": float(train.learning_rate),
        "lr_scheduler": train.lr_scheduler,
        "lr_warmup_steps": train.lr_warmup_steps,
        "lr_scheduler_num_cycles": train.lr_num_cycles,
        "max_grad_norm": float(MAX_GRAD_NORM),
    }
    if train.train_text_encoder:
        optimizer["text_encoder_lr"] = float(train.text_encoder_lr)
    training: dict[str, Any] = {
        "max_train_steps": train.max_train_steps,
        "train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "mixed_precision": train.mixed_precision,
        "seed": train.seed,
        "gradient_checkpointing": train.gradient_checkpointing,
        "cache_latents": train.cache_latents,
        "prior_loss_weight": float(train.prior_loss_weight),
        "sdpa": True,
    }
    if train.max_train_epochs:  # whole epochs of sd-scripts' buckets decide (it overrides max_train_steps)
        training["max_train_epochs"] = train.max_train_epochs
    if train.noise_offset:
        training["noise_offset"] = float(train.noise_offset)
    if train.min_snr_gamma:
        training["min_snr_gamma"] = float(train.min_snr_gamma)
    if train.family == "sdxl":  # our trainer keeps SDXL's VAE in float32 too (it overflows in fp16)
        training["no_half_vae"] = True
    saving: dict[str, Any] = {
        "output_dir": str(layout.output_dir),
        "output_name": train.output_name,
        "save_model_as": "safetensors",
        "save_precision": train.save_precision,
        "save_state": True,
    }
    if train.checkpoint_every:
        # sd-scripts keeps the checkpoints of the last N steps: keep_checkpoints of them span (keep - 1) * every
        span = (train.keep_checkpoints - 1) * train.checkpoint_every
        saving |= {
            "save_every_n_steps": train.checkpoint_every,
            "save_last_n_steps": span,
            "save_last_n_steps_state": span,
        }
    config = {
        "model": model,
        "network": network,
        "optimizer": optimizer,
        "training": training,
        "saving": saving,
    }
    if train.sample_every:
        config["sample"] = {
            "sample_every_n_steps": train.sample_every,
            "sample_prompts": str(layout.prompts),
            "sample_sampler": "euler",
        }  # our samples use EulerDiscreteScheduler too
    return config


def sample_prompts_text(train) -> str:
    """prompts.txt in sd-scripts' syntax, with the size, seed, steps and guidance of our own samples."""
    size = f"--w {train.resolution} --h {train.resolution}"
    return "".join(
        f"{_prompt_line(p)} {size} --d {SAMPLE_SEED + k} --s {SAMPLE_STEPS} --l {SAMPLE_GUIDANCE}\n"
        for k, p in enumerate(train.sample_prompts)
    )


def write_dataset(train, layout: KohyaLayout) -> list[dict]:
    """The image folders (rebuilt from the request each run) and their [[datasets.subsets]] entries: one
    subset per (regularisation?, repeats) group, every image beside its caption."""
    groups: dict[tuple[bool, int], list[int]] = {}
    for index, item in enumerate(train.images):
        key = (bool(item.get("reg")), int(item.get("repeats", train.repeats)))
        groups.setdefault(key, []).append(index)
    subsets = []
    with atomic_dir(layout.dataset_dir) as tmp:
        for (reg, repeats), indexes in sorted(groups.items()):
            name = f"{repeats}_{'reg' if reg else train.output_name}"
            folder = tmp / name
            folder.mkdir()
            for index in indexes:
                item = train.images[index]
                src = Path(item["path"])
                suffix = src.suffix.lower()
                if suffix not in SD_SCRIPTS_IMAGE_SUFFIXES:
                    raise InputError(
                        f"images[{index}] {src.name}: sd-scripts reads only "
                        f"{', '.join(sorted(SD_SCRIPTS_IMAGE_SUFFIXES))} images"
                    )
                if not src.is_file():
                    raise InputError(f"images[{index}] {src} is gone; review the dataset and train again")
                _link_or_copy(src, folder / f"{index:05d}{suffix}")
                (folder / f"{index:05d}.txt").write_text(str(item.get("caption", "")), encoding="utf-8")
            subsets.append(
                {"image_dir": str(layout.dataset_dir / name), "num_repeats": repeats, "is_reg": reg}
            )
    return subsets


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed there
        shutil.copy2(src, dest)


def write_kohya_files(train, layout: KohyaLayout, model_folder: Path) -> None:
    """Everything sd-scripts reads for this request: the dataset folders, dataset.toml, config.toml and
    prompts.txt (TOML written with tomli-w)."""
    import tomli_w

    subsets = write_dataset(train, layout)
    config = training_config(train, model_folder, layout, _v_prediction(model_folder))
    if write_tokenizers(train.family, model_folder, layout.tokenizers):
        config["model"]["tokenizer_cache_dir"] = str(layout.tokenizers)
    for path, data in ((layout.dataset_toml, dataset_config(train, subsets)), (layout.config_toml, config)):
        with atomic_write(path) as f:
            tomli_w.dump(data, f)
    if train.sample_every:
        with atomic_write(layout.prompts, "w") as f:
            f.write(sample_prompts_text(train))
    layout.output_dir.mkdir(parents=True, exist_ok=True)


# sd-scripts loads its tokenizers from the Hub by these ids (strategy_sd.py, strategy_sdxl.py) unless
# `tokenizer_cache_dir/<id with / -> _>` exists: the base model's own tokenizers, put there, keep it offline
TOKENIZER_IDS = {
    "sd1": {"tokenizer": "openai/clip-vit-large-patch14"},
    "sd2": {"tokenizer": "stabilityai/stable-diffusion-2"},
    "sdxl": {
        "tokenizer": "openai/clip-vit-large-patch14",
        "tokenizer_2": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    },
}


def write_tokenizers(family: str, model_folder: Path, cache_dir: Path) -> bool:
    """The diffusers folder's tokenizer(s) where sd-scripts looks before the Hub; False when the folder has
    none (then sd-scripts fetches them itself, which needs the network)."""
    wanted = TOKENIZER_IDS[family]
    if not all((Path(model_folder) / sub / "tokenizer_config.json").is_file() for sub in wanted):
        return False
    for sub, hub_id in wanted.items():
        target = cache_dir / hub_id.replace("/", "_")
        if target.is_dir():
            shutil.rmtree(target)
        shutil.copytree(Path(model_folder) / sub, target)
    return True


def _v_prediction(model_folder: Path) -> bool:
    path = Path(model_folder) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return config.get("prediction_type") == "v_prediction"


# --- resume ---------------------------------------------------------------------------------------------


def latest_state(output_dir: Path, output_name: str, max_steps: int) -> tuple[Path, int] | None:
    """The newest complete `--save_state` folder of a step or an epoch (`<name>-step00000100-state`,
    `<name>-000002-state`) and its step, below max_steps: sd-scripts refuses to resume a finished run, so
    the end-of-training `<name>-state` never counts."""
    pattern = re.compile(rf"^{re.escape(output_name)}(?:-step\d{{8}}|-\d{{6}})-state$")
    best: tuple[Path, int] | None = None
    for path in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        if not pattern.match(path.name) or not all((path / f).is_file() for f in STATE_COMPLETE_FILES):
            continue
        try:
            step = int(json.loads((path / "train_state.json").read_text(encoding="utf-8"))["current_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if 0 < step < max_steps and (best is None or step > best[1]):
            best = (path, step)
    return best


# --- progress -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    desc: str
    n: int
    total: int
    eta: float | None
    loss: float | None


def parse_progress(line: str) -> Progress | None:
    """One tqdm frame -> its description, count, total, remaining seconds and avr_loss (None if absent)."""
    m = _TQDM.match(line.strip())
    if m is None:
        return None
    loss = _LOSS.search(m.group("rest"))
    return Progress(
        (m.group("desc") or "").strip(),
        int(m.group("n")),
        int(m.group("total")),
        _seconds(m.group("remaining")),
        float(loss.group("loss")) if loss else None,
    )


def _seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return float(seconds)


class LineSplitter:
    """Bytes -> lines, split at \\n and at \\r (tqdm redraws its bar after a bare \\r)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        parts = re.split(rb"[\r\n]", self._buf + chunk)
        self._buf = parts.pop()
        return [s for s in (_decode(p) for p in parts) if s]

    def flush(self) -> list[str]:
        rest, self._buf = _decode(self._buf), b""
        return [rest] if rest else []


def _decode(raw: bytes) -> str:
    return _ANSI.sub("", raw.decode("utf-8", errors="replace")).rstrip()


# --- the process ----------------------------------------------------------------------------------------


class KohyaExitError(RuntimeError):
    """sd-scripts ended with a non-zero exit code (the message quotes its last lines)."""


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody has reaped yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_process(proc: subprocess.Popen, grace: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` seconds (and to whatever of the group is left)."""
    if os.name == "nt":  # no process groups to signal: end the process itself
        proc.kill()
        proc.wait()
        return
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # data-loader workers outlive their parent otherwise


def _stop_orphan(layout: KohyaLayout) -> None:
    """A run of this job that a crash of StudioNOVA left behind (it has its own session, so it lived on) is
    ended before a new one starts: two trainings must not write one output folder. Only a process whose
    command line names this job's config.toml is touched."""
    try:
        pid = int(json.loads(layout.pid_file.read_text(encoding="utf-8"))["pid"])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record, the process is gone, or no /proc to check it by
    if os.fsencode(str(layout.config_toml)) not in argv:
        return
    log.warning("ending sd-scripts process %s left running by an earlier attempt of this job", pid)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)


def _child_env(device: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):  # the GPU this worker holds, counted within what we may see
        index = int(device.partition(":")[2])
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    return env


def _pump(fd: int, out: queue.Queue) -> None:
    try:
        while chunk := os.read(fd, 65536):
            out.put(chunk)
    finally:
        out.put(None)  # end of output


# --- the job --------------------------------------------------------------------------------------------


def run_kohya_job(req, ctx) -> dict:
    """Run sd-scripts on `req` (a TrainJobRequest) and register the LoRA it saves as the character's next
    version. Resumes from the newest complete state of an earlier attempt of the same job."""
    rt = ctx.runtime
    train = req.train
    install = locate_install(rt.settings)
    script = install.script(train.family)
    characters = ctx.characters
    character = characters.get(req.character_id)
    work = rt.settings.data_dir / "training" / ctx.job_id
    layout = KohyaLayout(work / "kohya")
    started = time.monotonic()
    rt.make_room("train")  # sd-scripts needs the memory the warm pipelines hold; they reload on the next job
    model_folder = Path(train.model_path)
    if model_folder.is_file():  # a single-file checkpoint: the built-in trainer's cached diffusers conversion
        desc = f"converting {train.model} to diffusers"
        ctx.emit({"step": 0, "total": train.max_train_steps, "desc": desc})
        model_folder = rt.models.diffusers_folder(model_folder)
    _stop_orphan(layout)
    write_kohya_files(train, layout, model_folder)
    final = layout.output_dir / f"{train.output_name}.safetensors"
    final.unlink(missing_ok=True)  # only a file this run writes counts
    argv = [
        str(install.python),
        str(script),
        "--config_file",
        str(layout.config_toml),
        "--dataset_config",
        str(layout.dataset_toml),
    ]
    state = latest_state(layout.output_dir, train.output_name, train.max_train_steps)
    if state is not None:
        argv += ["--resume", str(state[0])]
    run = _Run(ctx, layout, train, EMIT_INTERVAL_S)
    rc = run.execute(argv, install.scripts_dir)
    if rc != 0:
        tail = "\n".join(run.tail)
        how = f"exited with code {rc}" if rc > 0 else f"was killed by signal {-rc} (exit code {rc})"
        message = f"sd-scripts {script.name} {how}; its last lines:\n{tail}"
        if any(marker in tail for marker in _OOM_MARKERS):
            raise OutOfMemoryError(
                f"{message}\nlower batch_size or resolution, or turn on "
                "gradient_checkpointing, mixed_precision or cache_latents (the last saved state "
                "is kept; resume continues from it)"
            )
        raise KohyaExitError(message)
    if not final.is_file():
        raise KohyaExitError(
            f"sd-scripts {script.name} exited with code 0 but wrote no {final}; its last lines:\n"
            + "\n".join(run.tail)
        )
    ctx.emit({"step": run.step, "total": run.total, "desc": "registering the LoRA"})
    samples = sorted(str(p) for p in layout.sample_dir.glob("*.png")) if layout.sample_dir.is_dir() else []
    losses = [run.losses[s] for s in sorted(run.losses)]
    result = {
        "steps": run.step,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "samples": samples,
        "resumed_from_step": state[1] if state else None,
        "seconds": round(time.monotonic() - started, 3),
    }
    return _register(req, ctx.job_id, result, character, rt, work, final, script, layout, model_folder)


def _register(
    req,
    job_id: str,
    result: dict,
    character,
    rt,
    work: Path,
    final: Path,
    script: Path,
    layout: KohyaLayout,
    model_folder: Path,
) -> dict:
    """sd-scripts' file (already kohya keys and ss_* metadata) into models/loras as the next version, with our
    identity keys added: the job, the character, the dataset hash, and the base model as we name and hash it
    (sd-scripts writes the folder's basename and 'IsADirectory' for a diffusers folder)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    info = inspect_lora(final)
    if info["format"] != "kohya":
        raise KohyaExitError(f"sd-scripts wrote a {info['format']} LoRA to {final}; expected kohya keys")
    with safe_open(str(final), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(final)
    train = req.train
    name, version = next_lora_version(rt, character)
    meta.pop("ss_new_sd_model_hash", None)
    meta |= {
        "ss_sd_model_name": train.model,
        "ss_sd_model_hash": rt.models.model_hash(Path(train.model_path)),
        "ss_output_name": name,
        "ss_dataset_hash": req.dataset_hash,
        "studionova_job": job_id,
        "studionova_character": character.slug,
        "studionova_trainer": "sd-scripts",
    }
    if "modelspec.title" in meta:
        meta["modelspec.title"] = name
    result = {**result, "steps": int(meta.get("ss_steps") or result["steps"])}
    extra = {
        "backend": "kohya",
        "script": str(script),
        "config_toml": str(layout.config_toml),
        "dataset_toml": str(layout.dataset_toml),
        "log": str(layout.log),
        "base_model_folder": str(model_folder),
        "sd_scripts_checked_against": SD_SCRIPTS_COMMIT,
    }
    out = register_lora_version(req, job_id, result, character, rt, work, name, version, tensors, meta, extra)
    return {**out, "backend": "kohya", "log": str(layout.log)}


class _Run:
    """One sd-scripts process: output to train.log and a short tail, tqdm frames to progress events, new
    sample images to sample events, cancel to the end of its process group."""

    def __init__(self, ctx, layout: KohyaLayout, train, emit_interval: float) -> None:
        self.ctx, self.layout, self.interval = ctx, layout, emit_interval
        self.total, self.step = train.max_train_steps, 0
        self.losses: dict[int, float] = {}  # step -> the avr_loss shown last at that step
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._tail_bar: str | None = None  # the bar the tail's last line is a frame of (redraws replace it)
        self._last_emit = 0.0
        self._sample_re = re.compile(rf"^{re.escape(train.output_name)}_(\d{{6}})_")
        sample_dir = layout.sample_dir
        self._seen = {p.name for p in sample_dir.glob("*.png")} if sample_dir.is_dir() else set()

    def execute(self, argv: list[str], cwd: Path) -> int:
        if os.name == "nt":
            group: dict[str, Any] = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True}  # its own process group, so cancel reaches its workers too
        chunks: queue.Queue = queue.Queue()
        lines = LineSplitter()
        with open(self.layout.log, "a", encoding="utf-8") as logf:
            logf.write(f"$ {shlex.join(argv)}\n")
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_child_env(self.ctx.device),
                **group,
            )
            pump = threading.Thread(target=_pump, args=(proc.stdout.fileno(), chunks), daemon=True)
            try:
                self.layout.pid_file.write_text(json.dumps({"pid": proc.pid}), encoding="utf-8")
                pump.start()
                done = False
                last_scan = 0.0
                while not done:
                    try:
                        chunk = chunks.get(timeout=POLL_S)
                    except queue.Empty:
                        chunk = b""
                    if chunk is None:
                        done, new = True, lines.flush()
                    else:
                        new = lines.feed(chunk)
                    for line in new:
                        logf.write(line + "\n")
                        self._line(line)
                    if new:
                        logf.flush()
                    if self.ctx.is_cancelled():
                        stop_process(proc)
                        raise JobCancelledError(
                            f"training cancelled at step {self.step}/{self.total}; sd-scripts' saved states are "
                            f"kept in {self.layout.output_dir}"
                        )
                    if time.monotonic() - last_scan >= 1.0 or done:
                        last_scan = time.monotonic()
                        self._samples()
                return proc.wait()
            finally:
                stop_process(proc)  # nothing of this run outlives it: cancel, our own errors, the normal end
                if pump.is_alive():
                    pump.join(timeout=TERMINATE_GRACE_S)
                if not pump.is_alive():  # a descendant that left the group may still hold the pipe open
                    proc.stdout.close()
                self.layout.pid_file.unlink(missing_ok=True)

    def _line(self, line: str) -> None:
        frame = parse_progress(line)
        if frame is not None and self._tail_bar == frame.desc and self.tail:
            self.tail[-1] = line
        else:
            self.tail.append(line)
        self._tail_bar = frame.desc if frame is not None else None
        if frame is None:
            return
        now = time.monotonic()
        if frame.desc == "steps":  # train_network.py's training bar
            self.step, self.total = frame.n, frame.total
            event: dict[str, Any] = {"step": frame.n, "total": frame.total, "eta": frame.eta}
            if frame.loss is not None:
                self.losses[frame.n] = frame.loss
                event |= {"loss": frame.loss, "desc": f"step {frame.n}/{frame.total} loss {frame.loss:.4f}"}
            else:
                event["desc"] = f"step {frame.n}/{frame.total}"
            if frame.n == frame.total or now - self._last_emit >= self.interval:
                self._last_emit = now
                self.ctx.emit(event)
        elif now - self._last_emit >= self.interval:  # caching latents, validation: shown, step unchanged
            self._last_emit = now
            desc = f"sd-scripts: {frame.desc or 'preparing'} {frame.n}/{frame.total}"
            self.ctx.emit({"step": self.step, "total": self.total, "eta": None, "desc": desc})

    def _samples(self) -> None:
        """New complete PNGs in output/sample -> one sample event each, copied where the UI may show them."""
        folder = self.layout.sample_dir
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.png")):
            if path.name in self._seen or not _png_complete(path):
                continue
            self._seen.add(path.name)
            out_dir = self.ctx.outputs / "training" / self.ctx.job_id / "live"
            out_dir.mkdir(parents=True, exist_ok=True)
            dest = out_dir / path.name
            shutil.copy2(path, dest)
            m = self._sample_re.match(path.name)
            step = int(m.group(1)) if m else self.step
            self.ctx.emit({"type": "sample", "step": step, "paths": [str(dest)]})


def _png_complete(path: Path) -> bool:
    """sd-scripts writes samples in place: a PNG counts once its IEND chunk is there."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False
