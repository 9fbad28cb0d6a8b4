"""A pool of ComfyUI servers: each job goes to the least busy healthy server below its in-flight limit.

A server that fails (a connection error during a run, or a failed health probe) is skipped for
`retry_after_s`; after that the next caller that needs a server probes it with GET /system_stats, which
decides whether it is back. Servers are probed the same way before their first job. Falling back to local
diffusers is not this module's business: callers decide that, from the user's setting.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from engine.comfyui.client import (
    Auth,
    ComfyClient,
    ComfyConnectionError,
    ComfyError,
    EventCallback,
    RunResult,
)
from engine.comfyui.templates import _combo_options
from engine.errors import InputError, TransientError

OBJECT_INFO_TTL_S = 60.0
# Where a server lists its model files in /object_info: model kind -> (node class, input name).
SERVER_MODEL_INPUTS: dict[str, tuple[str, str]] = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "upscale_models": ("UpscaleModelLoader", "model_name"),
}
_SPLIT = re.compile(r"[\s,]+")


class NoServerError(ComfyError, TransientError):
    """No server in the pool can take a job now; the message names every server and why."""


@dataclass(frozen=True)
class ServerSpec:
    """One ComfyUI server: its URL without credentials, and the auth to send (see ComfyClient)."""

    url: str
    auth: Auth = None

    def __repr__(self) -> str:  # never print credentials
        kind = "none" if self.auth is None else "bearer" if isinstance(self.auth, str) else "basic"
        return f"ServerSpec(url={self.url!r}, auth={kind})"


def _redacted(entry: str) -> str:
    """An entry as it may appear in an error: password and token replaced by ***."""
    entry = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", entry)
    return re.sub(r"(#token=).*", r"\1***", entry)


def parse_server_spec(text: str) -> list[ServerSpec]:
    """Parse ComfyUI server URLs separated by commas and/or whitespace.

    `https://user:pw@host:8188` sends basic auth, `http://host:8188#token=XYZ` a bearer token; either way
    the credentials are taken out of the URL. An empty text gives []. Raises InputError naming the entry
    (credentials masked) for anything that is not an http(s) URL, an unknown fragment, or a repeated server.
    """
    specs: list[ServerSpec] = []
    for entry in _SPLIT.split(text.strip()):
        if not entry:
            continue
        shown = _redacted(entry)
        parts = urlsplit(entry)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"ComfyUI server {shown!r} must be an http:// or https:// URL with a host")
        try:
            port = parts.port
        except ValueError as exc:
            raise InputError(f"ComfyUI server {shown!r} has a bad port: {exc}") from exc
        auth: Auth = None
        if parts.username is not None or parts.password is not None:
            if not parts.username or parts.password is None:
                raise InputError(f"ComfyUI server {shown!r}: basic auth needs user:password@")
            auth = (unquote(parts.username), unquote(parts.password))
        if parts.fragment:
            key, eq, token = parts.fragment.partition("=")
            if key != "token" or not eq or not token:
                raise InputError(
                    f"ComfyUI server {shown!r}: the only fragment allowed is #token=<bearer token>"
                )
            if auth is not None:
                raise InputError(f"ComfyUI server {shown!r}: give basic auth or a token, not both")
            auth = unquote(token)
        if port == 0:
            raise InputError(f"ComfyUI server {shown!r} has port 0")
        host = parts.netloc.rpartition("@")[2].lower()
        url = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), parts.query, ""))
        if any(spec.url == url for spec in specs):
            raise InputError(f"ComfyUI server {shown!r} is listed twice")
        specs.append(ServerSpec(url=url, auth=auth))
    return specs


def server_models(object_info: Mapping[str, Any]) -> dict[str, list[str]]:
    """The checkpoints, LoRAs and upscale models a server offers, read from its /object_info.

    Accepts both input shapes ([[names...], {...}] and ["COMBO", {"options": [...]}]); a node class the
    server lacks gives an empty list.
    """
    found: dict[str, list[str]] = {}
    for kind, (class_type, input_name) in SERVER_MODEL_INPUTS.items():
        inputs = (object_info.get(class_type) or {}).get("input") or {}
        spec = (inputs.get("required") or {}).get(input_name) or (inputs.get("optional") or {}).get(
            input_name
        )
        found[kind] = [str(name) for name in (_combo_options(spec) or [])] if spec else []
    return found


@dataclass
class _Server:
    spec: ServerSpec
    client: Any
    limit: int
    in_flight: int = 0
    healthy: bool | None = None  # None: not probed yet
    probing: bool = False
    retry_at: float = 0.0  # monotonic time after which an unhealthy server is probed again
    last_error: str | None = None
    last_checked: float | None = None  # wall-clock time of the last probe or failure


@dataclass(frozen=True)
class PoolLease:
    """One job's slot on one server: use `client` for the job; the slot is freed when the lease ends."""

    url: str
    client: ComfyClient


