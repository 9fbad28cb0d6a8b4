"""Model downloads for the model manager: one file of a Hugging Face repo, a whole diffusers repo,
or an http(s) URL, into the kind's folder under models/.

Bytes go to `<kind folder>/.tmp-downloads/` first (hidden from every model listing by TMP_PREFIX),
are checked (expected sha256, the Hub's LFS sha256, the git blob id of small repo files, a parseable
safetensors header) and only then appear under their final name, by one rename. A partial file stays
in that hidden folder, so the next call for the same content continues with an HTTP Range request.

huggingface-hub speaks the Hub's protocol here (URL building, the metadata HEAD with its redirect
and auth rules, the repo listing); the bytes come through httpx, written as they arrive. Not through
`hf_hub_download`/`snapshot_download` because, in huggingface-hub 2.x, they delete their
`.incomplete` file on any failure (nothing to resume across calls), stream 10 MiB chunks (cancel
and progress granularity), and `snapshot_download` returns a partial `local_dir` when offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from engine.artifacts import TMP_PREFIX, atomic_write, safetensors_header, sha256_file
from engine.errors import InputError, JobCancelledError, NotFoundError, StudioError, TransientError
from engine.paths import MODEL_FOLDERS, ModelRoots, resolve_under
from engine.requests import RequestBase

if TYPE_CHECKING:
    import httpx

    from engine.jobs.kinds import RunContext

Progress = Callable[[int, int | None, str], None]  # (bytes done, bytes in all or None, what)
Cancelled = Callable[[], bool]

PART_DIR = f"{TMP_PREFIX}downloads"  # in each kind folder: partial files, sidecars, snapshot staging
CHUNK_BYTES = 1 << 20  # progress is reported per MiB; cancellation is checked on every network read
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # a dropped connection is resumed this many times per call
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_OID = re.compile(r"[0-9a-f]{40}")
_REPO_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}", re.ASCII)
_REVISION = re.compile(r"[\w.\-/]{1,200}", re.ASCII)
_WEIGHT_FORMATS = ("safetensors", "bin")  # diffusers subfolder weights, preferred first
_DIFFUSERS_SIDE_FILES = (".json", ".txt", ".model")  # configs, tokenizer vocab/merges, sentencepiece
ALL_SUFFIXES = frozenset(s for _, suffixes in MODEL_FOLDERS.values() for s in suffixes)


class OfflineModeError(InputError):
    """HF_HUB_OFFLINE is set: the Hub is off limits. The message says where to put the model by hand."""


class SourceUnreachableError(TransientError):
    """DNS failure, refused connection or timeout. The message says where to put the model by hand."""


class DownloadRequest(RequestBase):
    """A Hub repo file (repo_id + filename), a whole diffusers repo (repo_id, kind='diffusers'), or a URL.

    A huggingface.co `/resolve/` or `/blob/` URL is read as the repo file it names.
    """

    repo_id: str = Field(default="", max_length=200, description="Hugging Face repo, 'org/name'")
    filename: str = Field(
        default="",
        max_length=500,
        description="File inside the repo; leave empty with kind 'diffusers' for the whole repo",
    )
    revision: str = Field(default="", max_length=200, description="Branch, tag or commit; empty = main")
    url: str = Field(default="", max_length=4000, description="http(s) URL of the file, instead of a repo")
    kind: str = Field(default="checkpoints", description=f"Model kind: {', '.join(MODEL_FOLDERS)}")
    save_as: str = Field(
        default="",
        max_length=255,
        description="Name in the kind's folder (a folder name for diffusers); empty = the source's name",
    )
    sha256: str = Field(default="", description="Expected SHA-256 (64 hex); a different file is refused")
    overwrite: bool = Field(default=False, description="Replace a model already saved under that name")

    @model_validator(mode="before")
    @classmethod
    def _hub_url_as_repo(cls, values: Any) -> Any:
        """`https://huggingface.co/org/name/blob/main/x.safetensors` (an HTML page!) -> the repo file."""
        if not isinstance(values, dict) or not values.get("url") or values.get("repo_id"):
            return values
        parsed = urlsplit(str(values["url"]).strip())
        parts = [unquote(p) for p in parsed.path.split("/")[1:]]
        host = (parsed.hostname or "").lower()
        if host in HUB_HOSTS and len(parts) >= 5 and parts[2] in ("resolve", "blob") and parts[4:] != [""]:
            return {
                **values,
                "url": "",
                "repo_id": f"{parts[0]}/{parts[1]}",
                "revision": values.get("revision") or parts[3],
                "filename": "/".join(parts[4:]),
            }
        return values

    @field_validator("repo_id", "filename", "revision", "url", "save_as", "sha256", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v

    @field_validator("repo_id")
    @classmethod
    def _check_repo_id(cls, v: str) -> str:
        if v and (not _REPO_ID.fullmatch(v) or ".." in v or "--" in v or v.endswith(".git")):
            raise ValueError(
                "must look like 'org/name': letters, digits, '-', '_' and '.', at most 96 each side "
                "(no '..' or '--')"
            )
        return v

    @field_validator("filename")
    @classmethod
    def _check_filename(cls, v: str) -> str:
        if v and not _is_relative_posix(v):
            raise ValueError(
                "must be a path inside the repo such as 'unet/diffusion_pytorch_model.safetensors'"
            )
        return v

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, v: str) -> str:
        if v and (not _REVISION.fullmatch(v) or ".." in v or v.startswith("/")):
            raise ValueError("must be a branch, tag or commit hash such as 'main', 'v1.0' or 'refs/pr/1'")
        return v

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v:
            return v
        parsed = urlsplit(v)
        if parsed.scheme.lower() not in ("http", "https"):
            raise ValueError(f"scheme {parsed.scheme or '(none)'!r} is not allowed; allowed: http, https")
        if not parsed.hostname or any(c.isspace() for c in v):
            raise ValueError("must be a full URL such as 'https://example.com/models/x.safetensors'")
        return v

    @field_validator("kind")
    @classmethod
    def _check_kind(cls, v: str) -> str:
        if v not in MODEL_FOLDERS:
            raise ValueError(f"is unknown; allowed: {', '.join(MODEL_FOLDERS)}")
        return v

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, v: str) -> str:
        v = v.lower().removeprefix("sha256:")
        if v and not _SHA256.fullmatch(v):
            raise ValueError("must be 64 hex digits (a SHA-256), or empty")
        return v

    @field_validator("save_as")
    @classmethod
    def _check_save_as(cls, v: str) -> str:
        if v and (not _is_relative_posix(v) or any(p.startswith(TMP_PREFIX) for p in v.split("/"))):
            raise ValueError(
                f"must be a name inside the kind's folder, such as 'my_model.safetensors' "
                f"(no '..', no absolute path, not starting with {TMP_PREFIX!r})"
            )
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> DownloadRequest:
        if bool(self.repo_id) == bool(self.url):
            raise ValueError(
                "give either repo_id ('org/name' on the Hugging Face Hub) or url (http:// or https://)"
                + (", not both" if self.repo_id else "")
            )
        if self.url and (self.filename or self.revision):
            raise ValueError("filename and revision go with repo_id, not with url")
        suffixes = MODEL_FOLDERS[self.kind][1]
        if self.kind == "diffusers":
            if self.url:
                raise ValueError("kind='diffusers' is a whole repo folder: give repo_id, not url")
            if self.filename:
                raise ValueError(
                    f"kind='diffusers' downloads the whole repo: leave filename empty, or give a file kind "
                    f"({', '.join(k for k in MODEL_FOLDERS if k != 'diffusers')}) for {self.filename!r}"
                )
            if "/" in self.save_as:
                raise ValueError(f"save_as={self.save_as!r}: a diffusers folder name has no '/'")
            return self
        if self.repo_id and not self.filename:
            raise ValueError(
                f"filename is required for kind={self.kind!r} (the file inside {self.repo_id}); "
                "leave it empty only with kind='diffusers'"
            )
        source = self.source_suffix
        if source is not None and source not in suffixes:
            field_name = "filename" if self.repo_id else "url"
            raise ValueError(
                f"{field_name} names a {source or '(suffix-less)'} file, not accepted for {self.kind}; "
                f"allowed: {', '.join(suffixes)}"
            )
        if self.save_as:
            suffix = PurePosixPath(self.save_as).suffix.lower()
            if suffix not in suffixes:
                raise ValueError(
                    f"save_as={self.save_as!r}: suffix {suffix or '(none)'!r} is not accepted for "
                    f"{self.kind}; allowed: {', '.join(suffixes)}"
                )
            if source is not None and suffix != source:
                raise ValueError(f"save_as={self.save_as!r} must keep the source's suffix {source}")
        return self

    @property
    def source_suffix(self) -> str | None:
        """The model suffix the source's own name shows (None when a URL's path shows none)."""
        if self.repo_id:
            return PurePosixPath(self.filename).suffix.lower() if self.filename else None
        suffix = PurePosixPath(unquote(urlsplit(self.url).path)).suffix.lower()
        return suffix if suffix in ALL_SUFFIXES else None

    @property
    def label(self) -> str:
        """The model as messages name it: 'org/name/file@rev', 'org/name@rev' or the URL."""
        if self.url:
            return self.url
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}/{self.filename}{at}" if self.filename else f"{self.repo_id}{at}"

    def default_name(self) -> str | None:
        """save_as, else the source's own name; None for a URL whose path names no model file."""
        if self.save_as:
            return self.save_as
        if self.repo_id:
            return PurePosixPath(self.filename).name if self.filename else self.repo_id.split("/")[-1]
        name = PurePosixPath(unquote(urlsplit(self.url).path)).name
        return name if self.source_suffix and not name.startswith(".") else None


