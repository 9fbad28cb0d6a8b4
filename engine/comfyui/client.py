"""A client for one ComfyUI server: its HTTP API plus the websocket that reports a prompt's progress.

The protocol is the one in /work/shared/INTEROP.md section 3. One `ComfyClient` talks to one server;
`run()` opens its own websocket (its own clientId), so several runs may share a client.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from engine.errors import (
    InputError,
    JobCancelledError,
    PermissionDeniedError,
    StudioError,
    TransientError,
)

Auth = tuple[str, str] | str | None
EventCallback = Callable[[dict[str, Any]], None]

# Binary websocket frames: a 4-byte big-endian event type, then the payload.
BINARY_PREVIEW_IMAGE = 1
BINARY_PREVIEW_WITH_METADATA = 4
PREVIEW_FORMATS = {1: "JPEG", 2: "PNG"}

_RECV_SLICE_S = 0.25  # how often run() looks at is_cancelled while the socket is quiet
_RECONNECT_WINDOW_S = 10.0  # how long run() keeps trying to reconnect a dropped websocket
_CANCEL_GRACE_S = 5.0  # how long run() waits for ComfyUI to confirm an interrupt


class ComfyError(StudioError):
    """Something went wrong talking to ComfyUI; the message names the server."""


class ComfyConnectionError(ComfyError, TransientError):
    """The server could not be reached, or the connection dropped and did not come back."""


class ComfyAuthError(ComfyError, PermissionDeniedError):
    """The server refused our credentials (HTTP 401/403)."""


class ComfyHTTPError(ComfyError):
    """An unexpected HTTP status from the server."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class ComfyValidationError(ComfyError, InputError):
    """POST /prompt answered 400: ComfyUI's `error` and `node_errors`, quoted verbatim."""

    def __init__(self, message: str, error: dict[str, Any], node_errors: dict[str, Any]):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class ComfyExecutionError(ComfyError):
    """A node raised while ComfyUI executed the prompt (an `execution_error` message)."""

    def __init__(
        self,
        message: str,
        *,
        prompt_id: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str | None,
        exception_message: str | None,
        traceback: list[str] | None,
    ):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = traceback or []


class ComfyPromptLostError(ComfyError):
    """The server no longer knows the prompt (it restarted): the job failed, it did not finish."""


@dataclass(frozen=True)
class RunResult:
    """A finished prompt: every output image (bytes + {node_id, filename, subfolder, type}), the
    raw `outputs` of /history and timings in seconds (queued, executing, download, total)."""

    prompt_id: str
    images: list[tuple[bytes, dict[str, Any]]]
    outputs: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _normalise_base_url(base_url: str) -> str:
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _auth_header(auth: Auth) -> dict[str, str]:
    if auth is None:
        return {}
    if isinstance(auth, str):
        return {"Authorization": f"Bearer {auth}"}
    if isinstance(auth, tuple) and len(auth) == 2:
        raw = f"{auth[0]}:{auth[1]}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}
    raise InputError("auth must be None, a (user, password) tuple or a bearer token string")


def parse_binary_frame(frame: bytes) -> dict[str, Any] | None:
    """Decode a binary websocket frame into a preview event, or None for frame types we skip."""
    if len(frame) < 8:
        return None
    (event_type,) = struct.unpack(">I", frame[:4])
    if event_type == BINARY_PREVIEW_IMAGE:
        (fmt,) = struct.unpack(">I", frame[4:8])
        return {"type": "preview", "image": bytes(frame[8:]), "format": PREVIEW_FORMATS.get(fmt, "JPEG")}
    if event_type == BINARY_PREVIEW_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        metadata = json.loads(frame[8 : 8 + length].decode("utf-8"))
        mime = metadata.get("image_type", "image/jpeg")
        return {
            "type": "preview",
            "image": bytes(frame[8 + length :]),
            "format": "PNG" if mime == "image/png" else "JPEG",
            "node": metadata.get("node_id"),
            "prompt_id": metadata.get("prompt_id"),
        }
    return None


