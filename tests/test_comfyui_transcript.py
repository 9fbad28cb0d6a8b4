"""Our client against what a real ComfyUI sent: tests/data/comfyui_transcript.json was recorded from
ComfyUI (commit in the file) running on this machine's CPU, with a raw websocket client. Replaying its
message sequences through the client's follower must give the same outcome the real run had."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from engine.comfyui.client import ComfyClient, ComfyExecutionError, _PromptFollower
from engine.errors import JobCancelledError

TRANSCRIPT = json.loads(
    (Path(__file__).parent / "data" / "comfyui_transcript.json").read_text(encoding="utf-8")
)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


class ReplaySocket:
    """The recorded frames, in order: JSON text as sent, binary frames rebuilt with the recorded header."""

    def __init__(self, messages: list[dict]):
        self.frames = []
        for m in messages:
            if m.get("binary"):
                self.frames.append(struct.pack(">II", m["event"], m["format"]) + _png())
            else:
                self.frames.append(json.dumps(m))

    def recv(self, timeout=None):
        if not self.frames:
            raise AssertionError("the follower read past the end of the recorded messages")
        return self.frames.pop(0)

    def close(self):
        pass


def prompt_id_of(messages: list[dict]) -> str:
    return next(
        m["data"]["prompt_id"]
        for m in messages
        if isinstance(m.get("data"), dict) and "prompt_id" in m["data"]
    )


def replay(key: str) -> list[dict]:
    messages = TRANSCRIPT[key]
    events: list[dict] = []
    # an unreachable base URL: the follower must not need any HTTP call for these sequences
    follower = _PromptFollower(
        ComfyClient("http://127.0.0.1:9", timeout=60),
        prompt_id_of(messages),
        "cid",
        ReplaySocket(messages),
        events.append,
        lambda: False,
    )
    follower.follow()
    return events


def test_a_real_successful_run_is_followed_to_the_end():
    events = replay("ws_messages")
    executing = [e["node"] for e in events if e["type"] == "executing" and e.get("node")]
    assert len(executing) >= 3  # every executed node was reported


def test_real_binary_previews_become_preview_events():
    events = replay("ws_messages_binary_preview")
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and all(Image.open(io.BytesIO(p["image"])).size == (4, 4) for p in previews)


def test_a_real_execution_error_is_raised_verbatim():
    with pytest.raises(ComfyExecutionError) as caught:
        replay("ws_messages_execution_error")
    recorded = next(
        m["data"] for m in TRANSCRIPT["ws_messages_execution_error"] if m["type"] == "execution_error"
    )
    assert caught.value.node_type == recorded["node_type"] and recorded["exception_type"] in str(caught.value)


def test_a_real_interrupt_is_a_cancellation():
    with pytest.raises(JobCancelledError):
        replay("ws_messages_interrupted")