@dataclass(frozen=True)
class DownloadResult:
    """What landed where. For a diffusers folder, `sha256` is taken over its sorted 'path\\0sha256'
    lines, so `sha256[:10]` equals `artifacts.folder_hash(file_hashes)`, the studio's model hash."""

    path: Path
    size: int
    sha256: str
    source: str  # the exact URL the bytes came from (a Hub file pinned to its commit)
    file_hashes: dict[str, str] = field(default_factory=dict)  # path relative to `path`'s folder -> sha256
    reused: bool = False  # already there with the expected hash: nothing was downloaded

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def download_folder(roots: ModelRoots, kind: str) -> Path:
    """The folder a download of `kind` goes to, absolute (messages tell users where to put files):
    the first existing one (ComfyUI name first), else the ComfyUI one, created."""
    existing = roots.folders(kind)
    folder = existing[0] if existing else roots.models_dir / MODEL_FOLDERS[kind][0][0]
    folder.mkdir(parents=True, exist_ok=True)
    return Path(os.path.abspath(folder))


def download_model(
    req: DownloadRequest,
    roots: ModelRoots,
    progress: Progress,
    cancelled: Cancelled,
    endpoint: str | None = None,
    token: str | None = None,
) -> DownloadResult:
    """Download `req` into its kind's folder; resumable, verified, and atomic under its final name.

    Raises InputError (bad request, hash mismatch, name taken), NotFoundError (no such repo, revision
    or file), OfflineModeError / SourceUnreachableError (message names the model and the absolute path
    to put it by hand), TransientError (a connection lost for good: run again to resume), or
    JobCancelledError when `cancelled()` turns true (the partial file stays hidden, for resuming).
    """
    if cancelled():
        raise JobCancelledError(f"download of {req.label} was cancelled before it started")
    if req.url:
        return _download_url(req, roots, progress, cancelled, endpoint, token)
    if req.filename:
        return _download_repo_file(req, roots, progress, cancelled, endpoint, token)
    return _download_snapshot(req, roots, progress, cancelled, endpoint, token)


