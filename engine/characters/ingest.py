"""Ingest: turn what users hand us (uploads, ZIPs, videos, server folders, URLs) into validated
candidate images for a character's training dataset.

Every candidate is a whole, decodable PNG/JPEG/WEBP file in a work folder we own, with its
provenance, hashes, size and sharpness. Every input that does not become one is reported as a
`Skipped` with a sentence saying why, and the other items go on. Nothing here touches the database
or gradio; heavy modules (PIL, av, cv2, imagehash, scenedetect, yt_dlp) are imported inside
functions.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from engine.artifacts import TMP_PREFIX
from engine.errors import InputError
from engine.media.ffmpeg import INPUT_OPTIONS, media_input, probe

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
"""Formats Pillow must detect by content (never by suffix); anything else is refused."""
FORMAT_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
FOLDER_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
VIDEO_MODES: tuple[str, ...] = ("scene", "rate")
MAX_VIDEO_FPS = 30.0
SHARPNESS_SIDE = 512  # sharpness is measured with the long side scaled down to this
SCENE_SAMPLE_POINTS = (0.1, 0.5, 0.9)  # where in a scene to look for its sharpest frame: the middle 80%
MIN_SCENE_S = 0.5  # PySceneDetect's default of 15 frames, in seconds (at 30 fps)
ZIP_RATIO_MIN_BYTES = 1024 * 1024  # small members may compress very well without being bombs
_COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class Candidate:
    path: Path  # a file in the work folder, validated and fully decodable
    source: str  # provenance shown to users: "upload:x.png", "zip:set.zip!a/b.png", "video:c.mp4@1.20s", ...
    sha256: str  # of the bytes of `path`
    phash: str  # str(imagehash.phash(image)): 16 hex characters
    width: int
    height: int
    sharpness: float  # variance of the Laplacian of the grayscale image, long side scaled to <= 512
    format: str  # one of IMAGE_FORMATS


@dataclass
class Skipped:
    source: str
    reason: str  # a sentence: what was wrong and, where it helps, what is allowed


@dataclass
class IngestReport:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  # every input that did not become a candidate


@dataclass(frozen=True)
class IngestLimits:
    max_image_pixels: int = 64_000_000  # decompression-bomb guard
    max_file_bytes: int = (
        100 * 1024 * 1024
    )  # per image and per zip entry (uncompressed, counted while streaming)
    max_zip_entries: int = 10_000
    max_zip_total_bytes: int = 2 * 1024**3
    max_zip_ratio: float = 200.0  # a member over ZIP_RATIO_MIN_BYTES expanding more than this is a bomb
    max_video_frames: int = 500  # most candidate frames one video may yield
    video_timeout_s: float = 600.0


class _Refused(Exception):
    """One item is refused; the message is the Skipped reason (without the item's name)."""


class _TooLarge(_Refused):
    """More bytes arrived than the cap allowed."""


# ---------------------------------------------------------------------------------------------
# Images


def _sharpness(image) -> float:
    import cv2
    import numpy as np

    gray = np.asarray(image.convert("L"))
    h, w = gray.shape
    scale = SHARPNESS_SIDE / max(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_CHUNK):
            h.update(block)
    return h.hexdigest()


def _describe(image, path: Path, source: str, fmt: str) -> Candidate:
    import imagehash

    return Candidate(
        path=path,
        source=source,
        sha256=_sha256(path),
        phash=str(imagehash.phash(image)),
        width=image.width,
        height=image.height,
        sharpness=_sharpness(image),
        format=fmt,
    )


def _claimed_format(path: Path) -> str | None:
    """The allowed format whose signature the file starts with, if any (to tell damaged from foreign)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _inspect_image(path: Path, source: str, limits: IngestLimits) -> Candidate:
    """Decode `path` completely; _Refused with the reason when it is not a whole, allowed image."""
    from PIL import Image, ImageFile

    allowed = ", ".join(IMAGE_FORMATS)
    # A truncated file must fail, not decode as grey: this switch is process-wide, so it is forced
    # off for the decode and put back after.
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise _Refused(
                        f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                        f"{limits.max_image_pixels:,} (a decompression-bomb guard)"
                    )
                fmt = image.format
                image.load()
                return _describe(image, path, source, fmt)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Refused(f"image too large (a decompression-bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        claimed = _claimed_format(path)
        if claimed:
            raise _Refused(
                f"corrupt or truncated image: it starts like a {claimed} but cannot be read"
            ) from None
        raise _Refused(f"not a {allowed} image (detected by content; allowed: {allowed})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _Refused(f"corrupt or truncated image: {e}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def check_image(path: Path, source: str, limits: IngestLimits = IngestLimits()) -> Candidate:
    """Open `path` with Pillow, check its format by content (IMAGE_FORMATS), its pixel count
    (limits.max_image_pixels) and decode it fully. Returns a Candidate for `path` itself;
    InputError naming `source` when the file is refused."""
    try:
        return _inspect_image(Path(path), source, limits)
    except _Refused as e:
        raise InputError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Files and ZIPs


def _copy_capped(
    src: IO[bytes],
    dst: IO[bytes],
    cap: int,
    what: str = "file",
    compressed_size: int | None = None,
    max_ratio: float | None = None,
) -> int:
    """Copy `src` to `dst`, counting bytes: _Refused as soon as more than `cap` bytes arrive, or (for a
    zip member) as soon as the output passes ZIP_RATIO_MIN_BYTES and `max_ratio` times its compressed
    size. Headers are never trusted: only the bytes actually read count."""
    total = 0
    while block := src.read(_COPY_CHUNK):
        total += len(block)
        if total > cap:
            raise _TooLarge(f"{what} is larger than the limit of {cap:,} bytes")
        if (
            max_ratio is not None
            and total > ZIP_RATIO_MIN_BYTES
            and total > max_ratio * max(1, compressed_size or 0)
        ):
            raise _Refused(
                f"zip bomb: expands more than {max_ratio:g}x ({max(1, compressed_size or 0):,} compressed bytes)"
            )
        dst.write(block)
    return total


def _temp_file(workdir: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=workdir)
    os.close(fd)
    return Path(tmp)


def _adopt(tmp: Path, source: str, workdir: Path, limits: IngestLimits) -> Candidate:
    """Validate the temp file `tmp` and rename it to a new unique name with its format's suffix;
    the temp file is gone either way."""
    try:
        candidate = _inspect_image(tmp, source, limits)
        final = workdir / f"{uuid.uuid4().hex}{FORMAT_SUFFIXES[candidate.format]}"
        os.replace(tmp, final)
        return replace(candidate, path=final)
    finally:
        tmp.unlink(missing_ok=True)


def _ingest_image(path: Path, source: str, workdir: Path, limits: IngestLimits) -> Candidate:
    tmp = _temp_file(workdir)
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            _copy_capped(src, dst, limits.max_file_bytes, "file")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _adopt(tmp, source, workdir, limits)


def _unsafe_member_reason(info) -> str | None:
    name = info.filename
    parts = [p for p in re.split(r"[/\\]", name) if p]
    if name.startswith(("/", "\\")):
        return f"zip entry {name!r} has an absolute path"
    if _DRIVE.match(name):
        return f"zip entry {name!r} names a drive"
    if ".." in parts:
        return f"zip entry {name!r} escapes the archive"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"zip entry {name!r} is a symbolic link (links are not followed)"
    if info.flag_bits & 0x1:
        return f"zip entry {name!r} is encrypted (password-protected entries are not supported)"
    return None


def _ignored_member(info) -> bool:
    """Folders, macOS resource forks and dotfiles: not user content, skipped silently."""
    parts = [p for p in re.split(r"[/\\]", info.filename) if p]
    return info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _ingest_zip(path: Path, label: str, workdir: Path, limits: IngestLimits, report: IngestReport) -> None:
    import lzma
    import zipfile
    import zlib

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        report.skipped.append(Skipped(f"zip:{label}", f"not a readable zip archive: {e}"))
        return
    with archive:
        total = 0
        for count, info in enumerate(archive.infolist(), start=1):
            source = f"zip:{label}!{info.filename}"
            if count > limits.max_zip_entries:
                report.skipped.append(
                    Skipped(
                        f"zip:{label}",
                        f"has more than {limits.max_zip_entries:,} entries (max_zip_entries); "
                        f"entries from {info.filename!r} on were not read",
                    )
                )
                return
            unsafe = _unsafe_member_reason(info)
            if unsafe:
                report.skipped.append(Skipped(source, unsafe))
                continue
            if _ignored_member(info):
                continue
            # Header sizes are a cheap first refusal only; the copy below counts the real bytes.
            if info.file_size > limits.max_file_bytes:
                report.skipped.append(
                    Skipped(
                        source,
                        f"zip entry is larger than the limit of {limits.max_file_bytes:,} bytes "
                        f"({info.file_size:,} bytes)",
                    )
                )
                continue
            if info.file_size > ZIP_RATIO_MIN_BYTES and info.file_size > limits.max_zip_ratio * max(
                1, info.compress_size
            ):
                report.skipped.append(
                    Skipped(
                        source,
                        f"zip bomb: expands {info.file_size / max(1, info.compress_size):.0f}x "
                        f"(more than {limits.max_zip_ratio:g}x)",
                    )
                )
                continue
            remaining = limits.max_zip_total_bytes - total
            cap = min(limits.max_file_bytes, remaining)
            tmp = _temp_file(workdir)
            try:
                with archive.open(info) as src, open(tmp, "wb") as dst:
                    total += _copy_capped(
                        src, dst, cap, "zip entry", info.compress_size, limits.max_zip_ratio
                    )
            except _Refused as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, _TooLarge) and cap < limits.max_file_bytes:
                    report.skipped.append(
                        Skipped(
                            f"zip:{label}",
                            f"expands to more than {limits.max_zip_total_bytes:,} bytes "
                            f"(max_zip_total_bytes); entries from {info.filename!r} on were not read",
                        )
                    )
                    return
                report.skipped.append(Skipped(source, str(e)))
                continue
            except (
                zipfile.BadZipFile,
                zlib.error,
                lzma.LZMAError,
                EOFError,
                OSError,
                NotImplementedError,
                RuntimeError,
            ) as e:
                tmp.unlink(missing_ok=True)
                report.skipped.append(Skipped(source, f"zip entry could not be read: {e}"))
                continue
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if zipfile.is_zipfile(tmp):
                tmp.unlink(missing_ok=True)
                report.skipped.append(
                    Skipped(source, "nested zip archives are not opened; upload it on its own")
                )
                continue
            try:
                report.candidates.append(_adopt(tmp, source, workdir, limits))
            except _Refused as e:
                report.skipped.append(Skipped(source, str(e)))


def ingest_files(paths: list[Path], workdir: Path, limits: IngestLimits = IngestLimits()) -> IngestReport:
    """Validate uploaded images and ZIPs (a ZIP is detected by content) and copy every image that
    passes into `workdir` under a new unique name. Sources: "upload:<name>", "zip:<zip>!<member>"."""
    import zipfile

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = IngestReport()
    for path in map(Path, paths):
        source = f"upload:{path.name}"
        if not path.is_file():
            report.skipped.append(
                Skipped(source, "not a regular file (folders, devices and pipes are refused)")
            )
            continue
        try:
            is_zip = zipfile.is_zipfile(path)
        except OSError as e:
            report.skipped.append(Skipped(source, f"could not be read: {e}"))
            continue
        if is_zip:
            _ingest_zip(path, path.name, workdir, limits, report)
            continue
        try:
            report.candidates.append(_ingest_image(path, source, workdir, limits))
        except _Refused as e:
            report.skipped.append(Skipped(source, str(e)))
        except OSError as e:
            report.skipped.append(Skipped(source, f"could not be read: {e}"))
    return report


# ---------------------------------------------------------------------------------------------
# Near-duplicates


def _phash_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def drop_near_duplicates(
    candidates: list[Candidate], known_phashes: dict[str, str], max_distance: int = 6
) -> tuple[list[Candidate], list[Skipped]]:
    """Keep candidates whose phash is more than `max_distance` bits from every known phash (phash ->
    source of items already in the dataset) and from every candidate kept before it in the list."""
    if not 0 <= max_distance <= 64:
        raise InputError(f"max_distance={max_distance!r} must be between 0 and 64 (bits of a phash)")
    seen = list(known_phashes.items())
    kept: list[Candidate] = []
    skipped: list[Skipped] = []
    for candidate in candidates:
        match = _nearest(candidate.phash, seen, max_distance)
        if match:
            skipped.append(
                Skipped(candidate.source, f"near-duplicate of {match[0]} (phash distance {match[1]})")
            )
            continue
        kept.append(candidate)
        seen.append((candidate.phash, candidate.source))
    return kept, skipped


def _nearest(phash: str, seen: list[tuple[str, str]], max_distance: int) -> tuple[str, int] | None:
    best: tuple[str, int] | None = None
    for other, source in seen:
        distance = _phash_distance(phash, other)
        if distance <= max_distance and (best is None or distance < best[1]):
            best = (source, distance)
    return best


# ---------------------------------------------------------------------------------------------
# Video


def _detect_scenes(path: Path, threshold: float, deadline: float, name: str) -> list[tuple[float, float]]:
    """(start, end) seconds of each scene; a video without a cut is one scene."""
    from scenedetect import ContentDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    # VideoStreamAv directly rather than open_video(): open_video silently falls back to OpenCV,
    # which would open the path with every ffmpeg protocol and demuxer.
    try:
        video = VideoStreamAv(str(path.resolve()), suppress_output=True)
    except Exception as e:  # PySceneDetect wraps any PyAV failure in its own types
        raise InputError(f"{name}: not a readable video ({e})") from None
    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=MIN_SCENE_S))
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), manager.stop)
    timer.daemon = True
    timer.start()
    try:
        manager.detect_scenes(video)
    finally:
        timer.cancel()
    if time.monotonic() >= deadline:
        raise InputError(
            f"{name}: scene detection ran past the video timeout; trim the video or raise video_timeout_s"
        )
    return [(s.get_seconds(), e.get_seconds()) for s, e in manager.get_scene_list(start_in_scene=True)]


def _frames_at(
    path: Path, times: list[float], deadline: float, name: str
) -> Iterator[tuple[int, object, float]]:
    """For each of `times` (seconds, ascending) yield (its index, the frame shown then, that frame's
    time), in one sequential decode; times past the last frame get the last frame."""
    import av

    try:
        container = av.open(media_input(path), options=INPUT_OPTIONS)
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"{name}: not a readable video ({e})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        tolerance = 0.5 / float(stream.average_rate or stream.guessed_rate or 30)  # half a frame
        k = 0
        last = None
        try:
            for frame in container.decode(stream):
                if time.monotonic() > deadline:
                    raise InputError(
                        f"{name}: sampling frames ran past the video timeout; trim the video or raise video_timeout_s"
                    )
                if frame.time is None:
                    continue
                last = (frame, round(frame.time - start, 6))
                while k < len(times) and last[1] + tolerance >= times[k]:
                    yield k, *last
                    k += 1
                if k == len(times):
                    return
        except av.FFmpegError as e:
            raise InputError(f"{name}: is damaged and could not be decoded ({e})") from None
        while last is not None and k < len(times):
            yield k, *last
            k += 1


def _best_frames(
    path: Path, slots: list[list[float]], deadline: float, name: str, max_pixels: int
) -> Iterator[tuple[float, object, float]]:
    """For each slot (a list of times in seconds; slots in time order) yield (time, PIL image,
    sharpness) of the sharpest frame shown at one of its times. Only one slot's best frame is held
    at a time, and a frame is never yielded twice in a row (a slot shorter than a frame)."""
    targets = [(i, t) for i, times in enumerate(slots) for t in sorted(times)]
    best: tuple[float, object, float] | None = None
    current = last_t = last_yielded = None
    for k, frame, t in _frames_at(path, [t for _, t in targets], deadline, name):
        if targets[k][0] != current:
            if best is not None and best[0] != last_yielded:
                last_yielded = best[0]
                yield best
            best, current, last_t = None, targets[k][0], None
        if t == last_t:  # two times of one slot fell on the same frame
            continue
        last_t = t
        if frame.width * frame.height > max_pixels:
            raise InputError(
                f"{name}: frames of {frame.width}x{frame.height} exceed the limit of {max_pixels:,} pixels"
            )
        image = frame.to_image()
        score = _sharpness(image)
        if best is None or score > best[2]:
            best = (t, image, score)
    if best is not None and best[0] != last_yielded:
        yield best


def sample_video(
    path: Path,
    workdir: Path,
    mode: str = "scene",
    fps: float = 1.0,
    scene_threshold: float = 27.0,
    min_sharpness: float = 40.0,
    max_phash_distance: int = 6,
    limits: IngestLimits = IngestLimits(),
    source_name: str | None = None,
) -> IngestReport:
    """Pick still frames from a video as candidates, saved as PNG in `workdir`.

    mode "scene": scenes are found with PySceneDetect's ContentDetector(threshold=scene_threshold);
    from each, the sharpest of frames at 10%, 50% and 90% of it. mode "rate": one frame every 1/fps
    seconds. Frames below `min_sharpness` are skipped as blurry, frames within `max_phash_distance`
    bits of a frame already kept from this video as near-duplicates. Sources are
    "<label>@<seconds>s" with label `source_name` (e.g. "url:https://...") or "video:<file name>".
    InputError naming the file when it is not a whole, decodable video or its sampling passes
    limits.video_timeout_s; nothing is left in `workdir` then."""
    path = Path(path)
    if mode not in VIDEO_MODES:
        raise InputError(f"mode={mode!r} is not a video sampling mode; allowed: {', '.join(VIDEO_MODES)}")
    if not (isinstance(fps, int | float) and math.isfinite(fps) and 0 < fps <= MAX_VIDEO_FPS):
        raise InputError(f"fps={fps!r} must be > 0 and <= {MAX_VIDEO_FPS:g}")
    if not scene_threshold > 0:
        raise InputError(f"scene_threshold={scene_threshold!r} must be > 0")
    if not min_sharpness >= 0:
        raise InputError(f"min_sharpness={min_sharpness!r} must be >= 0")
    if not 0 <= max_phash_distance <= 64:
        raise InputError(f"max_phash_distance={max_phash_distance!r} must be between 0 and 64")
    label = source_name or f"video:{path.name}"
    try:
        info = probe(path)
    except InputError as e:
        if source_name:
            raise InputError(f"{source_name}: {e}") from None
        raise
    name = source_name or path.name
    if not info.has_video:
        raise InputError(f"{name}: has no video stream (audio-only files have no frames to sample)")
    deadline = time.monotonic() + limits.video_timeout_s
    if mode == "scene":
        scenes = _detect_scenes(path, scene_threshold, deadline, name)
        slots = [[s + (e - s) * f for f in SCENE_SAMPLE_POINTS] for s, e in scenes]
    else:
        slots = [[i / fps] for i in range(max(1, math.ceil(info.duration * fps - 1e-6)))]
    report = IngestReport()
    if len(slots) > limits.max_video_frames:
        rest = len(slots) - limits.max_video_frames
        report.skipped.append(
            Skipped(
                label,
                f"yields at most {limits.max_video_frames} frames (max_video_frames): {rest} more "
                f"{'scenes' if mode == 'scene' else 'frames'} from {min(slots[limits.max_video_frames]):.2f}s on were not sampled",
            )
        )
        slots = slots[: limits.max_video_frames]

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import imagehash

    kept: list[tuple[str, str]] = []  # (phash, source) of frames kept from this video
    try:
        for t, image, score in _best_frames(path, slots, deadline, name, limits.max_image_pixels):
            source = f"{label}@{t:.2f}s"
            if score < min_sharpness:
                report.skipped.append(Skipped(source, f"blurry (sharpness {score:.1f} < {min_sharpness:g})"))
                continue
            phash = str(imagehash.phash(image))
            match = _nearest(phash, kept, max_phash_distance)
            if match:
                report.skipped.append(
                    Skipped(source, f"near-duplicate of {match[0]} (phash distance {match[1]})")
                )
                continue
            final = workdir / f"{uuid.uuid4().hex}.png"
            tmp = _temp_file(workdir)
            try:
                image.save(tmp, format="PNG", compress_level=4)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            candidate = _describe(image, final, source, "PNG")
            report.candidates.append(candidate)
            kept.append((phash, source))
    except BaseException:
        for candidate in report.candidates:  # an error leaves no frames behind
            candidate.path.unlink(missing_ok=True)
        raise
    return report


# ---------------------------------------------------------------------------------------------
# Server folders


def _root_of(resolved: Path, roots: list[Path]) -> Path | None:
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return root
    return None


def scan_folder(folder: Path, allowed_roots: list[Path], seen: set[str]) -> list[Path]:
    """Image files (by suffix: .png .jpg .jpeg .webp) under `folder`, recursively, as resolved paths
    not in `seen` (resolved path strings), sorted. `folder` must resolve inside one of
    `allowed_roots`; symlinked folders are not followed, symlinked files that leave that root and
    hidden files and folders are ignored."""
    if not allowed_roots:
        raise InputError(
            f"folder ingest is off: no allowed roots are set, so {str(folder)!r} cannot be read; "
            "allow a folder with the --ingest-roots setting"
        )
    roots = [Path(r).resolve() for r in allowed_roots]
    resolved = Path(folder).resolve()
    root = _root_of(resolved, roots)
    if root is None:
        raise InputError(
            f"folder {str(folder)!r} is outside the allowed roots: {', '.join(map(str, roots))} "
            "(set them with --ingest-roots)"
        )
    if not resolved.is_dir():
        raise InputError(f"folder {str(folder)!r} does not exist or is not a folder")
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(resolved, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith(".") or Path(filename).suffix.lower() not in FOLDER_IMAGE_SUFFIXES:
                continue
            candidate = Path(dirpath) / filename
            target = candidate.resolve()
            if not (target.is_relative_to(root) and target.is_file()):
                continue
            if str(target) not in seen:
                found.add(target)
    return sorted(found)


def folder_source(path: Path, root: Path) -> str:
    """ "folder:<path relative to the allowed root it is in>"."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise InputError(f"{str(path)!r} is not inside the allowed root {str(base)!r}")
    return f"folder:{resolved.relative_to(base).as_posix()}"


# ---------------------------------------------------------------------------------------------
# URLs


class _Messages:
    """yt-dlp logger: keep its errors for our message instead of printing them."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def download_url(
    url: str, workdir: Path, timeout_s: float = 60.0, max_bytes: int = 500 * 1024 * 1024
) -> Path:
    """Download the media at an http(s) URL (a direct link or a site yt-dlp supports) into `workdir`
    as download.<ext>; InputError when the URL is refused, cannot be fetched, or is over `max_bytes`."""
    import yt_dlp

    parsed = urlparse(str(url).strip())
    if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
        raise InputError(f"URL {url!r} is refused: only http:// and https:// URLs can be ingested")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    messages = _Messages()

    def guard(progress: dict) -> None:
        # max_filesize only checks a Content-Length; this counts the bytes that actually arrive.
        if (progress.get("downloaded_bytes") or 0) > max_bytes:
            raise InputError(f"URL {url!r}: the download is larger than the limit of {max_bytes:,} bytes")

    options = {
        "outtmpl": str(workdir / "download.%(ext)s"),
        "quiet": True,
        "noprogress": True,
        "no_warnings": True,
        "socket_timeout": timeout_s,
        "max_filesize": max_bytes,
        "noplaylist": True,
        "retries": 1,
        "fragment_retries": 1,
        "extractor_retries": 1,
        "overwrites": True,  # never hand back an older download of another URL
        "format": "bv*/b",  # frames are all we need: no audio, so no ffmpeg merge
        "logger": messages,
        "progress_hooks": [guard],
    }
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
            files = [d.get("filepath") for d in (info or {}).get("requested_downloads") or []]
            target = Path(files[0]) if files and files[0] else Path(ydl.prepare_filename(info))
    except InputError:
        _remove_partial(workdir)
        raise
    except yt_dlp.utils.YoutubeDLError as e:
        _remove_partial(workdir)
        brief = (messages.errors[-1] if messages.errors else str(e)).removeprefix("ERROR: ").strip()
        raise InputError(
            f"URL {url!r} could not be fetched: {brief[:300]}. URL ingest needs network access from this "
            "machine to that site (and a direct media link or a site yt-dlp supports)"
        ) from None
    if not target.is_file():
        raise InputError(f"URL {url!r} gave no file: it may be larger than the limit of {max_bytes:,} bytes")
    if target.stat().st_size > max_bytes:
        target.unlink(missing_ok=True)
        raise InputError(f"URL {url!r}: the download is larger than the limit of {max_bytes:,} bytes")
    return target


def _remove_partial(workdir: Path) -> None:
    for leftover in workdir.glob("download.*"):
        if leftover.name.endswith((".part", ".ytdl")):
            leftover.unlink(missing_ok=True)
