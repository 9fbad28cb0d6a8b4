"""engine.characters.ingest: uploads, ZIPs, videos, server folders and URLs become validated candidates.

All media is built here: images with Pillow, clips with the bundled ffmpeg (argv lists only), a
direct-link "site" with http.server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import socket
import stat
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.characters import ingest
from engine.characters.ingest import IngestLimits, Skipped
from engine.errors import InputError

CLIP_SIZE = "128x128"
CLIP_RATE = 10


def make_image(path: Path, size=(48, 32), fmt="PNG", seed=0) -> Path:
    """A sharp noise image (distinct per seed, so distinct phashes)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def image_bytes(fmt="PNG", seed=0, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reasons(report) -> dict[str, str]:
    return {s.source: s.reason for s in report.skipped}


def only_candidate_files(workdir: Path, report) -> bool:
    """The work folder holds exactly the candidates' files: nothing partial, no temp files."""
    return sorted(workdir.iterdir()) == sorted(c.path for c in report.candidates)


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-hide_banner", "-loglevel", "error", *args],
        check=True,
        timeout=60,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """4 scenes of 1 s at 10 fps: A testsrc, B mandelbrot, C = A again, D smptebars heavily blurred."""
    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    src = f"size={CLIP_SIZE}:rate={CLIP_RATE}"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"testsrc={src}:duration=1",
        "-f",
        "lavfi",
        "-i",
        f"mandelbrot={src}",
        "-f",
        "lavfi",
        "-i",
        f"testsrc={src}:duration=1",
        "-f",
        "lavfi",
        "-i",
        f"smptebars={src}:duration=1",
        "-filter_complex",
        "[1:v]trim=duration=1,setpts=PTS-STARTPTS[b];[3:v]boxblur=10:5[d];"
        "[0:v][b][2:v][d]concat=n=4:v=1:a=0,format=yuv420p[v]",
        "-map",
        "[v]",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-crf",
        "18",
        "-g",
        "10",
        str(out),
    )
    return out


def seconds(source: str) -> float:
    return float(source.rsplit("@", 1)[1].removesuffix("s"))


# ---------------------------------------------------------------------------------------------
# Images


def test_valid_images_become_candidates(tmp_path):
    png = make_image(tmp_path / "cat.png", size=(48, 32), seed=1)
    jpg = make_image(tmp_path / "dog.jpeg", size=(40, 30), fmt="JPEG", seed=2)
    liar = make_image(tmp_path / "x.png", size=(20, 24), fmt="JPEG", seed=3)
    workdir = tmp_path / "work"

    report = ingest.ingest_files([png, jpg, liar], workdir)

    assert report.skipped == []
    by_source = {c.source: c for c in report.candidates}
    assert set(by_source) == {"upload:cat.png", "upload:dog.jpeg", "upload:x.png"}
    cat, dog, x = by_source["upload:cat.png"], by_source["upload:dog.jpeg"], by_source["upload:x.png"]
    assert (cat.width, cat.height, cat.format, cat.path.suffix) == (48, 32, "PNG", ".png")
    assert (dog.width, dog.height, dog.format, dog.path.suffix) == (40, 30, "JPEG", ".jpg")
    assert (x.format, x.path.suffix) == ("JPEG", ".jpg")  # by content, not by its name
    for candidate, original in ((cat, png), (dog, jpg), (x, liar)):
        assert candidate.path.parent == workdir
        assert candidate.sha256 == sha256(original) == sha256(candidate.path)
        assert len(candidate.phash) == 16
        assert candidate.sharpness > 100  # noise is as sharp as it gets
    assert only_candidate_files(workdir, report)


def test_bad_images_are_skipped_and_the_rest_go_on(tmp_path):
    good = make_image(tmp_path / "good.png", seed=4)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    full = image_bytes(size=(64, 64), seed=5)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    text = tmp_path / "notes.png"
    text.write_text("just some text, not an image\n")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8), "red").save(gif, format="GIF")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 Mpx in a few KB
    assert bomb.stat().st_size < 100_000
    workdir = tmp_path / "work"

    report = ingest.ingest_files(
        [corrupt, truncated, good, text, gif, bomb], workdir, IngestLimits(max_image_pixels=10_000_000)
    )

    assert [c.source for c in report.candidates] == ["upload:good.png"]
    why = reasons(report)
    assert set(why) == {f"upload:{p.name}" for p in (corrupt, truncated, text, gif, bomb)}
    assert why["upload:corrupt.png"].startswith("corrupt or truncated image")
    assert why["upload:truncated.png"].startswith("corrupt or truncated image")
    assert "truncated" in why["upload:truncated.png"]
    for name in ("notes.png", "anim.gif"):
        assert why[f"upload:{name}"].startswith("not a PNG, JPEG, WEBP image")
        assert "allowed: PNG, JPEG, WEBP" in why[f"upload:{name}"]
    assert "81,000,000 pixels exceeds the limit of 10,000,000" in why["upload:bomb.png"]
    assert only_candidate_files(workdir, report)