def run_download_job(req: DownloadRequest, ctx: RunContext) -> dict:
    """Job runner (`JobKind("engine.model_manager.downloads:run_download_job", "engine.model_manager.downloads:DownloadRequest",
    uses_gpu=False, resumable=True)`): progress events carry bytes as step/total."""

    def progress(done: int, total: int | None, desc: str) -> None:
        ctx.emit({"step": done, "total": total or 0, "desc": desc})

    return download_model(req, ctx.runtime.models.roots, progress, ctx.is_cancelled).as_dict()


def discard_partial_downloads(roots: ModelRoots, older_than_s: float = 7 * 86400) -> list[Path]:
    """Delete hidden partial downloads untouched for `older_than_s` seconds, except those a download
    is working on right now; returns what was removed."""
    from filelock import FileLock, Timeout

    removed: list[Path] = []
    cutoff = time.time() - older_than_s
    for kind in MODEL_FOLDERS:
        for folder in roots.folders(kind):
            part_dir = folder / PART_DIR
            for entry in sorted(part_dir.iterdir()) if part_dir.is_dir() else []:
                if entry.suffix == ".lock" or entry.lstat().st_mtime > cutoff:
                    continue
                owner = entry.with_suffix(".part") if entry.suffix == ".json" else entry  # a URL's sidecar
                lock = FileLock(f"{owner}.lock", timeout=0)
                try:
                    lock.acquire()
                except Timeout:
                    continue  # being downloaded
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
                finally:
                    lock.release()
                    Path(f"{owner}.lock").unlink(missing_ok=True)
            _remove_if_empty(part_dir)
    return removed


# --- one file of a Hub repo ---------------------------------------------------------------------------


