"""A local stand-in for an OpenAI-compatible vision endpoint (Ollama, LM Studio, vLLM) for tests.

`POST /v1/chat/completions` answers like those servers: `{"choices": [{"message": {"role":
"assistant", "content": ...}}]}`. Every request body is recorded (`stub.requests`, parsed JSON) with
its headers (`stub.headers`, lower-case names). With an `api_key`, a request without
`Authorization: Bearer <api_key>` gets 401.

The answer is deterministic and depends on what was sent, so tests can prove the image got there:
- a prompt that lists names ("- Nova: ..." lines) asks for a character choice: the answer is
  `stub.character_answer` (default "none");
- anything else asks for a caption: `stub.caption_format` with `{colour}` replaced by the dominant
  channel of the decoded image's mean colour ("red", "green" or "blue").

`stub.mode` makes it fail: "http_error" (status `stub.error_status`, default 500), "not_json" (200
with a body that is not JSON) or "no_content" (200 JSON without choices). `stub.delay_s` waits
before answering (a timeout test).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMPLETIONS_PATH = "/v1/chat/completions"
DATA_URL_PREFIX = "data:image/png;base64,"
_LISTED_NAME_RE = re.compile(r"^\s*-\s+([^:\n]+?)\s*(?::|$)", re.MULTILINE)


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL (AssertionError for anything else)."""
    assert url.startswith("data:image/") and ";base64," in url, f"not an image data URL: {url[:40]!r}"
    return base64.b64decode(url.split(",", 1)[1], validate=True)


def request_parts(body: dict[str, Any]) -> tuple[str, list[str]]:
    """(all text of the messages, the image URLs) of one chat-completions request body."""
    texts: list[str] = []
    images: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                images.append(part["image_url"]["url"])
    return "\n".join(texts), images


def dominant_colour(png: bytes) -> str:
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as image:
        mean = ImageStat.Stat(image.convert("RGB")).mean
    return ("red", "green", "blue")[max(range(3), key=lambda i: mean[i])]


class VisionStub:
    def __init__(self, api_key: str = "", character_answer: str = "none") -> None:
        self.api_key = api_key
        self.character_answer = character_answer
        self.caption_format = "a {colour} square, simple background"
        self.mode = "ok"  # "ok" | "http_error" | "not_json" | "no_content"
        self.error_status = 500
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.listed_names: list[list[str]] = []  # the names each character question listed
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the stub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> VisionStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path != COMPLETIONS_PATH:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append(headers)
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                if stub.api_key and headers.get("authorization") != f"Bearer {stub.api_key}":
                    self._send(
                        401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}}
                    )
                    return
                status, payload = stub._answer(body)
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # a short poll interval: shutdown() waits for it, once per test
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="vision-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> VisionStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- answers ------------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.mode == "http_error":
            return self.error_status, {
                "error": {"message": "model runner crashed", "code": self.error_status}
            }
        if self.mode == "not_json":
            return 200, b"<html>gateway says hi</html>"
        if self.mode == "no_content":
            return 200, {"object": "chat.completion", "choices": []}
        text, images = request_parts(body)
        names = _LISTED_NAME_RE.findall(text)
        if names:
            with self._lock:
                self.listed_names.append(names)
            content = self.character_answer
        else:
            if not images:
                return 400, {"error": {"message": "no image in the request"}}
            content = self.caption_format.format(colour=dominant_colour(decode_data_url(images[0])))
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
        }
