"""Upscaling: Real-ESRGAN-family models through spandrel (tiled), the SD x4 upscaler, and videos frame by frame.

Models are any image-to-image model spandrel 0.4 loads from .pth/.safetensors: ESRGAN/RRDBNet
(RealESRGAN_x4plus, RealESRNet_x4plus, RealESRGAN_x4plus_anime_6B, RealESRGAN_x2plus), SRVGGNetCompact
(realesr-general-x4v3, realesr-animevideov3) and spandrel's other SR/restoration architectures.

Tiling (`tile_upscale`): the image is cut into ceil(W / tile) x ceil(H / tile) equal cells; each cell's
*core* is the cell widened by overlap/2 towards each neighbour (so neighbouring cores share exactly
`overlap` px), and each core runs with `pad` px of real context on every side (fewer at the image border).
The context is cropped off the model's output and the cores are blended with a linear feather over the
shared `overlap` px, accumulated in float32 sum/weight buffers. The model therefore sees at most
tile + overlap + 2 * pad px a side: with the defaults (tile 512, pad 16, overlap 16) that is 560 px. A model
whose receptive-field radius is <= pad gives exactly its untiled output; deeper models (RRDBNet,
realesr-general-x4v3) differ only in the last few levels near the seams, and the feather hides the step.

Nothing heavy is imported at module import: torch, spandrel, diffusers and av load inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from engine.device import free_memory, is_out_of_memory, resolve_device
from engine.errors import InputError, JobCancelledError, NotFoundError, OutOfMemoryError
from engine.media.ffmpeg import (
    INPUT_OPTIONS,
    OUTPUT_FORMATS,
    check_same_duration,
    media_input,
    probe,
    run_ffmpeg,
    staged_output,
)

LANCZOS = "Lanczos"
DEFAULT_TILE = 512  # input px: the side of one grid cell; the model sees at most tile + overlap + 2 * pad px
DEFAULT_PAD = 16  # input px of real context run around each core and discarded (receptive-field margin)
DEFAULT_OVERLAP = 16  # input px shared by neighbouring cores, blended with a linear feather
MIN_TILE = 64  # out-of-memory retries halve the tile down to this, then give up
MAX_SCALE = 16.0
AUTO_TILES = (1024, 768, 512, 384, 256, 192, 128)
AUTO_TILE_MEMORY_FRACTION = 0.6  # of the free GPU memory; the rest is for the allocator and cuDNN workspaces
# Activation estimate per input pixel for auto_tile, in values (x 2 bytes for fp16/bf16, x 4 for float32).
# RRDBNet is the heaviest family we ship: an RRDB dense block holds 64 + 4 * 32 = 192 concatenated channels
# plus its 32-channel output, the block input and the trunk (64 each) at input resolution (~352, rounded up
# to 384); after upsampling, a 64-channel conv input and output plus the 3-channel image at every output
# pixel (131 x scale^2). SRVGGNetCompact needs far less, so the estimate errs on the safe side.
LOWRES_VALUES_PER_PX = 384
HIGHRES_VALUES_PER_PX = 131
MODEL_EXTENSIONS = (".pth", ".safetensors", ".pt", ".ckpt")
SUPPORTED_FAMILIES = (
    "ESRGAN/RRDBNet (e.g. RealESRGAN_x4plus, RealESRNet_x4plus, RealESRGAN_x4plus_anime_6B, RealESRGAN_x2plus)",
    "SRVGGNetCompact (e.g. realesr-general-x4v3, realesr-animevideov3)",
    "other spandrel architectures (SwinIR, HAT, DAT, SPAN, OmniSR, ...) with an SR or restoration purpose",
)
SD_X4_SCALE = 4
SD_X4_MULTIPLE = 8  # SD x4 latents are at input resolution; its UNet halves them three times
VIDEO_COPY_AUDIO = frozenset({"aac", "mp3", "alac", "ac3", "eac3"})  # carried into MP4/MOV as they are
_VIDEO_QUEUE_FRAMES = 2


class UnsupportedUpscalerError(InputError):
    """The file is not an image-to-image model spandrel can load (unknown architecture, wrong purpose,
    unreadable weights). The message names the file and the supported families."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    architecture: str  # spandrel's architecture name, e.g. "ESRGAN", "RealESRGAN Compact"
    scale: int  # 1 for restoration models
    input_channels: int
    output_channels: int
    tiling: str  # "supported", "discouraged" (tiled only when asked or out of memory) or "internal"
    size_multiple: int  # input sides must be a multiple of this (padded by reflection when not)
    fp16: bool
    bf16: bool
    size: int  # file bytes


