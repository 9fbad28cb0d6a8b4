"""Model downloads against a local Hub stub: where files land, resume, verification, offline, cancel."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants as hf_constants
import pytest

from engine.artifacts import folder_hash
from engine.errors import InputError, JobCancelledError, NotFoundError, TransientError
from engine.model_manager import downloads
from engine.model_manager.downloads import (
    PART_DIR,
    DownloadRequest,
    OfflineModeError,
    SourceUnreachableError,
    discard_partial_downloads,
    download_model,
    run_download_job,
)
from engine.paths import ModelRoots
from tests.hub_stub import HubStub

MiB = 1 << 20


def safetensors_bytes(n: int, seed: int = 0) -> bytes:
    """A valid .safetensors file with one uint8 tensor of `n` random bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recorder:
    """The progress callback; `cancel_when(done, desc)` turns `cancelled()` true."""

    def __init__(self, cancel_when=None) -> None:
        self.calls: list[tuple[int, int | None, str]] = []
        self.cancel_when = cancel_when

    def __call__(self, done: int, total: int | None, desc: str) -> None:
        self.calls.append((done, total, desc))

    def cancelled(self) -> bool:
        return bool(self.cancel_when and self.calls and self.cancel_when(*self.calls[-1][::2]))


@pytest.fixture
def hub():
    with HubStub() as stub:
        yield stub


