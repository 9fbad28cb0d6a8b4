"""The web surface (shared/RELIABILITY.md): file routes, upload limit, queue bypass, server paths, auth."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.factories import REPO, AppProcess


def data_dir_of(app: AppProcess):
    from pathlib import Path

    return Path(app.args[app.args.index("--data-dir") + 1])


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../../../../etc/passwd",
        "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "{data}/studio.db",
        "{DATA}/STUDIO.DB",
        "{data}/studio.db-wal",
        "{models}/diffusers/studionova-demo/model_index.json",
        "{MODELS}/DIFFUSERS/STUDIONOVA-DEMO/MODEL_INDEX.JSON",
        "{data}/../../../etc/passwd",
    ],
)
def test_file_route_refuses_private_paths(app, models_dir, path):
    data = str(data_dir_of(app))
    path = path.format(data=data, DATA=data.upper(), models=models_dir, MODELS=str(models_dir).upper())
    r = httpx.get(app.url + "gradio_api/file=" + path, timeout=10)
    assert r.status_code in (400, 403, 404), (path, r.status_code)
    assert "root:" not in r.text and "SQLite format" not in r.text and "_class_name" not in r.text


def test_upload_over_limit_gets_413_and_server_keeps_serving(app):
    r = httpx.post(
        app.url + "gradio_api/upload", files={"files": ("big.png", b"0" * (2 * 1024 * 1024))}, timeout=30
    )
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert httpx.get(app.url + "gradio_api/info", timeout=10).status_code == 200


def test_queue_cannot_be_bypassed(app):
    for route in ("gradio_api/run/generate", "gradio_api/api/generate"):
        r = httpx.post(app.url + route, json={"data": ["x"]}, timeout=10)
        assert r.status_code == 404 and "join the queue" in r.text


def test_component_value_naming_a_server_path_is_refused(app):
    fake = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    params = httpx.get(app.url + "gradio_api/info", timeout=10).json()["named_endpoints"]["/generate"][
        "parameters"
    ]
    data = [
        fake
        if p["parameter_name"] == "init_image"
        else p["parameter_default"]
        if p["parameter_has_default"]
        else "x"
        for p in params
    ]
    assert fake in data
    r = httpx.post(app.url + "gradio_api/call/generate", json={"data": data}, timeout=10)
    event_id = r.json()["event_id"]
    with httpx.stream("GET", app.url + f"gradio_api/call/generate/{event_id}", timeout=60) as stream:
        lines = list(stream.iter_lines())
    assert "event: error" in lines
    error = json.loads(lines[lines.index("event: error") + 1].removeprefix("data: "))
    assert "not uploaded" in error["error"]
    assert "root:" not in "\n".join(lines)


def test_uploaded_non_image_gets_a_clear_error(app, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("definitely not a picture")
    client = Client(app.url, verbose=False)
    with pytest.raises(AppError, match="not a readable image|Invalid image|cannot identify"):
        client.predict(
            prompt="x",
            negative_prompt="",
            loras="",
            steps=2,
            width=64,
            height=64,
            seed=1,
            init_image=handle_file(str(notes)),
            api_name="/generate",
        )


def test_exposed_host_without_auth_refuses_to_start(models_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "app.py",
            "--host",
            "0.0.0.0",
            "--demo",
            "--data-dir",
            str(tmp_path),
            "--models-dir",
            str(models_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--auth" in out.stderr and "--insecure" in out.stderr


def test_auth_and_ownership(models_dir, tmp_path):
    app = AppProcess(tmp_path, models_dir, "--auth", "alice:secret,bob:pw2").start()
    try:
        assert httpx.get(app.url + "gradio_api/info", timeout=10).status_code in (401, 403)
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do; what matters is no access
            Client(app.url, verbose=False).predict("x", api_name="/job_status")
        alice = Client(app.url, auth=("alice", "secret"), verbose=False)
        bob = Client(app.url, auth=("bob", "pw2"), verbose=False)
        job = alice.submit(
            prompt="alice's",
            negative_prompt="",
            loras="",
            steps=150,
            width=128,
            height=128,
            seed=1,
            api_name="/generate",
        )
        deadline = time.monotonic() + 60
        while not job.outputs():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job_id = job.outputs()[0][2]
        assert alice.predict(job_id, api_name="/job_status")["owner"] == "alice"
        with pytest.raises(AppError, match="only its owner"):
            bob.predict(job_id, "", api_name="/cancel_job")
        assert alice.predict(job_id, "", api_name="/cancel_job") in ("cancelled", "cancelling")
        images = alice.predict(
            prompt="ok",
            negative_prompt="",
            loras="",
            steps=2,
            width=64,
            height=64,
            seed=2,
            api_name="/generate",
        )[0]
        assert len(images) == 1
    finally:
        app.stop()
