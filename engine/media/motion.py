"""Camera motion: a still image -> a video clip with a zoom and/or pan, and clip assembly.

Every frame is cut from the image with a float crop box (Pillow's EXTENT transform, bicubic), so the
camera moves by sub-pixel steps: no jitter from integer rounding as with ffmpeg's zoompan. Frames go
to ffmpeg as raw RGB on stdin. `concat_clips` joins clips, lays an audio track under them and can
burn in subtitles from an SRT file (copied to a file we own; user text never enters a filter).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError
from engine.media.ffmpeg import media_input, probe, run_ffmpeg, staged_output

MOVES = ("static", "zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down")
MAX_SIDE = 3840


@dataclass
class MotionSpec:
    image: Path
    moves: tuple[str, ...] = field(
        default=("zoom_in",), metadata={"help": "any of MOVES; pans and a zoom combine"}
    )
    strength: float = field(default=0.25, metadata={"help": "0.05-1: how far the camera travels"})
    duration: float = field(default=4.0, metadata={"help": "seconds, 0.5-120"})
    fps: int = field(default=30, metadata={"help": "frames per second, 1-60"})
    size: tuple[int, int] | None = field(
        default=None, metadata={"help": "output WxH (even); None = the image's"}
    )
    ease: bool = field(
        default=True, metadata={"help": "ease in and out (smoothstep) instead of constant speed"}
    )

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        if isinstance(self.moves, str):
            self.moves = tuple(m.strip() for m in self.moves.replace("+", ",").split(",") if m.strip())
        self.moves = tuple(self.moves) or ("static",)
        bad = [m for m in self.moves if m not in MOVES]
        if bad:
            raise InputError(f"moves={bad!r}: unknown; allowed: {', '.join(MOVES)} (combine with +)")
        if "zoom_in" in self.moves and "zoom_out" in self.moves:
            raise InputError("moves: zoom_in and zoom_out cannot be combined")
        if (
            len({m for m in self.moves if m in ("pan_left", "pan_right")}) > 1
            or len({m for m in self.moves if m in ("pan_up", "pan_down")}) > 1
        ):
            raise InputError("moves: opposite pans (left+right, up+down) cannot be combined")
        if not 0.05 <= float(self.strength) <= 1.0:
            raise InputError(f"strength={self.strength!r} must be between 0.05 and 1")
        if not 0.5 <= float(self.duration) <= 120:
            raise InputError(f"duration={self.duration!r} must be between 0.5 and 120 seconds")
        if not 1 <= int(self.fps) <= 60:
            raise InputError(f"fps={self.fps!r} must be between 1 and 60")
        if self.size is not None:
            w, h = (int(v) for v in self.size)
            if w % 2 or h % 2 or not (16 <= w <= MAX_SIDE and 16 <= h <= MAX_SIDE):
                raise InputError(f"size={self.size!r}: width and height must be even, 16-{MAX_SIDE}")
            self.size = (w, h)


def _progress(t: float, ease: bool) -> float:
    return t * t * (3 - 2 * t) if ease else t


def camera_boxes(
    spec: MotionSpec, image_size: tuple[int, int], frames: int
) -> list[tuple[float, float, float, float]]:
    """The float crop box (x0, y0, x1, y1) of every frame: the largest box of the output's aspect that
    fits the image, shrunk by the zoom and moved by the pan. Pans get room by a zoom of 1 + strength."""
    iw, ih = image_size
    ow, oh = spec.size or (iw - iw % 2, ih - ih % 2)
    aspect = ow / oh
    base_w, base_h = (ih * aspect, ih) if iw / ih > aspect else (iw, iw / aspect)
    pans = [m for m in spec.moves if m.startswith("pan_")]
    boxes = []
    for i in range(frames):
        p = _progress(i / max(1, frames - 1), spec.ease)
        if "zoom_in" in spec.moves:
            zoom = 1 + spec.strength * p
        elif "zoom_out" in spec.moves:
            zoom = 1 + spec.strength * (1 - p)
        else:
            zoom = 1 + spec.strength if pans else 1.0
        w, h = base_w / zoom, base_h / zoom
        room_x, room_y = (iw - w) / 2, (ih - h) / 2
        # pans travel the room the smallest box of the move leaves (constant speed in image pixels)
        min_w, min_h = base_w / (1 + spec.strength), base_h / (1 + spec.strength)
        travel_x, travel_y = (iw - min_w) / 2, (ih - min_h) / 2
        cx, cy = iw / 2, ih / 2
        if "pan_right" in spec.moves:
            cx += travel_x * (2 * p - 1)
        if "pan_left" in spec.moves:
            cx -= travel_x * (2 * p - 1)
        if "pan_down" in spec.moves:
            cy += travel_y * (2 * p - 1)
        if "pan_up" in spec.moves:
            cy -= travel_y * (2 * p - 1)
        cx = min(max(cx, iw / 2 - room_x), iw / 2 + room_x)
        cy = min(max(cy, ih / 2 - room_y), ih / 2 + room_y)
        boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return boxes


def _frames(image, boxes, size: tuple[int, int]) -> Iterator[bytes]:
    from PIL import Image

    for box in boxes:
        yield image.transform(size, Image.Transform.EXTENT, box, resample=Image.Resampling.BICUBIC).tobytes()


def render_motion(
    spec: MotionSpec, out: Path, timeout: float = 600, cancelled: Callable[[], bool] | None = None
):
    """Write the clip (H.264 MP4, no audio) to `out` atomically; returns its MediaInfo."""
    from PIL import Image

    try:
        with Image.open(spec.image) as im:
            image = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{spec.image.name}: not a readable image ({e})") from None
    iw, ih = image.size
    if iw < 16 or ih < 16:
        raise InputError(f"{spec.image.name}: {iw}x{ih} is too small; at least 16x16")
    size = spec.size or (min(iw, MAX_SIDE) // 2 * 2, min(ih, MAX_SIDE) // 2 * 2)
    frames = max(1, round(spec.duration * spec.fps))
    boxes = camera_boxes(
        MotionSpec(spec.image, spec.moves, spec.strength, spec.duration, spec.fps, size, spec.ease),
        (iw, ih),
        frames,
    )
    with staged_output(Path(out)) as tmp:
        args = [
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{size[0]}x{size[1]}",
            "-r",
            str(spec.fps),
            "-i",
            "pipe:0",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            "-y",
            f"file:{tmp}",
        ]
        run_ffmpeg(args, timeout=timeout, cancelled=cancelled, stdin_chunks=_frames(image, boxes, size))
    return probe(out)


def concat_clips(
    clips: list[Path],
    out: Path,
    audio: Path | None = None,
    subtitles: Path | None = None,
    size: tuple[int, int] | None = None,
    fps: int = 30,
    timeout: float = 900,
    cancelled: Callable[[], bool] | None = None,
):
    """Join clips (scaled/padded to one size and fps), lay `audio` under them (trimmed to the video,
    faded out) and burn in `subtitles` (.srt). Returns the output's MediaInfo."""
    if not clips:
        raise InputError("no clips to join")
    infos = [probe(c) for c in clips]
    w, h = size or (infos[0].width - infos[0].width % 2, infos[0].height - infos[0].height % 2)
    total = sum(i.duration for i in infos)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out.parent))
    cleanup = [work]
    try:
        args: list[str] = []
        for c in clips:
            args += ["-i", media_input(c)]
        parts = []
        for k in range(len(clips)):
            parts.append(
                f"[{k}:v:0]scale={w}:{h}:force_original_aspect_ratio=decrease,"
                f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color=black,setsar=1,fps={int(fps)},format=yuv420p[v{k}]"
            )
        graph = ";".join(parts) + ";" + "".join(f"[v{k}]" for k in range(len(clips)))
        graph += f"concat=n={len(clips)}:v=1:a=0[vcat]"
        last = "vcat"
        if subtitles is not None:
            # a copy under a name we chose: the filter sees our path, never user text or user file names
            srt = Path(tempfile.mkdtemp(prefix="studionova-subs-")) / "subs.srt"
            if not re.fullmatch(r"[\w/.-]+", srt.as_posix()):
                raise InputError(
                    f"temp folder {srt.parent} has characters ffmpeg filters cannot take; set TMPDIR"
                )
            shutil.copyfile(subtitles, srt)
            cleanup.append(srt.parent)
            graph += f";[vcat]subtitles=filename={srt.as_posix()}[vsub]"
            last = "vsub"
        maps = ["-map", f"[{last}]"]
        if audio is not None:
            args += ["-stream_loop", "-1", "-i", media_input(audio)]
            fade = min(0.5, total)
            graph += (
                f";[{len(clips)}:a:0]atrim=duration={total:.6f},asetpts=N/SR/TB,"
                f"afade=t=out:st={total - fade:.6f}:d={fade:.6f}[aout]"
            )
            maps += ["-map", "[aout]", "-c:a", "aac", "-b:a", "160k"]
        tmp = work / "out.mp4"
        args += [
            "-filter_complex",
            graph,
            *maps,
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            "-y",
            f"file:{tmp}",
        ]
        run_ffmpeg(args, timeout=timeout, cancelled=cancelled)
        tmp.replace(out)
    finally:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)
    return probe(out)
