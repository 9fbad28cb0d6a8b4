"""engine.upscale.upscalers: spandrel models (ESRGAN/RRDBNet, SRVGGNetCompact) built here with random weights, tiling
exactness and seams, out-of-memory retries, modes and alpha, sizes, the SD x4 upscaler and video."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.artifacts import TMP_PREFIX
from engine.device import DevicePlan, resolve_device
from engine.errors import InputError, JobCancelledError, NotFoundError, OutOfMemoryError
from engine.generation import modes
from engine.media.ffmpeg import probe
from engine.upscale import upscalers as upscale
from tests.upscale_factories import (
    TINY_RECEPTIVE_RADIUS,
    build_sd_x4,
    make_test_video,
    save_compact,
    save_esrgan,
    save_tiny_receptive,
    save_unknown_model,
)

# Max |tiled - untiled| (0-1 units) allowed for realesr-general-x4v3's architecture (34 3x3 convs, so a
# receptive-field radius of 34 px > DEFAULT_PAD) at the default pad 16 / overlap 16, tile 64, 160 px image.
# The factory's weights keep the signal alive through all layers (residual std 0.1, as a trained model);
# measured ~8e-4 there. The bound is one 8-bit level: at worst a seam pixel rounds to the neighbouring level.
# Without the feather (overlap 0) the same setup measures ~1e-2, and the test checks the feather beats it.
SEAM_BOUND = 1 / 255


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upscale_models")
    return {
        "esrgan_x4": save_esrgan(root / "RealESRGAN_x4plus-tiny.pth", scale=4),
        "esrgan_x2": save_esrgan(root / "RealESRGAN_x2plus-tiny.safetensors", scale=2, fmt="safetensors"),
        "compact_tiny": save_compact(
            root / "compact-tiny.safetensors", num_feat=8, num_conv=4, fmt="safetensors"
        ),
        "x4v3": save_compact(root / "realesr-general-x4v3.pth"),
        "receptive": save_tiny_receptive(root / "receptive-4px.pth"),
        "grey": save_compact(root / "grey-x4.pth", num_feat=8, num_conv=2, in_ch=1),
        "four": save_compact(root / "four-channel.pth", num_feat=8, num_conv=2, in_ch=4),
        "unknown": save_unknown_model(root / "mystery.safetensors"),
    }


@pytest.fixture(scope="module")
def cache() -> upscale.UpscalerCache:
    return upscale.UpscalerCache(max_models=4)


CPU = DevicePlan(device="cpu", dtype="float32")


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def _tensor(width: int, height: int, channels: int = 3, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.rand(1, channels, height, width)


# --- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,architecture,scale",
    [
        ("esrgan_x4", "ESRGAN", 4),
        ("esrgan_x2", "ESRGAN", 2),
        ("compact_tiny", "RealESRGAN Compact", 4),
        ("x4v3", "RealESRGAN Compact", 4),
    ],
)
def test_spandrel_reads_the_saved_weights(models, key, architecture, scale):
    """RRDBNet in Real-ESRGAN's key layout (.pth with params_ema, .safetensors) and SRVGGNetCompact load
    through spandrel; the architecture, scale and channels are reported."""
    info = upscale.inspect_upscaler(models[key], "shown name")
    assert (info.name, info.architecture, info.scale) == ("shown name", architecture, scale)
    assert (info.input_channels, info.output_channels, info.tiling) == (3, 3, "supported")
    assert info.fp16 and info.bf16 and info.size == models[key].stat().st_size
    if key == "esrgan_x2":  # Real-ESRGAN x2 pixel-unshuffles its input: sides must be multiples of 4
        assert info.size_multiple == 4
    assert upscale.inspect_upscaler(models[key]).name == models[key].name


@pytest.mark.parametrize("key", ["esrgan_x4", "compact_tiny"])
def test_64_px_becomes_256_px(models, cache, key):
    model = cache.get(models[key], CPU)
    assert model.scale == 4
    assert tuple(upscale.tile_upscale(model, _tensor(64, 64), tile=0).shape) == (1, 3, 256, 256)
    assert tuple(upscale.tile_upscale(model, _tensor(64, 64), tile=32, overlap=8).shape) == (1, 3, 256, 256)
    out = upscale.upscale_image(_noise(64, 64), models[key], scale=4.0, cache=cache)
    assert (out.size, out.mode) == ((256, 256), "RGB")


def test_x2plus_layout_pads_to_its_size_multiple(models, cache):
    """The x2 model wants sides that are multiples of 4: a 33x21 image (and its odd tiles) still works."""
    out = upscale.upscale_image(_noise(33, 21), models["esrgan_x2"], scale=2.0, cache=cache, tile=0)
    assert out.size == (66, 42)
    model = cache.get(models["esrgan_x2"], CPU)
    assert tuple(upscale.tile_upscale(model, _tensor(33, 21), tile=16, overlap=4).shape) == (1, 3, 42, 66)


def test_unknown_architecture_is_refused_naming_the_file(models, cache):
    with pytest.raises(
        InputError, match=r"mystery\.safetensors.*unknown model architecture.*ESRGAN.*SRVGGNetCompact"
    ):
        upscale.inspect_upscaler(models["unknown"])
    with pytest.raises(InputError, match=r"mystery\.safetensors"):
        upscale.upscale_image(_noise(16, 16), models["unknown"], scale=2.0, cache=cache)
    with pytest.raises(NotFoundError, match="nope.pth"):
        upscale.inspect_upscaler(models["unknown"].with_name("nope.pth"))


def test_model_channel_counts(models, cache):
    """A 1-channel model is fed grey; RGB images come back RGB. Other channel counts are refused."""
    out = upscale.upscale_image(_noise(20, 16), models["grey"], scale=4.0, cache=cache)
    assert (out.size, out.mode) == ((80, 64), "RGB")
    a = np.asarray(out).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    with pytest.raises(InputError, match="4 input channels; supported: 1 .* or 3"):
        upscale.upscale_image(_noise(20, 16), models["four"], scale=4.0, cache=cache)


def test_cache_is_lru_and_frees_evicted_models(models, monkeypatch):
    import torch

    freed: list[str] = []
    monkeypatch.setattr(upscale, "free_memory", lambda device: freed.append(device))
    small = upscale.UpscalerCache(max_models=1)
    first = small.get(models["receptive"], CPU)
    assert small.get(models["receptive"], CPU) is first
    assert first.dtype == torch.float32 and str(first.device) == "cpu" and not first.model.training
    small.get(models["compact_tiny"], CPU)
    assert len(small) == 1 and freed == ["cpu"]
    assert small.get(models["receptive"], CPU) is not first


def test_bfloat16_plan_loads_the_model_in_bfloat16(models):
    import torch

    model = upscale.UpscalerCache().get(models["receptive"], DevicePlan(device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    out = upscale.tile_upscale(model, _tensor(24, 20), tile=16, overlap=4)
    assert out.dtype == torch.float32 and tuple(out.shape) == (1, 3, 80, 96)


# --- tiling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "width,height,tile,overlap",
    [(53, 37, 16, 8), (53, 37, 24, 4), (53, 37, 20, 0), (61, 29, 40, 16), (17, 45, 8, 4)],
)
def test_tiles_equal_untiled_when_the_receptive_field_fits_the_pad(
    models, cache, width, height, tile, overlap
):
    """The 4-px-radius model with pad 16 (> 4): every tiled output equals the one-pass output (float
    tolerance), at odd image sizes and several tile/overlap choices."""
    model = cache.get(models["receptive"], CPU)
    x = _tensor(width, height, seed=width)
    whole = upscale.tile_upscale(model, x, tile=0)
    tiled = upscale.tile_upscale(model, x, tile=tile, overlap=overlap)
    assert tuple(tiled.shape) == (1, 3, height * 4, width * 4)
    assert float((tiled - whole).abs().max()) < 1e-5
    # ... and with just enough context (pad == the 4 px radius) too; one px less, and the seams show
    exact = upscale.tile_upscale(model, x, tile=tile, pad=TINY_RECEPTIVE_RADIUS, overlap=0)
    assert float((exact - whole).abs().max()) < 1e-5
    short = upscale.tile_upscale(model, x, tile=tile, pad=TINY_RECEPTIVE_RADIUS - 1, overlap=0)
    assert float((short - whole).abs().max()) > 1e-3


def test_seam_error_of_a_full_size_compact_is_bounded(models, cache):
    """realesr-general-x4v3's architecture, 160 px image, tile 64 at the default pad/overlap."""
    model = cache.get(models["x4v3"], CPU)
    x = _tensor(160, 160, seed=3)
    whole = upscale.tile_upscale(model, x, tile=0)
    seam = float((upscale.tile_upscale(model, x, tile=64) - whole).abs().max())
    no_feather = float((upscale.tile_upscale(model, x, tile=64, overlap=0) - whole).abs().max())
    assert seam < SEAM_BOUND, seam
    assert seam < no_feather, (seam, no_feather)


