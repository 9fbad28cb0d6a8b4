"""ComfyClient against the protocol-speaking ComfyUI stub (tests/comfy_stub.py)."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest
from PIL import Image

from engine.comfyui.client import (
    ComfyAuthError,
    ComfyClient,
    ComfyConnectionError,
    ComfyExecutionError,
    ComfyPromptLostError,
    ComfyValidationError,
    parse_binary_frame,
)
from engine.errors import JobCancelledError
from tests.comfy_stub import ComfyStub


def txt2img_graph(seed: int = 7, width: int = 64, height: int = 48) -> dict:
    """A small API-format text-to-image graph."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_tiny.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": 4,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "nova", "images": ["8", 0]}},
    }


@pytest.fixture
def stub():
    server = ComfyStub(render_delay=0.3, steps=4).start()
    yield server
    server.stop()


@pytest.fixture
def client(stub):
    with ComfyClient(stub.url, timeout=5) as comfy:
        yield comfy


def test_full_job_reports_progress_and_a_preview_and_downloads_the_image(stub, client):
    events = []
    result = client.run(txt2img_graph(), on_event=events.append, extra_pnginfo={"workflow": {"v": 1}})

    progress = [e for e in events if e["type"] == "progress"]
    assert [(e["node"], e["value"], e["max"]) for e in progress] == [("3", i, 4) for i in range(1, 5)]
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and previews[0]["format"] == "PNG"
    assert Image.open(io.BytesIO(previews[0]["image"])).size == (8, 8)

    assert len(result.images) == 1
    data, meta = result.images[0]
    assert meta == {"node_id": "9", "filename": "nova_00001_.png", "subfolder": "", "type": "output"}
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert result.outputs["9"]["images"][0]["filename"] == "nova_00001_.png"
    assert result.timings["total"] >= result.timings["executing"] > 0
    assert stub.submitted[0]["extra_data"] == {"extra_pnginfo": {"workflow": {"v": 1}}}
    assert stub.submitted[0]["client_id"]


def test_http_helpers(stub, client):
    assert "KSampler" in client.object_info()
    assert client.object_info()["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "sd15_tiny.safetensors",
        "sdxl_tiny.safetensors",
    ]
    assert client.models("loras") == ["character_a.safetensors", "style_b.safetensors"]
    assert client.system_stats()["devices"][0]["type"] == "cpu"
    assert client.queue() == {"queue_running": [], "queue_pending": []}
    assert client.history("no-such-prompt") is None


def test_execution_error_is_surfaced_verbatim(stub, client):
    stub.fail_class = "VAEDecode"
    with pytest.raises(ComfyExecutionError) as caught:
        client.run(txt2img_graph())
    error = caught.value
    assert error.node_id == "8"
    assert error.node_type == "VAEDecode"
    assert error.exception_type == "RuntimeError"
    assert (
        error.exception_message
        == "stub failure in VAEDecode (node 8): mat1 and mat2 shapes cannot be multiplied\n"
    )
    assert error.traceback and "comfy_stub.py" in "".join(error.traceback)
    assert "node 8 (VAEDecode) raised RuntimeError: stub failure in VAEDecode (node 8): mat1 and mat2" in str(
        error
    )


def test_unknown_node_type_is_rejected_with_comfyuis_message(client):
    graph = txt2img_graph()
    graph["8"]["class_type"] = "VAEDecodeMissing"
    with pytest.raises(ComfyValidationError) as caught:
        client.submit(graph)
    assert "Cannot execute because node VAEDecodeMissing does not exist.: Node ID '#8'" in str(caught.value)
    assert caught.value.error["type"] == "invalid_prompt"
    assert caught.value.node_errors == {}


