"""FFmpeg, safely: one binary, argv lists only, file-protocol inputs, a timeout on every run.

`render_variant` turns one video into a variant: a new or mixed audio track fitted to the video's
length, a pre-rendered RGBA overlay (a hook drawn by `engine.media.text`, never an ffmpeg filter
string), and an optional crop/pad to another aspect. Output is H.264 + AAC MP4, written to a temp
file beside the target and renamed into place only when whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError, JobCancelledError, NotFoundError, TransientError

FFMPEG_ENV = "STUDIONOVA_FFMPEG"
"""Unset: the imageio-ffmpeg wheel's binary; `system`: `ffmpeg` on PATH; anything else: a path."""

GLOBAL_ARGS = ["-nostdin", "-hide_banner", "-loglevel", "error"]
# Demuxers a user file may be read with. Playlists (hls, concat, ...) are excluded on purpose: a
# file named .mp4 holding a playlist would otherwise make ffmpeg open the paths listed inside it.
MEDIA_DEMUXERS = "mov,mp4,m4a,3gp,matroska,webm,avi,mp3,wav,aac,ogg,flac,image2,png_pipe"
INPUT_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": MEDIA_DEMUXERS}

AudioMode = Literal["replace", "mix"]
OverlayPosition = Literal["top", "center", "bottom"]
Fit = Literal["crop", "pad"]
AUDIO_MODES: tuple[str, ...] = ("replace", "mix")
OVERLAY_POSITIONS: tuple[str, ...] = ("top", "center", "bottom")
FITS: tuple[str, ...] = ("crop", "pad")
# Files treated as videos wherever a path could be an image or a clip (ingest, the library, upscale, video).
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
# Codecs an MP4/MOV can carry as they are; anything else is re-encoded even without overlay/resize.
COPYABLE_VIDEO_CODECS = frozenset({"h264", "hevc", "av1"})
MAX_SIDE = 8192
STDERR_TAIL_LINES = 8
POLL_S = 0.1
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# ffmpeg messages that say the machine, not the input, is at fault: worth a retry.
_TRANSIENT_MARKERS = ("No space left", "Cannot allocate memory", "Resource temporarily unavailable")


def ffmpeg_exe() -> str:
    """The ffmpeg binary every call uses (see FFMPEG_ENV)."""
    choice = os.environ.get(FFMPEG_ENV, "").strip()
    if not choice:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    if choice == "system":
        found = shutil.which("ffmpeg")
        if not found:
            raise NotFoundError(
                f"{FFMPEG_ENV}=system but no `ffmpeg` is on PATH; unset it to use the bundled one"
            )
        return found
    path = Path(choice).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise NotFoundError(
            f"{FFMPEG_ENV}={choice!r} is not an executable file; allowed: unset, 'system' or a path to ffmpeg"
        )
    return str(path)


def media_input(path: str | os.PathLike) -> str:
    """`file:` + the absolute path of an existing regular file: a name such as `-y.mp4` is never an
    option, and no other protocol (http:, concat:, ...) can be named."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFoundError(f"media file {str(path)!r} does not exist") from None
    if not resolved.is_file():
        raise InputError(
            f"media input {str(path)!r} is not a regular file (folders, devices and pipes are refused)"
        )
    return f"file:{resolved}"


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temp file beside `out` (same folder and suffix, TMP_PREFIX) for one ffmpeg output. When the block
    ends without error it is fsynced and renamed over `out`; when it raises, it is removed. So `out` is
    always either the old file or the whole new one, whatever stops the encode (cancel, timeout, kill)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _media_output(path: Path) -> str:
    return f"file:{Path(path).resolve()}"


@dataclass
class MediaInfo:
    path: Path
    duration: float  # seconds of the video stream (of the audio stream for audio-only files)
    width: int
    height: int
    fps: float
    has_video: bool
    has_audio: bool
    audio_rate: int
    video_codec: str
    audio_codec: str
    size: int  # bytes


def _stream_seconds(stream) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, size and duration of a media file; InputError naming the file when it is unreadable,
    has no audio/video, or is truncated (its last packets are missing)."""
    import av

    url = media_input(path)
    local = Path(url.removeprefix("file:"))
    name = Path(path).name
    try:
        container = av.open(url, options=INPUT_OPTIONS)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: not a readable media file ({e})") from None
    with container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        main = video or audio
        if main is None:
            raise InputError(f"{name}: has no video or audio stream")
        duration = _stream_seconds(main)
        if duration is None and container.duration is not None:
            duration = container.duration / 1_000_000
        if not duration or not math.isfinite(duration) or duration <= 0:
            raise InputError(f"{name}: has no usable duration")
        fps = float(video.average_rate or video.guessed_rate or 0) if video else 0.0
        _check_complete(container, main, duration, fps, name)
        return MediaInfo(
            path=Path(path),
            duration=duration,
            width=video.codec_context.width if video else 0,
            height=video.codec_context.height if video else 0,
            fps=fps,
            has_video=video is not None,
            has_audio=audio is not None,
            audio_rate=audio.codec_context.sample_rate if audio else 0,
            video_codec=video.codec_context.name if video else "",
            audio_codec=audio.codec_context.name if audio else "",
            size=local.stat().st_size,
        )


