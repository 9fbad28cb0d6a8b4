"""MP4 files and their previews: write PIL frames as H.264 with the recipe in the container metadata
(`write_mp4`), read that metadata back (`read_metadata`), raise the frame rate (`interpolate_fps`), and the
gallery's animated preview / poster frame / thumbnail of a clip. Nothing here is about video diffusion: video,
upscale and media jobs all write and show clips through these. PyAV and Pillow are imported inside functions.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from engine.artifacts import atomic_write
from engine.errors import InputError, TransientError
from engine.media.ffmpeg import (
    INPUT_OPTIONS,
    OUTPUT_FORMATS,
    MediaInfo,
    ffmpeg_exe,
    media_input,
    probe,
    run_ffmpeg,
    staged_output,
)

MAX_INTERPOLATED_FPS = 120
_METADATA_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# keys the mp4/mov muxer writes as classic iTunes atoms; any other key needs `use_metadata_tags`
_MP4_STANDARD_KEYS = frozenset(
    {
        "title",
        "comment",
        "description",
        "synopsis",
        "artist",
        "album",
        "album_artist",
        "composer",
        "date",
        "genre",
        "copyright",
        "grouping",
        "lyrics",
        "track",
        "disc",
        "compilation",
        "show",
        "episode_id",
        "network",
        "keywords",
    }
)


def whole_number(name: str, value, low: int, high: int, extra: str = "") -> int:
    """`value` as an int in low..high, refused (InputError naming `name`) if not a whole number there."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InputError(f"{name}={value!r}: must be a whole number, {low}-{high}{extra}")
    value = int(value)
    if not low <= value <= high:
        raise InputError(f"{name}={value}: must be {low}-{high}{extra}")
    return value


# ------------------------------------------------------------------------------------------ MP4 files


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
            raise InputError(
                f"metadata key {key!r}: letters, digits and _ only, starting with a letter, 1-64"
            )
        if key == "encoder":  # ffmpeg always writes its own version there and would drop ours
            raise InputError(
                "metadata key 'encoder' is ffmpeg's own (it writes its version there); use another key"
            )
        if not isinstance(value, str) or "\0" in value:
            raise InputError(f"metadata {key!r}: the value must be text without NUL characters")
        out[key] = value
    return out


def _movflags(keys: Iterable[str]) -> str:
    # faststart: the index first, so a browser plays while it downloads; custom keys need mdta tags
    return "+faststart" + ("+use_metadata_tags" if set(keys) - _MP4_STANDARD_KEYS else "")


def _output_format(out: Path) -> str:
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"output {out.name!r} must end in one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


def write_mp4(
    frames: Iterable,
    fps: int,
    out: Path,
    *,
    metadata: dict[str, str] | None = None,
    timeout: float = 600,
    cancelled: Callable[[], bool] | None = None,
    crf: int = 18,
) -> MediaInfo:
    """Encode PIL frames (all one size, both sides even: odd sizes are refused, not padded) to H.264
    yuv420p with faststart. Each metadata item becomes `-metadata key=value` (put the recipe JSON in
    "comment"; keys other than the standard MP4 ones are written as mdta tags; "encoder" is refused:
    ffmpeg owns it); values never enter a filter. Written to a temp file beside `out`, renamed when whole."""
    out = Path(out)
    fmt = _output_format(out)
    fps = whole_number("fps", fps, 1, MAX_INTERPOLATED_FPS)
    crf = whole_number("crf", crf, 0, 51)
    metadata = _check_metadata(metadata)
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InputError("no frames to write: at least 1")
    width, height = first.size
    if width % 2 or height % 2:
        raise InputError(f"frames are {width}x{height}: H.264 yuv420p needs even width and height")
    problems: list[Exception] = []
    count = 0

    def chunks() -> Iterator[bytes]:
        nonlocal count
        for index, frame in enumerate(_chain(first, iterator)):
            if frame.size != (width, height):
                problems.append(
                    InputError(f"frame {index} is {frame.size[0]}x{frame.size[1]}, not {width}x{height}")
                )
                return  # ends the stream; the error is raised once ffmpeg has stopped
            count += 1
            yield (frame if frame.mode == "RGB" else frame.convert("RGB")).tobytes()

    with staged_output(out) as tmp:
        args = [
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            "pipe:0",
            "-c:v",
            "libx264",
            "-preset",
            "medium",
            "-crf",
            str(crf),
            "-pix_fmt",
            "yuv420p",
        ]
        for key, value in metadata.items():
            args += ["-metadata", f"{key}={value}"]
        args += ["-movflags", _movflags(metadata), "-f", fmt, "-y", f"file:{tmp}"]
        run_ffmpeg(args, timeout=timeout, cancelled=cancelled, stdin_chunks=chunks())
        if problems:
            raise problems[0]
        info = probe(tmp)
    info.path = out
    return info


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def read_metadata(path: Path) -> dict[str, str]:
    """The container's metadata tags (comment, title, custom keys), read with PyAV."""
    import av

    url = media_input(path)
    try:
        with av.open(url, options=INPUT_OPTIONS) as container:
            return {str(k): str(v) for k, v in container.metadata.items()}
    except av.FFmpegError as e:
        raise InputError(f"{Path(path).name}: not a readable media file ({e})") from None


