"""Video generation end to end on tiny random-weight models (SVD, LTX-Video, AnimateDiff), and the
MP4 / preview helpers. Frames are decoded back with PyAV to check count, size and rate."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from engine.errors import InputError, JobCancelledError
from engine.media.clips import animated_preview, interpolate_fps, poster_frame, read_metadata, write_mp4
from engine.video.generate import (
    VIDEO_FAMILIES,
    VideoModel,
    VideoPipelines,
    VideoSpec,
    check_video_spec,
    detect_video_family,
    list_video_models,
    render_video,
)
from tests.video_factories import (
    build_tiny_ltx,
    build_tiny_motion_adapter,
    build_tiny_svd,
    save_motion_adapter_single_file,
)

SIZE = 64


@pytest.fixture(scope="module")
def video_models(tmp_path_factory) -> Path:
    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    root = tmp_path_factory.mktemp("video_models")
    ModelRoots(root).create_layout()
    demo = ensure_demo_model(root)
    build_tiny_svd(root / "diffusers" / "tiny-svd")
    build_tiny_ltx(root / "diffusers" / "tiny-ltx")
    build_tiny_motion_adapter(root / "animatediff_models" / "tiny-adapter", demo)
    save_motion_adapter_single_file(root / "animatediff_models" / "mm_tiny.safetensors", demo)
    (root / "animatediff_models" / ".tmp-half.safetensors").write_bytes(b"partial")
    (root / "animatediff_models" / "notes.ckpt").write_bytes(b"not a checkpoint")
    return root


@pytest.fixture(scope="module")
def plan():
    from engine.device import resolve_device

    return resolve_device("cpu", "float32")


@pytest.fixture(scope="module")
def pipelines(plan):
    return VideoPipelines(plan)


def _model(models: Path, name: str) -> VideoModel:
    return next(m for m in list_video_models(models) if m.name == name)


def _image(seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))


def _decode(path: Path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return (
            frames,
            Fraction(stream.average_rate),
            (stream.codec_context.width, stream.codec_context.height),
        )


def _assert_video(path: Path, frames: int, fps: int, size: tuple[int, int]) -> None:
    decoded, rate, wh = _decode(path)
    assert len(decoded) == frames
    assert rate == fps
    assert wh == size


def test_detect_and_list(video_models):
    assert detect_video_family(video_models / "diffusers" / "tiny-svd") == "svd"
    assert detect_video_family(video_models / "diffusers" / "tiny-ltx") == "ltx"
    assert detect_video_family(video_models / "animatediff_models" / "tiny-adapter") == "animatediff"
    assert detect_video_family(video_models / "animatediff_models" / "mm_tiny.safetensors") == "animatediff"
    assert detect_video_family(video_models / "diffusers" / "studionova-demo") is None  # an image model
    assert detect_video_family(video_models / "animatediff_models" / "notes.ckpt") is None
    listed = {m.name: m.family for m in list_video_models(video_models)}
    assert listed == {
        "tiny-svd": "svd",
        "tiny-ltx": "ltx",
        "animatediff_models/tiny-adapter": "animatediff",
        "animatediff_models/mm_tiny": "animatediff",
    }


def test_check_video_spec_fills_defaults_and_names_errors():
    ltx = check_video_spec(VideoSpec(family="ltx", mode="txt2video", prompt="a cat"))
    fam = VIDEO_FAMILIES["ltx"]
    assert (ltx.frames, ltx.fps, (ltx.width, ltx.height)) == (
        fam.default_frames,
        fam.default_fps,
        fam.default_size,
    )
    assert (ltx.steps, ltx.guidance) == (fam.default_steps, fam.default_guidance)
    from PIL import Image

    rgba = Image.new("RGBA", (1000, 600), (10, 20, 30, 128))
    svd = check_video_spec(VideoSpec(family="svd", mode="img2video", image=rgba))
    assert svd.image.mode == "RGB" and svd.width % 64 == 0 and svd.height % 64 == 0
    assert (svd.width, svd.height) == (1024, 576)  # each side rounded to a multiple of 64 (1000x600)

    cases = [
        (dict(family="ltx", mode="txt2video", frames=20), ["frames=20", "8k+1", "9", "257", "17", "25"]),
        (dict(family="ltx", mode="txt2video", width=70), ["width=70", "multiple of 32", "64-1280"]),
        (dict(family="svd", mode="img2video"), ["img2video", "image"]),
        (dict(family="sora", mode="txt2video"), ["'sora'", "svd", "ltx", "animatediff"]),
        (dict(family="svd", mode="txt2video"), ["'txt2video'", "img2video"]),
        (dict(family="animatediff", mode="img2video", image=rgba), ["'img2video'", "txt2video"]),
        (dict(family="ltx", mode="txt2video", fps=0.5), ["fps=0.5", "1-60"]),
        (dict(family="ltx", mode="txt2video", steps=500), ["steps=500", "1-150"]),
        (dict(family="ltx", mode="txt2video", guidance=31), ["guidance=31", "0-30"]),
        (dict(family="ltx", mode="txt2video", seed=-1), ["seed=-1", "4294967295"]),
        (dict(family="animatediff", mode="txt2video", frames=40), ["frames=40", "2 and 32"]),
        (dict(family="svd", mode="img2video", image=rgba, frames=-3), ["frames=-3", "2 and 48"]),
        (dict(family="svd", mode="img2video", image=rgba, width=96), ["width=96", "multiple of 64"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(InputError) as e:
            check_video_spec(VideoSpec(**kwargs))
        for word in words:
            assert word in str(e.value), (kwargs, str(e.value))


def test_svd_img2video_to_mp4(video_models, pipelines, plan, tmp_path):
    model = _model(video_models, "tiny-svd")
    pipe = pipelines.get(model, "img2video")
    steps = []
    spec = VideoSpec(
        family="svd",
        mode="img2video",
        image=_image(),
        frames=3,
        fps=7,
        width=SIZE,
        height=SIZE,
        steps=2,
        seed=5,
        motion_strength=0.8,
    )
    frames = render_video(
        pipe, spec, plan=plan, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw
    )
    assert steps == [0, 1]
    assert len(frames) == 3 and all(f.size == (SIZE, SIZE) and f.mode == "RGB" for f in frames)
    info = write_mp4(frames, 7, tmp_path / "svd.mp4", metadata={"comment": "svd"})
    assert info.path == tmp_path / "svd.mp4" and info.video_codec == "h264"
    _assert_video(tmp_path / "svd.mp4", 3, 7, (SIZE, SIZE))
    assert pipelines.loaded_key[1:3] == ("svd", "img2video")


def test_ltx_txt2video_and_img2video(video_models, pipelines, plan, tmp_path):
    model = _model(video_models, "tiny-ltx")
    t2v = pipelines.get(model, "txt2video")
    assert type(t2v).__name__ == "LTXPipeline"
    spec = VideoSpec(
        family="ltx",
        mode="txt2video",
        prompt="a red fox, snow",
        frames=9,
        fps=24,
        width=SIZE,
        height=SIZE,
        steps=2,
        seed=1,
    )
    frames = render_video(t2v, spec, plan=plan)
    write_mp4(frames, 24, tmp_path / "t2v.mp4")
    _assert_video(tmp_path / "t2v.mp4", 9, 24, (SIZE, SIZE))

    i2v = pipelines.get(model, "img2video")
    assert type(i2v).__name__ == "LTXImageToVideoPipeline"
    assert i2v.transformer is t2v.transformer  # built with from_pipe: the weights are loaded once
    spec = VideoSpec(
        family="ltx",
        mode="img2video",
        prompt="the fox runs",
        image=_image(1),
        frames=17,
        fps=25,
        width=SIZE,
        height=32 * 3,
        steps=2,
    )
    frames = render_video(i2v, spec, plan=plan)
    write_mp4(frames, 25, tmp_path / "i2v.mp4")
    _assert_video(tmp_path / "i2v.mp4", 17, 25, (SIZE, 96))


def test_animatediff_folder_and_single_file(video_models, plan):
    base = video_models / "diffusers" / "studionova-demo"
    pipes = VideoPipelines(plan)
    folder = _model(video_models, "animatediff_models/tiny-adapter")
    with pytest.raises(InputError, match="base_model"):
        pipes.get(folder, "txt2video")
    with pytest.raises(InputError, match="txt2video"):
        pipes.get(folder, "img2video", base)
    pipe = pipes.get(folder, "txt2video", base)
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    assert (
        type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.beta_schedule == "linear"
    )
    spec = VideoSpec(
        family="animatediff",
        mode="txt2video",
        prompt="a boat at sea",
        frames=4,
        width=SIZE,
        height=SIZE,
        steps=2,
        seed=3,
    )
    a = render_video(pipe, spec, plan=plan)
    again = render_video(pipe, spec, plan=plan)
    assert [f.tobytes() for f in a] == [f.tobytes() for f in again]  # same seed, same frames
    other = render_video(pipe, VideoSpec(**{**spec.__dict__, "seed": 4}), plan=plan)
    assert [f.tobytes() for f in a] != [f.tobytes() for f in other]
    first_key = pipes.loaded_key

    single = _model(video_models, "animatediff_models/mm_tiny")
    pipe2 = pipes.get(single, "txt2video", base)
    assert pipes.loaded_key != first_key and pipes.loaded_key[0].endswith("mm_tiny.safetensors")
    b = render_video(pipe2, spec, plan=plan)
    # the original-format file holds the same weights: converted by diffusers, the frames match
    assert [f.tobytes() for f in a] == [f.tobytes() for f in b]
    pipes.unload()
    assert pipes.loaded_key is None


def test_cancel_mid_run_leaves_no_mp4(video_models, pipelines, plan, tmp_path):
    model = _model(video_models, "tiny-ltx")
    pipe = pipelines.get(model, "txt2video")
    seen = []

    def cancelled() -> bool:
        return len(seen) >= 1

    def on_step(p, i, t, kw):
        seen.append(i)
        return kw

    out = tmp_path / "cancelled.mp4"

    def job():
        spec = VideoSpec(
            family="ltx", mode="txt2video", prompt="x", frames=9, width=SIZE, height=SIZE, steps=4
        )
        frames = render_video(pipe, spec, plan=plan, callback_on_step_end=on_step, cancelled=cancelled)
        write_mp4(frames, 25, out)

    with pytest.raises(JobCancelledError):
        job()
    assert seen == [0]  # stopped after the first step: the callback of step 2 never ran
    assert list(tmp_path.iterdir()) == []

    from PIL import Image

    frames = (Image.new("RGB", (64, 64), (i, 0, 0)) for i in range(10_000))
    with pytest.raises(JobCancelledError):
        write_mp4(frames, 25, out, cancelled=lambda: True)
    assert list(tmp_path.iterdir()) == []


def _gradient_frames(n: int, size=(64, 48)):
    from PIL import Image, ImageDraw

    frames = []
    for i in range(n):
        im = Image.new("RGB", size, (20, 40, 60))
        ImageDraw.Draw(im).ellipse((i * 3, 10, i * 3 + 16, 26), fill=(250, 200, 0))
        frames.append(im)
    return frames


def test_write_mp4_metadata_round_trip(tmp_path):
    recipe = {"prompt": 'a "quoted" cat\nsecond line', "négatif": "日本語 ✓", "seed": 7, "path": "C:\\x;y=z"}
    text = json.dumps(recipe, ensure_ascii=False)
    out = tmp_path / "meta.mp4"
    info = write_mp4(_gradient_frames(6), 12, out, metadata={"comment": text, "title": "Ünïcode: it's"})
    assert info.fps == 12
    meta = read_metadata(out)
    assert json.loads(meta["comment"]) == recipe
    assert meta["title"] == "Ünïcode: it's"
    custom = write_mp4(_gradient_frames(2), 12, tmp_path / "custom.mp4", metadata={"studionova_recipe": text})
    assert json.loads(read_metadata(custom.path)["studionova_recipe"]) == recipe
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []

    from PIL import Image

    with pytest.raises(InputError, match="even"):
        write_mp4([Image.new("RGB", (63, 48))], 12, tmp_path / "odd.mp4")
    with pytest.raises(InputError, match="frame 1 is 32x48"):
        write_mp4([Image.new("RGB", (64, 48)), Image.new("RGB", (32, 48))], 12, tmp_path / "mixed.mp4")
    with pytest.raises(InputError, match="metadata key"):
        write_mp4(_gradient_frames(1), 12, tmp_path / "k.mp4", metadata={"bad=key": "v"})
    with pytest.raises(InputError, match="'encoder'"):
        write_mp4(_gradient_frames(1), 12, tmp_path / "k.mp4", metadata={"encoder": "StudioNOVA"})
    assert not (tmp_path / "mixed.mp4").exists() and not (tmp_path / "odd.mp4").exists()


def test_interpolate_fps_and_previews(tmp_path, monkeypatch):
    src = tmp_path / "src.mp4"
    write_mp4(_gradient_frames(12), 8, src, metadata={"comment": '{"seed": 1}'})
    info = interpolate_fps(src, tmp_path / "x2.mp4", 16)
    assert info.fps == 16
    decoded, rate, size = _decode(tmp_path / "x2.mp4")
    assert rate == 16 and size == (64, 48)
    assert 20 <= len(decoded) <= 24  # twice the rate over the same span (12 frames at 8 fps: 1.5 s)
    assert read_metadata(info.path)["comment"] == '{"seed": 1}'
    for bad in (8, 4, 121):
        with pytest.raises(InputError) as e:
            interpolate_fps(src, tmp_path / "bad.mp4", bad)
        assert f"fps={bad}" in str(e.value) and "8 fps" in str(e.value) and "120" in str(e.value)
    assert not (tmp_path / "bad.mp4").exists()

    from PIL import Image

    preview = animated_preview(src, tmp_path / "preview.webp", max_side=32, fps=4)
    with Image.open(preview) as im:
        assert im.format == "WEBP" and getattr(im, "n_frames", 1) > 1 and max(im.size) <= 32
    gif = animated_preview(src, tmp_path / "preview.gif", max_side=32, fps=4)
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames > 1
    import engine.media.clips

    monkeypatch.setattr(
        engine.media.clips, "_ffmpeg_encoders", lambda: ""
    )  # an ffmpeg without libwebp: Pillow
    fallback = animated_preview(src, tmp_path / "fallback.webp", max_side=32, fps=4)
    with Image.open(fallback) as im:
        assert im.format == "WEBP" and im.n_frames > 1 and max(im.size) <= 32
    poster = poster_frame(src, tmp_path / "poster.png")
    with Image.open(poster) as im:
        assert im.size == (64, 48)