@pytest.fixture
def online(monkeypatch):
    """conftest turns the Hub off for the whole run; these tests only ever reach the local stub."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(downloads, "RETRY_DELAYS_S", (0.05, 0.05, 0.05, 0.05))


@pytest.fixture
def roots(tmp_path) -> ModelRoots:
    r = ModelRoots(tmp_path / "models")
    r.create_layout()
    return r


def fetch(
    hub: HubStub, roots: ModelRoots, rec: Recorder | None = None, endpoint: str | None = None, **request
):
    rec = rec or Recorder()
    req = DownloadRequest.build(**request)
    return download_model(req, roots, rec, rec.cancelled, endpoint=endpoint or hub.endpoint, token="hf_test")


def partial_files(roots: ModelRoots, kind: str) -> list[Path]:
    return sorted((roots.models_dir / kind / PART_DIR).glob("*.part"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LORA = safetensors_bytes(3 * MiB + 123, seed=1)


@pytest.fixture
def lora_repo(hub) -> str:
    files = {"ink_style.safetensors": LORA, "other.safetensors": safetensors_bytes(10), "README.md": b"# ink"}
    return hub.add_repo("acme/ink-style", files)


# --- repo files ----------------------------------------------------------------------------------------


def test_repo_file_lands_in_kind_folder_with_progress(hub, roots, online, lora_repo):
    rec = Recorder()
    res = fetch(hub, roots, rec, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")

    assert res.path == roots.models_dir / "loras" / "ink_style.safetensors"
    assert res.path.read_bytes() == LORA
    assert (res.size, res.sha256, res.reused) == (len(LORA), sha(LORA), False)
    assert res.source == f"{hub.endpoint}/acme/ink-style/resolve/{lora_repo}/ink_style.safetensors"
    assert roots.list_files("loras") == {"ink_style": res.path}
    assert not (roots.models_dir / "loras" / PART_DIR).exists()
    done = [c[0] for c in rec.calls]
    assert len(done) >= 4 and done == sorted(done) and done[-1] == len(LORA)
    assert {c[1] for c in rec.calls} == {len(LORA)}
    assert rec.calls[-1][2] == "acme/ink-style/ink_style.safetensors"
    # the token goes to the Hub, never to the CDN host the LFS file is served from
    head = hub.requests("HEAD")[0]
    cdn = hub.requests("GET", hub.blob_path("acme/ink-style", "ink_style.safetensors"))[0]
    assert head.headers["authorization"] == "Bearer hf_test"
    assert cdn.host.startswith("localhost:") and "authorization" not in cdn.headers


def test_dropped_connection_resumes_with_a_range_for_the_remainder(hub, roots, online, lora_repo):
    blob = hub.blob_path("acme/ink-style", "ink_style.safetensors")
    half = len(LORA) // 2 + 7
    hub.drop_next(blob, after=half)

    res = fetch(
        hub,
        roots,
        repo_id="acme/ink-style",
        filename="ink_style.safetensors",
        kind="loras",
        save_as="styles/ink.safetensors",
    )

    first, second = hub.requests("GET", blob)
    assert (first.sent, "range" in first.headers) == (half, False)
    assert (second.status, second.headers["range"], second.sent) == (206, f"bytes={half}-", len(LORA) - half)
    assert hub.bytes_sent(blob) == len(LORA)
    assert res.sha256 == sha(LORA) and res.path == roots.models_dir / "loras" / "styles" / "ink.safetensors"
    assert roots.list_files("loras") == {"styles/ink": res.path}


def test_cancelled_download_leaves_nothing_visible_and_the_next_one_resumes(hub, roots, online, lora_repo):
    target = roots.models_dir / "loras" / "ink_style.safetensors"
    blob = hub.blob_path("acme/ink-style", "ink_style.safetensors")
    rec = Recorder(cancel_when=lambda done, desc: done >= len(LORA) // 2)
    with pytest.raises(JobCancelledError, match="ink_style.safetensors"):
        fetch(hub, roots, rec, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")

    assert not target.exists() and roots.list_files("loras") == {}
    [part] = partial_files(roots, "loras")
    kept = part.stat().st_size
    assert len(LORA) // 2 <= kept < len(LORA)

    hub.clear()
    rec = Recorder()
    res = fetch(hub, roots, rec, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    [get] = hub.requests("GET", blob)
    assert get.headers["range"] == f"bytes={kept}-" and hub.bytes_sent(blob) == len(LORA) - kept
    assert rec.calls[0][0] == kept and rec.calls[-1][0] == len(LORA)
    assert res.sha256 == sha(LORA) and target.read_bytes() == LORA
    assert partial_files(roots, "loras") == []


def test_expected_hash_that_the_hub_contradicts_is_refused_before_downloading(hub, roots, online, lora_repo):
    wrong = "ab" * 32
    with pytest.raises(InputError) as err:
        fetch(
            hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras", sha256=wrong
        )
    assert wrong in str(err.value) and sha(LORA) in str(err.value)
    assert hub.requests("GET") == [] and roots.list_files("loras") == {}


def test_bytes_that_do_not_match_the_hubs_lfs_sha256_are_deleted(hub, roots, online):
    hub.add_repo("acme/broken", {"bad.safetensors": LORA}, corrupt=("bad.safetensors",))
    with pytest.raises(InputError) as err:
        fetch(hub, roots, repo_id="acme/broken", filename="bad.safetensors", kind="loras")
    served = bytes([LORA[0] ^ 0xFF]) + LORA[1:]
    assert sha(LORA) in str(err.value) and sha(served) in str(err.value) and "LFS" in str(err.value)
    assert (
        not (roots.models_dir / "loras" / "bad.safetensors").exists() and partial_files(roots, "loras") == []
    )


def test_a_file_already_there_is_reused_or_protected(hub, roots, online, lora_repo):
    first = fetch(hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    hub.clear()
    again = fetch(hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    assert again.reused and again.sha256 == first.sha256 and hub.requests("GET") == []

    first.path.write_bytes(safetensors_bytes(99, seed=9))  # someone else's file under that name
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        fetch(hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    assert first.path.read_bytes() != LORA
    res = fetch(
        hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras", overwrite=True
    )
    assert res.path.read_bytes() == LORA


def test_missing_repo_revision_or_file_is_named(hub, roots, online, lora_repo):
    with pytest.raises(NotFoundError, match=r"repo_id='acme/nope' was not found"):
        fetch(hub, roots, repo_id="acme/nope", filename="x.safetensors", kind="loras")
    with pytest.raises(NotFoundError, match=r"revision='v9' was not found in acme/ink-style"):
        fetch(hub, roots, repo_id="acme/ink-style", filename="x.safetensors", revision="v9", kind="loras")
    with pytest.raises(NotFoundError) as err:
        fetch(hub, roots, repo_id="acme/ink-style", filename="typo.safetensors", kind="loras")
    assert "filename='typo.safetensors'" in str(err.value)
    assert "ink_style.safetensors, other.safetensors" in str(err.value)


def test_a_second_download_of_the_same_file_is_refused_while_the_first_runs(hub, roots, online, lora_repo):
    started, release = threading.Event(), threading.Event()

    def slow_progress(done, total, desc):
        started.set()
        release.wait(10)

    req = DownloadRequest.build(repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    results: list = []
    t = threading.Thread(
        target=lambda: results.append(
            download_model(req, roots, slow_progress, lambda: False, endpoint=hub.endpoint)
        )
    )
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(InputError, match="already being downloaded"):
            fetch(hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
        assert discard_partial_downloads(roots, older_than_s=0) == []  # never pulls the rug
    finally:
        release.set()
        t.join(10)
    assert results and results[0].sha256 == sha(LORA)


# --- URLs ----------------------------------------------------------------------------------------------


def test_url_download_resumes_after_a_drop_and_after_a_cancel(hub, roots):
    data = safetensors_bytes(2 * MiB + 5, seed=2)
    url = hub.add_file("civit-style.safetensors", data)
    path = "/files/civit-style.safetensors"
    hub.drop_next(path, after=700_001)
    res = fetch(hub, roots, url=url, kind="checkpoints")
    second = hub.requests("GET", path)[1]
    assert second.headers["range"] == "bytes=700001-" and hub.bytes_sent(path) == len(data)
    assert res.path == roots.models_dir / "checkpoints" / "civit-style.safetensors" and res.sha256 == sha(
        data
    )
    assert res.source == url

    # across calls: the partial is resumed, and only if the server's file is still the same (If-Range)
    res.path.unlink()
    hub.clear()
    with pytest.raises(JobCancelledError):
        fetch(hub, roots, Recorder(cancel_when=lambda done, desc: done >= MiB), url=url, kind="checkpoints")
    assert roots.list_files("checkpoints") == {}
    [part] = partial_files(roots, "checkpoints")
    kept = part.stat().st_size
    hub.clear()
    res = fetch(hub, roots, url=url, kind="checkpoints")
    [get] = hub.requests("GET", path)
    assert (
        get.headers["range"] == f"bytes={kept}-"
        and get.headers["if-range"] == hub.plain["civit-style.safetensors"][1]["ETag"]
    )
    assert hub.bytes_sent(path) == len(data) - kept and res.sha256 == sha(data)


def test_url_server_that_ignores_range_is_downloaded_again_from_the_start(hub, roots):
    data = safetensors_bytes(2 * MiB, seed=3)
    url = hub.add_file("norange.safetensors", data)
    hub.ignore_range.add("/files/norange.safetensors")
    with pytest.raises(JobCancelledError):
        fetch(hub, roots, Recorder(cancel_when=lambda done, desc: done >= MiB), url=url, kind="loras")
    hub.clear()
    rec = Recorder()
    res = fetch(hub, roots, rec, url=url, kind="loras")
    [get] = hub.requests("GET", "/files/norange.safetensors")
    assert get.status == 200 and "range" in get.headers
    assert res.sha256 == sha(data) and res.size == len(data) and rec.calls[-1][0] == len(data)


def test_url_partial_of_a_file_changed_since_is_not_mixed_in(hub, roots):
    old, new = safetensors_bytes(2 * MiB, seed=7), safetensors_bytes(2 * MiB + 10, seed=8)
    url = hub.add_file("evolving.safetensors", old)
    with pytest.raises(JobCancelledError):
        fetch(hub, roots, Recorder(cancel_when=lambda done, desc: done >= MiB), url=url, kind="loras")
    hub.add_file("evolving.safetensors", new)  # a new version, with a new ETag
    hub.clear()
    res = fetch(hub, roots, url=url, kind="loras")
    [get] = hub.requests("GET", "/files/evolving.safetensors")
    assert get.status == 200 and "if-range" in get.headers and "range" in get.headers
    assert res.sha256 == sha(new) and res.path.read_bytes() == new


def test_url_name_from_content_disposition(hub, roots):
    data = safetensors_bytes(1000, seed=4)
    url = hub.add_file("12345", data, {"Content-Disposition": 'attachment; filename="paper_cut.safetensors"'})
    res = fetch(hub, roots, url=url, kind="loras")
    assert res.path == roots.models_dir / "loras" / "paper_cut.safetensors" and res.sha256 == sha(data)

    url = hub.add_file("67890", data, {"Content-Disposition": 'attachment; filename="setup.exe"'})
    with pytest.raises(InputError, match=r"give save_as='<name>\.safetensors'"):
        fetch(hub, roots, url=url, kind="loras")
    assert partial_files(roots, "loras") == []


def test_url_expected_hash_mismatch_deletes_the_download(hub, roots):
    data = safetensors_bytes(5000, seed=5)
    url = hub.add_file("x.safetensors", data)
    wrong = "cd" * 32
    with pytest.raises(InputError) as err:
        fetch(hub, roots, url=url, kind="loras", sha256=wrong.upper())
    assert wrong in str(err.value) and sha(data) in str(err.value) and "sha256 field" in str(err.value)
    assert not (roots.models_dir / "loras" / "x.safetensors").exists()
    assert not (roots.models_dir / "loras" / PART_DIR).exists()


def test_a_web_page_is_not_saved_as_a_model(hub, roots):
    url = hub.add_file("model.safetensors", b"<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(InputError, match="web page"):
        fetch(hub, roots, url=url, kind="checkpoints")
    assert roots.list_files("checkpoints") == {} and partial_files(roots, "checkpoints") == []


def test_download_job_reports_bytes_as_progress(hub, roots):
    data = safetensors_bytes(3 * MiB, seed=6)
    url = hub.add_file("job.safetensors", data)
    events: list[dict] = []
    ctx = SimpleNamespace(
        emit=events.append,
        is_cancelled=lambda: False,
        runtime=SimpleNamespace(models=SimpleNamespace(roots=roots)),
    )
    result = run_download_job(DownloadRequest.build(url=url, kind="vae"), ctx)
    assert result["path"] == str(roots.models_dir / "vae" / "job.safetensors") and result["sha256"] == sha(
        data
    )
    json.dumps(result)  # a job result is stored as JSON
    assert events[-1] == {"step": len(data), "total": len(data), "desc": url}


# --- offline -------------------------------------------------------------------------------------------


def test_offline_mode_names_the_model_and_where_to_put_it(hub, roots, monkeypatch, lora_repo):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeError) as err:
        fetch(hub, roots, repo_id="acme/ink-style", filename="ink_style.safetensors", kind="loras")
    message = str(err.value)
    assert "acme/ink-style/ink_style.safetensors" in message and "HF_HUB_OFFLINE" in message
    assert str(roots.models_dir.resolve() / "loras" / "ink_style.safetensors") in message
    assert hub.seen == []

    with pytest.raises(OfflineModeError) as err:
        fetch(hub, roots, repo_id="acme/tiny-sd", kind="diffusers")
    assert "acme/tiny-sd" in str(err.value) and "model_index.json" in str(err.value)
    assert str(roots.models_dir.resolve() / "diffusers" / "tiny-sd") in str(err.value)


def test_refused_connection_names_the_model_and_where_to_put_it(hub, roots, online):
    port = closed_port()
    with pytest.raises(SourceUnreachableError) as err:
        fetch(
            hub,
            roots,
            endpoint=f"http://127.0.0.1:{port}",
            repo_id="acme/ink-style",
            filename="ink_style.safetensors",
            kind="loras",
        )
    message = str(err.value)
    assert isinstance(err.value, TransientError)
    assert "acme/ink-style/ink_style.safetensors" in message and "unreachable" in message
    assert str(roots.models_dir.resolve() / "loras" / "ink_style.safetensors") in message

    url = f"http://127.0.0.1:{port}/models/big.ckpt"
    with pytest.raises(SourceUnreachableError) as err:
        fetch(hub, roots, url=url, kind="checkpoints")
    assert url in str(err.value) and str(roots.models_dir.resolve() / "checkpoints" / "big.ckpt") in str(
        err.value
    )
    assert partial_files(roots, "checkpoints") == []


def test_dns_failure_names_the_model_and_where_to_put_it(hub, roots, online, monkeypatch):
    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):  # what a machine without network answers, without asking anyone
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(SourceUnreachableError) as err:
        fetch(hub, roots, endpoint="https://hub.studionova.invalid", repo_id="acme/tiny-sd", kind="diffusers")
    assert "acme/tiny-sd" in str(err.value) and str(
        roots.models_dir.resolve() / "diffusers" / "tiny-sd"
    ) in str(err.value)

    url = "https://models.studionova.invalid/vae/kl-f8.safetensors"
    with pytest.raises(SourceUnreachableError) as err:
        fetch(hub, roots, url=url, kind="vae")
    assert url in str(err.value) and str(roots.models_dir.resolve() / "vae" / "kl-f8.safetensors") in str(
        err.value
    )


# --- a whole diffusers repo ----------------------------------------------------------------------------

TINY_SD = {
    "model_index.json": json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    ).encode(),
    "scheduler/scheduler_config.json": b'{"_class_name": "DDIMScheduler"}',
    "text_encoder/config.json": b'{"hidden_size": 32}',
    "text_encoder/model.fp16.safetensors": safetensors_bytes(200_000, seed=10),  # only a variant: taken
    "tokenizer/vocab.json": b'{"a": 0}',
    "tokenizer/merges.txt": b"#version: 0.2\n",
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": safetensors_bytes(2 * MiB, seed=11),
    "unet/diffusion_pytorch_model.fp16.safetensors": safetensors_bytes(MiB, seed=12),  # variant: left out
    "unet/diffusion_pytorch_model.bin": b"\x80\x02pickle" * 200,  # safetensors exists: left out
    "vae/config.json": b'{"latent_channels": 4}',
    "vae/diffusion_pytorch_model.safetensors": safetensors_bytes(300_000, seed=13),
    "v1-5-pruned.safetensors": safetensors_bytes(MiB, seed=14),  # root single-file checkpoint: left out
    "README.md": b"# tiny",
    ".gitattributes": b"*.safetensors filter=lfs",
}
TINY_SD_TAKEN = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def test_diffusers_repo_appears_atomically_with_only_what_the_pipeline_loads(hub, roots, online):
    commit = hub.add_repo("acme/tiny-sd", TINY_SD)
    target = roots.models_dir / "diffusers" / "tiny-sd"
    seen_early: list[str] = []

    class Watching(Recorder):
        def __call__(self, done, total, desc):
            super().__call__(done, total, desc)
            if target.exists() or "tiny-sd" in roots.list_diffusers_folders():
                seen_early.append(desc)

    rec = Watching()
    res = fetch(hub, roots, rec, repo_id="acme/tiny-sd", kind="diffusers")

    assert seen_early == []
    assert res.path == target and roots.list_diffusers_folders()["tiny-sd"] == target
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert files == TINY_SD_TAKEN
    assert res.file_hashes == {p: sha(TINY_SD[p]) for p in TINY_SD_TAKEN}
    assert res.sha256[:10] == folder_hash(res.file_hashes)
    assert res.size == sum(len(TINY_SD[p]) for p in TINY_SD_TAKEN) == rec.calls[-1][0] == rec.calls[-1][1]
    assert res.source == f"{hub.endpoint}/acme/tiny-sd/tree/{commit}"
    fetched = {s.path for s in hub.requests("GET")}
    assert not any(p.endswith(("README.md", "v1-5-pruned.safetensors", ".bin")) for p in fetched)
    assert not (roots.models_dir / "diffusers" / PART_DIR).exists()


def test_diffusers_repo_cancelled_then_resumed_keeps_finished_files(hub, roots, online):
    hub.add_repo("acme/tiny-sd", TINY_SD)
    target = roots.models_dir / "diffusers" / "tiny-sd"
    unet = "acme/tiny-sd/unet/diffusion_pytorch_model.safetensors"
    before_unet = sum(
        len(TINY_SD[p]) for p in sorted(TINY_SD_TAKEN) if p < "unet/diffusion_pytorch_model.safetensors"
    )
    rec = Recorder(cancel_when=lambda done, desc: desc == unet and done >= before_unet + MiB)
    with pytest.raises(JobCancelledError):
        fetch(hub, roots, rec, repo_id="acme/tiny-sd", kind="diffusers")
    assert not target.exists() and "tiny-sd" not in roots.list_diffusers_folders()

    hub.clear()
    res = fetch(hub, roots, repo_id="acme/tiny-sd", kind="diffusers", save_as="tiny")
    # the files finished before the cancel are not fetched again; the one cut short resumes
    rest = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    bodies = {s.path for s in hub.requests("GET") if "/api/" not in s.path and s.status != 302}
    assert bodies == {hub.blob_path("acme/tiny-sd", p) for p in rest}
    [unet_get] = hub.requests("GET", hub.blob_path("acme/tiny-sd", rest[0]))
    assert int(unet_get.headers["range"].removeprefix("bytes=").rstrip("-")) >= MiB
    assert res.path == roots.models_dir / "diffusers" / "tiny" and res.file_hashes == {
        p: sha(TINY_SD[p]) for p in TINY_SD_TAKEN
    }
    assert not (roots.models_dir / "diffusers" / PART_DIR).exists()


def test_a_repo_without_model_index_is_not_a_diffusers_folder(hub, roots, online, lora_repo):
    with pytest.raises(InputError, match="no model_index.json"):
        fetch(hub, roots, repo_id="acme/ink-style", kind="diffusers")
    assert not (roots.models_dir / "diffusers" / "ink-style").exists()


def test_discard_partial_downloads(hub, roots, online, lora_repo):
    with pytest.raises(JobCancelledError):
        fetch(
            hub,
            roots,
            Recorder(cancel_when=lambda done, desc: done > 0),
            repo_id="acme/ink-style",
            filename="ink_style.safetensors",
            kind="loras",
        )
    assert len(partial_files(roots, "loras")) == 1
    assert discard_partial_downloads(roots, older_than_s=3600) == []
    assert [p.suffix for p in discard_partial_downloads(roots, older_than_s=0)] == [".part"]
    assert not (roots.models_dir / "loras" / PART_DIR).exists()


# --- the request ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        (dict(repo_id="not a repo!", filename="x.safetensors"), ["repo_id='not a repo!'", "org/name"]),
        (dict(repo_id="a/b--c", filename="x.safetensors"), ["repo_id", "'--'"]),
        (
            dict(url="file:///etc/passwd"),
            ["url='file:///etc/passwd'", "'file' is not allowed", "http, https"],
        ),
        (dict(url="ftp://example.com/x.safetensors"), ["url=", "'ftp' is not allowed", "http, https"]),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="weights"),
            ["kind='weights'", "checkpoints, diffusers, loras"],
        ),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="loras", save_as="../evil.safetensors"),
            ["save_as='../evil.safetensors'", "no '..'"],
        ),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="loras", save_as="/etc/x.safetensors"),
            ["save_as=", "no absolute path"],
        ),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="loras", save_as=".tmp-x.safetensors"),
            ["save_as=", ".tmp-"],
        ),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="loras", save_as="x.exe"),
            ["save_as='x.exe'", "'.exe'", "allowed: .safetensors"],
        ),
        (
            dict(repo_id="a/b", filename="x.safetensors", kind="vae", save_as="x.pt"),
            ["save_as='x.pt'", "suffix .safetensors"],
        ),
        (
            dict(repo_id="a/b", filename="model.ckpt", kind="loras"),
            ["filename", ".ckpt", "loras", "allowed: .safetensors"],
        ),
        (dict(url="https://example.com/m.ckpt", kind="loras"), ["url", ".ckpt", "allowed: .safetensors"]),
        (
            dict(repo_id="a/b", filename="../x.safetensors"),
            ["filename='../x.safetensors'", "inside the repo"],
        ),
        (dict(repo_id="a/b", filename="x.safetensors", revision="a b"), ["revision='a b'", "'main'"]),
        (dict(repo_id="a/b", url="https://example.com/x.safetensors"), ["repo_id", "url", "not both"]),
        (dict(kind="loras"), ["repo_id", "url"]),
        (dict(repo_id="a/b", filename="x.safetensors", sha256="abc"), ["sha256='abc'", "64 hex"]),
        (dict(repo_id="a/b", kind="loras"), ["filename is required for kind='loras'"]),
        (
            dict(repo_id="a/b", filename="unet/x.safetensors", kind="diffusers"),
            ["kind='diffusers'", "leave filename empty"],
        ),
        (dict(url="https://example.com/x.safetensors", kind="diffusers"), ["kind='diffusers'", "repo_id"]),
    ],
)
def test_bad_requests_name_the_field_and_what_is_allowed(values, fragments):
    with pytest.raises(InputError) as err:
        DownloadRequest.build(**values)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_request_reads_hub_page_urls_as_repo_files():
    req = DownloadRequest.build(
        url="https://huggingface.co/acme/x/blob/main/sub/y.safetensors?download=true",
        kind="loras",
        sha256="AB" * 32,
    )
    assert (req.url, req.repo_id, req.filename, req.revision) == ("", "acme/x", "sub/y.safetensors", "main")
    assert req.sha256 == "ab" * 32 and req.label == "acme/x/sub/y.safetensors@main"
    assert DownloadRequest.build(**req.model_dump()) == req  # survives a job row


def test_save_as_through_a_symlink_out_of_the_folder_is_refused(hub, roots, tmp_path, online, lora_repo):
    outside = tmp_path / "outside"
    outside.mkdir()
    (roots.models_dir / "loras" / "link").symlink_to(outside)
    with pytest.raises(InputError, match="escapes"):
        fetch(
            hub,
            roots,
            repo_id="acme/ink-style",
            filename="ink_style.safetensors",
            kind="loras",
            save_as="link/ink.safetensors",
        )
    assert list(outside.iterdir()) == []


# --- the stub speaks the Hub's protocol ----------------------------------------------------------------


def test_stub_serves_huggingface_hub_itself(hub, tmp_path, online):
    from huggingface_hub import hf_hub_download, snapshot_download

    hub.add_repo("acme/tiny-sd", TINY_SD)
    path = hf_hub_download(
        "acme/tiny-sd",
        "unet/diffusion_pytorch_model.safetensors",
        endpoint=hub.endpoint,
        local_dir=tmp_path / "one",
    )
    assert Path(path).read_bytes() == TINY_SD["unet/diffusion_pytorch_model.safetensors"]
    folder = Path(
        snapshot_download(
            "acme/tiny-sd",
            endpoint=hub.endpoint,
            local_dir=tmp_path / "all",
            allow_patterns=["model_index.json", "vae/*"],
        )
    )
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == TINY_SD[
        "vae/diffusion_pytorch_model.safetensors"
    ]
    assert (folder / "model_index.json").read_bytes() == TINY_SD["model_index.json"]
