"""The ComfyUI engine: a client for ComfyUI servers and the workflow templates they run."""

from engine.comfyui.client import (
    ComfyAuthError,
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    ComfyExecutionError,
    ComfyHTTPError,
    ComfyPromptLostError,
    ComfyValidationError,
    RunResult,
)
from engine.jobs.kinds import COMFY_QUEUE, JobKind

# rendered by ComfyUI servers: its own workers (as many as the pool takes at once), never a local GPU slot
JOB_KINDS = {
    "comfy_generate": JobKind(
        "engine.comfyui.generate:run_comfy_generate_job",
        "engine.generation.request:GenerateRequest",
        uses_gpu=False,
        queue=COMFY_QUEUE,
    ),
}

__all__ = [
    "JOB_KINDS",
    "ComfyAuthError",
    "ComfyClient",
    "ComfyConnectionError",
    "ComfyError",
    "ComfyExecutionError",
    "ComfyHTTPError",
    "ComfyPromptLostError",
    "ComfyValidationError",
    "RunResult",
]
