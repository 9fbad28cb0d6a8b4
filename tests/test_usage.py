"""Usage dashboard: jobs per day and kind, storage per kind, and the daily GPU budget."""

from __future__ import annotations

from datetime import timedelta

import pytest

from engine.errors import BudgetExceededError, InputError
from engine.jobs.service import JobService
from engine.registry import job_kinds
from engine.settings import Settings
from engine.store.database import Database, Job, utcnow


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'u.db'}")
    d.create_all()
    yield d
    d.dispose()


def finished(db, kind: str, gpu_s: float, days_ago: float = 0.0) -> None:
    now = utcnow() - timedelta(days=days_ago)
    with db.session() as s:
        s.add(
            Job(
                kind=kind,
                status="succeeded",
                finished_at=now,
                created_at=now,
                run_seconds=gpu_s + 1,
                gpu_seconds=gpu_s,
            )
        )
        s.commit()


def test_daily_gpu_budget_refuses_gpu_jobs_only(db):
    jobs = JobService(db, job_kinds(), daily_gpu_minutes=2)
    finished(db, "generate", 100, days_ago=1.5)  # yesterday's minutes do not count
    finished(db, "generate", 90)
    jobs.submit("generate", {"prompt": "x"})  # 1.5 of 2 minutes used: still allowed
    finished(db, "generate", 40)
    with pytest.raises(
        BudgetExceededError, match=r"daily GPU budget of 2 minutes is used up \(2.2 min today\)"
    ):
        jobs.submit("generate", {"prompt": "x"})
    jobs.submit("variants", {"videos": ["v"]})  # media jobs still run
    assert JobService(db, job_kinds()).daily_gpu_minutes == 0  # no budget by default
    JobService(db, job_kinds()).submit("generate", {"prompt": "x"})


def test_usage_by_kind_groups_days_and_kinds(db):
    finished(db, "generate", 10)
    finished(db, "generate", 5)
    finished(db, "variants", 0)
    finished(db, "generate", 7, days_ago=3)
    df = JobService(db, job_kinds()).usage_by_kind()
    today = df[df["day"] == utcnow().strftime("%Y-%m-%d")]
    got = {r["kind"]: (r["jobs"], r["gpu_seconds"]) for r in today.to_dict(orient="records")}
    assert got == {"generate": (2, 15.0), "variants": (1, 0.0)} and len(df) == 3


def test_budget_setting_is_validated(tmp_path):
    assert Settings(data_dir=tmp_path, daily_gpu_minutes="30").daily_gpu_minutes == 30.0
    with pytest.raises(InputError, match="daily_gpu_minutes='lots' must be a number"):
        Settings(data_dir=tmp_path, daily_gpu_minutes="lots")
    with pytest.raises(InputError, match="must be 0 \\(no budget\\) or more"):
        Settings(data_dir=tmp_path, daily_gpu_minutes=-1)


def test_storage_counts_library_outputs_models_and_database(studio):
    df = studio.storage()
    kinds = dict(zip(df["kind"], df["bytes"], strict=True))
    assert kinds["models"] > 1_000_000 and kinds["database"] > 0
    assert set(df.columns) == {"kind", "files", "bytes", "MB"}