def test_pillow_decompression_bomb_warning_is_a_clean_rejection(tmp_path):
    # Above Pillow's own MAX_IMAGE_PIXELS (about 89 Mpx) its warning must not slip through as a warning.
    bomb = tmp_path / "huge.png"
    Image.new("1", (9500, 9500)).save(bomb)
    with pytest.raises(InputError, match=r"upload:huge\.png: image too large"):
        ingest.check_image(bomb, "upload:huge.png", IngestLimits(max_image_pixels=10**9))


def test_check_image_names_the_source(tmp_path):
    bad = tmp_path / "bad.webp"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 garbage")
    with pytest.raises(InputError, match=r"^upload:bad\.webp: "):
        ingest.check_image(bad, "upload:bad.webp")
    good = ingest.check_image(make_image(tmp_path / "ok.webp", fmt="WEBP"), "upload:ok.webp")
    assert good.format == "WEBP"


def test_oversized_upload_is_skipped(tmp_path):
    big = make_image(tmp_path / "big.png", size=(200, 200))
    report = ingest.ingest_files([big], tmp_path / "work", IngestLimits(max_file_bytes=1000))
    assert report.candidates == []
    assert "larger than the limit of 1,000 bytes" in reasons(report)["upload:big.png"]
    assert list((tmp_path / "work").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# ZIPs


def _member(name: str, **attrs) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def test_zip_takes_only_safe_image_members(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("inside.png", image_bytes(seed=9))
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/good.png", image_bytes(seed=6))
        z.writestr("../evil.png", image_bytes(seed=7))
        z.writestr("a/../../evil2.png", image_bytes(seed=7))
        z.writestr("/etc/x.png", image_bytes(seed=8))
        z.writestr("C:/x.png", image_bytes(seed=8))
        z.writestr(
            _member("link.png", create_system=3, external_attr=(stat.S_IFLNK | 0o777) << 16), "/etc/passwd"
        )
        z.writestr("locked.png", image_bytes(seed=10))
        z.getinfo("locked.png").flag_bits |= 0x1  # zipfile cannot encrypt; mark it as encrypted
        z.writestr("more.zip", inner.getvalue())
        z.writestr("readme.txt", "hello")
        z.writestr("a/", "")
        z.writestr("__MACOSX/a/._good.png", b"\x00\x05\x16\x07")
        z.writestr(".DS_Store", b"\x00\x00\x00\x01Bud1")
    workdir = tmp_path / "deep" / "work"
    before = sorted(tmp_path.rglob("*"))

    report = ingest.ingest_files([archive], workdir)

    assert [c.source for c in report.candidates] == ["zip:set.zip!a/good.png"]
    assert report.candidates[0].format == "PNG"
    why = reasons(report)
    assert why == {
        "zip:set.zip!../evil.png": "zip entry '../evil.png' escapes the archive",
        "zip:set.zip!a/../../evil2.png": "zip entry 'a/../../evil2.png' escapes the archive",
        "zip:set.zip!/etc/x.png": "zip entry '/etc/x.png' has an absolute path",
        "zip:set.zip!C:/x.png": "zip entry 'C:/x.png' names a drive",
        "zip:set.zip!link.png": "zip entry 'link.png' is a symbolic link (links are not followed)",
        "zip:set.zip!locked.png": "zip entry 'locked.png' is encrypted (password-protected entries are not supported)",
        "zip:set.zip!more.zip": "nested zip archives are not opened; upload it on its own",
        "zip:set.zip!readme.txt": why["zip:set.zip!readme.txt"],
    }
    assert why["zip:set.zip!readme.txt"].startswith("not a PNG, JPEG, WEBP image")
    assert only_candidate_files(workdir, report)
    # nothing was written anywhere but the work folder
    assert sorted(p for p in tmp_path.rglob("*") if workdir not in (p, *p.parents)) == sorted(
        [*before, workdir.parent]
    )


def test_zip_bomb_is_skipped(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.png", bytes(20 * 1024 * 1024))
        z.writestr("ok.png", image_bytes(seed=11))
    report = ingest.ingest_files([archive], tmp_path / "work", IngestLimits(max_file_bytes=64 * 1024 * 1024))
    assert [c.source for c in report.candidates] == ["zip:bomb.zip!ok.png"]
    assert reasons(report)["zip:bomb.zip!zeros.png"].startswith("zip bomb: expands")
    assert only_candidate_files(tmp_path / "work", report)


def test_zip_header_that_lies_about_its_size_does_not_get_through(tmp_path):
    archive = tmp_path / "liar.zip"
    payload = os.urandom(3 * 1024 * 1024)  # incompressible: no ratio to give it away
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", payload)
        # The central directory (what readers trust) now claims 100 bytes.
        z.getinfo("big.png").file_size = 100
    assert zipfile.ZipFile(archive).getinfo("big.png").file_size == 100
    report = ingest.ingest_files([archive], tmp_path / "work", IngestLimits(max_file_bytes=1024 * 1024))
    assert report.candidates == []
    assert "zip:liar.zip!big.png" in reasons(report)
    assert list((tmp_path / "work").iterdir()) == []


def test_streaming_copy_counts_real_bytes():
    # The cap holds whatever a header said: only bytes that arrive count.
    with pytest.raises(ingest._TooLarge, match="larger than the limit of 1,000 bytes"):
        ingest._copy_capped(io.BytesIO(bytes(5000)), io.BytesIO(), cap=1000)
    out = io.BytesIO()
    assert ingest._copy_capped(io.BytesIO(bytes(1000)), out, cap=1000) == 1000
    with pytest.raises(ingest._Refused, match="zip bomb"):
        ingest._copy_capped(
            io.BytesIO(bytes(3 * 1024 * 1024)), io.BytesIO(), cap=10**9, compressed_size=1000, max_ratio=200.0
        )


def test_zip_member_over_the_size_limit_is_skipped(tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("big.png", image_bytes(seed=12, size=(100, 100)))
        z.writestr("small.png", image_bytes(seed=13, size=(8, 8)))
    report = ingest.ingest_files([archive], tmp_path / "work", IngestLimits(max_file_bytes=5000))
    assert [c.source for c in report.candidates] == ["zip:set.zip!small.png"]
    assert "larger than the limit of 5,000 bytes" in reasons(report)["zip:set.zip!big.png"]


def test_zip_entry_and_total_limits_stop_the_archive(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(5):
            z.writestr(f"{i}.png", image_bytes(seed=20 + i))
    size = len(image_bytes(seed=20))

    report = ingest.ingest_files([archive], tmp_path / "a", IngestLimits(max_zip_entries=3))
    assert [c.source for c in report.candidates] == [f"zip:many.zip!{i}.png" for i in range(3)]
    assert report.skipped == [Skipped("zip:many.zip", report.skipped[0].reason)]
    assert "more than 3 entries" in report.skipped[0].reason

    report = ingest.ingest_files([archive], tmp_path / "b", IngestLimits(max_zip_total_bytes=int(size * 2.5)))
    assert len(report.candidates) == 2
    assert [s.source for s in report.skipped] == ["zip:many.zip"]
    assert "max_zip_total_bytes" in report.skipped[0].reason
    assert only_candidate_files(tmp_path / "b", report)


def test_broken_zip_is_skipped(tmp_path):
    good = make_image(tmp_path / "good.png", seed=30)
    archive = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.png", image_bytes(seed=31))
    data = bytearray(archive.read_bytes())
    data[40:60] = bytes(20)  # damage the member's data; the central directory still reads
    archive.write_bytes(bytes(data))
    report = ingest.ingest_files([archive, good, tmp_path / "missing.png"], tmp_path / "work")
    assert [c.source for c in report.candidates] == ["upload:good.png"]
    assert set(reasons(report)) == {"zip:broken.zip!a.png", "upload:missing.png"}


# ---------------------------------------------------------------------------------------------
# Near-duplicates


def test_drop_near_duplicates_against_dataset_and_within_list(tmp_path):
    report = ingest.ingest_files(
        [make_image(tmp_path / f"{i}.png", seed=s) for i, s in enumerate((40, 41, 40, 42))], tmp_path / "work"
    )
    a, b, a_again, c = report.candidates
    known = {c.phash: "folder:old/c.png"}
    kept, skipped = ingest.drop_near_duplicates(report.candidates, known)
    assert kept == [a, b]
    assert skipped == [
        Skipped(a_again.source, f"near-duplicate of {a.source} (phash distance 0)"),
        Skipped(c.source, "near-duplicate of folder:old/c.png (phash distance 0)"),
    ]


# ---------------------------------------------------------------------------------------------
# Video


def test_scene_sampling_keeps_one_frame_per_distinct_sharp_scene(clip, tmp_path):
    workdir = tmp_path / "frames"
    report = ingest.sample_video(clip, workdir, mode="scene")

    assert len(report.candidates) == 2
    first, second = report.candidates
    assert first.source.startswith("video:clip.mp4@") and 0 <= seconds(first.source) < 1  # scene A
    assert 1 <= seconds(second.source) < 2  # scene B
    assert len(report.skipped) == 2
    duplicate, blurry = report.skipped
    assert 2 <= seconds(duplicate.source) < 3  # scene C, A again
    assert duplicate.reason.startswith(f"near-duplicate of {first.source} (phash distance ")
    assert 3 <= seconds(blurry.source) <= 4  # scene D
    assert blurry.reason.startswith("blurry (sharpness ") and blurry.reason.endswith(" < 40)")
    for candidate in report.candidates:
        assert (candidate.format, candidate.width, candidate.height) == ("PNG", 128, 128)
        assert candidate.path.suffix == ".png" and candidate.sha256 == sha256(candidate.path)
        assert candidate.sharpness >= 40
        assert ingest.check_image(candidate.path, candidate.source).phash == candidate.phash
    assert only_candidate_files(workdir, report)


def test_rate_sampling_takes_a_frame_every_interval(clip, tmp_path):
    report = ingest.sample_video(clip, tmp_path / "frames", mode="rate", fps=2)
    times = sorted(seconds(x.source) for x in [*report.candidates, *report.skipped])
    assert abs(len(times) - 4 * 2) <= 1
    assert times[:3] == pytest.approx([0.0, 0.5, 1.0], abs=0.11)
    assert all(s.reason.startswith(("blurry", "near-duplicate")) for s in report.skipped)
    assert any(s.reason.startswith("blurry") for s in report.skipped)


def test_video_frame_limit_is_reported(clip, tmp_path):
    report = ingest.sample_video(
        clip,
        tmp_path / "frames",
        mode="rate",
        fps=2,
        max_phash_distance=0,
        limits=IngestLimits(max_video_frames=3),
        source_name="url:https://example.com/v",
    )
    sampled = [*report.candidates, *[s for s in report.skipped if "@" in s.source]]
    assert len(sampled) == 3
    assert all(x.source.startswith("url:https://example.com/v@") for x in sampled)
    limit = [s for s in report.skipped if s.source == "url:https://example.com/v"]
    assert len(limit) == 1 and "max_video_frames" in limit[0].reason


def test_broken_videos_raise_naming_the_file(clip, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match=r"garbage\.mp4"):
        ingest.sample_video(garbage, tmp_path / "w1")
    truncated = tmp_path / "half.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(InputError, match=r"half\.mp4"):
        ingest.sample_video(truncated, tmp_path / "w2")
    image = make_image(tmp_path / "still.mp4")
    with pytest.raises(InputError, match=r"still\.mp4"):
        ingest.sample_video(image, tmp_path / "w3")
    for workdir in ("w1", "w2", "w3"):
        assert not (tmp_path / workdir).exists() or not any((tmp_path / workdir).iterdir())


@pytest.mark.parametrize("mode", ["scene", "rate"])
def test_video_timeout_raises_and_leaves_nothing(clip, tmp_path, mode):
    with pytest.raises(InputError, match=r"clip\.mp4: .*video timeout"):
        ingest.sample_video(clip, tmp_path / "w", mode=mode, limits=IngestLimits(video_timeout_s=0))
    assert not any((tmp_path / "w").glob("*"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "every"}, "allowed: scene, rate"),
        ({"mode": "rate", "fps": 0}, "fps=0 must be > 0 and <= 30"),
        ({"mode": "rate", "fps": 31}, "fps=31 must be > 0 and <= 30"),
    ],
)
def test_sample_video_validates_its_arguments(clip, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        ingest.sample_video(clip, tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Server folders


def test_scan_folder_inside_root_returns_only_new_files(tmp_path):
    root = tmp_path / "root"
    (root / "set" / "sub").mkdir(parents=True)
    a = make_image(root / "set" / "a.png", seed=50)
    b = make_image(root / "set" / "sub" / "b.JPG", fmt="JPEG", seed=51)
    (root / "set" / "notes.txt").write_text("x")
    (root / "set" / ".hidden.png").write_bytes(a.read_bytes())

    seen: set[str] = set()
    found = ingest.scan_folder(root / "set", [root], seen)
    assert found == sorted([a.resolve(), b.resolve()])
    assert [ingest.folder_source(p, root) for p in found] == ["folder:set/a.png", "folder:set/sub/b.JPG"]

    seen.update(str(p) for p in found)
    assert ingest.scan_folder(root / "set", [root], seen) == []
    c = make_image(root / "set" / "c.webp", fmt="WEBP", seed=52)
    assert ingest.scan_folder(root / "set", [root], seen) == [c.resolve()]


def test_scan_folder_refuses_what_leaves_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "set").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = make_image(outside / "secret.png", seed=60)
    inside = make_image(root / "set" / "ok.png", seed=61)
    (root / "set" / "link.png").symlink_to(secret)
    (root / "set" / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "set" / "inner.png").symlink_to(inside)

    assert ingest.scan_folder(root / "set", [root], set()) == [inside.resolve()]
    with pytest.raises(InputError, match="is outside the allowed roots"):
        ingest.scan_folder(outside, [root], set())
    with pytest.raises(InputError, match="is outside the allowed roots"):
        ingest.scan_folder(root / "set" / ".." / ".." / "outside", [root], set())
    with pytest.raises(InputError, match="is outside the allowed roots"):
        ingest.scan_folder(root / "set" / "linkdir", [root], set())
    with pytest.raises(InputError, match="--ingest-roots"):
        ingest.scan_folder(root / "set", [], set())
    with pytest.raises(InputError, match="does not exist"):
        ingest.scan_folder(root / "nope", [root], set())
    with pytest.raises(InputError, match="not inside the allowed root"):
        ingest.folder_source(secret, root)


# ---------------------------------------------------------------------------------------------
# URLs


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _NoLengthHandler(http.server.BaseHTTPRequestHandler):
    """Streams 2 MB of "video" without a Content-Length, so only counting bytes can stop it."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.end_headers()
        try:
            for _ in range(32):
                self.wfile.write(bytes(64 * 1024))
        except ConnectionError:  # the client hung up: yt-dlp probing, or our cap
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    servers = []

    def start(handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.mp4", "/etc/passwd", "http://"])
def test_download_url_refuses_other_schemes(tmp_path, url):
    with pytest.raises(InputError, match="only http:// and https://"):
        ingest.download_url(url, tmp_path)


def test_download_url_unreachable_says_network_is_needed(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is
    with pytest.raises(InputError, match="could not be fetched.*needs network access") as caught:
        ingest.download_url(f"http://127.0.0.1:{port}/x.mp4", tmp_path, timeout_s=5)
    assert f"127.0.0.1:{port}/x.mp4" in str(caught.value)


def test_download_url_then_sample_video(clip, tmp_path, serve):
    base = serve(functools.partial(_QuietHandler, directory=str(clip.parent)))
    url = f"{base}/{clip.name}"

    downloaded = ingest.download_url(url, tmp_path / "dl", timeout_s=10)

    assert downloaded.parent == tmp_path / "dl" and downloaded.read_bytes() == clip.read_bytes()
    report = ingest.sample_video(downloaded, tmp_path / "frames", source_name=f"url:{url}")
    assert len(report.candidates) == 2
    assert all(c.source.startswith(f"url:{url}@") for c in report.candidates)


def test_download_url_size_cap_counts_bytes_without_content_length(tmp_path, serve):
    base = serve(_NoLengthHandler)
    with pytest.raises(InputError, match="larger than the limit of 1,000,000 bytes"):
        ingest.download_url(f"{base}/stream.mp4", tmp_path, timeout_s=10, max_bytes=1_000_000)
    assert list(tmp_path.iterdir()) == []  # no partial download left