def _download_repo_file(
    req: DownloadRequest,
    roots: ModelRoots,
    progress: Progress,
    cancelled: Cancelled,
    endpoint: str | None,
    token: str | None,
) -> DownloadResult:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    folder = download_folder(roots, req.kind)
    target = resolve_under(folder, req.default_name() or "", "save_as")
    hub = _hub_endpoint(endpoint)
    by_hand = (
        f"download {hub}/{req.repo_id}/resolve/{req.revision or 'main'}/{req.filename} yourself "
        f"and save it as {target}"
    )
    _refuse_hub_offline(req.label, by_hand)
    url = hf_hub_url(req.repo_id, req.filename, revision=req.revision or None, endpoint=endpoint)
    with _hub_errors(req, by_hand, endpoint, token):
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    if not meta.commit_hash or not meta.etag:
        raise InputError(
            f"{hub} does not answer like a Hugging Face Hub (no X-Repo-Commit or ETag header for {url}); "
            "check the endpoint (HF_ENDPOINT)"
        )
    lfs_sha = meta.etag if _SHA256.fullmatch(meta.etag) else None
    if req.sha256 and lfs_sha and req.sha256 != lfs_sha:
        raise InputError(
            f"sha256 mismatch for {req.label}: expected {req.sha256} (sha256 field) but the Hub lists "
            f"{lfs_sha} for it at commit {meta.commit_hash}; nothing was downloaded"
        )
    source = f"{hub}/{req.repo_id}/resolve/{meta.commit_hash}/{req.filename}"
    existing = _existing_target(target, req, req.sha256 or lfs_sha, source)
    if existing is not None:
        return existing
    part = folder / PART_DIR / f"hf-{_short_hash(meta.etag)}{target.suffix}.part"
    headers = _hub_headers(token, keep_auth=_same_origin(url, meta.location))
    with _exclusive(part, req.label), _http_client() as client:
        sha, size = _fetch(
            client,
            meta.location,
            part,
            headers=headers,
            size=meta.size,
            label=req.label,
            by_hand=by_hand,
            progress=progress,
            cancelled=cancelled,
        )
        checks = [("sha256 field", req.sha256), ("the Hub's LFS sha256", lfs_sha)]
        _verify(part, sha, checks, req.label, target.suffix)
        _publish_file(part, target, req.overwrite)
    return DownloadResult(target, size, sha, source, {target.name: sha})


# --- a whole diffusers repo ---------------------------------------------------------------------------


def _download_snapshot(
    req: DownloadRequest,
    roots: ModelRoots,
    progress: Progress,
    cancelled: Cancelled,
    endpoint: str | None,
    token: str | None,
) -> DownloadResult:
    from huggingface_hub import HfApi, hf_hub_url

    folder = download_folder(roots, "diffusers")
    name = req.default_name() or ""
    target = resolve_under(folder, name, "save_as")
    hub = _hub_endpoint(endpoint)
    by_hand = (
        f"download the repo's files (model_index.json and its component subfolders) from "
        f"{hub}/{req.repo_id}/tree/{req.revision or 'main'} yourself and put them in {target}/, "
        f"so that {target / 'model_index.json'} exists"
    )
    if target.exists() and not req.overwrite:
        raise InputError(
            f"save_as={name!r}: {target} already exists; pass overwrite=True to replace it, "
            "or choose another save_as"
        )
    _refuse_hub_offline(req.label, by_hand)
    with _hub_errors(req, by_hand, endpoint, token):
        info = HfApi(endpoint=endpoint, token=token).model_info(
            req.repo_id, revision=req.revision or None, files_metadata=True
        )
    commit = str(info.sha)
    files = select_diffusers_files(info.siblings or [], req.repo_id)
    part_dir = folder / PART_DIR
    repo_key = req.repo_id.replace("/", "--")  # repo ids have no '--'
    staging = part_dir / f"{repo_key}@{commit[:12]}"  # whatever save_as, the same repo resumes here
    total = sum(f.size or 0 for f in files) or None
    done, hashes = 0, {}
    headers = _hub_headers(token, keep_auth=True)  # httpx drops it on the redirect to the CDN host
    with _exclusive(staging, req.label), _http_client() as client:
        stale = re.compile(re.escape(repo_key) + r"@[0-9a-f]{12}")
        for old in part_dir.iterdir():
            if old != staging and stale.fullmatch(old.name) and not Path(f"{old}.lock").exists():
                shutil.rmtree(old, ignore_errors=True)  # an older commit's files: never resumed
        for repo_file in files:
            path, label = repo_file.rfilename, f"{req.repo_id}/{repo_file.rfilename}"
            dest = resolve_under(staging, path, "repo file")
            if dest.is_file() and repo_file.size is not None and dest.stat().st_size == repo_file.size:
                hashes[path] = sha256_file(dest)  # verified before it was moved here by an earlier call
                done += repo_file.size
                progress(done, total, label)
                continue
            lfs_sha = repo_file.lfs.sha256 if repo_file.lfs else None
            part = part_dir / f"hf-{_short_hash(lfs_sha or repo_file.blob_id or label)}.part"
            url = hf_hub_url(req.repo_id, path, revision=commit, endpoint=endpoint)
            sha, size = _fetch(
                client,
                url,
                part,
                headers=headers,
                size=repo_file.size,
                label=label,
                by_hand=by_hand,
                progress=progress,
                cancelled=cancelled,
                base=done,
                grand_total=total,
            )
            git_oid = None if lfs_sha else repo_file.blob_id
            _verify(part, sha, [("the Hub's LFS sha256", lfs_sha)], label, dest.suffix, git_oid=git_oid)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, dest)
            hashes[path] = sha
            done += size
        _publish_folder(staging, target, req.overwrite)
    return DownloadResult(target, done, listing_sha256(hashes), f"{hub}/{req.repo_id}/tree/{commit}", hashes)