def test_progress_and_cancel_between_tiles(models, cache):
    model = cache.get(models["receptive"], CPU)
    seen: list[tuple[int, int]] = []
    upscale.tile_upscale(
        model, _tensor(50, 30), tile=20, overlap=4, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(i, 6) for i in range(1, 7)]  # 3 x 2 cells
    calls = []
    with pytest.raises(JobCancelledError):
        upscale.tile_upscale(
            model,
            _tensor(50, 30),
            tile=20,
            overlap=4,
            progress=lambda d, t: calls.append(d),
            cancelled=lambda: len(calls) >= 2,
        )
    assert calls == [1, 2]


def test_tiling_arguments_are_checked(models, cache):
    model = cache.get(models["receptive"], CPU)
    with pytest.raises(InputError, match="overlap must be at most half the tile"):
        upscale.tile_upscale(model, _tensor(40, 40), tile=16, overlap=9)
    with pytest.raises(InputError, match="pad must be an integer >= 0"):
        upscale.tile_upscale(model, _tensor(40, 40), tile=16, pad=-1)
    with pytest.raises(InputError, match=f"tile must be 0 .auto. or at least {upscale.MIN_TILE}"):
        upscale.upscale_image(_noise(40, 40), models["receptive"], scale=2.0, cache=cache, tile=32)


