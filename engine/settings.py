"""Run-time settings: one dataclass, one place for every flag, its env variable and default.

`app.py` builds the argparse parser from `SETTING_FIELDS`, so a flag, its environment variable
and its help text are written once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.artifacts import atomic_write
from engine.errors import InputError
from engine.paths import SHIPPED_CONFIGS

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")


def _default_data_dir() -> Path:
    # On a Hugging Face Space with persistent storage, /data survives restarts.
    if os.environ.get("SPACE_ID") and Path("/data").is_dir():
        return Path("/data/studionova")
    return Path("data")


@dataclass
class Settings:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "interface to bind; anything but loopback needs --auth or --insecure"},
    )
    port: int = field(default=7860, metadata={"help": "TCP port of the web UI and API"})
    data_dir: Path = field(
        default_factory=_default_data_dir, metadata={"help": "database, outputs and caches live here"}
    )
    models_dir: Path = field(
        default=Path("models"),
        metadata={"help": "weights folder in ComfyUI layout (an A1111 models folder works too)"},
    )
    database_url: str = field(
        default="",
        metadata={
            "help": "SQLAlchemy URL; default sqlite:///<data-dir>/studio.db; postgresql+psycopg://... works"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cuda, cuda:N, mps or cpu"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16 or float32"}
    )
    auth: str = field(
        default="", metadata={"help": "user:password[,user2:password2] required to open the UI and API"}
    )
    max_upload_mb: int = field(
        default=50, metadata={"help": "largest accepted upload in MB (bigger ones get HTTP 413)"}
    )
    insecure: bool = field(
        default=False, metadata={"help": "allow binding a non-loopback interface without --auth"}
    )
    demo: bool = field(
        default=False, metadata={"help": "use the built-in demo model (tiny, random weights, fully offline)"}
    )
    jobs_per_device: int = field(
        default=1, metadata={"help": "jobs a device worker runs at once (diffusion jobs never share a GPU)"}
    )
    max_upscale_pixels: int = field(
        default=4096 * 4096,
        metadata={"help": "largest image an upscale may read or write, in pixels (width x height)"},
    )
    ffmpeg_parallel: int = field(
        default=0,
        metadata={"help": "ffmpeg processes a variant batch runs at once (0 = auto: 2 on 2+ cores, else 1)"},
    )
    max_queue: int = field(
        default=64, metadata={"help": "requests Gradio accepts waiting before answering 'queue is full'"}
    )
    model_configs: str = field(
        default="",
        metadata={
            "help": "folder of per-family diffusers configs for single-file checkpoints "
            "(default: the ones shipped in engine/model_configs; loading stays offline)"
        },
    )
    daily_gpu_minutes: float = field(
        default=0.0,
        metadata={"help": "GPU minutes per UTC day after which new GPU jobs are refused (0 = no budget)"},
    )
    cpu_offload: bool = field(
        default=False, metadata={"help": "enable model CPU offload on CUDA (saves VRAM, slower)"}
    )

    auto_resume: bool = field(
        default=False,
        metadata={"help": "after a crash, resume interrupted training (and downloads) at start-up"},
    )
    ingest_roots: str = field(
        default="",
        metadata={
            "help": "server folders (separated by ':') the dataset ingest may scan, e.g. a ComfyUI output "
            "folder; <data-dir>/import is always allowed"
        },
    )
    min_approved_images: int = field(
        default=10, metadata={"help": "approved images a character needs before it can be trained"}
    )
    vision_url: str = field(
        default="",
        metadata={
            "help": "OpenAI-compatible vision endpoint for auto-captions, e.g. http://127.0.0.1:11434/v1 "
            "(Ollama); empty = off"
        },
    )
    vision_model: str = field(default="llava", metadata={"help": "model name the vision endpoint serves"})
    vision_api_key: str = field(
        default="", metadata={"help": "API key for the vision endpoint, if it needs one"}
    )
    comfyui_urls: str = field(
        default="",
        metadata={
            "help": "ComfyUI servers for engine 'comfyui' (comma-separated; several form a pool; "
            "https://user:pw@host:8188 for basic auth, http://host:8188#token=XYZ for a bearer token)"
        },
    )
    comfyui_max_inflight: int = field(
        default=1, metadata={"help": "jobs each ComfyUI server runs at once (the pool queues the rest)"}
    )
    comfyui_fallback_local: bool = field(
        default=False,
        metadata={
            "help": "when no ComfyUI server is healthy, render a 'comfyui' generation with local diffusers"
        },
    )
    kohya_dir: str = field(
        default="",
        metadata={
            "help": "a kohya_ss or sd-scripts checkout; LoRA training with backend 'kohya' runs its "
            "train_network.py (sdxl_train_network.py for SDXL) as a job; empty = not configured"
        },
    )
    kohya_python: str = field(
        default="",
        metadata={
            "help": "interpreter for sd-scripts (default: <kohya-dir>/venv/bin/python or .venv/bin/python "
            "when present, else the one running StudioNOVA)"
        },
    )

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.models_dir = Path(self.models_dir).expanduser().resolve()
        if not 1 <= int(self.port) <= 65535:
            raise InputError(f"port={self.port!r} is not a TCP port; allowed: 1-65535")
        if self.device not in DEVICE_CHOICES and not self.device.startswith("cuda:"):
            raise InputError(
                f"device={self.device!r} is unknown; allowed: {', '.join(DEVICE_CHOICES)} or cuda:N"
            )
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"dtype={self.dtype!r} is unknown; allowed: {', '.join(DTYPE_CHOICES)}")
        if self.max_upload_mb < 1:
            raise InputError(f"max_upload_mb={self.max_upload_mb!r} must be at least 1")
        try:
            self.daily_gpu_minutes = float(self.daily_gpu_minutes)
        except (TypeError, ValueError):
            raise InputError(
                f"daily_gpu_minutes={self.daily_gpu_minutes!r} must be a number of minutes"
            ) from None
        if self.daily_gpu_minutes < 0:
            raise InputError(f"daily_gpu_minutes={self.daily_gpu_minutes!r} must be 0 (no budget) or more")
        if not 64 * 64 <= self.max_upscale_pixels <= 65536 * 65536:
            raise InputError(f"max_upscale_pixels={self.max_upscale_pixels!r} must be 4096 to 65536*65536")
        if not 0 <= self.ffmpeg_parallel <= 32:
            raise InputError(f"ffmpeg_parallel={self.ffmpeg_parallel!r} must be 0 (auto) to 32")
        if self.jobs_per_device < 1:
            raise InputError(f"jobs_per_device={self.jobs_per_device!r} must be at least 1")
        if int(self.comfyui_max_inflight) < 1:
            raise InputError(f"comfyui_max_inflight={self.comfyui_max_inflight!r} must be at least 1")
        if int(self.min_approved_images) < 1:
            raise InputError(f"min_approved_images={self.min_approved_images!r} must be at least 1")
        if self.auth:
            self.auth_pairs()  # validate early

    # --- derived paths: one helper per root -------------------------------------------
    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def styles_path(self) -> Path:
        """Saved styles, in A1111's styles.csv format (users copy theirs here)."""
        return self.data_dir / "styles.csv"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def gradio_tmp_dir(self) -> Path:
        return self.data_dir / "gradio-tmp"

    @property
    def model_configs_path(self) -> Path:
        return Path(self.model_configs).expanduser().resolve() if self.model_configs else SHIPPED_CONFIGS

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'studio.db'}"

    @property
    def import_dir(self) -> Path:
        """A folder always open to the dataset ingest's folder scan."""
        return self.data_dir / "import"

    def browser_state_secret(self) -> str:
        """The key the browser's job-token store is encrypted with: kept in the data dir, so a restarted app
        still reads what browsers stored before (a fresh random key per launch would lose every token)."""
        import secrets

        path = self.data_dir / "browser-state.key"
        if not path.is_file():
            with atomic_write(path, "w") as f:
                f.write(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text(encoding="utf-8").strip()

    @property
    def ingest_root_paths(self) -> list[Path]:
        extra = [Path(p).expanduser().resolve() for p in self.ingest_roots.split(os.pathsep) if p.strip()]
        return [self.import_dir, *extra]

    @property
    def is_space(self) -> bool:
        return bool(os.environ.get("SPACE_ID"))

    def auth_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (p.strip() for p in self.auth.split(","))):
            user, sep, password = item.partition(":")
            if not sep or not user or not password:
                raise InputError(f"auth entry {user or item!r} must look like user:password")
            pairs.append((user, password))
        return pairs

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback interface without auth unless told it is insecure."""
        if self.host in LOOPBACK_HOSTS or self.auth or self.insecure or self.is_space:
            return
        raise InputError(
            f"host={self.host!r} exposes StudioNOVA beyond this machine without a password; "
            "pass --auth user:password, or --insecure if the port is only reachable by you"
        )

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.outputs_dir, self.cache_dir, self.gradio_tmp_dir, self.import_dir):
            d.mkdir(parents=True, exist_ok=True)


SETTING_FIELDS = fields(Settings)


def env_name(name: str) -> str:
    return "STUDIONOVA_" + name.upper()
