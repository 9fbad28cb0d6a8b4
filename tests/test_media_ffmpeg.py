"""engine.media: variants rendered with the real ffmpeg on tiny lavfi clips, its safety rails, and
text drawn with Pillow. Clips are 2 s at 320x180 / 180x320, so the whole file runs in seconds."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError, JobCancelledError, NotFoundError, TransientError
from engine.media.ffmpeg import (
    FFMPEG_ENV,
    VariantSpec,
    ffmpeg_exe,
    media_input,
    overlay_box,
    probe,
    render_variant,
    run_ffmpeg,
)
from engine.media.text import render_text

pytestmark = pytest.mark.timeout(120)

SECONDS = 2.0
FPS = 25


def _lavfi_clip(
    path: Path, size: str, tone: int | None, seconds: float = SECONDS, faststart: bool = False
) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={FPS}"]
    if tone:
        args += ["-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=44100"]
    args += ["-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if tone:
        args += ["-c:a", "aac"]
    if faststart:
        args += ["-movflags", "+faststart"]
    run_ffmpeg([*args, "-y", f"file:{path}"], timeout=60)
    return path


def _tone(path: Path, frequency: int, seconds: float) -> Path:
    args = ["-f", "lavfi", "-i", f"sine=frequency={frequency}:sample_rate=44100", "-t", str(seconds)]
    run_ffmpeg([*args, "-y", f"file:{path}"], timeout=60)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("media")
    return SimpleNamespace(
        landscape=_lavfi_clip(d / "landscape.mp4", "320x180", tone=440),
        portrait=_lavfi_clip(d / "portrait.mp4", "180x320", tone=440),
        long_tone=_tone(d / "tone880.wav", 880, 3.0),
        short_tone=_tone(d / "tone1320.wav", 1320, 0.8),
    )


@pytest.fixture(scope="module")
def base_render(media, tmp_path_factory) -> Path:
    """The landscape clip re-encoded with no overlay: what an overlay render is compared with."""
    out = tmp_path_factory.mktemp("base") / "base.mp4"
    render_variant(VariantSpec(media.landscape, output_size=(320, 180)), out)
    return out


def _audio(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        chunks = [
            frame.to_ndarray().astype(np.float32).reshape(stream.channels, -1) for frame in c.decode(stream)
        ]
        return np.concatenate(chunks, axis=1).mean(axis=0), stream.rate


def _spectrum(samples: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    segment = samples[int(0.2 * rate) : int(1.4 * rate)]  # clear of the fade-out
    magnitude = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    return np.fft.rfftfreq(len(segment), 1 / rate), magnitude


def _dominant(samples: np.ndarray, rate: int) -> float:
    freqs, magnitude = _spectrum(samples, rate)
    return float(freqs[int(np.argmax(magnitude))])


def _level(samples: np.ndarray, rate: int, frequency: float) -> float:
    """Peak magnitude near `frequency`, relative to the strongest peak."""
    freqs, magnitude = _spectrum(samples, rate)
    near = np.abs(freqs - frequency) < 15
    return float(magnitude[near].max() / magnitude.max())


def _frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(video=0)]


def _video_packets(path: Path) -> list[bytes]:
    import av

    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def _no_temp_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


# --- audio ---------------------------------------------------------------------------------------


def test_replace_audio_uses_the_new_track_for_the_video_length(media, tmp_path):
    info = render_variant(VariantSpec(media.landscape, audio=media.long_tone), tmp_path / "out.mp4")
    assert info.path == tmp_path / "out.mp4" and info.has_video and info.has_audio
    assert abs(info.duration - SECONDS) <= 0.1
    samples, rate = _audio(info.path)
    assert abs(len(samples) / rate - SECONDS) <= 0.1  # the 3 s track is trimmed to the video
    assert abs(_dominant(samples, rate) - 880) < 10
    assert _level(samples, rate, 440) < 0.05  # the original tone is gone
    tail = samples[-int(0.05 * rate) :]
    assert np.abs(tail).max() < 0.2 * np.abs(samples[:rate]).max()  # faded out


def test_short_track_loops_to_the_video_length(media, tmp_path):
    info = render_variant(VariantSpec(media.landscape, audio=media.short_tone), tmp_path / "out.mp4")
    samples, rate = _audio(info.path)
    assert abs(len(samples) / rate - SECONDS) <= 0.1
    assert abs(_dominant(samples, rate) - 1320) < 10
    early = np.sqrt(np.mean(samples[int(0.1 * rate) : int(0.5 * rate)] ** 2))
    looped = np.sqrt(np.mean(samples[int(1.0 * rate) : int(1.4 * rate)] ** 2))  # past the 0.8 s track
    assert looped > 0.8 * early


def test_mix_keeps_the_original_under_the_new_track(media, tmp_path):
    spec = VariantSpec(media.landscape, audio=media.long_tone, audio_mode="mix", audio_volume=1.0)
    info = render_variant(spec, tmp_path / "out.mp4")
    samples, rate = _audio(info.path)
    assert _level(samples, rate, 440) > 0.3 and _level(samples, rate, 880) > 0.3
    assert abs(info.duration - SECONDS) <= 0.1


def test_without_overlay_or_resize_the_video_stream_is_copied(media, tmp_path):
    info = render_variant(VariantSpec(media.landscape, audio=media.long_tone), tmp_path / "out.mp4")
    assert info.video_codec == "h264" and (info.width, info.height) == (320, 180)
    assert _video_packets(info.path) == _video_packets(media.landscape)


# --- picture -------------------------------------------------------------------------------------


def _solid_png(path: Path, size=(200, 30), rgba=(255, 0, 255, 255)) -> Path:
    from PIL import Image

    Image.new("RGBA", size, rgba).save(path)
    return path


def test_overlay_shows_in_its_region_and_time_window_only(media, base_render, tmp_path):
    overlay = _solid_png(tmp_path / "box.png")
    spec = VariantSpec(
        media.landscape, overlay=overlay, overlay_position="bottom", overlay_start=0.8, overlay_duration=0.6
    )
    info = render_variant(spec, tmp_path / "out.mp4")
    assert (info.width, info.height) == (320, 180) and abs(info.duration - SECONDS) <= 0.1
    x, y, w, h = overlay_box(320, 180, 200, 30, "bottom", 0.08)
    assert (x, y, w, h) == (60, 180 - 14 - 30, 200, 30)
    frames, base = _frames(info.path), _frames(base_render)
    assert len(frames) == len(base) == SECONDS * FPS
    inside = np.zeros((180, 320), bool)
    inside[y + 3 : y + h - 3, x + 3 : x + w - 3] = True
    around = np.ones((180, 320), bool)
    around[y - 4 : y + h + 4, x - 4 : x + w + 4] = False

    shown = frames[int(1.1 * FPS)]  # inside [0.8, 1.4)
    r, g, b = shown[inside].mean(axis=0)
    assert r > 200 and g < 60 and b > 200, "the overlay is missing from its region"
    assert np.abs(shown - base[int(1.1 * FPS)])[around].mean() < 6, "the overlay leaked outside its region"
    for t in (0.4, 1.7):  # before and after the window
        frame = frames[int(t * FPS)]
        assert np.abs(frame - base[int(t * FPS)]).mean() < 6, f"overlay visible at {t}s"


@pytest.mark.parametrize(
    ("source", "size", "fit"),
    [
        ("landscape", (108, 192), "crop"),
        ("landscape", (108, 192), "pad"),
        ("portrait", (192, 108), "crop"),
        ("portrait", (192, 108), "pad"),
        ("portrait", (90, 160), "crop"),
    ],
)
def test_crop_and_pad_give_the_exact_size(media, tmp_path, source, size, fit):
    info = render_variant(
        VariantSpec(getattr(media, source), output_size=size, fit=fit), tmp_path / "out.mp4"
    )
    assert (info.width, info.height) == size and abs(info.duration - SECONDS) <= 0.1
    frame = _frames(info.path)[10]
    # a 16:9 picture padded into 9:16 (or the reverse) has black bars; cropped, it has none
    edge = frame[:4] if size[1] > size[0] else frame[:, :4]
    if fit == "pad" and size != (90, 160):
        assert edge.mean() < 20
    else:
        assert edge.mean() > 30


@pytest.mark.parametrize(
    "hook", ["a':textfile=/etc/passwd:x='", "%{eif:1/0:d}", "[in];movie=/etc/passwd,[x]"]
)
def test_hostile_hook_text_is_only_pixels(media, base_render, tmp_path, hook):
    image = render_text(hook, frame_width=320, font_size=20)
    png = tmp_path / "hook.png"
    image.save(png)
    info = render_variant(
        VariantSpec(media.landscape, overlay=png, overlay_position="center"), tmp_path / "o.mp4"
    )
    x, y, w, h = overlay_box(320, 180, image.width, image.height, "center", 0.08)
    frame, base = _frames(info.path)[25], _frames(base_render)[25]
    assert np.abs(frame - base)[y : y + h, x : x + w].mean() > 15  # the text was drawn there


def test_dash_names_are_files_not_options(media, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "-y.mp4"
    shutil.copy(media.landscape, source)
    before = source.read_bytes()
    _solid_png(tmp_path / "in" / "-i %d.png")  # a sequence pattern and an option, if ffmpeg were naive
    monkeypatch.chdir(tmp_path / "in")
    assert media_input("-y.mp4") == f"file:{source.resolve()}"
    spec = VariantSpec(Path("-y.mp4"), overlay=Path("-i %d.png"))
    info = render_variant(spec, tmp_path / "out" / "-y.mp4")
    assert info.path == tmp_path / "out" / "-y.mp4" and info.path.is_file()
    assert (info.width, info.height) == (320, 180)
    assert source.read_bytes() == before
    assert _no_temp_left(tmp_path / "out")


@pytest.mark.parametrize("faststart", [False, True], ids=["index-at-end", "index-first"])
def test_truncated_video_raises_naming_it_and_leaves_nothing(tmp_path, faststart):
    clip = _lavfi_clip(tmp_path / "clip.mp4", "320x180", tone=440, faststart=faststart)
    broken = tmp_path / "broken-clip.mp4"
    data = clip.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputError, match="broken-clip.mp4"):
        render_variant(VariantSpec(broken, overlay=_solid_png(tmp_path / "box.png")), out_dir / "v.mp4")
    assert list(out_dir.iterdir()) == []


# --- the ffmpeg rails ----------------------------------------------------------------------------


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _endless(marker_dir: Path) -> tuple[list[str], str]:
    marker = str(marker_dir / f"never-{uuid.uuid4().hex}.nut")
    return ["-re", "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-f", "null", f"file:{marker}"], marker


def test_timeout_kills_ffmpeg_and_raises(tmp_path):
    args, marker = _endless(tmp_path)
    started = time.monotonic()
    with pytest.raises(TransientError, match="timeout"):
        run_ffmpeg(args, timeout=0.5)
    assert time.monotonic() - started < 5
    assert _processes_mentioning(marker) == []


def test_cancel_kills_ffmpeg(tmp_path):
    args, marker = _endless(tmp_path)
    stop_at = time.monotonic() + 0.3
    with pytest.raises(JobCancelledError):
        run_ffmpeg(args, timeout=30, cancelled=lambda: time.monotonic() > stop_at)
    assert _processes_mentioning(marker) == []


def test_render_timeout_removes_the_temp_file(media, tmp_path):
    with pytest.raises(TransientError):
        render_variant(
            VariantSpec(media.landscape, output_size=(320, 180)), tmp_path / "out.mp4", timeout=0.01
        )
    assert list(tmp_path.iterdir()) == []


def test_only_file_inputs_reach_ffmpeg(tmp_path):
    for url in ("http://127.0.0.1:9/x.mp4", "/etc/passwd", "concat:/etc/passwd"):
        with pytest.raises(InputError, match="file: URL"):
            run_ffmpeg(["-i", url, "-f", "null", "-"], timeout=10)
    playlist = tmp_path / "playlist.mp4"  # an HLS playlist wearing an .mp4 name
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n/etc/passwd\n#EXT-X-ENDLIST\n")
    with pytest.raises(InputError, match="playlist.mp4"):
        probe(playlist)
    with pytest.raises(InputError):
        run_ffmpeg(["-i", media_input(playlist), "-f", "null", "-"], timeout=10)


def test_media_input_refuses_non_files(tmp_path):
    with pytest.raises(NotFoundError, match="missing.mp4"):
        media_input(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="not a regular file"):
        media_input(tmp_path)


def test_ffmpeg_exe_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(FFMPEG_ENV, raising=False)
    bundled = ffmpeg_exe()
    assert Path(bundled).is_file()
    monkeypatch.setenv(FFMPEG_ENV, bundled)
    assert ffmpeg_exe() == bundled
    monkeypatch.setenv(FFMPEG_ENV, str(tmp_path / "nope"))
    with pytest.raises(NotFoundError, match="nope"):
        ffmpeg_exe()
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(FFMPEG_ENV, "system")
    assert ffmpeg_exe() == str(fake)


def test_probe_reports_streams(media):
    info = probe(media.portrait)
    assert (info.width, info.height, info.fps) == (180, 320, FPS)
    assert info.has_video and info.has_audio and info.audio_rate == 44100
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert abs(info.duration - SECONDS) <= 0.1 and info.size == media.portrait.stat().st_size


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio_mode", "blend"),
        ("audio_volume", 3),
        ("audio_volume", float("nan")),
        ("fade_out_s", -1),
        ("overlay_position", "left"),
        ("overlay_margin", 0.9),
        ("overlay_start", -0.5),
        ("overlay_duration", 0),
        ("output_size", (101, 200)),
        ("output_size", (1080,)),
        ("fit", "stretch"),
    ],
)
def test_variant_spec_names_the_bad_field(media, field, value):
    with pytest.raises(InputError, match=field):
        VariantSpec(media.landscape, **{field: value})


def test_variant_spec_refuses_missing_and_non_png_files(media, tmp_path):
    with pytest.raises(NotFoundError, match="video"):
        VariantSpec(tmp_path / "none.mp4")
    with pytest.raises(InputError, match="must be a PNG"):
        VariantSpec(media.landscape, overlay=media.long_tone)
    with pytest.raises(InputError, match="must end in"):
        render_variant(VariantSpec(media.landscape), tmp_path / "out.gif")


# --- text ----------------------------------------------------------------------------------------


def test_render_text_wraps_within_the_width():
    one = render_text("Short hook", frame_width=320, font_size=24)
    long = render_text(
        "This hook is far too long to fit on one line of a small frame " * 2, 320, font_size=24
    )
    assert one.mode == long.mode == "RGBA"
    assert one.height < 2 * 24 and one.width <= 288
    assert long.width <= 288 and long.height > 3 * 24
    narrow = render_text(
        "Supercalifragilisticexpialidocious", frame_width=200, font_size=24, max_width_fraction=0.5
    )
    assert narrow.width <= 100


def test_render_text_draws_an_outline():
    image = np.asarray(render_text("I", frame_width=200, font_size=64, outline_width=4, shadow=False))
    opaque = image[..., 3] == 255
    white = opaque & (image[..., :3].min(axis=2) > 230)
    black = opaque & (image[..., :3].max(axis=2) < 25)
    assert white.sum() > 50 and black.sum() > 50
    row = image.shape[0] // 2  # across the stem of the I: outline, fill, outline
    solid = np.flatnonzero(opaque[row])
    assert black[row, solid[0]] and black[row, solid[-1]] and white[row, solid[0] : solid[-1]].any()
    plain = np.asarray(render_text("I", frame_width=200, font_size=64, outline_width=0, shadow=False))
    assert not ((plain[..., 3] == 255) & (plain[..., :3].max(axis=2) < 25)).any()


def test_render_text_survives_missing_glyphs_and_refuses_bad_values():
    image = render_text("ok 😀 日本 \U0010fffd ✓", frame_width=320)
    assert image.mode == "RGBA" and image.width > 10
    with pytest.raises(InputError, match="color"):
        render_text("hi", 320, color="not-a-colour")
    with pytest.raises(InputError, match="text"):
        render_text("   ", 320)
    with pytest.raises(NotFoundError, match="NoSuchFont"):
        render_text("hi", 320, font="NoSuchFont")
