"""Variant batches end to end through the studio: real clips and tones made with ffmpeg, library
ingest (probe, thumbnails), round-robin batch, per-variant audio check, ZIP, bad input, expiry."""

from __future__ import annotations

import subprocess
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from engine.media.ffmpeg import ffmpeg_exe, probe
from engine.media.variants import batch_dir, cleanup_expired

FREQS = (330, 550, 770)


def lavfi(out: Path, *args: str) -> Path:
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args, str(out)],
        check=True,
        timeout=120,
    )
    return out


def make_clip(out: Path, seconds: float = 2.0, size: str = "320x180") -> Path:
    return lavfi(
        out,
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate=25:duration={seconds}",
        "-f",
        "lavfi",
        "-i",
        f"sine=frequency=1000:duration={seconds}",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
    )


def make_tone(out: Path, freq: int, seconds: float = 3.0) -> Path:
    return lavfi(out, "-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}", "-c:a", "pcm_s16le")


def dominant_frequency(path: Path) -> float:
    raw = subprocess.run(
        [
            ffmpeg_exe(),
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            str(path),
            "-vn",
            "-ac",
            "1",
            "-ar",
            "8000",
            "-f",
            "s16le",
            "-",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    x = np.frombuffer(raw, dtype=np.int16).astype(np.float32)[2000:10000]  # skip the start, before the fade
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / 8000)[spectrum.argmax()])


@pytest.fixture(scope="module")
def media(studio, tmp_path_factory):
    """Three clips and three tones in the library (added through the studio's uploads root)."""
    root = studio.settings.gradio_tmp_dir / "variant-media"
    root.mkdir(parents=True, exist_ok=True)
    lib = studio.library
    videos = [lib.add_file(make_clip(root / f"clip{i}.mp4"), name=f"clip {i}", tags="test") for i in range(3)]
    audios = [lib.add_file(make_tone(root / f"tone{f}.wav", f), name=f"tone {f}") for f in FREQS]
    hooks = lib.add_hooks("first hook\nsecond hook", category="variants-test")
    return videos, audios, hooks


def run_batch(studio, **values) -> dict:
    job_id, _ = studio.submit_variants(values)
    events = list(studio.watch(job_id))
    assert events[-1]["type"] == "done", events[-1]
    return {"events": events, **events[-1]["result"]}


def test_library_ingest_probes_and_thumbnails(media):
    videos, audios, _ = media
    v = videos[0]
    assert (v.kind, v.width, v.height, v.has_audio) == ("video", 320, 180, True)
    assert abs(v.duration - 2.0) < 0.15 and Path(v.thumbnail).is_file() and v.sha256
    a = audios[0]
    assert a.kind == "audio" and abs(a.duration - 3.0) < 0.1 and Path(a.thumbnail).is_file()


def test_round_robin_batch_audio_per_variant_and_zip(studio, media):
    videos, audios, hooks = media
    res = run_batch(
        studio, videos=[v.id for v in videos], audios=[a.id for a in audios[:2]], hooks=[h.id for h in hooks]
    )
    assert (res["ok"], res["failed"]) == (3, 0)
    expected = [FREQS[i % 2] for i in range(3)]
    for row, freq in zip(res["variants"], expected, strict=True):
        out = studio.settings.outputs_dir / row["file"]
        info = probe(out)
        assert abs(info.duration - 2.0) < 0.15 and (info.width, info.height) == (320, 180)
        assert abs(dominant_frequency(out) - freq) < 15, (row, freq)
    progress = [e for e in res["events"] if e["type"] == "progress" and e.get("variant")]
    # each variant reported as it finished (two render at once, so in completion order)
    assert sorted(e["variant"]["index"] for e in progress) == [0, 1, 2]
    assert [e["step"] for e in progress] == [1, 2, 3]
    with zipfile.ZipFile(studio.settings.outputs_dir / res["zip"]) as z:
        assert sorted(z.namelist()) == sorted(Path(r["file"]).name for r in res["variants"])


