"""Durable jobs: the row is the truth, the in-process executor is a cache of it.

submit() writes a `Job` row (status queued) before any waiting and returns the job id and a
cancel token. The service depends only on the `Executor` protocol: it hands the executor each job id,
and the executor's workers report back through the `JobHost` methods below (pending, claim, progress,
cancel_requested, retry_later, finish). Claims are compare-and-set on the row (queued -> running), so a job
never runs twice; cancel is carried by the row (`cancel_requested`), so any process can honour it;
progress and results are pushed to subscribers through an in-memory event bus (not polled from the
database). At start-up `recover()` turns `running` rows into `interrupted` and hands `queued` rows to the
executor again.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import func, update
from sqlmodel import select

from engine.errors import (
    BudgetExceededError,
    InputError,
    NotFoundError,
    PermissionDeniedError,
)
from engine.jobs.events import TERMINAL_EVENTS, EventBus
from engine.jobs.executor import Executor
from engine.jobs.kinds import JobKinds
from engine.store.database import TERMINAL_STATUSES, Database, Job, utcnow

log = logging.getLogger(__name__)


PROGRESS_DB_INTERVAL_S = 1.0
RETRY_BASE_DELAY_S = 1.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobService:
    """submit / cancel / retry / resume / watch / status: the engine's job facade, and the `JobHost`
    its executor reports to. `kinds` is the job kind registry (engine.registry.job_kinds())."""

    def __init__(self, db: Database, kinds: JobKinds, daily_gpu_minutes: float = 0.0) -> None:
        self.db = db
        self.kinds = kinds
        self.daily_gpu_minutes = daily_gpu_minutes  # 0 = no budget
        self.bus = EventBus()
        self.executor: Executor | None = None
        self._progress: dict[str, tuple[float, dict]] = {}  # job id -> (last database write, last progress)

    def attach(self, executor: Executor) -> None:
        self.executor = executor

    # --- writing rows ---------------------------------------------------------------------
    def submit(
        self, kind: str, request, owner: str = "anonymous", retry_of: str | None = None
    ) -> tuple[str, str]:
        """Write the job row now (status queued); returns (job_id, cancel_token)."""
        if kind not in self.kinds:
            raise InputError(f"job kind {kind!r} is unknown; allowed: {', '.join(self.kinds)}")
        if self.kinds[kind].uses_gpu:
            self.check_budget()
        token = secrets.token_urlsafe(18)
        data = request.model_dump(mode="json") if hasattr(request, "model_dump") else dict(request)
        job = Job(
            kind=kind,
            owner=owner or "anonymous",
            cancel_token_hash=hash_token(token),
            request=data,
            model_key=str(
                data.get("model") or (data.get("base") or {}).get("model") or ""
            ),  # X/Y/Z, sheets: base
            retry_of=retry_of,
        )
        with self.db.session() as s:
            s.add(job)
            s.commit()
        self.bus.publish(job.id, {"type": "queued", "job_id": job.id})
        if self.executor:
            self.executor.submit(job.id)
        return job.id, token

    def _transition(self, job_id: str, from_statuses: tuple[str, ...], **values) -> bool:
        """Atomic compare-and-set on status; True if this call made the change."""
        with self.db.session() as s:
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(from_statuses)).values(**values)
            )
            s.commit()
            return res.rowcount == 1

    # --- the JobHost side: called by the executor's workers ---------------------------------
    def pending(self, job_id: str) -> Job | None:
        job = self.db.get_job(job_id)
        return job if job is not None and job.status == "queued" else None

    def claim(self, job_id: str, device: str) -> bool:
        if not self._transition(job_id, ("queued",), status="running", started_at=utcnow(), device=device):
            return False
        self.bus.publish(job_id, {"type": "started", "job_id": job_id, "device": device})
        return True

    def progress(self, job_id: str, event: dict) -> None:
        """Pushed to watchers at once; written to the row at most every PROGRESS_DB_INTERVAL_S."""
        event = {"type": "progress", "job_id": job_id, **event}
        self.bus.publish(job_id, event)
        stored = {k: v for k, v in event.items() if k in ("step", "total", "eta", "desc")}
        last_db, _ = self._progress.get(job_id, (0.0, {}))
        now = time.monotonic()
        if now - last_db >= PROGRESS_DB_INTERVAL_S:
            last_db = now
            with self.db.session() as s:
                s.execute(update(Job).where(Job.id == job_id).values(progress=stored))
                s.commit()
        self._progress[job_id] = (last_db, stored)

    def cancel_requested(self, job_id: str) -> bool:
        with self.db.session() as s:
            return bool(s.exec(select(Job.cancel_requested).where(Job.id == job_id)).first())

    def retry_later(self, job_id: str, reason: str) -> None:
        """Another attempt after RETRY_BASE_DELAY_S * 2**(attempt-1): running -> queued, then resubmitted."""
        self._progress.pop(job_id, None)
        job = self.require(job_id)
        delay = RETRY_BASE_DELAY_S * 2 ** (job.attempt - 1)
        if not self._transition(
            job_id,
            ("running",),
            status="queued",
            attempt=job.attempt + 1,
            error=f"{reason}; retrying in {delay:.0f}s",
        ):
            return
        self.bus.publish(
            job_id, {"type": "retrying", "job_id": job_id, "attempt": job.attempt + 1, "delay": delay}
        )
        timer = threading.Timer(delay, self._resubmit, args=(job_id,))
        timer.daemon = True
        timer.start()

    def _resubmit(self, job_id: str) -> None:
        if self.executor:
            self.executor.submit(job_id)

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
        _, progress = self._progress.pop(job_id, (0.0, {}))
        values = {"progress": dict(progress)} if progress else {}
        self._transition(
            job_id,
            ("running", "queued"),
            status=status,
            result=result or {},
            error=error,
            error_type=error_type,
            finished_at=utcnow(),
            run_seconds=run_seconds,
            gpu_seconds=gpu_seconds,
            **values,
        )
        event = "done" if status == "succeeded" else status
        self.bus.publish(
            job_id,
            {
                "type": event,
                "job_id": job_id,
                "status": status,
                "result": result or {},
                "error": error,
                "error_type": error_type,
            },
        )

    # --- control ------------------------------------------------------------------------------
    def _authorise(self, job: Job, user: str | None, token: str | None) -> None:
        if user and job.owner == user and user != "anonymous":
            return
        if token and secrets.compare_digest(hash_token(token), job.cancel_token_hash):
            return
        raise PermissionDeniedError(
            f"job {job.id}: only its owner or the holder of its cancel token may do this"
        )

    def require(self, job_id: str) -> Job:
        job = self.db.get_job(job_id) if job_id else None
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return job

    def cancel(self, job_id: str, user: str | None = None, token: str | None = None) -> str:
        job = self.require(job_id)
        self._authorise(job, user, token)
        if job.status in TERMINAL_STATUSES:
            return job.status
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            s.commit()
        if self._transition(job_id, ("queued",), status="cancelled", finished_at=utcnow()):
            self.bus.publish(job_id, {"type": "cancelled", "job_id": job_id, "status": "cancelled"})
            return "cancelled"
        if self.executor:  # a running job: the row already says so; this tells its worker at once
            self.executor.cancel(job_id)
        return "cancelling"

    def retry(self, job_id: str, user: str | None = None, token: str | None = None) -> tuple[str, str]:
        """A new job with the same request (the seed is already fixed, so the same pictures)."""
        job = self.require(job_id)
        self._authorise(job, user, token)
        if job.status not in ("failed", "cancelled", "interrupted", "succeeded"):
            raise InputError(f"job {job_id} is {job.status}; only finished jobs can be retried")
        kind = self.kinds[job.kind]
        return self.submit(job.kind, kind.parse_request(job.request), owner=job.owner, retry_of=job.id)

    def resume(self, job_id: str, user: str | None = None, token: str | None = None) -> str:
        """Run an interrupted job again from its own row, where its kind can pick up from a checkpoint."""
        job = self.require(job_id)
        self._authorise(job, user, token)
        kind = self.kinds.get(job.kind)
        if kind is None or not kind.resumable:
            raise InputError(
                f"job kind {job.kind!r} cannot resume; use retry (it makes the same images again)"
            )
        if not self._transition(
            job_id,
            ("interrupted",),
            status="queued",
            attempt=job.attempt + 1,
            error="",
            cancel_requested=False,
        ):
            raise InputError(f"job {job_id} is {job.status}; only interrupted jobs can resume")
        if self.executor:
            self.executor.submit(job_id)
        return "queued"

    def resume_interrupted(self) -> list[str]:
        """Queue again every interrupted job whose kind resumes from a checkpoint (training, downloads)."""
        kinds = [k for k, v in self.kinds.items() if v.resumable]
        with self.db.session() as s:
            ids = list(
                s.exec(
                    select(Job.id)
                    .where(Job.status == "interrupted", Job.kind.in_(kinds))
                    .order_by(Job.created_at)
                )
            )
        resumed = []
        for job_id in ids:
            if self._transition(job_id, ("interrupted",), status="queued", error="", cancel_requested=False):
                resumed.append(job_id)
                if self.executor:
                    self.executor.submit(job_id)
        return resumed

    def recover(self) -> dict[str, int]:
        """At start-up: running -> interrupted; queued -> handed to the executor again (oldest first)."""
        with self.db.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.status == "running")
                .values(
                    status="interrupted", finished_at=utcnow(), error="the app stopped while this job ran"
                )
            )
            s.commit()
            interrupted = res.rowcount
            queued = list(s.exec(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)))
        for job_id in queued:
            if self.executor:
                self.executor.submit(job_id)
        return {"interrupted": interrupted, "requeued": len(queued)}

    # --- reading ---------------------------------------------------------------------------------
    def status(self, job_id: str) -> dict:
        job = self.require(job_id)
        progress = dict(job.progress)
        live = self.bus.latest(job_id)
        if live and job.status == "running":
            progress = {k: live[k] for k in ("step", "total", "eta", "desc") if k in live}
        kind = self.kinds.get(job.kind)
        return {
            "job_id": job.id,
            "kind": job.kind,
            "status": job.status,
            "progress": progress,
            "result": job.result,
            "error": job.error,
            "error_type": job.error_type,
            "device": job.device,
            "attempt": job.attempt,
            "owner": job.owner,
            "created_at": job.created_at.isoformat(),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "run_seconds": round(job.run_seconds, 3),
            "gpu_seconds": round(job.gpu_seconds, 3),
            "can_resume": bool(kind and kind.resumable and job.status == "interrupted"),
        }

    def watch(self, job_id: str, heartbeat_s: float = 2.0) -> Iterator[dict]:
        """Events of one job until it ends. Subscribes before reading the row, so nothing is missed."""
        q = self.bus.subscribe(job_id)
        try:
            job = self.require(job_id)
            if job.status in TERMINAL_STATUSES:
                yield self._terminal_event(job)
                return
            while True:
                try:
                    event = q.get(timeout=heartbeat_s)
                except queue.Empty:
                    job = self.require(job_id)
                    if job.status in TERMINAL_STATUSES:  # e.g. finished by another process
                        yield self._terminal_event(job)
                        return
                    yield {"type": "heartbeat", "job_id": job_id, "status": job.status}
                    continue
                yield event
                if event["type"] in TERMINAL_EVENTS:
                    return
        finally:
            self.bus.unsubscribe(job_id, q)

    @staticmethod
    def _terminal_event(job: Job) -> dict:
        kind = "done" if job.status == "succeeded" else job.status
        return {
            "type": kind,
            "job_id": job.id,
            "status": job.status,
            "result": job.result,
            "error": job.error,
            "error_type": job.error_type,
        }

    def gpu_seconds_today(self) -> float:
        """Device-seconds of GPU job kinds finished since 00:00 UTC today."""
        start = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        with self.db.session() as s:
            used = s.exec(
                select(func.coalesce(func.sum(Job.gpu_seconds), 0.0)).where(
                    Job.finished_at.is_not(None), Job.finished_at >= start
                )
            ).one()
        return float(used[0] if isinstance(used, tuple | list) else used)

    def check_budget(self) -> None:
        if self.daily_gpu_minutes <= 0:
            return
        used = self.gpu_seconds_today() / 60
        if used >= self.daily_gpu_minutes:
            raise BudgetExceededError(
                f"the daily GPU budget of {self.daily_gpu_minutes:g} minutes is used up ({used:.1f} min today); "
                "new GPU jobs are refused until 00:00 UTC. Raise --daily-gpu-minutes (0 = no budget) to go on; "
                "media jobs (variants, downloads) still run"
            )

    def usage_by_kind(self, days: int = 30):
        """Jobs and CPU/GPU seconds per day and job kind (a pandas DataFrame)."""
        import pandas as pd

        since = utcnow() - timedelta(days=days)
        with self.db.session() as s:
            rows = s.exec(
                select(Job.finished_at, Job.kind, Job.run_seconds, Job.gpu_seconds).where(
                    Job.finished_at.is_not(None), Job.finished_at >= since
                )
            ).all()
        df = pd.DataFrame(rows, columns=["finished_at", "kind", "run_seconds", "gpu_seconds"])
        if df.empty:
            return pd.DataFrame(columns=["day", "kind", "jobs", "run_seconds", "gpu_seconds"])
        df["day"] = pd.to_datetime(df["finished_at"]).dt.strftime("%Y-%m-%d")
        out = (
            df.groupby(["day", "kind"])
            .agg(
                jobs=("run_seconds", "size"),
                run_seconds=("run_seconds", "sum"),
                gpu_seconds=("gpu_seconds", "sum"),
            )
            .reset_index()
        )
        return out.sort_values(["day", "kind"], ascending=[False, True]).round(2)

    def usage(self, days: int = 30):
        """Device-seconds per day and per model (pandas DataFrames)."""
        import pandas as pd

        since = utcnow() - timedelta(days=days)
        with self.db.session() as s:
            rows = s.exec(
                select(Job.finished_at, Job.model_key, Job.device, Job.run_seconds, Job.gpu_seconds).where(
                    Job.finished_at.is_not(None), Job.finished_at >= since
                )
            ).all()
        df = pd.DataFrame(rows, columns=["finished_at", "model", "device", "run_seconds", "gpu_seconds"])
        if df.empty:
            empty_day = pd.DataFrame(columns=["day", "jobs", "run_seconds", "gpu_seconds"])
            return empty_day, pd.DataFrame(columns=["model", "jobs", "run_seconds", "gpu_seconds"])
        df["day"] = pd.to_datetime(df["finished_at"]).dt.strftime("%Y-%m-%d")
        agg = {
            "jobs": ("run_seconds", "size"),
            "run_seconds": ("run_seconds", "sum"),
            "gpu_seconds": ("gpu_seconds", "sum"),
        }
        per_day = df.groupby("day").agg(**agg).reset_index().sort_values("day", ascending=False).round(2)
        per_model = (
            df[df["model"] != ""]
            .groupby("model")
            .agg(**agg)
            .reset_index()
            .sort_values("gpu_seconds", ascending=False)
            .round(2)
        )
        return per_day, per_model
