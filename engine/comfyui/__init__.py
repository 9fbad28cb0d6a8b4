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

__all__ = [
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
