"""Device and dtype choices, in one place. Imports torch lazily (only workers call this)."""

from __future__ import annotations

import gc
import traceback
from dataclasses import dataclass

from engine.errors import InputError, OutOfMemoryError

_DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
}


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda:0", "cpu", "mps"
    dtype: str  # "float16", "bfloat16", "float32"
    cpu_offload: bool = False
    vae_tiling_above_px: int = 1024 * 1024  # tile the VAE when an image is larger than this

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith(("cuda", "mps"))

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def resolve_device(device: str = "auto", dtype: str = "auto", cpu_offload: bool = False) -> DevicePlan:
    """auto -> first CUDA GPU (fp16, or bf16 where supported and asked), else MPS, else CPU fp32."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda:0"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    elif device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device={device!r} but no CUDA GPU is visible to torch; use --device cpu or auto"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dtype == "auto":
        dtype = "float16" if device.startswith(("cuda", "mps")) else "float32"
    dtype = _DTYPES.get(dtype, dtype)
    if dtype not in ("float16", "bfloat16", "float32"):
        raise InputError(f"dtype={dtype!r} is unknown; allowed: float16, bfloat16, float32")
    if device == "cpu" and dtype == "float16":
        raise InputError("dtype=float16 is not supported on the CPU; use float32 or bfloat16")
    return DevicePlan(device=device, dtype=dtype, cpu_offload=cpu_offload and device.startswith("cuda"))


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


class oom_guard:  # a context manager, named like contextlib.suppress
    """`with oom_guard(device, message):` an out-of-memory error raised inside (is_out_of_memory) becomes
    OutOfMemoryError(message) once the failed call's frames are cleared and the device's cached memory is
    freed; the worker stays alive. Every other exception, and an OutOfMemoryError that already says what to
    lower (from a guard further in), passes unchanged. Recoverable out-of-memory (halve the tile, retry)
    is handled where it happens, before it reaches a guard."""

    def __init__(self, device: str, message: str) -> None:
        self.device, self.message = device, message

    def __enter__(self) -> oom_guard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or isinstance(exc, OutOfMemoryError) or not isinstance(exc, Exception):
            return
        if not is_out_of_memory(exc):
            return
        traceback.clear_frames(tb)  # the failed call's locals hold its tensors: release them before freeing
        free_memory(self.device)
        raise OutOfMemoryError(self.message) from None


def free_memory(device: str) -> None:
    """Return cached allocator memory after a failure or a model switch."""
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    elif device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def memory_allocated(device: str) -> int:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device))
    return 0
