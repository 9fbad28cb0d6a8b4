"""Error types shared by every layer. The UI turns them into gr.Error at one boundary."""

from __future__ import annotations


class StudioError(Exception):
    """Base class for errors StudioNOVA raises on purpose."""


class InputError(StudioError, ValueError):
    """Bad input: names the value and what is allowed. Never retried."""


class NotFoundError(InputError):
    """A named model, LoRA, job or file does not exist."""


class BudgetExceededError(InputError):
    """The daily GPU budget is spent: new GPU jobs are refused until the next UTC day."""


class PermissionDeniedError(StudioError):
    """The caller may not act on this job."""


class TransientError(StudioError):
    """A failure that may pass (a busy resource, a dropped connection): retried with backoff."""


class JobCancelledError(StudioError):
    """Raised inside a runner when its job was cancelled; unwinds the sampler within one step."""


class OutOfMemoryError(StudioError):
    """The device ran out of memory; the message says what to lower."""
