"""Upscale models and media built here with random weights, in the layouts the real files use.

- save_esrgan: RRDBNet in Real-ESRGAN's (basicsr) key layout: conv_first, body.N.rdbM.convK, conv_body,
  conv_up1/2, conv_hr, conv_last, under "params_ema" as RealESRGAN_x4plus.pth ships. Scale 2 and 1 use
  Real-ESRGAN's pixel-unshuffle input (RealESRGAN_x2plus: 12 input channels). Spandrel reads it as "ESRGAN".
- save_compact: SRVGGNetCompact (body.0 ... body.N), "params" key as realesr-general-x4v3.pth ships;
  defaults are realesr-general-x4v3's size (64 features, 32 convs). Spandrel reads it as "RealESRGAN Compact".
- save_tiny_receptive: a Compact with num_conv=2, i.e. four 3x3 convs (first, two body, last) plus a
  pixel shuffle and a nearest-upsampled skip: its receptive-field radius is 4 input px (< DEFAULT_PAD).
- build_sd_x4: a tiny StableDiffusionUpscalePipeline at diffusers' own test sizes, saved with save_pretrained.
- make_test_video: an H.264 + AAC MP4 from lavfi testsrc + sine.
"""

from __future__ import annotations

from pathlib import Path

TINY_RECEPTIVE_RADIUS = 4  # input px: four stacked 3x3 convs
RESIDUAL_STD = 0.1  # what save_compact's random net adds to the nearest-upsampled input (0-1 units)


def _save_state(state: dict, path: Path, fmt: str, wrapper: str | None) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif fmt == "pth":
        torch.save({wrapper: state} if wrapper else state, str(path))
    else:
        raise ValueError(f"fmt must be 'pth' or 'safetensors', got {fmt!r}")
    return path


def _conv(state: dict, name: str, out_ch: int, in_ch: int, gain: float = 1.0) -> None:
    import torch

    conv = torch.nn.Conv2d(in_ch, out_ch, 3, 1, 1)
    state[f"{name}.weight"] = conv.weight.data * gain
    state[f"{name}.bias"] = conv.bias.data * gain


def save_esrgan(
    path: Path, scale: int = 4, num_feat: int = 8, num_block: int = 1, fmt: str = "pth", seed: int = 3
) -> Path:
    """An RRDBNet (ESRGAN / Real-ESRGAN) with random weights. num_feat=64, num_block=23 is RealESRGAN_x4plus;
    num_block=6 the anime_6B model; the defaults make a tiny one for fast tests. Grow channels are 32, as in
    every released ESRGAN (spandrel assumes it)."""
    import torch

    if scale not in (1, 2, 4):
        raise ValueError(f"scale must be 1, 2 or 4 (Real-ESRGAN's layouts), got {scale}")
    torch.manual_seed(seed)
    grow = 32
    in_ch = 3 * {4: 1, 2: 4, 1: 16}[scale]  # pixel-unshuffled input for x2 / x1
    state: dict = {}
    _conv(state, "conv_first", num_feat, in_ch)
    for b in range(num_block):
        for r in range(1, 4):
            for k in range(1, 6):
                out_ch = grow if k < 5 else num_feat
                _conv(state, f"body.{b}.rdb{r}.conv{k}", out_ch, num_feat + (k - 1) * grow, gain=0.1)
    _conv(state, "conv_body", num_feat, num_feat)
    _conv(state, "conv_up1", num_feat, num_feat)
    _conv(state, "conv_up2", num_feat, num_feat)
    _conv(state, "conv_hr", num_feat, num_feat)
    _conv(state, "conv_last", 3, num_feat)
    return _save_state(state, path, fmt, "params_ema")


def save_compact(
    path: Path,
    scale: int = 4,
    num_feat: int = 64,
    num_conv: int = 32,
    fmt: str = "pth",
    seed: int = 4,
    in_ch: int = 3,
) -> Path:
    """An SRVGGNetCompact with random weights. The defaults are realesr-general-x4v3's architecture;
    num_feat=64, num_conv=16 is realesr-animevideov3's.

    The weights keep the signal alive through every layer as a trained network does (He init for the PReLU
    slope 0.25, zero biases) and the last conv is scaled so the residual over the nearest-upsampled input
    has std RESIDUAL_STD on uniform noise. PyTorch's default init instead shrinks the signal layer by layer
    (residual std ~0.02 after 34 convs), which would make far pixels count for nothing and hide seams."""
    import torch
    import torch.nn.functional as F
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=in_ch, num_out_ch=in_ch, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        torch.nn.init.kaiming_normal_(conv.weight, a=0.25, nonlinearity="leaky_relu")
        torch.nn.init.zeros_(conv.bias)
    probe = torch.rand(1, in_ch, 32, 32)
    with torch.no_grad():
        residual = model(probe) - F.interpolate(probe, scale_factor=scale, mode="nearest")
        convs[-1].weight.mul_(RESIDUAL_STD / float(residual.std()))
    return _save_state(model.state_dict(), path, fmt, "params")


def save_tiny_receptive(path: Path, scale: int = 4, fmt: str = "pth") -> Path:
    """A Compact whose receptive-field radius is TINY_RECEPTIVE_RADIUS (4) input px: tiled with pad >= 4 it
    must equal its untiled output to float tolerance."""
    return save_compact(path, scale=scale, num_feat=8, num_conv=2, fmt=fmt, seed=6)


def save_unknown_model(path: Path) -> Path:
    """Random tensors under keys no spandrel architecture knows."""
    import torch

    torch.manual_seed(7)
    state = {"encoder.stem.weight": torch.randn(8, 3, 3, 3), "decoder.head.bias": torch.randn(3)}
    return _save_state(state, path, "safetensors" if Path(path).suffix == ".safetensors" else "pth", None)


def build_sd_x4_pipeline():
    """A tiny StableDiffusionUpscalePipeline (diffusers' test_stable_diffusion_upscale sizes): UNet with
    7 input channels (4 latent + 3 image) and class-embedded noise level, a 3-level VAE (scale factor 4),
    a 5-layer 32-wide CLIP text encoder and the demo's local byte tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    from engine.model_manager.demo_model import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        scaling_factor=0.08333,
    )
    torch.manual_seed(0)
    text_encoder = build_text_encoder(hidden_act="gelu", projection_dim=512)
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    )


def build_sd_x4(folder: Path) -> Path:
    """build_sd_x4_pipeline() saved with save_pretrained into `folder` (a diffusers folder)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_sd_x4_pipeline().save_pretrained(str(folder))
    return folder


def make_test_video(
    path: Path, seconds: float = 1, fps: int = 8, size: tuple[int, int] = (64, 48), audio: bool = True
) -> Path:
    """An H.264 (yuv420p) MP4 of lavfi's testsrc, with a 440 Hz AAC tone when `audio`."""
    from engine.media.ffmpeg import run_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["-f", "lavfi", "-i", f"testsrc=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-t", str(seconds)]
    if audio:
        args += ["-c:a", "aac", "-b:a", "96k"]
    run_ffmpeg([*args, "-y", f"file:{path.resolve()}"], timeout=60)
    return path