def select_diffusers_files(siblings: list, repo_id: str) -> list:
    """The files a diffusers pipeline loads: model_index.json, and per component subfolder its configs,
    tokenizer files and one set of weights (safetensors before .bin, default before variants such as
    fp16). Root-level extras (single-file checkpoints, README, images) are left out."""
    paths = {s.rfilename for s in siblings}
    if "model_index.json" not in paths:
        raise InputError(
            f"repo_id={repo_id!r} has no model_index.json, so it is not a diffusers folder; for a single "
            "checkpoint file give filename='<file>.safetensors' and kind='checkpoints'"
        )
    by_folder: dict[str, list] = {}
    for s in siblings:
        parent = PurePosixPath(s.rfilename).parent.as_posix()
        if parent != "." and not parent.startswith("."):
            by_folder.setdefault(parent, []).append(s)
    chosen = [s for s in siblings if s.rfilename == "model_index.json"]
    for folder_files in by_folder.values():
        kinds = {id(s): _weight_kind(PurePosixPath(s.rfilename).name) for s in folder_files}
        present = {k for k in kinds.values() if k is not None and not k[2]}  # real weights, not indexes
        best = next(
            (
                (fmt, variant)
                for variant in (False, True)
                for fmt in _WEIGHT_FORMATS
                if (fmt, variant, False) in present
            ),
            None,
        )
        for s in folder_files:
            wk = kinds[id(s)]
            if wk is None:
                if PurePosixPath(s.rfilename).suffix.lower() in _DIFFUSERS_SIDE_FILES:
                    chosen.append(s)
            elif best is not None and wk[:2] == best:
                chosen.append(s)
    return chosen


def listing_sha256(file_hashes: dict[str, str]) -> str:
    """SHA-256 over sorted 'path\\0sha256' lines: a folder's identity (first 10 hex = folder_hash)."""
    h = hashlib.sha256()
    for rel in sorted(file_hashes):
        h.update(f"{rel}\0{file_hashes[rel]}\n".encode())
    return h.hexdigest()


def _weight_kind(name: str) -> tuple[str, bool, bool] | None:
    """(format, is_variant, is_index) for weight files and their shard indexes, else None.
    'x.safetensors' / 'x-00001-of-00002.safetensors' are default weights, 'x.fp16.safetensors' a variant;
    'x.safetensors.index.json' the default index, 'x.safetensors.index.fp16.json' a variant's."""
    parts = name.split(".")
    if parts[-1] in _WEIGHT_FORMATS:
        return parts[-1], len(parts) > 2, False
    for fmt in _WEIGHT_FORMATS:
        if f".{fmt}.index." in name and parts[-1] == "json":
            return fmt, len(parts) > 4, True
    return None


# --- an http(s) URL -----------------------------------------------------------------------------------


