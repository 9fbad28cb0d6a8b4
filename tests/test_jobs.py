"""The job seam: cancel, ownership, retries with backoff, OOM, recovery, one diffusion job per GPU."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import BaseModel

from engine.errors import InputError, PermissionDeniedError, TransientError
from engine.jobs import service as jobs_mod
from engine.jobs.kinds import JobKind
from engine.settings import Settings
from engine.store.database import Asset, Job
from engine.studio import Studio

TINY = dict(prompt="a lighthouse", steps=2, width=64, height=64, seed=1)
SLOW = dict(prompt="a slow lighthouse", steps=150, width=128, height=128, seed=2)


class FlakyRequest(BaseModel):
    key: str
    fail_times: int = 0
    error: str = "transient"

    @classmethod
    def build(cls, **values):
        return cls(**values)


CALLS: dict[str, int] = {}


def flaky_runner(req: FlakyRequest, ctx) -> dict:
    CALLS[req.key] = CALLS.get(req.key, 0) + 1
    if CALLS[req.key] <= req.fail_times:
        if req.error == "transient":
            raise TransientError(f"busy (call {CALLS[req.key]})")
        if req.error == "input":
            raise InputError("value=3 is not allowed; allowed: 1-2")
        raise RuntimeError("unexpected bug")
    return {"calls": CALLS[req.key]}


@pytest.fixture
def flaky_kind(studio, monkeypatch):
    assert studio.executor.kinds is studio.jobs.kinds  # one registry, shared by the service and its executor
    monkeypatch.setitem(
        studio.jobs.kinds,
        "flaky",
        JobKind("tests.test_jobs:flaky_runner", "tests.test_jobs:FlakyRequest", uses_gpu=False),
    )
    monkeypatch.setattr(jobs_mod, "RETRY_BASE_DELAY_S", 0.05)


def finish(studio, job_id: str) -> dict:
    return list(studio.watch(job_id))[-1]


def test_transient_failures_retry_with_backoff(studio, flaky_kind):
    job_id, _ = studio.jobs.submit("flaky", FlakyRequest(key="t1", fail_times=2))
    events = list(studio.watch(job_id))
    assert [e["attempt"] for e in events if e["type"] == "retrying"] == [2, 3]
    assert events[-1]["type"] == "done" and events[-1]["result"] == {"calls": 3}
    assert studio.job_status(job_id)["attempt"] == 3


def test_transient_failures_give_up_after_max_attempts(studio, flaky_kind):
    job_id, _ = studio.jobs.submit("flaky", FlakyRequest(key="t2", fail_times=10))
    last = finish(studio, job_id)
    assert last["type"] == "failed" and "gave up after 3 attempts" in last["error"]
    assert CALLS["t2"] == 3


def test_bad_input_never_retries(studio, flaky_kind):
    job_id, _ = studio.jobs.submit("flaky", FlakyRequest(key="t3", fail_times=5, error="input"))
    last = finish(studio, job_id)
    assert last["type"] == "failed" and last["error_type"] == "bad_input" and "allowed: 1-2" in last["error"]
    assert CALLS["t3"] == 1


def test_unexpected_error_fails_job_and_worker_lives_on(studio, flaky_kind):
    job_id, _ = studio.jobs.submit("flaky", FlakyRequest(key="t4", fail_times=1, error="bug"))
    last = finish(studio, job_id)
    assert last["type"] == "failed" and "RuntimeError: unexpected bug" in last["error"]
    assert finish(studio, studio.submit_generate(TINY)[0])["type"] == "done"


def test_cancel_stops_sampler_within_one_step(studio):
    job_id, token = studio.submit_generate(SLOW)
    seen = 0
    events = studio.watch(job_id)
    for event in events:
        if event["type"] == "progress" and event["step"] >= 3:
            seen = event["step"]
            assert studio.cancel(job_id, token=token) == "cancelling"
            break
    rest = list(events)
    assert rest[-1]["type"] == "cancelled"
    steps_after = [e["step"] for e in rest if e["type"] == "progress"]
    assert max(steps_after, default=seen) <= seen + 2  # the step in flight, plus one raced event at most
    status = studio.job_status(job_id)
    assert status["status"] == "cancelled" and status["progress"]["step"] < 150
    assert finish(studio, studio.submit_generate(TINY)[0])["type"] == "done"  # the next job is fine


def test_cancel_needs_owner_or_token(studio):
    job_id, token = studio.jobs.submit("generate", studio.build_generate_request(SLOW), owner="alice")
    with pytest.raises(PermissionDeniedError, match="only its owner"):
        studio.cancel(job_id, user="bob")
    with pytest.raises(PermissionDeniedError):
        studio.cancel(job_id, user="anonymous", token="wrong")
    assert studio.cancel(job_id, user="alice") in ("cancelled", "cancelling")
    assert finish(studio, job_id)["type"] == "cancelled"


def test_cancel_queued_job_never_runs(studio):
    first, t1 = studio.submit_generate(SLOW)
    second, t2 = studio.submit_generate(TINY)
    assert studio.cancel(second, token=t2) == "cancelled"
    studio.cancel(first, token=t1)
    events = list(studio.watch(second))
    assert [e["type"] for e in events] == ["cancelled"]
    finish(studio, first)
    assert studio.job_status(second)["started_at"] is None


def test_closing_a_watcher_does_not_cancel_the_job(studio):
    job_id, _ = studio.submit_generate({**TINY, "steps": 8})
    watcher = studio.watch(job_id)
    next(watcher)
    watcher.close()  # as when a browser tab closes
    assert finish(studio, job_id)["type"] == "done"


def test_retry_makes_a_new_job_with_the_same_request(studio):
    job_id, token = studio.submit_generate(TINY)
    first = finish(studio, job_id)
    new_id, _ = studio.retry(job_id, token=token)
    second = finish(studio, new_id)
    assert studio.db.get_job(new_id).retry_of == job_id
    assert first["result"]["images"][0]["seed"] == second["result"]["images"][0]["seed"]
    with pytest.raises(InputError, match="cannot resume"):
        studio.resume(job_id, token=token)


def test_out_of_memory_is_reported_freed_and_next_job_works(studio):
    import torch

    finish(studio, studio.submit_generate(TINY)[0])
    unet = studio.executor.runtime(studio.device).models.loaded.pipe.unet
    original = unet.forward

    def oom(*args, **kwargs):
        unet.forward = original
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    unet.forward = oom
    last = finish(studio, studio.submit_generate({**TINY, "batch_size": 4})[0])
    assert last["type"] == "failed" and last["error_type"] == "out_of_memory"
    assert "lower batch_size (now 4)" in last["error"]
    assert finish(studio, studio.submit_generate(TINY)[0])["type"] == "done"


def test_progress_is_pushed_and_recorded(studio, monkeypatch):
    from engine import runtime

    monkeypatch.setattr(runtime, "PREVIEW_INTERVAL_S", 0.0)
    job_id, _ = studio.submit_generate({**TINY, "steps": 5})
    events = list(studio.watch(job_id))
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5] and all(e["total"] == 5 for e in progress)
    previews = [e["preview"] for e in progress if "preview" in e]
    assert len(previews) == 4 and previews[0].size == (32, 32)  # every step but the last (the image itself)
    assert studio.job_status(job_id)["progress"]["step"] == 5


def test_recovery_after_crash_requeues_queued_and_interrupts_running(models_dir, tmp_path):
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, demo=True, device="cpu")
    # Rows as a killed process leaves them: one running, two queued, one finished.
    first = Studio.start(settings, recover=False)
    first.executor.stop()
    req = first.build_generate_request(TINY).model_dump(mode="json")
    with first.db.session() as s:
        rows = [
            Job(kind="generate", status="running", request=req),
            Job(kind="generate", status="queued", request=req),
            Job(kind="generate", status="queued", request=req),
            Job(kind="generate", status="succeeded", request=req),
        ]
        s.add_all(rows)
        s.commit()
    ids = [r.id for r in rows]
    first.db.dispose()
    second = Studio.start(settings)
    try:
        for job_id in ids[1:3]:
            assert finish(second, job_id)["type"] == "done"
        states = [second.job_status(i)["status"] for i in ids]
        assert states == ["interrupted", "succeeded", "succeeded", "succeeded"]
        with second.db.session() as s:
            from sqlmodel import select

            for job_id in ids[1:3]:  # ran exactly once each
                assert len(s.exec(select(Asset).where(Asset.job_id == job_id)).all()) == 1
            assert not s.exec(select(Asset).where(Asset.job_id == ids[0])).all()
    finally:
        second.close()


def test_one_device_never_runs_two_diffusion_jobs_at_once(models_dir, tmp_path):
    settings = Settings(data_dir=tmp_path, models_dir=models_dir, demo=True, device="cpu", jobs_per_device=3)
    st = Studio.start(settings)
    try:
        ids = [st.submit_generate({**TINY, "steps": 6, "seed": i})[0] for i in range(3)]
        for job_id in ids:
            finish(st, job_id)
        spans = sorted((st.db.get_job(i).started_at, st.db.get_job(i).finished_at) for i in ids)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end
    finally:
        st.close()


def test_many_watchers_one_job(studio):
    job_id, _ = studio.submit_generate({**TINY, "steps": 4})
    results = []

    def watch():
        results.append(list(studio.watch(job_id))[-1]["type"])

    threads = [threading.Thread(target=watch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["done"] * 6


def test_usage_reports_seconds_per_day_and_model(studio):
    finish(studio, studio.submit_generate(TINY)[0])
    per_day, per_model = studio.usage()
    assert per_day["jobs"].sum() >= 1 and "studionova-demo" in set(per_model["model"])
    assert time.strftime("%Y-%m-%d", time.gmtime()) in set(per_day["day"])