def test_a_truncated_clip_fails_only_its_variant(studio, media, tmp_path):
    videos, audios, _ = media
    root = studio.settings.gradio_tmp_dir / "variant-media"
    good = make_clip(root / "whole.mp4")
    item = studio.library.add_file(good, name="soon truncated")
    data = Path(item.path).read_bytes()
    Path(item.path).write_bytes(data[: len(data) // 3])  # damaged after it was added
    res = run_batch(studio, videos=[videos[0].id, item.id], audios=[audios[2].id])
    assert (res["ok"], res["failed"]) == (1, 1)
    bad = next(r for r in res["variants"] if not r["ok"])
    assert bad["video"] == "soon truncated" and bad["error"]
    assert not [
        p
        for p in batch_dir(studio.settings.outputs_dir, res["batch_id"]).iterdir()
        if p.name.startswith(".tmp-")
    ]


def test_expired_batches_lose_files_and_rows(studio, media):
    from sqlmodel import select

    from engine.store.database import Asset, Job

    videos, audios, _ = media
    res = run_batch(studio, videos=[videos[1].id], audios=[audios[0].id], expire_hours=1)
    folder = batch_dir(studio.settings.outputs_dir, res["batch_id"])
    assert folder.is_dir()
    assert cleanup_expired(studio.db, studio.settings.outputs_dir) == 0  # not yet
    from engine.store.database import utcnow

    assert cleanup_expired(studio.db, studio.settings.outputs_dir, now=utcnow() + timedelta(hours=2)) >= 1
    assert not folder.exists()
    with studio.db.session() as s:
        assert list(s.exec(select(Asset).where(Asset.job_id == res["batch_id"]))) == []
        assert s.get(Job, res["batch_id"]).result["expired"] is True


def test_delete_removes_files_and_rows(studio, media):
    root = studio.settings.gradio_tmp_dir / "variant-media"
    item = studio.library.add_file(make_tone(root / "bye.wav", 200), name="bye")
    assert Path(item.path).is_file()
    assert studio.library.delete([item.id]) == 1
    assert not Path(item.path).exists() and not Path(item.thumbnail).exists()
    assert item.id not in {i.id for i in studio.library.items(kind="audio")}


def test_a_batch_does_not_hold_up_image_generation(studio, media):
    """Media jobs have their own worker: an image job submitted after a batch finishes while it runs."""
    videos, audios, hooks = media
    batch_id, _ = studio.submit_variants(
        {
            "videos": [v.id for v in videos],
            "audios": [a.id for a in audios],
            "hooks": [h.id for h in hooks],
            "per_video": 4,
        }
    )
    job_id, _ = studio.submit_generate({"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1})
    assert list(studio.watch(job_id))[-1]["type"] == "done"
    assert studio.job_status(batch_id)["status"] in ("queued", "running")  # 12 renders are still going
    assert list(studio.watch(batch_id))[-1]["type"] == "done"
    assert studio.job_status(batch_id)["device"] == "media"


def test_two_variants_render_at_once_and_cancel_stops_them(studio, media, monkeypatch):
    """A batch keeps two ffmpeg processes busy (one leaves cores idle); cancel stops every running one and
    leaves no partial file."""
    import threading

    import engine.media.variants as variants

    videos, audios, _ = media
    real = variants._render_one
    lock, state = threading.Lock(), {"now": 0, "most": 0}
    cancel_now = threading.Event()

    def counting(a, req, folder, ctx):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            if cancel_now.is_set():
                cancel_now.wait(0.3)
            return real(a, req, folder, ctx)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(variants, "_render_one", counting)
    monkeypatch.setattr(studio.settings, "ffmpeg_parallel", 2)
    res = run_batch(studio, videos=[v.id for v in videos], audios=[audios[0].id], per_video=2)
    assert (res["ok"], res["failed"]) == (6, 0) and [r["index"] for r in res["variants"]] == list(range(6))
    assert state["most"] == 2

    cancel_now.set()
    job_id, token = studio.submit_variants(
        {"videos": [v.id for v in videos], "audios": [audios[1].id], "per_video": 3}
    )
    for event in studio.watch(job_id):
        if event["type"] == "progress" and event.get("variant"):
            studio.cancel(job_id, token=token)
    assert studio.job_status(job_id)["status"] == "cancelled"
    left = list(batch_dir(studio.settings.outputs_dir, job_id).glob(".tmp-*"))
    assert not left, left
