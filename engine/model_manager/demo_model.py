"""The built-in demo model: a tiny random-weight Stable Diffusion 1.x pipeline built locally.

Nothing is fetched: the CLIP tokenizer's vocabulary is generated here (byte-level, one token per
byte plus end-of-word forms, so any prompt tokenizes), the UNet/VAE/text encoder use the sizes of
diffusers' own tests. The result is saved as an ordinary diffusers folder under
models/diffusers/ and then loaded by exactly the same code as any real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.artifacts import atomic_dir

DEMO_MODEL_NAME = "studionova-demo"
DEMO_LABEL = "demo (random weights)"
DEMO_SEED = 20260101
_MARKER = "studionova_demo.json"


def _byte_unicode() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: every byte gets a printable character.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def build_tokenizer():
    """A CLIPTokenizer whose vocabulary is the 256 byte symbols and their end-of-word forms."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_text_encoder(**overrides):
    """The demo's CLIP text encoder (diffusers test sizes), matching build_tokenizer's 514-token vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=514,
        max_position_embeddings=77,
    )
    return CLIPTextModel(CLIPTextConfig(**{**config, **overrides}))


def build_demo_pipeline():
    """The pipeline object with deterministic random weights (diffusers test sizes)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(DEMO_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = build_text_encoder()
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    tokenizer = build_tokenizer()
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def demo_model_path(models_dir: Path) -> Path:
    return Path(models_dir) / "diffusers" / DEMO_MODEL_NAME


def is_demo_folder(path: Path) -> bool:
    return (Path(path) / _MARKER).is_file()


def ensure_demo_model(models_dir: Path) -> Path:
    """Build and save the demo model once; later calls return the existing folder.

    Saved into a temp folder beside the target and renamed into place, so an interrupted build
    never leaves a half-written model that the model list would show.
    """
    target = demo_model_path(models_dir)
    if is_demo_folder(target):
        return target
    with atomic_dir(target) as tmp:  # a leftover folder without the marker is replaced
        pipe = build_demo_pipeline()
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps({"label": DEMO_LABEL, "seed": DEMO_SEED}), encoding="utf-8")
    return target