def test_out_of_memory_halves_the_tile_and_succeeds(models, cache, monkeypatch):
    import torch
    from spandrel import ImageModelDescriptor

    real_call = ImageModelDescriptor.__call__
    sides: list[int] = []
    freed: list[str] = []

    def small_tiles_only(self, image):
        side = max(image.shape[-2:])
        sides.append(side)
        if side > 150:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a {side} px tile")
        return real_call(self, image)

    monkeypatch.setattr(ImageModelDescriptor, "__call__", small_tiles_only)
    monkeypatch.setattr(upscale, "free_memory", lambda device: freed.append(device))
    image = _noise(300, 300)
    out = upscale.upscale_image(image, models["receptive"], scale=1.0, cache=cache, tile=256)
    assert out.size == (300, 300) and freed == ["cpu"]
    assert sides[0] > 150 and max(sides[1:]) <= 150  # tile 256 (174 px model inputs) failed, 128 (148) ran
    monkeypatch.setattr(ImageModelDescriptor, "__call__", real_call)
    expected = upscale.upscale_image(image, models["receptive"], scale=1.0, cache=cache, tile=128)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_out_of_memory_at_the_smallest_tile_names_tile_and_size(models, cache, monkeypatch):
    import torch
    from spandrel import ImageModelDescriptor

    def always(self, image):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ImageModelDescriptor, "__call__", always)
    with pytest.raises(OutOfMemoryError, match=r"200x120 image .* tile 64 px"):
        upscale.upscale_image(_noise(200, 120), models["receptive"], scale=2.0, cache=cache, tile=128)


def test_other_errors_are_not_retried(models, cache, monkeypatch):
    from spandrel import ImageModelDescriptor

    calls = []

    def broken(self, image):
        calls.append(1)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ImageModelDescriptor, "__call__", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        upscale.upscale_image(_noise(200, 120), models["receptive"], scale=2.0, cache=cache, tile=128)
    assert len(calls) == 1


def test_auto_tile(monkeypatch):
    import torch

    assert upscale.auto_tile(CPU, 4, 512, 300) == 0
    assert upscale.auto_tile(CPU, 4, 1024, 600) == upscale.DEFAULT_TILE
    gpu = DevicePlan(device="cuda:0", dtype="float16")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert upscale.auto_tile(gpu, 4, 4096, 4096) == 1024
    # 2 GiB free -> 1.2 GiB budget; (tile + 48)^2 px x (384 + 131 * 16) values x 2 bytes must fit
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    per_px = 2 * (384 + 131 * 16)
    fits = [t for t in upscale.AUTO_TILES if (t + 48) ** 2 * per_px <= 0.6 * 2 * 2**30]
    assert upscale.auto_tile(gpu, 4, 4096, 4096) == fits[0] == 384
    assert upscale.auto_tile(gpu, 4, 300, 200) == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert upscale.auto_tile(gpu, 4, 4096, 4096) == 128


# --- images: modes, alpha, sizes ---------------------------------------------------------------------
def test_alpha_survives(models, cache):
    """RGBA in, RGBA out; the alpha channel is the source alpha Lanczos-resized, untouched by the model."""
    rgb = _noise(48, 40)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (40, 1)))
    image = Image.merge("RGBA", (*rgb.split(), alpha))
    out = upscale.upscale_image(image, models["compact_tiny"], scale=4.0, cache=cache)
    assert (out.mode, out.size) == ("RGBA", (192, 160))
    expected = alpha.resize((192, 160), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected))
    lanczos = upscale.upscale_image(image, None, scale=4.0)
    assert lanczos.mode == "RGBA" and np.array_equal(
        np.asarray(lanczos.getchannel("A")), np.asarray(expected)
    )