def interpolate_fps(
    src: Path, out: Path, fps: int, *, timeout: float = 600, cancelled: Callable[[], bool] | None = None
) -> MediaInfo:
    """Raise the frame rate with ffmpeg's motion-compensated interpolation (no weights needed).
    `fps` must be above the source's and at most 120. Metadata and audio are kept; atomic."""
    out = Path(out)
    fmt = _output_format(out)
    info = probe(src)
    if not info.has_video:
        raise InputError(f"{Path(src).name}: has no video stream to interpolate")
    if isinstance(fps, bool) or not isinstance(fps, int) or not info.fps < fps <= MAX_INTERPOLATED_FPS:
        raise InputError(
            f"fps={fps!r}: must be a whole number above the source's {info.fps:g} fps and at most"
            f" {MAX_INTERPOLATED_FPS}"
        )
    keys = read_metadata(src)
    graph = f"minterpolate=fps={fps}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1"
    with staged_output(out) as tmp:
        args = [
            "-i",
            media_input(src),
            "-map",
            "0:v:0",
            "-map",
            "0:a?",
            "-map_metadata",
            "0",
            "-vf",
            graph,
            "-c:v",
            "libx264",
            "-preset",
            "medium",
            "-crf",
            "18",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "160k",
            "-movflags",
            _movflags(keys),
            "-f",
            fmt,
            "-y",
            f"file:{tmp}",
        ]
        run_ffmpeg(args, timeout=timeout, cancelled=cancelled)
        result = probe(tmp)
    result.path = out
    return result


# ------------------------------------------------------------------------------------------- previews


def _ffmpeg_encoders() -> str:
    try:
        done = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-encoders"],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.decode("utf-8", "replace")


def _preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _decoded_frames(src: Path, fps: int, size: tuple[int, int]) -> list:
    """Frames of `src` resampled to `fps` (by timestamp) and resized, decoded with PyAV."""
    import av
    from PIL import Image

    frames, next_t = [], 0.0
    with av.open(media_input(src), options=INPUT_OPTIONS) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base) if frame.pts is not None else next_t
            if t + 1e-6 >= next_t:
                frames.append(frame.to_image().resize(size, Image.Resampling.LANCZOS))
                next_t += 1 / fps
    return frames


def animated_preview(
    src: Path, out: Path, *, max_side: int = 256, fps: int = 8, timeout: float = 120
) -> Path:
    """A small looping animated WebP (or GIF, by `out`'s suffix) of a video, for galleries: ffmpeg's
    libwebp_anim encoder when the binary has it, else PyAV decoding + Pillow. Atomic."""
    out = Path(out)
    if out.suffix.lower() not in (".webp", ".gif"):
        raise InputError(f"preview {out.name!r} must end in .webp or .gif")
    max_side = whole_number("max_side", max_side, 16, 2048)
    fps = whole_number("fps", fps, 1, 30)
    info = probe(src)
    if not info.has_video:
        raise InputError(f"{Path(src).name}: has no video stream to preview")
    size = _preview_size(info.width, info.height, max_side)
    if out.suffix.lower() == ".webp" and "libwebp_anim" in _ffmpeg_encoders():
        with staged_output(out) as tmp:
            graph = f"fps={fps},scale={size[0]}:{size[1]}:flags=lanczos"
            run_ffmpeg(
                [
                    "-i",
                    media_input(src),
                    "-map",
                    "0:v:0",
                    "-vf",
                    graph,
                    "-c:v",
                    "libwebp_anim",
                    "-loop",
                    "0",
                    "-quality",
                    "75",
                    "-an",
                    "-f",
                    "webp",
                    "-y",
                    f"file:{tmp}",
                ],
                timeout,
            )
        return out
    frames = _decoded_frames(src, fps, size)
    if not frames:
        raise InputError(f"{Path(src).name}: no frames could be decoded")
    fmt = "WEBP" if out.suffix.lower() == ".webp" else "GIF"
    with atomic_write(out) as f:
        frames[0].save(
            f, format=fmt, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0
        )
    return out


def poster_frame(src: Path, out: Path) -> Path:
    """The first frame of a video as a still (.webp, .png or .jpg by `out`'s suffix). Atomic."""
    import av

    out = Path(out)
    formats = {".webp": "WEBP", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    fmt = formats.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"poster {out.name!r} must end in one of {', '.join(formats)}")
    try:
        with av.open(media_input(src), options=INPUT_OPTIONS) as container:
            if not container.streams.video:
                raise InputError(f"{Path(src).name}: has no video stream")
            image = next(container.decode(container.streams.video[0]), None)
            image = image.to_image() if image is not None else None
    except av.FFmpegError as e:
        raise InputError(f"{Path(src).name}: not a readable video ({e})") from None
    if image is None:
        raise InputError(f"{Path(src).name}: no frame could be decoded")
    with atomic_write(out) as f:
        image.convert("RGB").save(f, format=fmt)
    return out


def video_thumbnail(video: Path, thumb: Path) -> None:
    """The gallery's thumbnail of a video: an animated WebP preview (a poster frame if that fails or takes too
    long, as it may for a long clip)."""
    try:
        animated_preview(video, thumb)
    except (InputError, TransientError):
        poster_frame(video, thumb)
