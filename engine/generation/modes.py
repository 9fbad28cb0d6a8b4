"""Image-side work for inpaint, outpaint, hires fix, variation seeds and ControlNet inputs.

Pure functions over PIL images and tensors, so each one is tested on its own. Pixel work uses
Pillow, numpy and opencv (cv2.inpaint for "fill", cv2.Canny for ControlNet), never hand-rolled loops.
"""

from __future__ import annotations

from pathlib import Path

from engine.device import resolve_device
from engine.errors import InputError
from engine.upscale import upscalers as upscale

MAX_INPUT_PIXELS = 4096 * 4096
HIRES_LATENT_MODES = {"Latent": "bilinear", "Latent (nearest)": "nearest"}


def open_image(path: str | Path, what: str, mode: str = "RGB"):
    """Open and verify an input image; errors name the parameter and the problem."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p.name!r} was not uploaded or no longer exists")
    try:
        with Image.open(p) as probe:
            probe.verify()
        img = Image.open(p)
        if img.width * img.height > MAX_INPUT_PIXELS:
            raise InputError(f"{what} is {img.width}x{img.height}; at most {MAX_INPUT_PIXELS} pixels")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"{what} {p.name!r} is not a readable image (PNG, JPEG or WebP): {e}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} {p.name!r} is too large to decode safely: {e}") from None
    if mode == "L" and img.mode in ("RGBA", "LA"):
        # A mask drawn on a transparent layer (gr.ImageEditor): painted = opaque.
        return img.getchannel("A")
    return img.convert(mode)


def fit(img, width: int, height: int):
    from PIL import Image

    return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.LANCZOS)


def prepare_mask(mask, blur: int):
    """Binary mask (white = repaint) and its blurred copy used to paste the result back."""
    from PIL import ImageFilter

    binary = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if binary.getbbox() is None:
        raise InputError("mask_image is empty: paint the area to change in white (or draw on it)")
    blurred = binary.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else binary
    return binary, blurred


def outpaint_canvas(image, left: int, right: int, up: int, down: int, overlap: int = 8):
    """Extend the canvas: the new area starts as the image's edges stretched out, and the mask covers it
    (plus `overlap` pixels into the original so the seam is repainted too)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image)
    padded = np.pad(arr, ((up, down), (left, right), (0, 0)), mode="edge")
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    h, w = arr.shape[:2]
    top, bottom = up + (overlap if up else 0), up + h - (overlap if down else 0)
    lft, rgt = left + (overlap if left else 0), left + w - (overlap if right else 0)
    mask[top:bottom, lft:rgt] = 0
    return Image.fromarray(padded), Image.fromarray(mask)


def fill_masked(image, mask, how: str, seed: int):
    """A1111's "masked content": what the masked area holds before denoising."""
    import numpy as np
    from PIL import Image

    if how == "original":
        return image
    arr = np.asarray(image).copy()
    m = np.asarray(mask) > 127
    if how == "fill":
        import cv2

        filled = cv2.inpaint(arr, m.astype(np.uint8) * 255, 9, cv2.INPAINT_TELEA)
        return Image.fromarray(filled)
    if how == "latent noise":
        rng = np.random.default_rng(seed)
        arr[m] = rng.integers(0, 256, size=(int(m.sum()), 3), dtype=np.uint8)
        return Image.fromarray(arr)
    if how == "latent nothing":
        arr[m] = 127
        return Image.fromarray(arr)
    raise InputError(f"masked_content={how!r}; allowed: original, fill, latent noise, latent nothing")


def paste_back(original, generated, blurred_mask):
    """Outside the mask the original pixels, exactly; inside the generated ones, blended at the edge."""
    from PIL import Image

    return Image.composite(generated.convert("RGB"), original.convert("RGB"), blurred_mask)


def canny(image, low: int = 100, high: int = 200):
    import cv2
    import numpy as np
    from PIL import Image

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


# --- tensors -------------------------------------------------------------------------------------
def slerp(t: float, low, high):
    """Spherical interpolation between two noise tensors (A1111's variation seed)."""
    import torch

    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(
        1
    ) * high


def initial_noise(seeds: list[int], shape: tuple[int, int, int], subseed: int, strength: float):
    """Starting latents for each seed, drawn on the CPU (same picture on any device), with the
    variation seed mixed in by `strength` exactly as A1111 does (image k uses subseed + k)."""
    import torch

    out = []
    for k, seed in enumerate(seeds):
        noise = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed))
        if strength > 0:
            sub = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(subseed + k))
            noise = slerp(strength, noise, sub)
        out.append(noise)
    return torch.cat(out)


def upscale_latents(latents, width: int, height: int, upscaler: str, vae_scale_factor: int = 8):
    import torch.nn.functional as F

    mode = HIRES_LATENT_MODES[upscaler]
    kwargs = {"antialias": False, "align_corners": False} if mode == "bilinear" else {}
    size = (height // vae_scale_factor, width // vae_scale_factor)
    return F.interpolate(latents, size=size, mode=mode, **kwargs)


def upscale_image(image, width: int, height: int, model_path: Path | None, device: str = "cpu"):
    """Lanczos, or an ESRGAN-family model loaded through spandrel, then resized to the exact target
    (engine.upscale.upscalers.upscale_image: tiled, alpha and mode kept)."""
    if model_path is None:
        return upscale.upscale_image(image, None, target=(width, height))
    try:
        return upscale.upscale_image(image, model_path, target=(width, height), plan=resolve_device(device))
    except upscale.UnsupportedUpscalerError as e:
        raise InputError(
            f"hr_upscaler {model_path.name!r} is not an upscale model spandrel can load: {e}"
        ) from None