def _check_complete(container, stream, duration: float, fps: float, name: str) -> None:
    """Demux the last second of `stream`: a file cut short (its index intact, its data not) has
    corrupt or missing packets there. Cheap: one seek and about a second of packets."""
    import av

    tb = stream.time_base
    start = stream.start_time or 0
    tolerance = max(0.25, 2 / fps) if fps else 0.25
    end = 0.0
    try:
        container.seek(start + int(max(0.0, duration - 1.0) / tb), stream=stream, backward=True)
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            if packet.is_corrupt:
                raise InputError(
                    f"{name}: is truncated or damaged near {float((packet.pts - start) * tb):.2f}s"
                )
            end = max(end, float((packet.pts + (packet.duration or 0) - start) * tb))
    except av.FFmpegError as e:
        raise InputError(f"{name}: is truncated or damaged ({e})") from None
    if end < duration - tolerance:
        raise InputError(f"{name}: is truncated: its data ends at {end:.2f}s of {duration:.2f}s")


def _with_input_whitelists(args: list[str], allow_pipe: bool = False) -> list[str]:
    """Put the protocol and demuxer whitelists before every `-i`; refuse an input that is neither a
    `file:` URL (see media_input) nor one of our own lavfi sources (nor, with `allow_pipe`, our own
    raw frames on `pipe:0`)."""
    out: list[str] = []
    pending: list[str] = []  # options since the previous input/output
    for i, arg in enumerate(args):
        if arg == "-i" and i + 1 < len(args):
            target = args[i + 1]
            lavfi = any(a == "-f" and b == "lavfi" for a, b in zip(pending, pending[1:], strict=False))
            ours = allow_pipe and target == "pipe:0"
            if not (lavfi or ours):
                if not target.startswith("file:"):
                    raise InputError(f"ffmpeg input {target!r} must be a file: URL from media_input()")
                if "-protocol_whitelist" not in pending:
                    out += ["-protocol_whitelist", "file"]
                if "-format_whitelist" not in pending and "-f" not in pending:
                    out += ["-format_whitelist", MEDIA_DEMUXERS]
            pending = []
        else:
            pending.append(arg)
        out.append(arg)
    return out


