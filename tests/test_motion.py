"""Camera motion clips are smooth (a tracked pattern moves monotonically, without jitter) and clips join
with audio and burned-in subtitles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.errors import InputError
from engine.media.ffmpeg import probe
from engine.media.motion import MotionSpec, camera_boxes, concat_clips, render_motion


def decoded(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(np.float32) for f in c.decode(c.streams.video[0])]


def dot_image(path, size=(640, 360), box=(305, 165, 335, 195)):
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle(box, fill="black")
    im.save(path)
    return path


def centroid(frame: np.ndarray) -> tuple[float, float, float]:
    """Centre (x, y) and width of the dark square, weighted by darkness (sub-pixel)."""
    w = np.clip(255 - frame, 0, None)
    w[w < 40] = 0
    ys, xs = np.indices(frame.shape)
    total = w.sum()
    cols = (w.sum(axis=0) > 0).sum()
    return float((xs * w).sum() / total), float((ys * w).sum() / total), float(cols)


def test_pan_is_monotonic_and_smooth(tmp_path):
    spec = MotionSpec(
        dot_image(tmp_path / "dot.png"),
        moves=("pan_right",),
        strength=0.5,
        duration=2.0,
        fps=15,
        size=(320, 180),
        ease=False,
    )
    info = render_motion(spec, tmp_path / "pan.mp4")
    assert (info.width, info.height) == (320, 180) and abs(info.duration - 2.0) < 0.1
    xs = np.array([centroid(f)[0] for f in decoded(info.path)])
    steps = np.diff(xs)
    assert len(xs) == 30 and (steps < 0).all()  # camera pans right: the square moves left, every frame
    assert np.abs(steps - steps.mean()).max() < 0.35, steps  # constant speed, no integer-rounding jitter


def test_zoom_in_grows_steadily_with_easing(tmp_path):
    spec = MotionSpec(
        dot_image(tmp_path / "dot.png"), moves="zoom_in", strength=0.6, duration=1.5, fps=20, size=(320, 180)
    )
    frames = decoded(render_motion(spec, tmp_path / "zoom.mp4").path)
    widths = np.array([centroid(f)[2] for f in frames])
    assert widths[-1] > widths[0] * 1.4 and (np.diff(widths) >= -1).all()
    boxes = camera_boxes(spec, (640, 360), 30)
    sizes = np.array([b[2] - b[0] for b in boxes])
    assert (np.diff(sizes) <= 1e-9).all()  # the view only ever shrinks (zooming in)
    assert abs(sizes[1] - sizes[0]) < abs(sizes[15] - sizes[14])  # eased: slow start, faster middle


def test_combined_moves_and_bad_specs(tmp_path):
    spec = MotionSpec(
        dot_image(tmp_path / "d.png"),
        moves="zoom_out+pan_up",
        strength=0.3,
        duration=1,
        fps=10,
        size=(160, 90),
    )
    boxes = camera_boxes(spec, (640, 360), 10)
    assert boxes[0][1] > boxes[-1][1]  # moving up
    assert all(
        b[0] >= 0 and b[2] <= 640 and b[1] >= 0 and b[3] <= 360 for b in boxes
    )  # never outside the image
    with pytest.raises(InputError, match="moves=\\['spin'\\]: unknown; allowed: static, zoom_in"):
        MotionSpec(tmp_path / "d.png", moves=("spin",))
    with pytest.raises(InputError, match="opposite pans"):
        MotionSpec(tmp_path / "d.png", moves=("pan_left", "pan_right"))
    with pytest.raises(InputError, match="size=\\(321, 180\\)"):
        MotionSpec(tmp_path / "d.png", size=(321, 180))
    (tmp_path / "not.png").write_text("nope")
    with pytest.raises(InputError, match="not.png: not a readable image"):
        render_motion(MotionSpec(tmp_path / "not.png"), tmp_path / "x.mp4")
    assert not list(tmp_path.glob(".tmp-*"))


def test_concat_with_audio_and_burned_subtitles(tmp_path):
    from engine.media.ffmpeg import run_ffmpeg

    a = render_motion(
        MotionSpec(dot_image(tmp_path / "a.png"), moves="pan_left", duration=1.0, fps=10, size=(320, 180)),
        tmp_path / "a.mp4",
    )
    b = render_motion(
        MotionSpec(dot_image(tmp_path / "b.png"), moves="static", duration=1.5, fps=10, size=(320, 180)),
        tmp_path / "b.mp4",
    )
    tone = tmp_path / "tone.wav"
    run_ffmpeg(["-f", "lavfi", "-i", "sine=frequency=500:duration=1", "-y", f"file:{tone}"], timeout=60)
    srt = tmp_path / "it's: [x],y.srt"  # a hostile name: the filter only ever sees our copy
    srt.write_text("1\n00:00:00,000 --> 00:00:02,500\nHELLO %{eif:1/0:d} ':x\n", encoding="utf-8")
    plain = concat_clips([a.path, b.path], tmp_path / "plain.mp4", audio=tone, fps=10)
    subbed = concat_clips([a.path, b.path], tmp_path / "subbed.mp4", audio=tone, subtitles=srt, fps=10)
    for info in (plain, subbed):
        assert abs(info.duration - 2.5) < 0.15 and info.has_audio and (info.width, info.height) == (320, 180)
    f_plain, f_sub = decoded(plain.path)[12], decoded(subbed.path)[12]
    diff = np.abs(f_plain - f_sub)
    assert diff[120:, :].mean() > 1.5 > 0.5 > diff[:60, :].mean()  # text at the bottom, nothing on top
    assert not list(tmp_path.glob(".tmp-*"))
    assert probe(subbed.path).video_codec == "h264"
