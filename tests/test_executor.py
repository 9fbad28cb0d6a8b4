"""The executor seam: cancel carried by the row, health and capacity, per-room job kinds, and a second
executor plugged into an unchanged JobService through the Executor protocol."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from pydantic import BaseModel

from engine import characters, comfyui, generation, media, model_manager, training, upscale, video
from engine.jobs import executor as executor_mod
from engine.jobs.executor import Executor, JobHost, run_claimed_job
from engine.jobs.kinds import COMFY_QUEUE, JobKind
from engine.jobs.service import JobService
from engine.registry import job_kinds, merge_job_kinds
from engine.store.database import Database

SLOW = dict(prompt="a slow lighthouse", steps=150, width=128, height=128, seed=2)


class WaitRequest(BaseModel):
    seconds: float = 30.0

    @classmethod
    def build(cls, **values):
        return cls(**values)


def wait_runner(req: WaitRequest, ctx) -> dict:
    """A job that does nothing but wait, checking cancel every 10 ms and reporting its progress."""
    deadline = time.monotonic() + req.seconds
    step = 0
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        step += 1
        ctx.emit({"step": step, "total": 0, "desc": "waiting"})
        time.sleep(0.01)
    return {"steps": step}


WAIT = JobKind("tests.test_executor:wait_runner", "tests.test_executor:WaitRequest", uses_gpu=False)


def request_cancel_like_another_process(db_path, job_id: str) -> None:
    """What a second process (another server, a CLI) does: write the flag on the row, nothing else."""
    con = sqlite3.connect(db_path)
    try:
        con.execute("UPDATE job SET cancel_requested = 1 WHERE id = ?", (job_id,))
        con.commit()
    finally:
        con.close()


def test_a_cancel_written_to_the_row_stops_a_running_job(studio):
    job_id, _ = studio.submit_generate(SLOW)
    events = studio.watch(job_id)
    for event in events:
        if event["type"] == "progress" and event["step"] >= 3:
            requested_at = time.monotonic()
            request_cancel_like_another_process(studio.settings.data_dir / "studio.db", job_id)
            break
    rest = list(events)
    assert rest[-1]["type"] == "cancelled"
    assert time.monotonic() - requested_at < 5  # seen within a poll (0.5 s) plus the step in flight
    status = studio.job_status(job_id)
    assert status["status"] == "cancelled" and status["progress"]["step"] < 150
    assert list(studio.watch(studio.submit_generate({**SLOW, "steps": 2})[0]))[-1]["type"] == "done"


def test_health_and_capacity_show_the_running_job(studio):
    health = studio.health()
    assert health["executor"] == "in-process" and health["alive"] is True
    assert health["workers"] and all(health["workers"].values())
    capacity = health["capacity"]
    assert capacity[studio.device]["workers"] == studio.settings.jobs_per_device
    assert capacity["media"] == {"workers": 1, "running": 0, "queued": 0}
    job_id, token = studio.submit_generate(SLOW)
    for event in studio.watch(job_id):
        if event["type"] == "progress":
            break
    busy = studio.health()
    assert job_id in busy["running"].values() and busy["capacity"][studio.device]["running"] == 1
    studio.cancel(job_id, token=token)
    assert list(studio.watch(job_id))[-1]["type"] == "cancelled"
    assert studio.health()["capacity"][studio.device]["running"] == 0


EXPECTED_KINDS = {  # name: (runner, request, uses_gpu, resumable, queue), as before the rooms declared them
    "generate": (
        "engine.generation.generate:run_generate_job",
        "engine.generation.request:GenerateRequest",
        True,
        False,
        "",
    ),
    "xyz_plot": (
        "engine.generation.xyz:run_xyz_job",
        "engine.generation.xyz:XYZPlotRequest",
        True,
        False,
        "",
    ),
    "download": (
        "engine.model_manager.downloads:run_download_job",
        "engine.model_manager.downloads:DownloadRequest",
        False,
        True,
        "",
    ),
    "variants": (
        "engine.media.variants:run_variants_job",
        "engine.media.variants:VariantsRequest",
        False,
        False,
        "",
    ),
    "cleanup": (
        "engine.media.variants:run_cleanup_job",
        "engine.media.variants:CleanupRequest",
        False,
        False,
        "",
    ),
    "motion_clip": (
        "engine.media.variants:run_motion_job",
        "engine.media.variants:MotionClipRequest",
        False,
        False,
        "",
    ),
    "join_clips": (
        "engine.media.variants:run_join_job",
        "engine.media.variants:JoinClipsRequest",
        False,
        False,
        "",
    ),
    "ingest": (
        "engine.characters.datasets:run_ingest_job",
        "engine.characters.datasets:IngestRequest",
        False,
        False,
        "",
    ),
    "caption": (
        "engine.characters.datasets:run_caption_job",
        "engine.characters.datasets:CaptionRequest",
        False,
        False,
        "",
    ),
    "comfy_generate": (
        "engine.comfyui.generate:run_comfy_generate_job",
        "engine.generation.request:GenerateRequest",
        False,
        False,
        COMFY_QUEUE,
    ),
    "train_lora": (
        "engine.training.job:run_train_job",
        "engine.training.job:TrainJobRequest",
        True,
        True,
        "",
    ),
    "train_lora_kohya": (
        "engine.training.kohya:run_kohya_job",
        "engine.training.job:TrainJobRequest",
        True,
        True,
        "",
    ),
    "upscale": ("engine.upscale.job:run_upscale_job", "engine.upscale.job:UpscaleRequest", True, False, ""),
    "generate_video": ("engine.video.job:run_video_job", "engine.video.job:VideoRequest", True, False, ""),
    "reference_sheet": (
        "engine.generation.reference_sheet:run_reference_sheet_job",
        "engine.generation.reference_sheet:ReferenceSheetRequest",
        True,
        False,
        "",
    ),
}


def test_each_room_declares_its_kinds_and_the_registry_merges_them():
    kinds = job_kinds()
    got = {n: (k.runner, k.request_type, k.uses_gpu, k.resumable, k.queue) for n, k in kinds.items()}
    assert got == EXPECTED_KINDS
    for room in (generation, model_manager, media, characters, comfyui, training, upscale, video):
        for name, kind in room.JOB_KINDS.items():  # a room's runners live in that room
            assert kind.runner.startswith(room.__name__ + "."), (name, kind.runner)
    for kind in kinds.values():  # every "module:attr" resolves
        assert callable(kind.load_runner())
        module, _, cls = kind.request_type.partition(":")
        assert hasattr(__import__(module, fromlist=[cls]), cls)
    with pytest.raises(ValueError, match="'generate' is declared twice"):
        merge_job_kinds(generation.JOB_KINDS, {"generate": WAIT})
    assert job_kinds() is not job_kinds()  # a fresh dict each time: a test's extra kind never leaks


def test_the_job_core_imports_no_room():
    rooms = ("generation", "characters", "training", "upscale", "video", "media", "model_manager", "comfyui")
    code = (
        "import sys, engine.jobs.service, engine.jobs.executor;"
        f"print([m for m in sys.modules if m.split('.')[:2] in [['engine', r] for r in {rooms!r}]])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class ThreadPerJobExecutor:
    """A second executor, written only against the protocol: one fresh thread per job, no queues."""

    def __init__(self, events: JobHost, kinds) -> None:
        self.events, self.kinds = events, kinds
        self.threads: list[threading.Thread] = []

    def submit(self, job_id: str) -> None:
        t = threading.Thread(target=self._run, args=(job_id,), daemon=True)
        self.threads.append(t)
        t.start()

    def _run(self, job_id: str) -> None:
        job = self.events.pending(job_id)
        if job is None or not self.events.claim(job_id, "thread"):
            return
        cancelled = executor_mod.CancelCheck(job_id, self.events, set())  # the row only
        run_claimed_job(self.events, job, self.kinds[job.kind], "thread", lambda: None, cancelled)

    def cancel(self, job_id: str) -> None:
        pass  # nothing in memory: the row carries the cancel

    def warm(self, model: str) -> None:
        pass

    def health(self) -> dict:
        return {"alive": True, "threads": sum(t.is_alive() for t in self.threads)}

    def capacity(self) -> dict:
        return {"thread": {"workers": None, "running": sum(t.is_alive() for t in self.threads), "queued": 0}}


@pytest.fixture
def service(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.create_all()
    jobs = JobService(db, {"wait": WAIT})
    executor: Executor = ThreadPerJobExecutor(jobs, jobs.kinds)
    jobs.attach(executor)
    yield jobs, tmp_path / "jobs.db"
    db.dispose()


def test_another_executor_plugs_into_an_unchanged_service(service):
    jobs, _ = service
    job_id, _ = jobs.submit("wait", WaitRequest(seconds=0.05))
    events = list(jobs.watch(job_id))
    assert events[-1]["type"] == "done" and events[-1]["result"]["steps"] >= 1
    assert any(e["type"] == "progress" for e in events) and jobs.status(job_id)["device"] == "thread"


def test_another_executor_honours_a_cancel_from_the_row(service):
    jobs, db_path = service
    job_id, token = jobs.submit("wait", WaitRequest(seconds=30))
    events = jobs.watch(job_id)
    for event in events:
        if event["type"] == "progress":
            break
    request_cancel_like_another_process(db_path, job_id)
    started = time.monotonic()
    assert list(events)[-1]["type"] == "cancelled"
    assert time.monotonic() - started < executor_mod.CANCEL_POLL_S + 2
    assert jobs.status(job_id)["status"] == "cancelled"
    assert jobs.db.get_job(job_id).cancel_requested is True
