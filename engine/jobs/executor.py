"""The executor seam: how queued jobs get run, and how the running side reports back.

`JobService` owns the rows; an `Executor` runs them. The service hands each executor a `JobHost` (itself)
at construction; workers claim, report progress and finish through it and read cancel from the row, so a
process-worker or Ray executor can be added later without touching the service. `InProcessExecutor`
runs jobs on threads in this process, one queue per device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

from engine.errors import InputError, JobCancelledError, OutOfMemoryError, TransientError
from engine.jobs.kinds import MEDIA_QUEUE, JobKind, JobKinds, RunContext
from engine.store.database import Job

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5  # a running job re-reads its row's cancel_requested at most this often


class JobHost(Protocol):
    """The job service's side of the seam: what an executor calls while it runs jobs. Every call is
    keyed by job id and carries plain data, so another process can relay it."""

    def pending(self, job_id: str) -> Job | None:
        """The job's row while it is still queued (else None: cancelled, finished or unknown)."""

    def claim(self, job_id: str, device: str) -> bool:
        """Compare-and-set queued -> running on `device`; True if this caller won the job."""

    def progress(self, job_id: str, event: dict) -> None:
        """A progress event (step, total, eta, desc, preview...) of a running job."""

    def cancel_requested(self, job_id: str) -> bool:
        """Whether anyone (any process) asked this job to stop: the row's cancel_requested."""

    def retry_later(self, job_id: str, reason: str) -> None:
        """Requeue a running job for another attempt after a backoff (the host resubmits it)."""

    def finish(
        self,
        job_id: str,
        status: str,
        result: dict | None = None,
        error: str = "",
        error_type: str = "",
        run_seconds: float = 0.0,
        gpu_seconds: float = 0.0,
    ) -> None:
        """The job ended: succeeded / failed / cancelled, with its result or error."""


class Executor(Protocol):
    """Runs queued jobs. `events` is where it reports every job's progress and end (the JobService)."""

    events: JobHost

    def submit(self, job_id: str) -> None:
        """Run this queued job when a worker is free (its row is already written)."""

    def cancel(self, job_id: str) -> None:
        """Ask a running job to stop soon. The row carries the request too; this is the fast path."""

    def warm(self, model: str) -> None:
        """Load `model` ahead of the first job that needs it."""

    def health(self) -> dict:
        """Whether the workers are alive, what runs where, how much waits."""

    def capacity(self) -> dict:
        """Per queue: workers, jobs running, jobs waiting."""


def run_claimed_job(
    host: JobHost,
    job: Job,
    kind: JobKind,
    device: str,
    load_runtime: Callable[[], Any],
    is_cancelled: Callable[[], bool],
    extra: dict | None = None,
) -> None:
    """Run one job this worker has claimed and report its end to `host`: the outcome mapping every
    executor shares (cancel, bad input, out of memory, transient errors retried with backoff, bugs).
    `load_runtime` builds or returns the worker's runtime; if that fails, the job fails with its error."""
    started = time.monotonic()
    status, error, error_type, result = "succeeded", "", "", {}
    try:
        request = kind.parse_request(job.request)
        ctx = RunContext(
            job_id=job.id,
            device=device,
            emit=lambda event: host.progress(job.id, event),
            is_cancelled=is_cancelled,
            runtime=load_runtime(),
            attempt=job.attempt,
            extra=dict(extra or {}),
        )
        result = kind.load_runner()(request, ctx) or {}
    except JobCancelledError:
        status = "cancelled"
    except InputError as e:
        status, error, error_type = "failed", str(e), "bad_input"
    except OutOfMemoryError as e:
        status, error, error_type = "failed", str(e), "out_of_memory"
    except (TransientError, ConnectionError, TimeoutError) as e:
        if job.attempt < job.max_attempts:
            host.retry_later(job.id, f"attempt {job.attempt} failed: {e}")
            return
        status, error, error_type = "failed", f"{e} (gave up after {job.attempt} attempts)", "transient"
    except Exception as e:  # record the failure on the job; the worker stays alive
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        status, error, error_type = "failed", f"{type(e).__name__}: {e}", "error"
    elapsed = time.monotonic() - started
    gpu = elapsed if device.startswith(("cuda", "mps")) and kind.uses_gpu else 0.0
    host.finish(
        job.id,
        status,
        result=result,
        error=error,
        error_type=error_type,
        run_seconds=elapsed,
        gpu_seconds=gpu,
    )


class CancelCheck:
    """A running job's is_cancelled(): a fast in-memory flag (set by this process's cancel), else the
    row's cancel_requested, re-read at most every CANCEL_POLL_S (a cancel written by any process)."""

    def __init__(self, job_id: str, host: JobHost, flags: set[str]) -> None:
        self.job_id, self.host, self.flags = job_id, host, flags
        self._next_read = 0.0
        self._requested = False

    def __call__(self) -> bool:
        if self._requested or self.job_id in self.flags:
            return True
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + CANCEL_POLL_S
            self._requested = self.host.cancel_requested(self.job_id)
        return self._requested