def _families() -> str:
    return "; ".join(SUPPORTED_FAMILIES)


def _file_stat(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except OSError:
        raise NotFoundError(f"upscale model {str(path)!r} does not exist") from None
    if not path.is_file():
        raise NotFoundError(f"upscale model {str(path)!r} is not a file")
    return st


def _load_descriptor(path: Path):
    """The spandrel ImageModelDescriptor of `path`, on the CPU in float32, in eval mode."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    if path.suffix.lower() not in MODEL_EXTENSIONS:
        raise UnsupportedUpscalerError(
            f"{path.name}: upscale models must be {', '.join(MODEL_EXTENSIONS)} files; supported: {_families()}"
        )
    try:
        descriptor = ModelLoader(device="cpu").load_from_file(str(path))
    except UnsupportedModelError:
        raise UnsupportedUpscalerError(
            f"{path.name}: unknown model architecture (no spandrel architecture matches its weights); "
            f"supported: {_families()}"
        ) from None
    except (
        Exception
    ) as e:  # torch.load, safetensors and each architecture's own shape checks raise assorted types
        raise UnsupportedUpscalerError(
            f"{path.name}: not a model file spandrel can load ({type(e).__name__}: {e}); supported: {_families()}"
        ) from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise UnsupportedUpscalerError(
            f"{path.name}: is a {descriptor.architecture.name} {descriptor.purpose} model, not an image-to-image "
            f"upscale/restoration model; supported: {_families()}"
        )
    return descriptor.eval()


@lru_cache(maxsize=64)
def _inspect(path: str, size: int, mtime_ns: int) -> tuple | str:
    """The descriptor's facts, or the refusal message (remembered too: model lists re-inspect every file)."""
    try:
        d = _load_descriptor(Path(path))
    except UnsupportedUpscalerError as e:
        return str(e)
    return (
        d.architecture.name,
        int(d.scale),
        int(d.input_channels),
        int(d.output_channels),
        d.tiling.name.lower(),
        int(d.size_requirements.multiple_of),
        bool(d.supports_half),
        bool(d.supports_bfloat16),
    )


def inspect_upscaler(path: Path, name: str = "") -> UpscalerInfo:
    """What an upscale model file is (architecture, scale, channels, tiling, dtypes), loaded once on the CPU
    and remembered by (path, size, mtime). UnsupportedUpscalerError (an InputError) for a file that is not an
    image-to-image model spandrel knows; NotFoundError for a missing file."""
    path = Path(path)
    st = _file_stat(path)
    facts = _inspect(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if isinstance(facts, str):
        raise UnsupportedUpscalerError(facts)
    arch, scale, cin, cout, tiling, multiple, fp16, bf16 = facts
    return UpscalerInfo(
        name=name or path.name,
        architecture=arch,
        scale=scale,
        input_channels=cin,
        output_channels=cout,
        tiling=tiling,
        size_multiple=multiple,
        fp16=fp16,
        bf16=bf16,
        size=st.st_size,
    )


class UpscalerCache:
    """The last `max_models` upscale models used, ready on their device (LRU by file, mtime, device, dtype).
    One per worker runtime; thread-safe. An evicted model's memory is returned with free_memory."""

    def __init__(self, max_models: int = 2):
        if not (isinstance(max_models, int) and max_models >= 1):
            raise InputError(f"max_models must be an integer >= 1, got {max_models!r}")
        self.max_models = max_models
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, plan):
        """The spandrel ImageModelDescriptor for `path` on plan.device, in eval mode: float16 when plan.dtype is
        float16 and the architecture supports it, bfloat16 likewise, else float32."""
        import torch

        path = Path(path)
        st = _file_stat(path)
        key = (str(path.resolve()), st.st_mtime_ns, plan.device, plan.dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            descriptor = _load_descriptor(path)
            if plan.dtype == "float16" and descriptor.supports_half:
                descriptor.half()
            elif plan.dtype == "bfloat16" and descriptor.supports_bfloat16:
                descriptor.bfloat16()
            else:
                descriptor.float()
            descriptor.to(torch.device(plan.device)).eval()
            self._models[key] = descriptor
            evicted = []
            while len(self._models) > self.max_models:
                evicted.append(self._models.popitem(last=False))
        devices = [key[2] for key, _model in evicted]
        evicted.clear()  # drop the last references before returning the memory
        for device in devices:
            free_memory(device)
        return descriptor

    def clear(self) -> None:
        with self._lock:
            devices = {key[2] for key in self._models}
            self._models.clear()
        for device in devices:
            free_memory(device)

    def __len__(self) -> int:
        return len(self._models)


def _bytes_per_input_px(plan, scale: int) -> int:
    element = 4 if plan.dtype == "float32" else 2
    return element * (LOWRES_VALUES_PER_PX + HIGHRES_VALUES_PER_PX * scale * scale)


def auto_tile(plan, scale: int, width: int, height: int) -> int:
    """The tile for a width x height input. CUDA: the largest of AUTO_TILES whose model input (tile + overlap
    + 2 * pad px a side, at the default pad/overlap) times the activation estimate (bytes per input px:
    (384 + 131 * scale^2) values x the dtype's size, see LOWRES_VALUES_PER_PX) fits in 60% of the free memory
    (the smallest when none fits; out-of-memory retries take it from there). CPU/MPS: DEFAULT_TILE.
    Returns 0 (untiled) when the whole image is no bigger than that tile."""
    if plan.device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(plan.device))
        budget = free * AUTO_TILE_MEMORY_FRACTION
        per_px = _bytes_per_input_px(plan, max(1, int(scale)))
        margin = DEFAULT_OVERLAP + 2 * DEFAULT_PAD
        chosen = next((t for t in AUTO_TILES if (t + margin) ** 2 * per_px <= budget), AUTO_TILES[-1])
    else:
        chosen = DEFAULT_TILE
    return 0 if max(width, height) <= chosen else chosen


# --- tiling ----------------------------------------------------------------------------------------------
def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cores along one axis: ceil(length / tile) equal cells, each widened by overlap/2 towards its
    neighbours, so neighbours share exactly `overlap` px; the first and last reach the image border."""
    n = max(1, math.ceil(length / tile))
    cuts = [round(i * length / n) for i in range(n + 1)]
    before, after = overlap // 2, overlap - overlap // 2
    return [
        (cuts[i] - before if i > 0 else 0, cuts[i + 1] + after if i < n - 1 else length) for i in range(n)
    ]


def _feather(start: int, end: int, length: int, overlap: int, scale: int):
    """Blend weights of one core along one axis, in output px: a linear ramp over the `overlap` px shared
    with each neighbour ((i + 0.5) / ramp, never 0), flat 1 elsewhere and at the image border."""
    import torch

    n = (end - start) * scale
    w = torch.ones(n, dtype=torch.float32)
    ramp_len = min(overlap * scale, n)
    if ramp_len:
        ramp = (torch.arange(ramp_len, dtype=torch.float32) + 0.5) / ramp_len
        if start > 0:
            w[:ramp_len] = torch.minimum(w[:ramp_len], ramp)
        if end < length:
            w[n - ramp_len :] = torch.minimum(w[n - ramp_len :], ramp.flip(0))
    return w


def _pad_to(x, minimum: int, multiple_of: int, square: bool = False):
    """Pad (B,C,H,W) on the right/bottom up to the size requirements: reflection where the tile is big
    enough, replicate for the rest (what spandrel's own call does). Returns (tensor, h, w) of the original."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    th, tw = max(h, minimum), max(w, minimum)
    th, tw = -(-th // multiple_of) * multiple_of, -(-tw // multiple_of) * multiple_of
    if square:
        th = tw = max(th, tw)
    pad_h, pad_w = th - h, tw - w
    if pad_h or pad_w:
        rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
        if rw or rh:
            x = F.pad(x, (0, rw, 0, rh), mode="reflect")
        if pad_w - rw or pad_h - rh:
            x = F.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
    return x, h, w


def _check_tiling(tile, pad, overlap) -> None:
    for name, value in (("tile", tile), ("pad", pad), ("overlap", overlap)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise InputError(f"{name} must be an integer >= 0 (px), got {value!r}")
    if tile and overlap > tile // 2:
        raise InputError(
            f"overlap must be at most half the tile ({tile // 2} px for tile {tile}), got {overlap}"
        )


def _tiled(fn: Callable, x, scale: int, tile: int, pad: int, overlap: int, progress, cancelled):
    """Run fn (a (B,C,h,w) -> (B,C',h*s,w*s) float32 CPU function) over x tile by tile; see the module doc."""
    import torch

    _b, _c, height, width = x.shape
    if tile == 0 or tile >= max(height, width):
        if cancelled is not None and cancelled():
            raise JobCancelledError("upscale was cancelled")
        out = fn(x)
        if progress is not None:
            progress(1, 1)
        return out
    rows, cols = _spans(height, tile, overlap), _spans(width, tile, overlap)
    wy = {span: _feather(*span, height, overlap, scale) for span in rows}
    wx = {span: _feather(*span, width, overlap, scale) for span in cols}
    total = len(rows) * len(cols)
    acc = None
    weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
    done = 0
    for y0, y1 in rows:
        for x0, x1 in cols:
            if cancelled is not None and cancelled():
                raise JobCancelledError("upscale was cancelled")
            iy0, iy1, ix0, ix1 = (
                max(0, y0 - pad),
                min(height, y1 + pad),
                max(0, x0 - pad),
                min(width, x1 + pad),
            )
            out = fn(x[:, :, iy0:iy1, ix0:ix1])
            core = out[:, :, (y0 - iy0) * scale : (y1 - iy0) * scale, (x0 - ix0) * scale : (x1 - ix0) * scale]
            if acc is None:
                acc = torch.zeros(
                    (x.shape[0], out.shape[1], height * scale, width * scale), dtype=torch.float32
                )
            w = wy[(y0, y1)][:, None] * wx[(x0, x1)][None, :]
            region = (slice(None), slice(None), slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
            acc[region].addcmul_(core, w)
            weight[region].add_(w)
            del out, core
            done += 1
            if progress is not None:
                progress(done, total)
    return acc.div_(weight)


def _model_fn(model):
    """One tile through a spandrel descriptor: size requirements met by padding, in the model's dtype and
    device, the padding cropped off, float32 on the CPU."""
    import torch

    req = model.size_requirements
    scale = int(model.scale)

    def run(t):
        padded, h, w = _pad_to(t, req.minimum, req.multiple_of, req.square)
        with torch.inference_mode():
            y = model(padded.to(device=model.device, dtype=model.dtype))
        y = y[:, :, : h * scale, : w * scale].to(device="cpu", dtype=torch.float32)
        if y.shape[-2:] != (h * scale, w * scale):
            raise InputError(
                f"{model.architecture.name} returned {y.shape[-1]}x{y.shape[-2]} px for a {w}x{h} tile; "
                f"expected {w * scale}x{h * scale} (scale {scale})"
            )
        return y

    return run


def tile_upscale(
    model,
    x,
    *,
    tile: int,
    pad: int = DEFAULT_PAD,
    overlap: int = DEFAULT_OVERLAP,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
):
    """x (B,C,H,W) float in [0,1] on the CPU -> (B,C_out,H*s,W*s) float32 on the CPU, s = model.scale.

    tile 0 or tile >= max(H, W): one pass. Otherwise the grid of the module doc: cores of about `tile` px
    sharing `overlap` px, each run with `pad` px of context, feathered together. progress(done, total) after
    each tile; cancelled() is checked before each tile (JobCancelledError)."""
    import torch

    _check_tiling(tile, pad, overlap)
    if x.ndim != 4 or x.shape[1] != model.input_channels:
        raise InputError(
            f"input must be (batch, {model.input_channels}, height, width) for this model, got {tuple(x.shape)}"
        )
    with torch.inference_mode():
        return _tiled(_model_fn(model), x, int(model.scale), tile, pad, overlap, progress, cancelled)


# --- images --------------------------------------------------------------------------------------------
def _final_size(width: int, height: int, scale, target) -> tuple[int, int]:
    has_scale = scale not in (None, 0, 0.0)
    if has_scale == (target is not None):
        raise InputError(
            f"give exactly one of scale (> 0, up to {MAX_SCALE:g}) or target (width, height); "
            f"got scale={scale!r}, target={target!r}"
        )
    if target is not None:
        try:
            tw, th = target
        except (TypeError, ValueError):
            raise InputError(f"target must be (width, height) in px, got {target!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (tw, th)):
            raise InputError(f"target must be (width, height), positive integers, got {target!r}")
        return tw, th
    try:
        factor = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"scale must be a number in (0, {MAX_SCALE:g}], got {scale!r}") from None
    if not (math.isfinite(factor) and 0 < factor <= MAX_SCALE):
        raise InputError(f"scale must be in (0, {MAX_SCALE:g}], got {scale!r}")
    return max(1, round(width * factor)), max(1, round(height * factor))


def _split(image):
    """(base, alpha, out_mode): base is "L", "RGB" or "I;16" (16-bit grey), alpha an "L" image or None,
    out_mode the mode the result is given back in. 1 -> L; P/PA -> RGB(A); I -> 16-bit (clipped), back as I;
    F -> L (Pillow's conversion); CMYK, YCbCr, LAB, HSV, RGBX -> RGB."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in ("1", "L", "F"):
        return image.convert("L"), None, "L"
    if mode in ("LA", "La"):
        la = image.convert("LA")
        return la.getchannel("L"), la.getchannel("A"), "LA"
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A"), "RGBA"
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535).astype(np.uint16)
        return Image.fromarray(values), None, "I" if mode == "I" else "I;16"
    return image.convert("RGB"), None, "RGB"


def _join(base, alpha, out_mode: str):
    from PIL import Image

    if out_mode == "LA":
        return Image.merge("LA", (base, alpha))
    if out_mode == "RGBA":
        return Image.merge("RGBA", (*base.split(), alpha))
    if out_mode == "I":
        return base.convert("I")
    return base


def _to_tensor(base):
    import numpy as np
    import torch

    a = np.asarray(base)
    depth = 65535.0 if base.mode == "I;16" else 255.0
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(a.astype(np.float32) / depth).permute(2, 0, 1).unsqueeze(0).contiguous()


def _luma(t):
    """ITU-R 601 luma, as Pillow's RGB -> L."""
    return (t[:, 0:1] * 0.299 + t[:, 1:2] * 0.587 + t[:, 2:3] * 0.114).clamp_(0, 1)


def _channels(t, n: int):
    if t.shape[1] == n:
        return t
    return t.repeat(1, 3, 1, 1) if n == 3 else _luma(t)


def _to_image(t, mode: str, inplace: bool = False):
    """(1,C,H,W) float in [0,1] -> a PIL image in `mode` ("L", "RGB" or "I;16"). `inplace` reuses t's memory
    (no second full-size float buffer) and leaves t scaled: only for a tensor nobody reads afterwards."""
    import numpy as np
    import torch
    from PIL import Image

    t = _channels(t, 3 if mode == "RGB" else 1)[0]
    if mode == "I;16":
        scaled = t.mul_(65535) if inplace else t.mul(65535)
        a = scaled.round_().clamp_(0, 65535).to(torch.int32)[0].numpy().astype(np.uint16)
        return Image.fromarray(a)  # uint16 -> I;16
    scaled = t.mul_(255) if inplace else t.mul(255)
    a = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).contiguous().numpy() if mode == "RGB" else a[0].numpy())


def _lanczos_tensor(t, width: int, height: int):
    """Resize a (1,C,H,W) float tensor with Pillow's Lanczos, channel by channel in 32-bit float."""
    import numpy as np
    import torch
    from PIL import Image

    planes = [
        np.asarray(Image.fromarray(t[0, c].numpy()).resize((width, height), Image.Resampling.LANCZOS))
        for c in range(t.shape[1])
    ]
    return torch.from_numpy(np.stack(planes)).unsqueeze(0).clamp_(0, 1)


def _check_pixels(width: int, height: int, out_w: int, out_h: int, max_pixels: int) -> None:
    if width * height > max_pixels or out_w * out_h > max_pixels:
        side = math.isqrt(max_pixels)
        raise InputError(
            f"image {width}x{height} -> {out_w}x{out_h} px is larger than max_pixels={max_pixels} "
            f"(about {side}x{side}); upscale a smaller image or to a smaller size"
        )


def check_output_size(
    width: int,
    height: int,
    *,
    scale: float = 0.0,
    target: tuple[int, int] | None = None,
    max_pixels: int = 4096 * 4096,
) -> tuple[int, int]:
    """The output size an upscale of a width x height image makes; InputError when it (or the input) is
    over max_pixels, or scale/target are not valid."""
    out_w, out_h = _final_size(width, height, scale, target)
    _check_pixels(width, height, out_w, out_h, max_pixels)
    return out_w, out_h


def upscale_image(
    image,
    upscaler: Path | None,
    *,
    scale: float = 0.0,
    target: tuple[int, int] | None = None,
    plan=None,
    cache: UpscalerCache | None = None,
    tile: int = 0,
    pad: int = DEFAULT_PAD,
    overlap: int = DEFAULT_OVERLAP,
    max_pixels: int = 4096 * 4096,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
):
    """Upscale a PIL image with Lanczos (upscaler None) or a spandrel model file, to `scale` x its size or to
    `target` (width, height) exactly (give one). PIL in, PIL out, in the input's mode (see _split).

    With a model: the colour channels go through the model tiled (tile 0 = auto_tile; models whose tiling
    spandrel marks internal/discouraged run untiled unless a tile is given), again on its output while the
    requested size is not reached (A1111's loop; the last pass's input is first Lanczos-reduced to size/scale,
    so no buffer exceeds the final size), then Lanczos to the exact size; alpha is Lanczos-resized from the
    source. Out of memory: free, halve the tile, retry down to MIN_TILE, then OutOfMemoryError. progress(done,
    total) counts the tiles of the pass in progress. plan None -> the CPU in float32."""
    from PIL import Image

    if not (isinstance(max_pixels, int) and max_pixels >= 1):
        raise InputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    width, height = image.size
    out_w, out_h = _final_size(width, height, scale, target)
    _check_pixels(width, height, out_w, out_h, max_pixels)
    _check_tiling(tile, pad, overlap)
    if tile and tile < MIN_TILE:
        raise InputError(f"tile must be 0 (auto) or at least {MIN_TILE} px, got {tile}")
    if overlap > MIN_TILE // 2:
        raise InputError(f"overlap must be at most {MIN_TILE // 2} px (half of MIN_TILE), got {overlap}")
    base, alpha, out_mode = _split(image)
    if alpha is not None:
        alpha = alpha.resize((out_w, out_h), Image.Resampling.LANCZOS)
    if upscaler is None:
        return _join(base.resize((out_w, out_h), Image.Resampling.LANCZOS), alpha, out_mode)

    import torch

    plan = plan or resolve_device("cpu")
    model = (cache or UpscalerCache(max_models=1)).get(Path(upscaler), plan)
    name = Path(upscaler).name
    for kind, count in (("input", model.input_channels), ("output", model.output_channels)):
        if count not in (1, 3):
            raise InputError(f"{name}: the model has {count} {kind} channels; supported: 1 (grey) or 3 (RGB)")
    with torch.inference_mode():
        x = _channels(_to_tensor(base), model.input_channels)
        y = _run_passes(model, x, out_w, out_h, plan, tile, pad, overlap, progress, cancelled)
        result = _to_image(y, base.mode, inplace=True)
    del x, y
    if result.size != (out_w, out_h):
        result = result.resize((out_w, out_h), Image.Resampling.LANCZOS)
    return _join(result, alpha, out_mode)


def _run_passes(
    model, x, out_w: int, out_h: int, plan, tile: int, pad: int, overlap: int, progress, cancelled
):
    from spandrel import ModelTiling

    s = int(model.scale)
    untiled = not tile and model.tiling != ModelTiling.SUPPORTED  # tiled only when asked or out of memory
    while True:
        h, w = x.shape[-2:]
        step_tile = tile or (0 if untiled else auto_tile(plan, s, w, h))
        y, used = _one_pass(model, x, plan, step_tile, pad, overlap, progress, cancelled)
        if used != step_tile:  # shrunk after running out of memory: later passes start from it
            tile = used
        h, w = y.shape[-2:]
        if s <= 1 or (w >= out_w and h >= out_h):
            return y
        x = _channels(y, model.input_channels)
        nw, nh = math.ceil(out_w / s), math.ceil(out_h / s)
        if (
            nw < w and nh < h
        ):  # the next pass would overshoot: start it from the size that lands on the target
            x = _lanczos_tensor(x, nw, nh)


def _one_pass(model, x, plan, tile: int, pad: int, overlap: int, progress, cancelled):
    """One model pass with the out-of-memory retry; returns (output, the tile that worked)."""
    h, w = x.shape[-2:]
    while True:
        try:
            return tile_upscale(
                model, x, tile=tile, pad=pad, overlap=overlap, progress=progress, cancelled=cancelled
            ), tile
        except Exception as e:  # only out-of-memory is retried; everything else propagates unchanged
            if not is_out_of_memory(e):
                raise
        free_memory(plan.device)  # outside the except block, so the failed tile's tensors are released
        failed = tile or max(h, w)
        tile = failed // 2
        if tile < MIN_TILE:
            raise OutOfMemoryError(
                f"out of memory upscaling a {w}x{h} image on {plan.device} even at tile {failed} px "
                f"(the minimum is {MIN_TILE}); upscale a smaller image, free GPU memory or use the CPU"
            )


# --- Stable Diffusion x4 upscaler ---------------------------------------------------------------------
def load_sd_x4(folder: Path, plan):
    """A diffusers StableDiffusionUpscalePipeline from a local folder (nothing fetched), on plan's device
    (or with model CPU offload), with VAE tiling and slicing on the GPU."""
    from diffusers import StableDiffusionUpscalePipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise NotFoundError(
            f"SD x4 upscaler folder {str(folder)!r} has no model_index.json; expected a diffusers "
            "StableDiffusionUpscalePipeline folder (save_pretrained layout)"
        )
    try:
        pipe = StableDiffusionUpscalePipeline.from_pretrained(
            str(folder), local_files_only=True, dtype=plan.torch_dtype()
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(
            f"{folder.name}: not a loadable StableDiffusionUpscalePipeline folder ({type(e).__name__}: {e})"
        ) from None
    if plan.cpu_offload:
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    if plan.is_gpu:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_x4_upscale(
    pipe,
    image,
    *,
    prompt: str = "",
    negative_prompt: str = "",
    noise_level: int = 20,
    steps: int = 20,
    guidance_scale: float = 9.0,
    seed: int = 0,
    tile: int = 128,
    overlap: int = 32,
    scale: float = 4.0,
    target: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    callback_on_step_end: Callable | None = None,
):
    """The SD x4 upscaler on a PIL image: 4x, then Lanczos to `target` (which overrides scale) or to `scale`
    x the input when scale != 4. Inputs larger than `tile` px (input px; 0 = never tile) run tile by tile on
    the tiling grid of tile_upscale (no context pad; the `overlap` feather blends), each tile with a CPU
    generator seeded `seed`; tile inputs are padded by reflection to a multiple of 8. Alpha is Lanczos-resized.
    callback_on_step_end(pipe, step, timestep, {"latents": ...}) is called after each denoising step (its
    return value is ignored: this pipeline cannot take changed latents); cancelled() is checked there too."""
    import numpy as np
    import torch
    from PIL import Image

    max_noise = int(getattr(pipe.config, "max_noise_level", 350) or 350)
    if not (
        isinstance(noise_level, int) and not isinstance(noise_level, bool) and 0 <= noise_level <= max_noise
    ):
        raise InputError(f"noise_level must be an integer in [0, {max_noise}], got {noise_level!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 1000):
        raise InputError(f"steps must be an integer in [1, 1000], got {steps!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64):
        raise InputError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    _check_tiling(tile, 0, overlap)
    width, height = image.size
    out_w, out_h = _final_size(width, height, None if target is not None else scale, target)
    base, alpha, out_mode = _split(image)

    def step_callback(step, timestep, latents):
        if cancelled is not None and cancelled():
            raise JobCancelledError("upscale was cancelled")
        if callback_on_step_end is not None:
            callback_on_step_end(pipe, step, timestep, {"latents": latents})

    def run(t):
        padded, h, w = _pad_to(t, SD_X4_MULTIPLE, SD_X4_MULTIPLE)
        tile_image = _to_image(padded, "RGB")
        out = pipe(
            prompt=prompt,
            image=tile_image,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            noise_level=noise_level,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            callback=step_callback,
            callback_steps=1,
        ).images
        y = torch.from_numpy(np.ascontiguousarray(out[0], dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
        return y[:, :, : h * SD_X4_SCALE, : w * SD_X4_SCALE]

    x = _channels(_to_tensor(base), 3)
    y = _tiled(run, x, SD_X4_SCALE, tile, 0, overlap, progress, cancelled)
    result = _to_image(y.clamp_(0, 1), base.mode, inplace=True)
    if result.size != (out_w, out_h):
        result = result.resize((out_w, out_h), Image.Resampling.LANCZOS)
    if alpha is not None:
        alpha = alpha.resize((out_w, out_h), Image.Resampling.LANCZOS)
    return _join(result, alpha, out_mode)


# --- video ---------------------------------------------------------------------------------------------
def _decoded_frames(container, stream, name: str) -> Iterator:
    import av

    try:
        for frame in container.decode(stream):
            yield frame.to_image()
    except av.FFmpegError as e:
        raise InputError(f"{name}: is damaged; decoding failed ({e})") from None


def _even(image, size: tuple[int, int]):
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _drain_and_close(chunks: queue.Queue) -> None:
    """Wake the feeder (blocked on get) with the end marker, whatever was still queued."""
    while True:
        try:
            chunks.get_nowait()
        except queue.Empty:
            break
    with contextlib.suppress(queue.Full):
        chunks.put_nowait(None)


def upscale_video(
    src: Path,
    out: Path,
    frame_fn: Callable,
    *,
    timeout: float = 3600,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    crf: int = 18,
):
    """Every frame of `src` through frame_fn (PIL RGB -> PIL RGB, the same size for every frame; odd sides are
    Lanczos-resized to even ones), encoded H.264 (crf, preset medium, yuv420p) at the source's frame rate and
    frame count, with the source's audio (copied when MP4 carries it, else AAC) and metadata. Frames are
    decoded and processed in the calling thread and streamed to ffmpeg's stdin as raw rgb24: nothing is
    written to disk but the output, which goes to a temp file beside `out` and is renamed into place only
    when whole. Returns probe(out). progress(done_frames, total_frames) after each frame."""
    import av

    src, out = Path(src), Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"output {out.name!r} must end in one of {', '.join(OUTPUT_FORMATS)}")
    if not (isinstance(crf, int) and not isinstance(crf, bool) and 0 <= crf <= 51):
        raise InputError(f"crf must be an integer in [0, 51], got {crf!r}")
    info = probe(src)  # a truncated or corrupt video is refused here, naming the file
    if not info.has_video:
        raise InputError(f"video {src.name!r} has no video stream")
    with staged_output(out) as tmp:
        try:
            container = av.open(media_input(src), options=INPUT_OPTIONS)
        except (av.FFmpegError, OSError) as e:
            raise InputError(f"{src.name}: not a readable video ({e})") from None
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise InputError(f"{src.name}: has no frame rate")
            total = int(stream.frames or 0) or max(1, round(info.duration * float(rate)))
            frames = _decoded_frames(container, stream, src.name)
            first = next(frames, None)
            if first is None:
                raise InputError(f"{src.name}: has no decodable video frames")
            first_out = frame_fn(first)
            raw_size = first_out.size
            size = (max(2, raw_size[0] - raw_size[0] % 2), max(2, raw_size[1] - raw_size[1] % 2))
            audio = (
                ["-c:a", "copy"] if info.audio_codec in VIDEO_COPY_AUDIO else ["-c:a", "aac", "-b:a", "192k"]
            )
            args = [
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-s",
                f"{size[0]}x{size[1]}",
                "-framerate",
                f"{rate.numerator}/{rate.denominator}",
                "-i",
                "pipe:0",
                "-i",
                media_input(src),
                "-map",
                "0:v:0",
                "-map",
                "1:a?",
                "-c:v",
                "libx264",
                "-crf",
                str(crf),
                "-preset",
                "medium",
                "-pix_fmt",
                "yuv420p",
                *audio,
                "-map_metadata",
                "1",
                "-movflags",
                "+faststart",
                "-f",
                fmt,
                "-y",
                f"file:{tmp.resolve()}",
            ]

            def outputs() -> Iterator[bytes]:
                yield _even(first_out, size).tobytes()
                for frame in frames:
                    result = frame_fn(frame)
                    if result.size != raw_size:
                        raise InputError(
                            f"frame_fn returned {result.size[0]}x{result.size[1]} px for a frame of {src.name}; "
                            f"every frame must come back {raw_size[0]}x{raw_size[1]} like the first"
                        )
                    yield _even(result, size).tobytes()

            _encode(args, outputs(), timeout, cancelled, progress, total)
        result = probe(tmp)
        check_same_duration(result, info, src.name, "upscaled video")
    result.path = out
    return result


def _encode(
    args: list[str], chunks: Iterator[bytes], timeout: float, cancelled, progress, total: int
) -> None:
    """ffmpeg runs in a helper thread (run_ffmpeg with stdin_chunks); frames are made here, in the caller's
    thread, and handed over through a small queue, so frame_fn's errors and cancellation unwind normally."""
    handoff: queue.Queue = queue.Queue(maxsize=_VIDEO_QUEUE_FRAMES)
    aborted = threading.Event()
    failure: list[BaseException] = []

    def feed() -> Iterator[bytes]:
        while (chunk := handoff.get()) is not None:
            yield chunk

    def encode() -> None:
        try:
            run_ffmpeg(args, timeout, cancelled=aborted.is_set, stdin_chunks=feed())
        except BaseException as e:  # handed to the calling thread below
            failure.append(e)

    worker = threading.Thread(target=encode, name="upscale-video-ffmpeg", daemon=True)
    worker.start()

    def put(item) -> bool:
        while worker.is_alive():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        done = 0
        while True:
            if cancelled is not None and cancelled():
                raise JobCancelledError("video upscale was cancelled")
            chunk = next(chunks, None)
            if chunk is None or not put(chunk):
                break
            done += 1
            if progress is not None:
                progress(done, max(total, done))
        put(None)
        worker.join()
    except BaseException:
        aborted.set()
        _drain_and_close(handoff)
        worker.join()
        raise
    if failure:
        raise failure[0]