class ComfyPool:
    """Thread-safe routing of jobs over several ComfyUI servers.

    specs: from parse_server_spec. max_inflight: jobs one server runs at once (>= 1). retry_after_s: how
    long a failed server is skipped before it is probed again. client_factory(url, auth=...) builds one
    client per server (ComfyClient; tests may pass another).
    """

    def __init__(
        self,
        specs: list[ServerSpec],
        max_inflight: int = 1,
        retry_after_s: float = 30.0,
        client_factory: Callable[..., Any] = ComfyClient,
        object_info_ttl_s: float = OBJECT_INFO_TTL_S,
    ):
        if not specs:
            raise InputError("a ComfyUI pool needs at least one server URL")
        if not isinstance(max_inflight, int) or max_inflight < 1:
            raise InputError(f"max_inflight must be an integer >= 1, got {max_inflight!r}")
        if retry_after_s < 0:
            raise InputError(f"retry_after_s must be >= 0 seconds, got {retry_after_s!r}")
        urls = [spec.url for spec in specs]
        if len(set(urls)) != len(urls):
            raise InputError(f"ComfyUI server URLs must be distinct, got {urls}")
        self.retry_after_s = retry_after_s
        self.object_info_ttl_s = object_info_ttl_s
        self._servers = [
            _Server(spec, client_factory(spec.url, auth=spec.auth), max_inflight) for spec in specs
        ]
        self._cond = threading.Condition()
        self._next = 0  # round-robin start for ties
        self._object_info: tuple[float, dict[str, Any]] | None = None

    def close(self) -> None:
        """Close every server's client."""
        for server in self._servers:
            server.client.close()

    def __enter__(self) -> ComfyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health --------------------------------------------------------------------------------

    def _server(self, url: str) -> _Server:
        for server in self._servers:
            if server.spec.url == url:
                return server
        raise InputError(f"{url!r} is not in the pool; it has: {[s.spec.url for s in self._servers]}")

    def _mark_unhealthy_locked(self, server: _Server, reason: str) -> None:
        server.healthy = False
        server.retry_at = time.monotonic() + self.retry_after_s
        server.last_error = reason
        server.last_checked = time.time()
        self._cond.notify_all()  # waiters may now have no server left, and must say so

    def mark_unhealthy(self, url: str, reason: str) -> None:
        """Skip the server at `url` (as status() shows it) for retry_after_s, recording why."""
        with self._cond:
            self._mark_unhealthy_locked(self._server(url), reason)

    def _due_locked(self) -> list[_Server]:
        """Claim the servers that need a probe now (never probed, or past their retry time)."""
        now = time.monotonic()
        due = [s for s in self._servers if not s.healthy and not s.probing and now >= s.retry_at]
        for server in due:
            server.probing = True
        return due

    def _probe(self, servers: list[_Server]) -> None:
        """GET /system_stats on each server (outside the lock) and record the answer."""
        for server in servers:
            try:
                server.client.system_stats()
                error = None
            except ComfyError as exc:  # unreachable, refused credentials, or an HTTP error: not usable
                error = str(exc)
            with self._cond:
                server.probing = False
                if error is None:
                    server.healthy = True
                    server.last_checked = time.time()
                    self._cond.notify_all()
                else:
                    self._mark_unhealthy_locked(server, error)

    def _why_unavailable(self) -> str:
        reasons = []
        for s in self._servers:
            if s.healthy:
                reasons.append(f"{s.spec.url}: busy ({s.in_flight}/{s.limit} jobs in flight)")
            elif s.probing or s.healthy is None:
                reasons.append(f"{s.spec.url}: being checked")
            else:
                wait = max(0.0, s.retry_at - time.monotonic())
                reasons.append(f"{s.spec.url}: unhealthy ({s.last_error}); next check in {wait:.0f} s")
        return "; ".join(reasons)

    # -- leases --------------------------------------------------------------------------------

    def _take(self, timeout: float | None) -> _Server:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                due = self._due_locked()
                if not due:
                    free = [s for s in self._servers if s.healthy and s.in_flight < s.limit]
                    if free:
                        return self._pick_locked(free)
                    if not any(s.healthy or s.probing for s in self._servers):
                        raise NoServerError(f"no healthy ComfyUI server: {self._why_unavailable()}")
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise NoServerError(
                            f"no ComfyUI server became free within {timeout:g} s: {self._why_unavailable()}"
                        )
                    waits = [s.retry_at - now for s in self._servers if s.healthy is False and not s.probing]
                    if deadline is not None:
                        waits.append(deadline - now)
                    self._cond.wait(max(0.0, min(waits)) if waits else None)
                    continue
            self._probe(due)

    def _pick_locked(self, free: list[_Server]) -> _Server:
        """The free server with the fewest jobs in flight; ties go round robin in list order."""
        n = len(self._servers)
        order = sorted(free, key=lambda s: (s.in_flight, (self._servers.index(s) - self._next) % n))
        chosen = order[0]
        self._next = (self._servers.index(chosen) + 1) % n
        chosen.in_flight += 1
        return chosen

    @contextmanager
    def acquire(self, timeout: float | None = None) -> Iterator[PoolLease]:
        """Hold one job slot on the least busy healthy server for the `with` block.

        Blocks while every healthy server is at its limit (up to `timeout` seconds; None waits as long as
        it takes). Raises NoServerError, naming every server and why it is unavailable, when none is
        healthy or the timeout passes.
        """
        server = self._take(timeout)
        try:
            yield PoolLease(server.spec.url, server.client)
        finally:
            with self._cond:
                server.in_flight -= 1
                self._cond.notify_all()

    def run(
        self,
        graph: Mapping[str, Any],
        on_event: EventCallback | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        acquire_timeout: float | None = None,
        **kwargs: Any,
    ) -> RunResult:
        """acquire() + ComfyClient.run(graph, on_event, is_cancelled, **kwargs) on the chosen server.

        A ComfyConnectionError marks that server unhealthy and is re-raised (a TransientError: the job
        layer retries it, and the retry goes to another server).
        """
        with self.acquire(acquire_timeout) as lease:
            try:
                return lease.client.run(graph, on_event, is_cancelled, **kwargs)
            except ComfyConnectionError as exc:
                self.mark_unhealthy(lease.url, str(exc))
                raise

    # -- information ---------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One row per server for a UI table: url (no credentials), healthy (None before the first probe),
        in_flight, limit, last_error and last_checked (epoch seconds or None)."""
        with self._cond:
            return [
                {
                    "url": s.spec.url,
                    "healthy": s.healthy,
                    "in_flight": s.in_flight,
                    "limit": s.limit,
                    "last_error": s.last_error,
                    "last_checked": s.last_checked,
                }
                for s in self._servers
            ]

    def object_info(self) -> dict[str, Any]:
        """/object_info of the first healthy server in list order, cached for object_info_ttl_s.

        Does not take a job slot. Raises NoServerError when no server answers.
        """
        with self._cond:
            cached = self._object_info
            if cached is not None and time.monotonic() - cached[0] < self.object_info_ttl_s:
                return cached[1]
            due = self._due_locked()
        self._probe(due)
        for server in self._servers:
            with self._cond:
                if not server.healthy:
                    continue
            try:
                info = server.client.object_info()
            except ComfyConnectionError as exc:
                self.mark_unhealthy(server.spec.url, str(exc))
                continue
            with self._cond:
                self._object_info = (time.monotonic(), info)
            return info
        with self._cond:
            raise NoServerError(f"no healthy ComfyUI server for /object_info: {self._why_unavailable()}")
