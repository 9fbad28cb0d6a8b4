"""A local stand-in for the Hugging Face Hub (and a plain file server) for download tests.

It speaks what huggingface-hub 2.x sends, so `hf_hub_download(endpoint=stub.endpoint)` and
`snapshot_download(endpoint=...)` work against it unchanged:

- HEAD/GET `/{repo}/resolve/{revision}/{path}`: `X-Repo-Commit` and `ETag` on every answer. LFS files
  answer 302 to a "CDN" on another host name (`localhost` instead of `127.0.0.1`, so clients treat it
  as off-Hub and drop the token), with `X-Linked-Etag` (the sha256) and `X-Linked-Size`, like the Hub.
  Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound).
- GET `/api/models/{repo}[/revision/{revision}]` (`?blobs=true` adds sizes, blob ids and LFS sha256) and
  GET `/api/models/{repo}/tree/{revision}[/{path}]` (`?recursive=true`): the listings.
- GET/HEAD `/cdn/{sha256}` and `/files/{name}`: file bodies with `Range` (206) and `If-Range` support.

No Xet headers are ever sent, so clients fall back to plain HTTP. `drop_next` cuts the next body
of a path short and closes the connection (a dropped download); every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Seen:
    """One request the stub answered."""

    method: str
    host: str
    path: str
    headers: dict[str, str]  # lower-case names
    status: int = 0
    sent: int = 0  # body bytes written


@dataclass
class StubFile:
    data: bytes
    lfs: bool
    sha256: str
    git_oid: str
    served: bytes  # what the CDN sends: `data`, unless the test corrupts it


@dataclass
class StubRepo:
    commit: str
    files: dict[str, StubFile] = field(default_factory=dict)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.plain: dict[str, tuple[bytes, dict[str, str]]] = {}  # /files/<name> -> (data, extra headers)
        self.seen: list[Seen] = []
        self.ignore_range: set[str] = set()  # paths answered 200 even to a Range request
        self._drops: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- content ------------------------------------------------------------------------------------
    def add_repo(
        self, repo_id: str, files: dict[str, bytes], lfs_from: int = 1024, corrupt: tuple[str, ...] = ()
    ) -> str:
        """Serve `files` as `repo_id` at one commit (files of `lfs_from` bytes or more are LFS);
        the CDN sends a flipped byte for paths in `corrupt`. Returns the commit hash."""
        commit = hashlib.sha1(
            repr((repo_id, sorted(files.items()))).encode(), usedforsecurity=False
        ).hexdigest()
        repo = StubRepo(commit)
        for path, data in files.items():
            served = bytes([data[0] ^ 0xFF]) + data[1:] if path in corrupt else data
            repo.files[path] = StubFile(
                data, len(data) >= lfs_from, hashlib.sha256(data).hexdigest(), git_blob_oid(data), served
            )
        self.repos[repo_id] = repo
        return commit

    def add_file(self, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
        """Serve `data` at `/files/<name>` with a strong ETag; returns its URL."""
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        self.plain[name] = (data, {"ETag": etag, **(headers or {})})
        return f"{self.endpoint}/files/{name}"

    def blob_path(self, repo_id: str, filename: str) -> str:
        """The path a repo file's bytes are served from (the CDN for LFS files)."""
        f = self.repos[repo_id].files[filename]
        return f"/cdn/{f.sha256}" if f.lfs else f"/{repo_id}/resolve/{self.repos[repo_id].commit}/{filename}"

    def drop_next(self, path: str, after: int) -> None:
        """The next GET of `path` sends `after` body bytes, then closes the connection."""
        with self._lock:
            self._drops.setdefault(path, []).append(after)

    # --- what happened -------------------------------------------------------------------------------
    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and (path is None or s.path == path)
            ]

    def bytes_sent(self, path: str) -> int:
        return sum(s.sent for s in self.requests("GET", path))

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    # --- server --------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the stub first"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"

    def start(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            pass

        Handler.stub = stub
        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="hub-stub", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- answers -------------------------------------------------------------------------------------
    def answer(self, h: _Handler, head: bool) -> None:
        split = urlsplit(h.path)
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        seen = Seen(
            h.command, h.headers.get("Host", ""), split.path, {k.lower(): v for k, v in h.headers.items()}
        )
        with self._lock:
            self.seen.append(seen)
        if segs[:2] == ["api", "models"] and len(segs) == 4:  # model_info() without a revision
            self._api(h, seen, f"{segs[2]}/{segs[3]}", "revision", "main", "", query)
        elif segs[:2] == ["api", "models"] and len(segs) >= 6:
            self._api(h, seen, f"{segs[2]}/{segs[3]}", segs[4], segs[5], "/".join(segs[6:]), query)
        elif segs[0] == "cdn" and len(segs) == 2:
            blob = next(
                (f for r in self.repos.values() for f in r.files.values() if f.sha256 == segs[1]), None
            )
            if blob is None:
                return self._send(h, seen, 404, {}, b"no such blob", head)
            self._body(h, seen, blob.served, {"ETag": f'"{blob.sha256}"'}, head)
        elif segs[0] == "files" and len(segs) == 2 and segs[1] in self.plain:
            data, headers = self.plain[segs[1]]
            self._body(h, seen, data, headers, head)
        elif len(segs) >= 5 and segs[2] == "resolve":
            self._resolve(h, seen, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), head)
        else:
            self._send(h, seen, 404, {}, b"not found", head)

    def _repo_at(self, h: _Handler, seen: Seen, repo_id: str, revision: str, head: bool) -> StubRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(h, seen, 401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", head)
        elif revision not in ("main", repo.commit):
            self._send(h, seen, 404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id", head)
        else:
            return repo
        return None

    def _resolve(
        self, h: _Handler, seen: Seen, repo_id: str, revision: str, filename: str, head: bool
    ) -> None:
        repo = self._repo_at(h, seen, repo_id, revision, head)
        if repo is None:
            return
        f = repo.files.get(filename)
        hub = {"X-Repo-Commit": repo.commit}
        if f is None:
            return self._send(
                h, seen, 404, {**hub, "X-Error-Code": "EntryNotFound"}, b"Entry not found", head
            )
        if not f.lfs:
            return self._body(h, seen, f.data, {**hub, "ETag": f'"{f.git_oid}"'}, head)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {len(f.data)}\n"
        headers = {
            **hub,
            "Location": f"{self.cdn}/cdn/{f.sha256}",
            "ETag": f'"{git_blob_oid(pointer.encode())}"',  # the pointer file's blob id, as on the Hub
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(len(f.data)),
        }
        self._send(h, seen, 302, headers, b"", head)

    def _api(
        self, h: _Handler, seen: Seen, repo_id: str, what: str, revision: str, sub: str, query: dict
    ) -> None:
        repo = self._repo_at(h, seen, repo_id, revision, False)
        if repo is None:
            return
        if what == "revision":
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for p, f in sorted(repo.files.items()):
                sibling: dict = {"rfilename": p}
                if blobs:
                    sibling.update(size=len(f.data), blobId=f.git_oid)
                if blobs and f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
                siblings.append(sibling)
            body = {
                "_id": repo.commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            }
        elif what == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            body, folders = [], set()
            prefix = f"{sub}/" if sub else ""
            for p, f in sorted(repo.files.items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :]
                parts = rest.split("/")
                for i in range(1, len(parts) if recursive else min(2, len(parts))):
                    folders.add(prefix + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    entry = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": p}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                    body.append(entry)
            body += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
        else:
            return self._send(h, seen, 404, {}, b"not found", False)
        self._send(h, seen, 200, {"Content-Type": "application/json"}, json.dumps(body).encode(), False)

    def _body(self, h: _Handler, seen: Seen, data: bytes, headers: dict[str, str], head: bool) -> None:
        """A file body, honouring Range (and If-Range against the ETag)."""
        headers = {"Accept-Ranges": "bytes", **headers}
        start, end, status = 0, len(data) - 1, 200
        wanted = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if (
            wanted
            and seen.path not in self.ignore_range
            and (if_range is None or if_range == headers.get("ETag"))
        ):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if m and int(m[1]) >= len(data):
                return self._send(h, seen, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            if m:
                start, end, status = int(m[1]), min(int(m[2] or len(data) - 1), len(data) - 1), 206
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(h, seen, status, headers, data[start : end + 1], head)

    def _send(
        self, h: _Handler, seen: Seen, status: int, headers: dict[str, str], body: bytes, head: bool
    ) -> None:
        seen.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head or not body:
            return
        with self._lock:
            drops = self._drops.get(seen.path)
            cut = drops.pop(0) if drops else None
        if cut is not None and cut < len(body):
            body = body[:cut]
            h.close_connection = True  # the client sees the body end early: a dropped connection
        try:
            h.wfile.write(body)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (a cancelled download)
            h.close_connection = True
            return
        seen.sent = len(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are expected here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: HubStub

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.stub.answer(self, head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.stub.answer(self, head=True)

    def log_message(self, format: str, *args) -> None:  # quiet
        pass