def test_node_errors_are_surfaced_verbatim(client):
    graph = txt2img_graph()
    graph["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    del graph["3"]["inputs"]["cfg"]
    with pytest.raises(ComfyValidationError) as caught:
        client.submit(graph)
    message = str(caught.value)
    assert "rejected the prompt: Prompt outputs failed validation" in message
    assert (
        "node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: 'missing.safetensors' not in "
        "['sd15_tiny.safetensors', 'sdxl_tiny.safetensors']"
    ) in message
    assert "node 3 (KSampler): Required input is missing: cfg" in message
    assert set(caught.value.node_errors) == {"3", "4"}


def test_ui_workflow_json_is_rejected(client):
    with pytest.raises(ComfyValidationError, match="missing the class_type property"):
        client.submit({"nodes": [], "links": [], "version": 0.4})


def test_cancel_while_running_interrupts(stub, client):
    stub.render_delay = 2.0
    seen = []
    started = time.monotonic()
    with pytest.raises(JobCancelledError):
        client.run(
            txt2img_graph(),
            on_event=seen.append,
            is_cancelled=lambda: any(e["type"] == "progress" for e in seen),
        )
    assert time.monotonic() - started < 2.0
    (prompt_id,) = stub.history_ids()
    status = client.history(prompt_id)["status"]
    assert status["status_str"] == "error"
    assert [event for event, _ in status["messages"]][-1] == "execution_interrupted"


def test_cancel_while_queued_deletes_it_from_the_queue(stub, client):
    stub.render_delay = 1.0
    blocker = client.submit(txt2img_graph(seed=1))
    seen = []
    with pytest.raises(JobCancelledError):
        client.run(
            txt2img_graph(seed=2),
            on_event=seen.append,
            is_cancelled=lambda: any(e["type"] == "queued" for e in seen),
        )
    cancelled_id = next(e["prompt_id"] for e in seen if e["type"] == "queued")
    assert cancelled_id not in stub.pending_ids()
    client.interrupt()  # a global interrupt stops the blocker
    deadline = time.monotonic() + 5
    while client.history(blocker) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.history(blocker)["status"]["status_str"] == "error"
    assert client.history(cancelled_id) is None


def test_server_restart_mid_job_fails_with_a_clear_message(stub, client):
    stub.render_delay = 1.0
    restarted = threading.Event()

    def on_event(event):
        if event["type"] == "progress" and not restarted.is_set():
            restarted.set()
            stub.restart()

    with pytest.raises(ComfyPromptLostError) as caught:
        client.run(txt2img_graph(), on_event=on_event)
    assert f"ComfyUI at {stub.url} lost prompt" in str(caught.value)
    assert "(server restarted?)" in str(caught.value)


def test_websocket_drop_reconnects_and_finishes(stub, client):
    stub.render_delay = 0.6
    dropped = threading.Event()

    def on_event(event):
        if event["type"] == "progress" and not dropped.is_set():
            dropped.set()
            stub.drop_sockets()

    result = client.run(txt2img_graph(), on_event=on_event)
    assert dropped.is_set()
    assert len(result.images) == 1
    assert len(stub.submitted) == 1  # reconnected to the same prompt, never resubmitted


def test_unreachable_server_names_the_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with ComfyClient(url, timeout=2) as comfy:
        with pytest.raises(ComfyConnectionError, match=f"ComfyUI at {url} is unreachable"):
            comfy.system_stats()
        with pytest.raises(ComfyConnectionError, match=f"ComfyUI at {url} is unreachable"):
            comfy.run(txt2img_graph())


def test_upload_image_round_trip(stub, client):
    png = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(png, format="PNG")
    ref = client.upload_image(png.getvalue(), "pose.png")
    assert ref == {"name": "pose.png", "subfolder": "", "type": "input"}
    assert client.view("pose.png", type="input") == png.getvalue()
    assert "pose.png" in client.object_info()["LoadImage"]["input"]["required"]["image"][0]
    renamed = client.upload_image(png.getvalue(), "pose.png", overwrite=False)
    assert renamed["name"] == "pose (1).png"


def test_run_uploads_inputs_before_submitting(stub, client, tmp_path):
    source = tmp_path / "init.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(source)
    graph = txt2img_graph()
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    result = client.run(graph, upload={"init.png": source})
    assert len(result.images) == 1


@pytest.mark.parametrize("auth", [("nova", "s3cret"), "tok-123"])
def test_auth_required(auth):
    if isinstance(auth, tuple):
        server = ComfyStub(render_delay=0.1, basic_auth=auth).start()
    else:
        server = ComfyStub(render_delay=0.1, token=auth).start()
    try:
        with ComfyClient(server.url, auth=auth, timeout=5) as comfy:
            assert len(comfy.run(txt2img_graph()).images) == 1
        with ComfyClient(server.url, timeout=5) as anonymous:
            with pytest.raises(ComfyAuthError, match=f"ComfyUI at {server.url} refused"):
                anonymous.system_stats()
            with pytest.raises(ComfyAuthError, match="websocket"):
                anonymous.run(txt2img_graph())
    finally:
        server.stop()


def test_ws_url_follows_the_scheme():
    with ComfyClient("https://comfy.example/base/") as secure, ComfyClient("http://127.0.0.1:8188") as plain:
        assert secure.ws_url("abc") == "wss://comfy.example/base/ws?clientId=abc"
        assert plain.ws_url("abc") == "ws://127.0.0.1:8188/ws?clientId=abc"


def test_preview_with_metadata_frame_is_decoded():
    import json
    import struct

    metadata = json.dumps({"node_id": "3", "prompt_id": "p1", "image_type": "image/png"}).encode()
    frame = struct.pack(">I", 4) + struct.pack(">I", len(metadata)) + metadata + b"\x89PNG..."
    assert parse_binary_frame(frame) == {
        "type": "preview",
        "image": b"\x89PNG...",
        "format": "PNG",
        "node": "3",
        "prompt_id": "p1",
    }
    assert parse_binary_frame(struct.pack(">I", 1) + struct.pack(">I", 1) + b"jpg")["format"] == "JPEG"