@pytest.mark.parametrize(
    "mode,expected", [("L", "L"), ("LA", "LA"), ("P", "RGB"), ("1", "L"), ("CMYK", "RGB")]
)
def test_modes_are_kept_or_converted_sensibly(models, cache, mode, expected):
    image = _noise(24, 18, mode)
    out = upscale.upscale_image(image, models["compact_tiny"], scale=2.0, cache=cache)
    assert (out.mode, out.size) == (expected, (48, 36))
    assert upscale.upscale_image(image, None, scale=2.0).mode == expected


def test_sixteen_bit_grey_stays_sixteen_bit(models, cache):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 65536, (18, 24), dtype=np.uint16))
    assert image.mode == "I;16"
    out = upscale.upscale_image(image, models["grey"], scale=4.0, cache=cache)
    assert (out.mode, out.size) == ("I;16", (96, 72))
    assert np.asarray(out).max() > 255  # the model saw (and returned) the full 16-bit range


def test_scale_below_the_model_and_target_size(models, cache):
    image = _noise(40, 30)
    assert upscale.upscale_image(image, models["compact_tiny"], scale=2.0, cache=cache).size == (80, 60)
    assert upscale.upscale_image(image, models["compact_tiny"], target=(100, 61), cache=cache).size == (
        100,
        61,
    )
    assert upscale.upscale_image(image, None, scale=1.5).size == (60, 45)


def test_scale_above_the_model_runs_it_again(models, cache, monkeypatch):
    from spandrel import ImageModelDescriptor

    real_call = ImageModelDescriptor.__call__
    inputs: list[tuple[int, int]] = []

    def counting(self, image):
        inputs.append(tuple(image.shape[-2:]))
        return real_call(self, image)

    monkeypatch.setattr(ImageModelDescriptor, "__call__", counting)
    out = upscale.upscale_image(_noise(20, 12), models["compact_tiny"], scale=8.0, cache=cache)
    assert out.size == (160, 96)
    # 20x12 -> 80x48; the second pass starts from 40x24 (= 160x96 / 4), so no buffer exceeds the final size
    assert inputs == [(12, 20), (24, 40)]


def test_size_arguments_are_checked(models, cache):
    image = _noise(40, 30)
    with pytest.raises(InputError, match="exactly one of scale"):
        upscale.upscale_image(image, models["compact_tiny"], cache=cache)
    with pytest.raises(InputError, match="exactly one of scale"):
        upscale.upscale_image(image, None, scale=2.0, target=(80, 60))
    with pytest.raises(InputError, match=r"scale must be in \(0, 16\]"):
        upscale.upscale_image(image, None, scale=17.0)
    with pytest.raises(InputError, match="target must be"):
        upscale.upscale_image(image, None, target=(0, 60))


def test_too_large_input_is_refused(models, cache):
    with pytest.raises(InputError, match=r"image 100x80 -> 200x160 px is larger than max_pixels=4096"):
        upscale.upscale_image(
            _noise(100, 80), models["compact_tiny"], scale=2.0, cache=cache, max_pixels=64 * 64
        )
    with pytest.raises(InputError, match=r"image 60x50 -> 240x200 px is larger than max_pixels=16384"):
        upscale.upscale_image(_noise(60, 50), None, scale=4.0, max_pixels=128 * 128)


def test_hires_fix_upscale_goes_through_this_module(models):
    """engine.generation.modes.upscale_image (hires fix) keeps its signature and its refusal wording."""
    image = _noise(32, 24)
    out = modes.upscale_image(image, 48, 36, models["compact_tiny"], "cpu")
    ours = upscale.upscale_image(image, models["compact_tiny"], target=(48, 36), plan=resolve_device("cpu"))
    assert out.size == (48, 36) and np.array_equal(np.asarray(out), np.asarray(ours))
    assert modes.upscale_image(image, 48, 36, None).size == (48, 36)
    with pytest.raises(
        InputError, match=r"hr_upscaler 'mystery.safetensors' is not an upscale model spandrel can load"
    ):
        modes.upscale_image(image, 48, 36, models["unknown"])


# --- SD x4 --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_x4(tmp_path_factory):
    folder = build_sd_x4(tmp_path_factory.mktemp("sd_x4") / "tiny-sd-x4")
    return upscale.load_sd_x4(folder, resolve_device("cpu"))