def _download_url(
    req: DownloadRequest,
    roots: ModelRoots,
    progress: Progress,
    cancelled: Cancelled,
    endpoint: str | None,
    token: str | None,
) -> DownloadResult:
    folder = download_folder(roots, req.kind)
    part = folder / PART_DIR / f"url-{_short_hash(req.url)}.part"
    sidecar = part.with_suffix(".json")
    state = _read_sidecar(sidecar, req.url)
    name = req.default_name() or state.get("name")
    target = resolve_under(folder, name, "save_as") if name else None
    by_hand = f"download {req.url} yourself and save it as " + (
        str(target) if target else f"{folder}/<name> (with one of {', '.join(MODEL_FOLDERS[req.kind][1])})"
    )
    if target is not None:
        existing = _existing_target(target, req, req.sha256, req.url)
        if existing is not None:
            return existing

    def on_response(response: httpx.Response) -> None:
        nonlocal name, target
        if target is None:
            name = _content_disposition_name(response)
            suffixes = MODEL_FOLDERS[req.kind][1]
            if not name or PurePosixPath(name).suffix.lower() not in suffixes:
                raise InputError(
                    f"url={req.url!r} names no {req.kind} file (the server calls it {name or 'nothing'!r}); "
                    f"give save_as='<name>{suffixes[0]}' (allowed suffixes: {', '.join(suffixes)})"
                )
            target = resolve_under(folder, name, "save_as")
            if target.exists() and not req.overwrite:
                raise _name_taken(target)
        if response.status_code == 200:  # a fresh start: remember what to resume it against
            validator = response.headers.get("ETag", "")
            if not validator or validator.startswith("W/"):
                validator = response.headers.get("Last-Modified", "")
            state.update(url=req.url, name=name, validator=validator, size=_content_length(response))
            with atomic_write(sidecar, "w") as f:
                json.dump(state, f)

    headers = _hub_headers(token, keep_auth=True) if _same_origin(req.url, _hub_endpoint(endpoint)) else {}
    headers.setdefault("user-agent", "StudioNOVA")
    with _exclusive(part, req.label), _http_client() as client:
        sha, size = _fetch(
            client,
            req.url,
            part,
            headers=headers,
            size=state.get("size"),
            label=req.label,
            by_hand=by_hand,
            progress=progress,
            cancelled=cancelled,
            if_range=state.get("validator") or None,
            on_response=on_response,
        )
        assert target is not None  # set before the first byte was written
        _verify(part, sha, [("sha256 field", req.sha256)], req.label, target.suffix, sidecar=sidecar)
        _publish_file(part, target, req.overwrite)
        sidecar.unlink(missing_ok=True)
    return DownloadResult(target, size, sha, req.url, {target.name: sha})


def _content_disposition_name(response: httpx.Response) -> str | None:
    header = response.headers.get("Content-Disposition", "")
    m = re.search(r"filename\*\s*=\s*[^']*'[^']*'([^;]+)", header) or re.search(
        r'filename\s*=\s*"?([^";]+)"?', header
    )
    name = PurePosixPath(unquote(m[1]).strip().replace("\\", "/")).name if m else ""
    return name if name and not name.startswith(".") else None


def _read_sidecar(path: Path, url: str) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("url") == url else {}


# --- the transfer -------------------------------------------------------------------------------------