def _feed(proc: subprocess.Popen, chunks: Iterable[bytes]) -> None:
    """Write our frames to ffmpeg; a dead ffmpeg (killed on timeout/cancel) just ends the feed."""
    try:
        for chunk in chunks:
            if proc.poll() is not None:
                break
            proc.stdin.write(chunk)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def run_ffmpeg(
    args: list[str],
    timeout: float,
    cancelled: Callable[[], bool] | None = None,
    stdin_chunks: Iterable[bytes] | None = None,
) -> None:
    """Run ffmpeg with `args` (everything after the executable) as an argv list, never a shell.

    Adds -nostdin/-hide_banner/-loglevel error and the input whitelists. Kills ffmpeg and waits for
    it when `timeout` seconds pass (TransientError) or `cancelled()` turns true (JobCancelledError).
    A non-zero exit raises InputError (or TransientError for resource errors) with stderr's tail.
    `stdin_chunks` (frames we generate) are written to ffmpeg's stdin from a thread, for a `pipe:0` input.
    """
    if not timeout > 0:
        raise InputError(f"timeout must be > 0 seconds, got {timeout!r}")
    argv = [
        ffmpeg_exe(),
        *GLOBAL_ARGS,
        *_with_input_whitelists(list(args), allow_pipe=stdin_chunks is not None),
    ]
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty ffmpeg can never block on it
        stdin = subprocess.PIPE if stdin_chunks is not None else subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
        if stdin_chunks is not None:
            threading.Thread(
                target=_feed, args=(proc, stdin_chunks), name="ffmpeg-stdin", daemon=True
            ).start()
        try:
            while True:
                try:
                    proc.wait(timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cancelled is not None and cancelled():
                    raise JobCancelledError("ffmpeg was cancelled")
                if time.monotonic() >= deadline:
                    raise TransientError(f"ffmpeg ran past its {timeout:g}s timeout and was stopped")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:
            return
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").strip().splitlines()
    tail = "\n".join(lines[-STDERR_TAIL_LINES:]) or "(no message)"
    if proc.returncode < 0 or any(m in tail for m in _TRANSIENT_MARKERS):
        raise TransientError(f"ffmpeg failed (exit {proc.returncode}): {tail}")
    raise InputError(f"ffmpeg failed (exit {proc.returncode}): {tail}")


def _finite(name: str, value, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return number


def _one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _existing_file(name: str, value) -> Path:
    path = Path(value)
    if not path.is_file():
        raise NotFoundError(f"{name} {str(value)!r} is not an existing file")
    return path


@dataclass
class VariantSpec:
    """What `render_variant` makes of one video. Validated on construction."""

    video: Path = field(metadata={"help": "Source video; its length is the variant's length."})
    audio: Path | None = field(default=None, metadata={"help": "New audio track (looped or trimmed to fit)."})
    audio_mode: AudioMode = field(
        default="replace",
        metadata={
            "help": "replace: only the new track; mix: new track under the original (alone if the video has none)."
        },
    )
    audio_volume: float = field(default=1.0, metadata={"help": "Gain of the new track when mixing, 0..2."})
    fade_out_s: float = field(
        default=0.5, metadata={"help": "Fade-out of the new track at the end, seconds."}
    )
    overlay: Path | None = field(default=None, metadata={"help": "An RGBA PNG we rendered (a hook, a logo)."})
    overlay_position: OverlayPosition = field(default="top", metadata={"help": "top, center or bottom."})
    overlay_margin: float = field(
        default=0.08, metadata={"help": "Safe margin around the overlay, as a fraction of the frame height."}
    )
    overlay_start: float = field(
        default=0.0, metadata={"help": "Seconds into the video the overlay appears."}
    )
    overlay_duration: float | None = field(
        default=None, metadata={"help": "Seconds the overlay shows; None = to the end."}
    )
    output_size: tuple[int, int] | None = field(
        default=None, metadata={"help": "(width, height), both even; None keeps the source size."}
    )
    fit: Fit = field(
        default="crop", metadata={"help": "crop: fill and cut; pad: fit inside with black bars."}
    )

    def __post_init__(self) -> None:
        self.video = _existing_file("video", self.video)
        if self.audio is not None:
            self.audio = _existing_file("audio", self.audio)
        _one_of("audio_mode", self.audio_mode, AUDIO_MODES)
        self.audio_volume = _finite("audio_volume", self.audio_volume, 0.0, 2.0)
        self.fade_out_s = _finite("fade_out_s", self.fade_out_s, 0.0, 3600.0)
        if self.overlay is not None:
            self.overlay = _existing_file("overlay", self.overlay)
            with open(self.overlay, "rb") as f:
                if f.read(len(_PNG_MAGIC)) != _PNG_MAGIC:
                    raise InputError(f"overlay {self.overlay.name!r} must be a PNG image")
        _one_of("overlay_position", self.overlay_position, OVERLAY_POSITIONS)
        self.overlay_margin = _finite("overlay_margin", self.overlay_margin, 0.0, 0.45)
        self.overlay_start = _finite("overlay_start", self.overlay_start, 0.0, 86_400.0)
        if self.overlay_duration is not None:
            self.overlay_duration = _finite("overlay_duration", self.overlay_duration, 0.0, 86_400.0)
            if self.overlay_duration == 0:
                raise InputError("overlay_duration must be > 0 seconds or None (to the end), got 0")
        if self.output_size is not None:
            size = tuple(self.output_size)
            if not (
                len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
                and all(2 <= v <= MAX_SIDE and v % 2 == 0 for v in size)
            ):
                raise InputError(
                    f"output_size must be (width, height), even integers in [2, {MAX_SIDE}]; got {self.output_size!r}"
                )
            self.output_size = (size[0], size[1])
        _one_of("fit", self.fit, FITS)


def overlay_box(
    frame_w: int, frame_h: int, overlay_w: int, overlay_h: int, position: str, margin: float
) -> tuple[int, int, int, int]:
    """(x, y, width, height) of an overlay in the frame: shrunk (never enlarged) to fit inside the
    frame minus `margin * frame_h` on every side, centred horizontally, placed at `position`."""
    pad = round(margin * frame_h)
    room_w, room_h = max(1, frame_w - 2 * pad), max(1, frame_h - 2 * pad)
    scale = min(1.0, room_w / overlay_w, room_h / overlay_h)
    w, h = max(1, round(overlay_w * scale)), max(1, round(overlay_h * scale))
    x = (frame_w - w) // 2
    y = {"top": pad, "center": (frame_h - h) // 2, "bottom": frame_h - pad - h}[position]
    return x, y, w, h


def _variant_args(
    spec: VariantSpec, video: MediaInfo, audio: MediaInfo | None, out_url: str, fmt: str
) -> list[str]:
    import ffmpeg

    duration = video.duration
    source = ffmpeg.input(media_input(spec.video))
    frame_w, frame_h = spec.output_size or (video.width - video.width % 2, video.height - video.height % 2)
    copy_video = (
        spec.overlay is None
        and spec.output_size is None
        and video.video_codec in COPYABLE_VIDEO_CODECS
        and (frame_w, frame_h) == (video.width, video.height)
    )
    v = source["v:0"]
    if not copy_video:
        if spec.output_size is None:
            if (frame_w, frame_h) != (video.width, video.height):  # x264's yuv420p wants even sides
                v = v.filter("crop", frame_w, frame_h, 0, 0)
        elif spec.fit == "crop":
            v = v.filter("scale", frame_w, frame_h, force_original_aspect_ratio="increase")
            v = v.filter("crop", frame_w, frame_h)
        else:
            v = v.filter("scale", frame_w, frame_h, force_original_aspect_ratio="decrease")
            v = v.filter("pad", frame_w, frame_h, "(ow-iw)/2", "(oh-ih)/2", color="black")
        if spec.output_size is not None:
            v = v.filter("setsar", 1)
        if spec.overlay is not None:
            v = _with_overlay(v, spec, duration, video.fps, frame_w, frame_h)

    a = None
    if audio is not None:
        new = ffmpeg.input(media_input(spec.audio), stream_loop=-1)["a:0"]
        new = new.filter("atrim", duration=f"{duration:.6f}").filter("asetpts", "N/SR/TB")
        fade = min(spec.fade_out_s, duration)
        if fade > 0:
            new = new.filter("afade", t="out", st=f"{duration - fade:.6f}", d=f"{fade:.6f}")
        if spec.audio_mode == "mix" and video.has_audio:
            original = source["a:0"].filter("atrim", duration=f"{duration:.6f}")
            new = new.filter("volume", f"{spec.audio_volume:.4f}")
            a = ffmpeg.filter([original, new], "amix", inputs=2, duration="longest", normalize=0)
        else:
            a = new
    elif video.has_audio:
        a = source["a:0"].filter("atrim", duration=f"{duration:.6f}")

    streams = [v] if a is None else [v, a]
    options: dict = {"f": fmt, "movflags": "+faststart"}
    if copy_video:
        options["c:v"] = "copy"
    else:
        options.update({"c:v": "libx264", "preset": "veryfast", "pix_fmt": "yuv420p"})
    if a is not None:
        options.update({"c:a": "aac", "b:a": "160k"})
    return ffmpeg.output(*streams, out_url, **options).overwrite_output().get_args()


def _with_overlay(v, spec: VariantSpec, duration: float, fps: float, frame_w: int, frame_h: int):
    """Overlay the PNG for [start, start + duration): its timing lives on the image input (-itsoffset,
    -t) and eof_action=pass, so no time expression is needed in the filter graph."""
    import ffmpeg
    from PIL import Image

    if spec.overlay_start >= duration:
        raise InputError(
            f"overlay_start {spec.overlay_start:g}s must be before the end of the video ({duration:.2f}s)"
        )
    try:
        with Image.open(spec.overlay) as im:
            ow, oh = im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"overlay {spec.overlay.name!r} is not a readable PNG ({e})") from None
    x, y, w, h = overlay_box(frame_w, frame_h, ow, oh, spec.overlay_position, spec.overlay_margin)
    shown = duration - spec.overlay_start
    if spec.overlay_duration is not None:
        shown = min(shown, spec.overlay_duration)
    image = ffmpeg.input(
        media_input(spec.overlay),
        f="image2",
        pattern_type="none",  # a `%d` in the name is a name, not a sequence pattern
        loop=1,
        framerate=f"{fps or 25:.6g}",
        t=f"{shown:.6f}",
        itsoffset=f"{spec.overlay_start:.6f}",
    )["v:0"]
    image = image.filter("format", "rgba").filter("scale", w, h)
    return v.overlay(image, x=x, y=y, eof_action="pass")


def check_same_duration(result: MediaInfo, source: MediaInfo, name: str, what: str) -> None:
    """An output made from `source` must last as long (within two frames or 0.25 s): a shorter one means the
    source stopped decoding early, i.e. it is damaged."""
    if abs(result.duration - source.duration) > max(0.25, 2 / (source.fps or 25)):
        raise InputError(
            f"video {name!r}: the {what} lasts {result.duration:.2f}s, not {source.duration:.2f}s;"
            " the source is probably damaged"
        )


def render_variant(
    spec: VariantSpec, out: Path, timeout: float = 600, cancelled: Callable[[], bool] | None = None
) -> MediaInfo:
    """Render `spec` to `out` (.mp4/.m4v/.mov) and return the output's MediaInfo.

    The output lasts as long as the source video. With no overlay and no resize the video stream is
    copied and only the audio is encoded. A temp file beside `out` is renamed into place on success
    and removed on any failure, so `out` is either the old file or the whole new one.
    """
    out = Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"output {out.name!r} must end in one of {', '.join(OUTPUT_FORMATS)}")
    video = probe(spec.video)
    if not video.has_video:
        raise InputError(f"video {spec.video.name!r} has no video stream")
    audio = None
    if spec.audio is not None:
        audio = probe(spec.audio)
        if not audio.has_audio:
            raise InputError(f"audio {spec.audio.name!r} has no audio stream")

    with staged_output(out) as tmp:
        run_ffmpeg(_variant_args(spec, video, audio, _media_output(tmp), fmt), timeout, cancelled)
        result = probe(tmp)
        check_same_duration(result, video, spec.video.name, "variant")
    result.path = out
    return result


def tag_video(path: Path, metadata: dict[str, str], cancelled=None) -> None:
    """Set container tags by remuxing (streams copied, nothing re-encoded) over `path`, atomically."""
    args = ["-i", media_input(path), "-map", "0", "-c", "copy", "-map_metadata", "0"]
    for key, value in metadata.items():
        args += ["-metadata", f"{key}={value}"]
    with staged_output(path) as tmp:
        run_ffmpeg(
            [*args, "-movflags", "+faststart", "-f", "mp4", "-y", f"file:{tmp}"],
            timeout=300,
            cancelled=cancelled,
        )