class ComfyClient:
    """HTTP + websocket client for one ComfyUI server.

    auth: None, ("user", "password") for basic auth, or a token string sent as `Bearer`.
    timeout: seconds for every HTTP call and for opening the websocket.
    """

    def __init__(self, base_url: str, auth: Auth = None, timeout: float = 30.0):
        if timeout <= 0:
            raise InputError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = _normalise_base_url(base_url)
        self.timeout = timeout
        self._headers = _auth_header(auth)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ComfyConnectionError(
                f"ComfyUI at {self.base_url} did not answer {method} {path} within {self.timeout} s"
            ) from exc
        except httpx.TransportError as exc:
            raise ComfyConnectionError(f"ComfyUI at {self.base_url} is unreachable: {exc}") from exc
        if response.status_code in (401, 403):
            raise ComfyAuthError(
                f"ComfyUI at {self.base_url} refused {method} {path} (HTTP {response.status_code}): "
                "check the user/password or token"
            )
        return response

    def _ok(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        request = response.request
        raise ComfyHTTPError(
            f"ComfyUI at {self.base_url} answered HTTP {response.status_code} to {request.method} "
            f"{request.url.path}: {response.text[:500]}",
            response.status_code,
        )

    def _get_json(self, path: str, **params: Any) -> Any:
        return self._ok(self._request("GET", path, params=params or None)).json()

    def object_info(self) -> dict[str, Any]:
        """GET /object_info: every node class's schema (inputs, outputs, model lists)."""
        return self._get_json("/object_info")

    def models(self, folder: str) -> list[str]:
        """GET /models/{folder}: the file names ComfyUI sees in a model folder ("checkpoints", "loras")."""
        response = self._request("GET", f"/models/{folder}")
        if response.status_code == 404:
            raise ComfyHTTPError(f"ComfyUI at {self.base_url} has no model folder {folder!r}", 404)
        return self._ok(response).json()

    def system_stats(self) -> dict[str, Any]:
        """GET /system_stats: versions, RAM and devices."""
        return self._get_json("/system_stats")

    def queue(self) -> dict[str, list[Any]]:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}; item[1] is the prompt id."""
        return self._get_json("/queue")

    def upload_image(
        self,
        image: str | Path | bytes,
        name: str,
        subfolder: str = "",
        type: str = "input",
        overwrite: bool = True,
    ) -> dict[str, str]:
        """POST /upload/image; returns ComfyUI's {name, subfolder, type} (the name may be changed)."""
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        form = {"subfolder": subfolder, "type": type, "overwrite": "true" if overwrite else "false"}
        response = self._request("POST", "/upload/image", data=form, files={"image": (name, data)})
        return self._ok(response).json()

    def submit(
        self,
        graph: Mapping[str, Any],
        extra_pnginfo: Mapping[str, Any] | None = None,
        client_id: str | None = None,
    ) -> str:
        """POST /prompt with an API-format graph; returns the prompt id.

        A 400 raises ComfyValidationError quoting ComfyUI's error and every node error verbatim.
        """
        body: dict[str, Any] = {"prompt": dict(graph), "client_id": client_id or uuid.uuid4().hex}
        if extra_pnginfo is not None:
            body["extra_data"] = {"extra_pnginfo": dict(extra_pnginfo)}
        response = self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {}
            if isinstance(payload, dict) and "error" in payload:
                raise self._validation_error(payload)
        return self._ok(response).json()["prompt_id"]

    def _validation_error(self, payload: dict[str, Any]) -> ComfyValidationError:
        error = payload.get("error") or {}
        node_errors = payload.get("node_errors") or {}
        if isinstance(error, str):  # some servers and proxies send a bare string
            error = {"message": error}
        lines = [f"ComfyUI at {self.base_url} rejected the prompt: {error.get('message', '')}"]
        if error.get("details"):
            lines[0] += f": {error['details']}"
        for node_id, info in node_errors.items():
            for reason in info.get("errors", []):
                lines.append(
                    f"node {node_id} ({info.get('class_type', '?')}): "
                    f"{reason.get('message', '')}: {reason.get('details', '')}"
                )
        return ComfyValidationError("\n".join(lines), error, node_errors)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt; with a prompt id ComfyUI stops only that prompt if it is running."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self._ok(self._request("POST", "/interrupt", json=body))

    def delete_queued(self, prompt_ids: list[str]) -> None:
        """POST /queue {"delete": ids}: drop prompts that have not started."""
        self._ok(self._request("POST", "/queue", json={"delete": list(prompt_ids)}))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """GET /history/{id}: the prompt's entry ({outputs, status, ...}), or None if the server has none."""
        entries = self._get_json(f"/history/{prompt_id}")
        return entries.get(prompt_id) if isinstance(entries, dict) else None

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """GET /view: the bytes of an output, input or temp file."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        response = self._request("GET", "/view", params=params)
        if response.status_code == 404:
            raise ComfyHTTPError(
                f"ComfyUI at {self.base_url} has no {type} file {filename!r} (subfolder {subfolder!r})", 404
            )
        return self._ok(response).content

    # -- websocket -----------------------------------------------------------------------------

    def ws_url(self, client_id: str) -> str:
        """The /ws address for a clientId: ws:// for http://, wss:// for https://."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/ws", f"clientId={client_id}", ""))

    def _connect_ws(self, client_id: str) -> ClientConnection:
        try:
            return connect(
                self.ws_url(client_id),
                additional_headers=self._headers,
                open_timeout=self.timeout,
                max_size=None,  # previews can be large
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise ComfyAuthError(
                    f"ComfyUI at {self.base_url} refused the websocket (HTTP {status}): "
                    "check the user/password or token"
                ) from exc
            raise ComfyConnectionError(
                f"ComfyUI at {self.base_url} refused the websocket (HTTP {status})"
            ) from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ComfyConnectionError(f"ComfyUI at {self.base_url} is unreachable: {exc}") from exc

    def _reconnect_ws(self, client_id: str) -> ClientConnection:
        deadline = time.monotonic() + _RECONNECT_WINDOW_S
        delay = 0.2
        while True:
            try:
                return self._connect_ws(client_id)
            except ComfyConnectionError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # backoff between reconnect attempts, not a busy poll
                delay = min(delay * 2, 2.0)

    # -- run -----------------------------------------------------------------------------------

    def run(
        self,
        graph: Mapping[str, Any],
        on_event: EventCallback | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        extra_pnginfo: Mapping[str, Any] | None = None,
        upload: Mapping[str, str | Path | bytes] | None = None,
    ) -> RunResult:
        """Upload `upload` ({name: path or bytes}) to input/, submit the graph and follow it to the end.

        on_event gets {"type": "progress", node, value, max}, {"type": "preview", image, format},
        {"type": "executing", node}, {"type": "status", queue_remaining} and {"type": "queued", prompt_id}.
        Raises ComfyExecutionError, JobCancelledError, ComfyPromptLostError or ComfyConnectionError.
        """
        emit = on_event or (lambda event: None)
        cancelled = is_cancelled or (lambda: False)
        started = time.monotonic()
        for name, source in (upload or {}).items():
            self.upload_image(source, name)
        client_id = uuid.uuid4().hex
        ws = self._connect_ws(client_id)  # before submitting, so no message is missed
        follower = None
        try:
            prompt_id = self.submit(graph, extra_pnginfo, client_id=client_id)
            emit({"type": "queued", "prompt_id": prompt_id})
            follower = _PromptFollower(self, prompt_id, client_id, ws, emit, cancelled)
            follower.follow()
            executing_at = follower.executing_at or time.monotonic()
            finished_at = time.monotonic()
            images, outputs = self._collect_outputs(prompt_id)
        finally:
            (follower.ws if follower else ws).close()  # the follower may have reconnected
        done = time.monotonic()
        timings = {
            "queued": executing_at - started,
            "executing": finished_at - executing_at,
            "download": done - finished_at,
            "total": done - started,
        }
        return RunResult(prompt_id=prompt_id, images=images, outputs=outputs, timings=timings)

    def _collect_outputs(self, prompt_id: str) -> tuple[list[tuple[bytes, dict[str, Any]]], dict[str, Any]]:
        entry = self.history(prompt_id)
        if entry is None:
            raise ComfyPromptLostError(
                f"ComfyUI at {self.base_url} lost prompt {prompt_id} (server restarted?)"
            )
        _raise_for_history_status(self, prompt_id, entry)
        # a successful prompt may have no /history outputs: its only output node sent images over the socket
        # (SaveImageWebsocket, seen on a real ComfyUI); the caller decides whether no files is an error
        outputs = entry.get("outputs") or {}
        images = []
        for node_id, node_output in outputs.items():
            for ref in node_output.get("images", []):
                meta = {
                    "node_id": node_id,
                    "filename": ref["filename"],
                    "subfolder": ref.get("subfolder", ""),
                    "type": ref.get("type", "output"),
                }
                images.append((self.view(meta["filename"], meta["subfolder"], meta["type"]), meta))
        return images, outputs


def _raise_for_history_status(client: ComfyClient, prompt_id: str, entry: dict[str, Any]) -> None:
    """Raise the failure a /history entry records (its status messages), if any."""
    status = entry.get("status") or {}
    if status.get("status_str", "success") == "success" and status.get("completed", True):
        return
    for event, data in status.get("messages", []):
        if event == "execution_error":
            raise _execution_error(client, prompt_id, data)
        if event == "execution_interrupted":
            raise JobCancelledError(f"ComfyUI at {client.base_url} interrupted prompt {prompt_id}")
    raise ComfyError(f"ComfyUI at {client.base_url} reports prompt {prompt_id} failed: {status}")


def _execution_error(client: ComfyClient, prompt_id: str, data: dict[str, Any]) -> ComfyExecutionError:
    message = (data.get("exception_message") or "").rstrip()
    return ComfyExecutionError(
        f"ComfyUI at {client.base_url}: node {data.get('node_id')} ({data.get('node_type')}) raised "
        f"{data.get('exception_type')}: {message}",
        prompt_id=prompt_id,
        node_id=data.get("node_id"),
        node_type=data.get("node_type"),
        exception_type=data.get("exception_type"),
        exception_message=data.get("exception_message"),
        traceback=data.get("traceback"),
    )


class _PromptFollower:
    """Reads one prompt's websocket messages until it succeeds, fails, is cancelled or is lost."""

    def __init__(
        self,
        client: ComfyClient,
        prompt_id: str,
        client_id: str,
        ws: ClientConnection,
        emit: EventCallback,
        cancelled: Callable[[], bool],
    ):
        self.client = client
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.ws = ws
        self.emit = emit
        self.cancelled = cancelled
        self.executing_at: float | None = None

    def follow(self) -> None:
        last_frame = time.monotonic()
        while True:
            if self.cancelled():
                self._cancel()
            try:
                frame = self.ws.recv(timeout=_RECV_SLICE_S)
            except TimeoutError:
                # A long silence may hide a lost message: ask /history and /queue what happened.
                if time.monotonic() - last_frame > self.client.timeout:
                    last_frame = time.monotonic()
                    if self._check_prompt():
                        return
                continue
            except ConnectionClosed:
                self.ws = self.client._reconnect_ws(self.client_id)
                if self._check_prompt():
                    return
                continue
            last_frame = time.monotonic()
            if isinstance(frame, bytes):
                self._on_binary(frame)
            elif self._on_message(json.loads(frame)):
                return

    def _on_binary(self, frame: bytes) -> None:
        event = parse_binary_frame(frame)
        if event is None or self.executing_at is None:
            return  # a type-1 preview carries no prompt id: trust it only while ours runs
        if event.get("prompt_id") not in (None, self.prompt_id):
            return
        event.pop("prompt_id", None)
        self.emit(event)

    def _on_message(self, message: dict[str, Any]) -> bool:
        """Handle one JSON message; True when the prompt has finished successfully."""
        kind = message.get("type")
        data = message.get("data") or {}
        if kind == "status":
            info = (data.get("status") or {}).get("exec_info") or {}
            self.emit({"type": "status", "queue_remaining": info.get("queue_remaining")})
            return False
        if data.get("prompt_id") != self.prompt_id:
            return False  # another prompt's message, or one without a prompt id we cannot place
        if kind in ("execution_start", "executing") and self.executing_at is None:
            self.executing_at = time.monotonic()
        if kind == "executing":
            if data.get("node") is None:
                return True  # older servers signal the end only this way
            self.emit({"type": "executing", "node": data["node"]})
        elif kind == "progress":
            self.emit(
                {
                    "type": "progress",
                    "node": data.get("node"),
                    "value": data.get("value"),
                    "max": data.get("max"),
                }
            )
        elif kind == "execution_success":
            return True
        elif kind == "execution_error":
            raise _execution_error(self.client, self.prompt_id, data)
        elif kind == "execution_interrupted":
            raise JobCancelledError(
                f"ComfyUI at {self.client.base_url} interrupted prompt {self.prompt_id} "
                f"at node {data.get('node_id')} ({data.get('node_type')})"
            )
        # execution_cached, progress_state and executed need no action: outputs come from /history.
        return False

    def _check_prompt(self) -> bool:
        """Find out from /history and /queue what became of the prompt; True if it has finished."""
        entry = self.client.history(self.prompt_id)
        if entry is not None:
            _raise_for_history_status(self.client, self.prompt_id, entry)
            return True
        if self._queue_position() is None:
            raise ComfyPromptLostError(
                f"ComfyUI at {self.client.base_url} lost prompt {self.prompt_id} (server restarted?)"
            )
        return False

    def _queue_position(self) -> str | None:
        """Where GET /queue lists the prompt: "running", "pending" or None."""
        queue = self.client.queue()
        for where, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(len(item) > 1 and item[1] == self.prompt_id for item in queue.get(key, [])):
                return where
        return None

    def _cancel(self) -> None:
        """Delete the prompt if it is queued, interrupt it if it runs; always ends in JobCancelledError."""
        where = self._queue_position()
        if where == "pending":
            self.client.delete_queued([self.prompt_id])
        elif where == "running":
            self.client.interrupt(self.prompt_id)
            self._await_interrupt()
        raise JobCancelledError(f"cancelled prompt {self.prompt_id} on ComfyUI at {self.client.base_url}")

    def _await_interrupt(self) -> None:
        """Wait briefly for ComfyUI to confirm the interrupt, so the server is free when we return."""
        deadline = time.monotonic() + _CANCEL_GRACE_S
        while time.monotonic() < deadline:
            try:
                frame = self.ws.recv(timeout=_RECV_SLICE_S)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            if isinstance(frame, str):
                message = json.loads(frame)
                data = message.get("data") or {}
                if data.get("prompt_id") != self.prompt_id:
                    continue
                if message.get("type") in ("execution_interrupted", "execution_error", "execution_success"):
                    return
                if message.get("type") == "executing" and data.get("node") is None:
                    return
