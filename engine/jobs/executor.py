"""Executors run queued jobs. The in-process executor: worker threads in this process, one queue per device."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from engine.jobs.kinds import JOB_KINDS, MEDIA_QUEUE

if TYPE_CHECKING:  # the service hands itself to the executor; only its type is needed here
    from engine.jobs.service import JobService

log = logging.getLogger(__name__)


class InProcessExecutor:
    """One queue per device, served by `jobs_per_device` threads; GPU kinds also hold a device lock
    so a device never runs two diffusion jobs at once. Kinds that do not use the GPU (variant batches,
    downloads, clips, cleanup) have their own queue and thread, so they never wait behind diffusion
    jobs nor hold them up."""

    def __init__(
        self,
        service: JobService,
        devices: list[str],
        jobs_per_device: int,
        runtime_factory,
        extra_queues: dict[str, int] | None = None,
    ) -> None:
        self.service = service
        self.devices = devices
        self.extra_queues = {name: n for name, n in (extra_queues or {}).items() if n > 0}
        self._queues = {d: queue.Queue() for d in [*devices, MEDIA_QUEUE, *self.extra_queues]}
        self._gpu_locks = {d: threading.Lock() for d in devices}
        self._runtime_factory = runtime_factory
        self._runtimes: dict[str, Any] = {}
        self._runtime_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.jobs_per_device = jobs_per_device

    def start(self) -> None:
        for device in self.devices:
            for i in range(self.jobs_per_device):
                t = threading.Thread(
                    target=self._loop, args=(device,), name=f"worker-{device}-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)
        t = threading.Thread(target=self._loop, args=(MEDIA_QUEUE,), name="worker-media", daemon=True)
        t.start()
        self._threads.append(t)
        for name, count in self.extra_queues.items():
            for i in range(count):
                t = threading.Thread(target=self._loop, args=(name,), name=f"worker-{name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def submit(self, job_id: str) -> None:
        job = self.service.db.get_job(job_id)
        kind = JOB_KINDS.get(job.kind) if job is not None else None
        if kind is not None and kind.queue:
            if kind.queue not in self._queues:
                self.service._finish(
                    job_id,
                    "failed",
                    error=f"no workers for {job.kind} jobs (is it configured?)",
                    error_type="InputError",
                )
                return
            self._queues[kind.queue].put(job_id)
            return
        self._queues[MEDIA_QUEUE if kind is not None and not kind.uses_gpu else self.devices[0]].put(job_id)

    def warm(self, model: str) -> None:
        """Load `model` on every device in the background, so the first job does not wait for it."""
        for device in self.devices:
            self._queues[device].put(("warm", model))

    def capacity(self) -> dict[str, int]:
        return {d: self._queues[d].qsize() for d in self.devices}

    def runtime(self, device: str):
        if device == MEDIA_QUEUE or device in self.extra_queues:  # the runtime's database and folders only
            device = self.devices[0]
        with self._runtime_lock:
            if device not in self._runtimes:
                self._runtimes[device] = self._runtime_factory(device)
            return self._runtimes[device]

    def _loop(self, device: str) -> None:
        q = self._queues[device]
        while not self._stop.is_set():
            job_id = q.get()
            if job_id is None:
                return
            if isinstance(job_id, tuple):  # ("warm", model)
                self._warm(device, job_id[1])
                continue
            try:
                self.service.run_job(job_id, device, self)
            except Exception:  # a bug in the job machinery must not kill the worker
                log.exception("worker %s crashed on job %s", device, job_id)

    def _warm(self, device: str, model: str) -> None:
        with self._gpu_locks[device]:
            try:
                self.runtime(device).models.get(model)
            except Exception:  # a broken default model shows up on the first job, with its real error
                log.exception("could not preload %s on %s", model, device)

    def unload_models(self) -> None:
        """Free every device's loaded pipelines (waits for the running diffusion job, if any)."""
        for device in self.devices:
            with self._gpu_locks[device], self._runtime_lock:
                runtime = self._runtimes.get(device)
            if runtime is not None:
                with self._gpu_locks[device]:
                    runtime.models.unload()

    def gpu_lock(self, device: str) -> threading.Lock:
        return self._gpu_locks[device]
