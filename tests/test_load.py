"""Load and chaos (marked slow; run by tests/run_slow.sh)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest
from gradio_client import Client

from tests.factories import AppProcess

pytestmark = pytest.mark.slow


def test_past_max_queue_callers_get_queue_full_and_server_keeps_serving(models_dir, tmp_path):
    app = AppProcess(tmp_path, models_dir, "--max-queue", "3").start()
    try:
        client = Client(app.url, verbose=False)
        args = dict(prompt="load", negative_prompt="", loras="", steps=60, width=128, height=128, seed=1)
        jobs = [client.submit(**args, api_name="/generate") for _ in range(12)]
        errors = []
        deadline = time.monotonic() + 300
        for job in jobs:
            try:
                job.result(timeout=max(1, deadline - time.monotonic()))
            except Exception as e:  # the refused ones
                errors.append(str(e))
        assert any("queue is full" in e.lower() for e in errors), errors
        assert len(errors) < len(jobs)  # the accepted ones finished
        assert httpx.get(app.url + "gradio_api/info", timeout=10).status_code == 200
    finally:
        app.stop()


def test_many_concurrent_clients_all_finish(models_dir, tmp_path):
    app = AppProcess(tmp_path, models_dir).start()
    try:

        def one(i):
            c = Client(app.url, verbose=False)
            return c.predict(
                prompt=f"n{i}",
                negative_prompt="",
                loras="",
                steps=2,
                width=64,
                height=64,
                seed=i,
                api_name="/generate",
            )[2]

        with cf.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(one, range(16)))
        assert len(set(ids)) == 16
    finally:
        app.stop()
