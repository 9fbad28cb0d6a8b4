"""kill -9 the app mid-job, restart it, and check every job's state."""

from __future__ import annotations

import sqlite3
import time

from gradio_client import Client

from tests.factories import AppProcess

LONG = dict(prompt="long", negative_prompt="", loras="", steps=150, width=192, height=192, seed=1)
SHORT = dict(prompt="short", negative_prompt="", loras="", steps=3, width=64, height=64)


def first_output(job, timeout=60):
    deadline = time.monotonic() + timeout
    while not job.outputs():
        assert time.monotonic() < deadline, "no job id came back"
        time.sleep(0.05)
    return job.outputs()[0]


def test_kill_9_mid_job_then_restart(models_dir, tmp_path):
    data = tmp_path / "data"
    app = AppProcess(data, models_dir).start()
    try:
        client = Client(app.url, verbose=False)
        long_job = client.submit(**LONG, api_name="/generate")
        long_id = first_output(long_job)[2]
        deadline = time.monotonic() + 60
        while client.predict(long_id, api_name="/job_status")["progress"].get("step", 0) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        queued_ids = [
            first_output(client.submit(**SHORT, seed=10 + i, api_name="/generate"))[2] for i in range(2)
        ]
        app.kill9()
    finally:
        app.kill9()

    db = sqlite3.connect(data / "studio.db")
    states = dict(db.execute("select id, status from job"))
    db.close()
    assert states[long_id] == "running" and all(states[i] == "queued" for i in queued_ids)

    app2 = AppProcess(data, models_dir, port=app.port).start()
    try:
        client = Client(app2.url, verbose=False)
        assert client.predict(long_id, api_name="/job_status")["status"] == "interrupted"
        for job_id in queued_ids:
            deadline = time.monotonic() + 90
            while (status := client.predict(job_id, api_name="/job_status"))["status"] != "succeeded":
                assert status["status"] in ("queued", "running"), status
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert len(status["result"]["images"]) == 1
    finally:
        app2.stop()

    db = sqlite3.connect(data / "studio.db")
    counts = dict(db.execute("select job_id, count(*) from asset group by job_id"))
    db.close()
    assert counts.get(long_id, 0) == 0 and all(counts[i] == 1 for i in queued_ids)  # nothing run twice
    leftovers = [p for p in (data / "outputs").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