class InProcessExecutor:
    """One queue per device, served by `jobs_per_device` threads; GPU kinds also hold a device lock
    so a device never runs two diffusion jobs at once. Kinds that do not use the GPU (variant batches,
    downloads, clips, cleanup) have their own queue and thread, so they never wait behind diffusion
    jobs nor hold them up; `extra_queues` (e.g. the ComfyUI pool's) get their own workers too."""

    def __init__(
        self,
        events: JobHost,
        kinds: JobKinds,
        devices: list[str],
        jobs_per_device: int,
        runtime_factory,
        extra_queues: dict[str, int] | None = None,
    ) -> None:
        self.events = events
        self.kinds = kinds
        self.devices = devices
        self.jobs_per_device = jobs_per_device
        self.extra_queues = {name: n for name, n in (extra_queues or {}).items() if n > 0}
        self._workers = {d: jobs_per_device for d in devices} | {MEDIA_QUEUE: 1} | self.extra_queues
        self._queues = {name: queue.Queue() for name in self._workers}
        self._gpu_locks = {d: threading.Lock() for d in devices}
        self._runtime_factory = runtime_factory
        self._runtimes: dict[str, Any] = {}
        self._runtime_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, tuple[str, str]] = {}  # worker thread name -> (queue, job id)
        self._cancel_flags: set[str] = set()
        self._stop = threading.Event()

    def start(self) -> None:
        for name, count in self._workers.items():
            for i in range(count):
                label = f"worker-{name}" if name == MEDIA_QUEUE else f"worker-{name}-{i}"
                t = threading.Thread(target=self._loop, args=(name,), name=label, daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for name, count in self._workers.items():
            for _ in range(count):  # one wake-up per worker, so every thread ends
                self._queues[name].put(None)
        for t in self._threads:
            t.join(timeout=5)

    # --- the Executor protocol ---------------------------------------------------------------
    def submit(self, job_id: str) -> None:
        job = self.events.pending(job_id)
        kind = self.kinds.get(job.kind) if job is not None else None
        if kind is not None and kind.queue:
            if kind.queue not in self._queues:
                self.events.finish(
                    job_id,
                    "failed",
                    error=f"no workers for {job.kind} jobs (is it configured?)",
                    error_type="InputError",
                )
                return
            self._queues[kind.queue].put(job_id)
            return
        self._queues[MEDIA_QUEUE if kind is not None and not kind.uses_gpu else self.devices[0]].put(job_id)

    def cancel(self, job_id: str) -> None:
        self._cancel_flags.add(job_id)

    def warm(self, model: str) -> None:
        """Load `model` on every device in the background, so the first job does not wait for it."""
        for device in self.devices:
            self._queues[device].put(("warm", model))

    def health(self) -> dict:
        workers = {t.name: t.is_alive() for t in self._threads}
        return {
            "executor": "in-process",
            "alive": bool(workers) and all(workers.values()) and not self._stop.is_set(),
            "workers": workers,
            "running": {worker: job_id for worker, (_, job_id) in list(self._running.items())},
            "queued": {name: q.qsize() for name, q in self._queues.items()},
        }

    def capacity(self) -> dict:
        running = [name for name, _ in list(self._running.values())]
        return {
            name: {"workers": count, "running": running.count(name), "queued": self._queues[name].qsize()}
            for name, count in self._workers.items()
        }

    # --- in-process specifics ------------------------------------------------------------------
    def runtime(self, device: str):
        if device not in self.devices:  # media / remote queues: the runtime's database and folders only
            device = self.devices[0]
        with self._runtime_lock:
            if device not in self._runtimes:
                self._runtimes[device] = self._runtime_factory(device)
            return self._runtimes[device]

    def _loop(self, name: str) -> None:
        q = self._queues[name]
        while not self._stop.is_set():
            job_id = q.get()
            if job_id is None:
                return
            if isinstance(job_id, tuple):  # ("warm", model)
                self._warm(name, job_id[1])
                continue
            try:
                self._run(job_id, name)
            except Exception:  # a bug in the job machinery must not kill the worker
                log.exception("worker %s crashed on job %s", name, job_id)

    def _run(self, job_id: str, device: str) -> None:
        job = self.events.pending(job_id)
        if job is None:
            return  # cancelled while waiting, or already run
        kind = self.kinds.get(job.kind)
        if kind is None:
            self.events.finish(job_id, "failed", error=f"job kind {job.kind!r} is not known to this version")
            return
        with self._gpu_locks[device] if kind.uses_gpu else nullcontext():
            if not self.events.claim(job_id, device):
                return  # cancelled while waiting for the device, or claimed elsewhere
            worker = threading.current_thread().name
            self._running[worker] = (device, job_id)
            extra = {}
            if kind.queue:  # a remote-render job that may fall back to the local GPU takes its lock then
                extra["gpu_lock"] = self._gpu_locks[self.devices[0]]
            try:
                cancelled = CancelCheck(job_id, self.events, self._cancel_flags)
                run_claimed_job(
                    self.events, job, kind, device, lambda: self.runtime(device), cancelled, extra
                )
            finally:
                self._running.pop(worker, None)
                self._cancel_flags.discard(job_id)

    def _warm(self, device: str, model: str) -> None:
        with self._gpu_locks[device]:
            try:
                runtime = self.runtime(device)
                runtime.make_room("image")
                runtime.models.get(model)
            except Exception:  # a broken default model shows up on the first job, with its real error
                log.exception("could not preload %s on %s", model, device)

    def unload_models(self) -> None:
        """Free every device's loaded pipelines (waits for the running diffusion job, if any)."""
        for device in self.devices:
            with self._gpu_locks[device], self._runtime_lock:
                runtime = self._runtimes.get(device)
            if runtime is not None:
                with self._gpu_locks[device]:
                    runtime.unload_all()

    def gpu_lock(self, device: str) -> threading.Lock:
        return self._gpu_locks[device]