def _fetch(
    client: httpx.Client,
    url: str,
    part: Path,
    *,
    headers: dict[str, str],
    size: int | None,
    label: str,
    by_hand: str,
    progress: Progress,
    cancelled: Cancelled,
    base: int = 0,
    grand_total: int | None = None,
    if_range: str | None = None,
    on_response: Callable[[httpx.Response], None] | None = None,
) -> tuple[str, int]:
    """Download `url` into `part`, continuing after the bytes already there (Range; a 200 answer
    starts over). Returns (sha256, size) of the complete part. Dropped connections are resumed
    RETRY_DELAYS_S times; a first connection that fails (DNS, refused) raises SourceUnreachableError
    at once, naming `label` and saying `by_hand`."""
    import httpx

    part.parent.mkdir(parents=True, exist_ok=True)
    hasher, have = _hash_prefix(part)
    total = grand_total if grand_total is not None else size
    failures, contacted = 0, False
    while size is None or have != size:
        if cancelled():
            raise _cancel_error(label, have, part)
        if size is not None and have > size:
            hasher, have = _restart(part)
        request_headers = {**headers, "Accept-Encoding": "identity"}
        if have:
            request_headers["Range"] = f"bytes={have}-"
            if if_range:
                request_headers["If-Range"] = if_range
        try:
            with client.stream("GET", url, headers=request_headers) as response:
                contacted = True
                if response.status_code == 416 and have:
                    hasher, have = _restart(part)
                    failures += 1
                    continue
                _raise_for_status(response, label)
                if on_response is not None:
                    on_response(response)
                if response.status_code == 206:
                    start, length = _content_range(response)
                    # a range of another size of file: what we have belongs to an older version
                    if start != have or (length is not None and size is not None and length != size):
                        hasher, have = _restart(part)
                        size = None
                        failures += 1
                        if failures > len(RETRY_DELAYS_S):
                            raise TransientError(f"{label}: the server answers ranges it was not asked for")
                        continue
                else:  # 200: the whole file (the server ignored Range, or the file changed since)
                    if have:
                        hasher, have = _restart(part)
                    length = _content_length(response)
                if length is not None and length != size:
                    size = length  # the server's word on this body (the hash check judges the content)
                    total = grand_total if grand_total is not None else size
                progress(base + have, total, label)
                reported = have
                with open(part, "ab") as f:
                    # whatever arrives is written at once, so a dropped connection loses no byte
                    for chunk in response.iter_bytes():
                        if cancelled():
                            raise _cancel_error(label, have, part)
                        f.write(chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        failures = 0
                        if have - reported >= CHUNK_BYTES:
                            progress(base + have, total, label)
                            reported = have
                    f.flush()
                    os.fsync(f.fileno())
                if have != reported:
                    progress(base + have, total, label)
            if size is None:
                break  # no length given: the end of the body is the end of the file
            if have < size:
                raise httpx.RemoteProtocolError(f"body ended after {have} of {size} bytes")
        except httpx.TransportError as e:
            if not contacted and isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                host = urlsplit(url).netloc
                raise SourceUnreachableError(
                    f"cannot download {label}: {host} is unreachable ({type(e).__name__}: {e}). "
                    f"To install it by hand, {by_hand}"
                ) from e
            failures += 1
            if failures > len(RETRY_DELAYS_S):
                raise TransientError(
                    f"{label}: connection lost after {have} of {size or '?'} bytes ({e}); "
                    "run the download again to resume it"
                ) from e
            _sleep(RETRY_DELAYS_S[failures - 1], cancelled)
    return hasher.hexdigest(), have


def _cancel_error(label: str, have: int, part: Path) -> JobCancelledError:
    return JobCancelledError(
        f"download of {label} was cancelled after {have} bytes; the partial file stays hidden in "
        f"{part.parent} and the next download of it resumes there"
    )


def _http_client() -> httpx.Client:
    import httpx

    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return httpx.Client(follow_redirects=True, timeout=timeout, trust_env=True)


def _raise_for_status(response: httpx.Response, label: str) -> None:
    code = response.status_code
    if code < 400:
        return
    where = f"{label}: the server answered HTTP {code} for {response.url}"
    if code in (408, 429) or code >= 500:
        raise TransientError(f"{where}; try again later (the download resumes)")
    if code == 404:
        raise NotFoundError(f"{where} (not found)")
    if code in (401, 403):
        raise InputError(f"{where}: it needs a login or a token with access")
    raise InputError(where)


def _content_range(response: httpx.Response) -> tuple[int, int | None]:
    """(first byte, complete length or None) from 'Content-Range: bytes 100-199/200'."""
    m = re.fullmatch(r"bytes\s+(\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not m:
        return -1, None
    return int(m[1]), (int(m[2]) if m[2] != "*" else None)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() and not _encoded(response) else None


def _encoded(response: httpx.Response) -> bool:
    return response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")


def _hash_prefix(part: Path) -> tuple[Any, int]:
    hasher = hashlib.sha256()
    have = 0
    if part.is_file():
        with open(part, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                hasher.update(block)
                have += len(block)
    return hasher, have


def _restart(part: Path) -> tuple[Any, int]:
    part.write_bytes(b"")
    return hashlib.sha256(), 0


def _sleep(seconds: float, cancelled: Cancelled) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if cancelled():
            raise JobCancelledError("download cancelled while waiting to resume")
        time.sleep(min(left, 0.1))


# --- checking and publishing --------------------------------------------------------------------------


def _verify(
    part: Path,
    sha: str,
    checks: list[tuple[str, str | None]],
    label: str,
    suffix: str,
    git_oid: str | None = None,
    sidecar: Path | None = None,
) -> None:
    """Refuse (and delete) a part whose hash or content is not what it must be."""

    def refuse(message: str) -> None:
        part.unlink(missing_ok=True)
        if sidecar is not None:
            sidecar.unlink(missing_ok=True)
        raise InputError(f"{label}: {message}; the download was deleted")

    for what, expected in checks:
        if expected and sha != expected:
            refuse(f"sha256 mismatch: expected {expected} ({what}), got {sha}")
    if git_oid and _GIT_OID.fullmatch(git_oid) and _git_blob_oid(part) != git_oid:
        refuse(f"git blob id mismatch: expected {git_oid} (the Hub's listing), got {_git_blob_oid(part)}")
    with open(part, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        refuse("the server sent a web page, not a model file (is the URL a download link?)")
    if suffix.lower() == ".safetensors":
        try:
            safetensors_header(part)
        except ValueError as e:
            refuse(f"not a safetensors file ({e})")


def _git_blob_oid(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _existing_target(
    target: Path, req: DownloadRequest, expected: str | None, source: str
) -> DownloadResult | None:
    """A file already saved under the name: reuse it if it has the expected hash, else refuse to clobber."""
    if not target.exists() or req.overwrite:
        return None
    if expected and target.is_file():
        sha = sha256_file(target)
        if sha == expected:
            return DownloadResult(target, target.stat().st_size, sha, source, {target.name: sha}, reused=True)
    raise _name_taken(target)


def _name_taken(target: Path) -> InputError:
    return InputError(
        f"save_as={target.name!r}: {target} already exists; pass overwrite=True to replace it, "
        "or choose another save_as"
    )


def _publish_file(part: Path, target: Path, overwrite: bool) -> None:
    """Give the verified part its final name in one step; never clobber unless told to."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        os.replace(part, target)
        return
    try:
        os.link(part, target)  # fails if the name is taken, with no window in between
    except FileExistsError:
        raise _name_taken(target) from None
    except OSError:  # no hard links on this filesystem
        if target.exists():
            raise _name_taken(target) from None
        os.replace(part, target)
        return
    part.unlink()


def _publish_folder(staging: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            raise _name_taken(target)
        retired = target.parent / PART_DIR / f"replaced-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    os.rename(staging, target)


@contextmanager
def _exclusive(part: Path, label: str) -> Iterator[None]:
    """One download per partial file at a time, across threads and processes."""
    from filelock import FileLock, Timeout

    part.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(str(part) + ".lock")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{label} is already being downloaded; wait for that download to finish") from None
    try:
        yield
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)  # a racing opener then fails like any other second downloader
        _remove_if_empty(part.parent)


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):  # not empty (other partial downloads), or already gone
        folder.rmdir()


# --- the Hub ------------------------------------------------------------------------------------------


def _hub_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def _refuse_hub_offline(label: str, by_hand: str) -> None:
    if _hub_offline():
        raise OfflineModeError(
            f"cannot download {label}: HF_HUB_OFFLINE is set, so the Hugging Face Hub is off limits. "
            f"To install it by hand, {by_hand}"
        )


def _hub_headers(token: str | None, keep_auth: bool) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    headers = dict(build_hf_headers(token=token))
    if not keep_auth:
        headers.pop("authorization", None)  # a signed CDN URL: the token must not leave the Hub
    return headers


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    ports = {"http": 80, "https": 443}
    return (pa.scheme, pa.hostname, pa.port or ports.get(pa.scheme)) == (
        pb.scheme,
        pb.hostname,
        pb.port or ports.get(pb.scheme),
    )


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextmanager
def _hub_errors(
    req: DownloadRequest, by_hand: str, endpoint: str | None, token: str | None
) -> Iterator[None]:
    """Turn huggingface-hub's errors into ours, each naming the value at fault."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = _hub_endpoint(endpoint)
    try:
        yield
    except OfflineModeIsEnabled as e:
        raise OfflineModeError(f"cannot download {req.label}: {e}. To install it by hand, {by_hand}") from e
    except GatedRepoError as e:
        raise InputError(
            f"repo_id={req.repo_id!r} is gated: accept its conditions at {hub}/{req.repo_id} while "
            "logged in, then give a token (HF_TOKEN) of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise NotFoundError(
            f"repo_id={req.repo_id!r} was not found on {hub} (a private repo needs a token with access)"
        ) from e
    except RevisionNotFoundError as e:
        raise NotFoundError(f"revision={req.revision!r} was not found in {req.repo_id}") from e
    except RemoteEntryNotFoundError as e:
        raise NotFoundError(
            f"filename={req.filename!r} is not in {req.repo_id}@{req.revision or 'main'}; "
            + _repo_listing(req, endpoint, token)
        ) from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        if status in (408, 429) or status >= 500:
            raise TransientError(
                f"cannot download {req.label}: the Hub answered HTTP {status}; try again"
            ) from e
        raise
    except StudioError:
        raise
    except Exception as e:
        # huggingface-hub lets its HTTP client's transport errors through (httpx2 in 2.x, httpx in 1.x):
        # matched by class name so this module does not import that client
        if any(c.__name__ in ("TransportError", "ConnectionError") for c in type(e).__mro__):
            raise SourceUnreachableError(
                f"cannot download {req.label}: {hub} is unreachable ({type(e).__name__}: {e}). "
                f"To install it by hand, {by_hand}"
            ) from e
        raise


def _repo_listing(req: DownloadRequest, endpoint: str | None, token: str | None) -> str:
    """Best effort: the repo's files with suffixes accepted for the kind, for a 'not found' message."""
    from huggingface_hub import HfApi

    suffixes = MODEL_FOLDERS[req.kind][1]
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(req.repo_id, revision=req.revision or None)
    except Exception:  # the message is still right without the listing
        return f"files there with {', '.join(suffixes)} could not be listed"
    names = sorted(s.rfilename for s in info.siblings or [] if PurePosixPath(s.rfilename).suffix in suffixes)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"{req.kind} files there: {shown or 'none'}"


def _is_relative_posix(path: str) -> bool:
    parts = path.split("/")
    return (
        "\\" not in path
        and "\0" not in path
        and not path.startswith("/")
        and ":" not in parts[0]
        and all(p not in ("", ".", "..") for p in parts)
    )