def test_sd_x4_untiled_and_tiled(sd_x4):
    image = _noise(32, 32)
    steps: list[int] = []
    whole = upscale.sd_x4_upscale(
        sd_x4,
        image,
        prompt="a cat",
        steps=2,
        tile=0,
        seed=1,
        callback_on_step_end=lambda pipe, i, t, kw: steps.append(i),
    )
    assert (whole.size, whole.mode) == ((128, 128), "RGB") and steps == [0, 1]
    again = upscale.sd_x4_upscale(sd_x4, image, prompt="a cat", steps=2, tile=0, seed=1)
    assert np.array_equal(np.asarray(whole), np.asarray(again))  # seeded
    seen: list[tuple[int, int]] = []
    tiled = upscale.sd_x4_upscale(
        sd_x4, image, steps=1, tile=16, overlap=8, progress=lambda d, t: seen.append((d, t))
    )
    assert tiled.size == (128, 128) and seen[-1] == (4, 4)


def test_sd_x4_keeps_alpha_and_resizes(sd_x4):
    image = _noise(20, 12, "RGBA")
    out = upscale.sd_x4_upscale(sd_x4, image, steps=1, tile=0, scale=2.0)
    assert (out.mode, out.size) == ("RGBA", (40, 24))
    assert upscale.sd_x4_upscale(sd_x4, _noise(20, 12, "L"), steps=1, target=(50, 30)).size == (50, 30)


@pytest.mark.parametrize("noise_level", [-1, 351, 2.5])
def test_sd_x4_refuses_noise_level_out_of_range(sd_x4, noise_level):
    with pytest.raises(InputError, match=r"noise_level must be an integer in \[0, 350\]"):
        upscale.sd_x4_upscale(sd_x4, _noise(16, 16), noise_level=noise_level, steps=1)


def test_sd_x4_missing_folder(tmp_path):
    with pytest.raises(NotFoundError, match="model_index.json"):
        upscale.load_sd_x4(tmp_path / "none", resolve_device("cpu"))


# --- video ----------------------------------------------------------------------------------------------
def _frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _no_temp_left(folder: Path) -> bool:
    return not [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]


def test_video_upscale_keeps_frames_fps_and_audio(models, cache, tmp_path):
    src = make_test_video(tmp_path / "clip.mp4", seconds=1, fps=8, size=(64, 48), audio=True)
    seen: list[tuple[int, int]] = []
    out = upscale.upscale_video(
        src,
        tmp_path / "out" / "clip-x2.mp4",
        lambda frame: upscale.upscale_image(frame, models["receptive"], scale=2.0, cache=cache),
        progress=lambda d, t: seen.append((d, t)),
    )
    source = probe(src)
    assert (out.width, out.height) == (128, 96) and out.path == tmp_path / "out" / "clip-x2.mp4"
    assert out.fps == source.fps == 8 and out.has_audio and out.audio_codec == "aac"
    assert abs(out.duration - source.duration) < 0.2
    assert _frames(out.path) == _frames(src) == 8 and seen[-1] == (8, 8)
    assert _no_temp_left(tmp_path / "out")


def test_odd_frame_sizes_are_made_even(tmp_path):
    src = make_test_video(tmp_path / "clip.mp4", seconds=0.5, fps=8, size=(32, 24), audio=False)
    out = upscale.upscale_video(src, tmp_path / "odd.mp4", lambda f: f.resize((51, 37)))
    assert (out.width, out.height) == (50, 36) and not out.has_audio and _frames(out.path) == 4


def test_truncated_video_fails_and_leaves_no_output(tmp_path):
    src = make_test_video(tmp_path / "clip.mp4", seconds=1, fps=8, size=(64, 48), audio=True)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out.mp4"
    with pytest.raises(InputError, match="broken.mp4"):
        upscale.upscale_video(broken, out, lambda frame: frame)
    assert not out.exists() and _no_temp_left(tmp_path)


def test_frame_size_changes_and_cancel_leave_no_output(tmp_path):
    src = make_test_video(tmp_path / "clip.mp4", seconds=1, fps=8, size=(64, 48), audio=True)
    calls = []

    def shrinking(frame):
        calls.append(1)
        return frame if len(calls) < 3 else frame.resize((32, 24))

    with pytest.raises(InputError, match="every frame must come back 64x48"):
        upscale.upscale_video(src, tmp_path / "a.mp4", shrinking)
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 4

    with pytest.raises(JobCancelledError):
        upscale.upscale_video(src, tmp_path / "b.mp4", lambda f: f, cancelled=cancelled)
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists() and _no_temp_left(tmp_path)
