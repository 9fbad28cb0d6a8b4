"""Tiny video models built locally (diffusers' own test sizes, random weights) and saved as ordinary
diffusers folders, so the engine loads them with from_pretrained exactly like real ones."""

from __future__ import annotations

from pathlib import Path

SEED = 0


def build_tiny_svd(folder: Path) -> Path:
    """Stable Video Diffusion at the sizes of diffusers' test_stable_video_diffusion.py."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            # SVD always resizes its conditioning image to 224 px: 16x16 patches of 14 px keep it tiny
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            image_size=224,
            intermediate_size=37,
            patch_size=14,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    pipe = StableVideoDiffusionPipeline(
        unet=unet,
        image_encoder=image_encoder,
        scheduler=scheduler,
        vae=vae,
        feature_extractor=feature_extractor,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_t5_tokenizer(vocab_size: int = 1000):
    """A T5 tokenizer made here: a Unigram model over the printable ASCII characters (anything else is
    <unk>, so any text tokenizes), wrapped in transformers' T5 tokenizer class so it saves and loads as one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    pieces = [(s, 0.0) for s in specials]
    pieces += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    pieces += [("▁" + chr(c), -2.0) for c in range(33, 127)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces.append(("▁", -4.0))
    pieces = pieces[:vocab_size]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁")])
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=128,
    )


def build_tiny_ltx(folder: Path) -> Path:
    """LTX-Video at the sizes of diffusers' tests/pipelines/ltx/test_ltx.py; the T5 encoder is a tiny
    random T5 (hf-internal-testing/tiny-random-t5's shape) and the tokenizer is built here."""
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    tokenizer = build_t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = LTXPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def _demo_unet_config(base_model: Path | None) -> dict:
    import json

    if base_model is None:
        return {"block_out_channels": [32, 64], "layers_per_block": 2, "norm_num_groups": 32}
    return json.loads((Path(base_model) / "unet" / "config.json").read_text(encoding="utf-8"))


def build_tiny_motion_adapter(folder: Path, base_model: Path | None = None):
    """A MotionAdapter whose blocks match the demo SD1 UNet (engine.model_manager.demo_model): channels, layers per
    block and norm groups read from `base_model`'s unet/config.json when given."""
    import torch
    from diffusers import MotionAdapter

    unet = _demo_unet_config(base_model)
    torch.manual_seed(SEED)
    adapter = MotionAdapter(
        block_out_channels=tuple(unet["block_out_channels"]),
        motion_layers_per_block=unet["layers_per_block"],
        motion_norm_num_groups=unet["norm_num_groups"],
        motion_num_attention_heads=8,  # what the original AnimateDiff modules use, so a single file matches
        motion_max_seq_length=32,
    )
    adapter.save_pretrained(folder, safe_serialization=True)
    return adapter


# diffusers MotionAdapter key fragments -> the original AnimateDiff (guoyww) names; the inverse of
# diffusers.loaders.single_file_utils.convert_animatediff_checkpoint_to_diffusers
_TO_ORIGINAL = (
    (".norm1", ".norms.0"),
    (".norm2", ".norms.1"),
    (".norm3", ".ff_norm"),
    (".attn1", ".attention_blocks.0"),
    (".attn2", ".attention_blocks.1"),
)


def save_motion_adapter_single_file(path: Path, base_model: Path | None = None) -> Path:
    """The same tiny adapter as one .safetensors in the original AnimateDiff layout (what
    ComfyUI-AnimateDiff-Evolved users keep in models/animatediff_models, e.g. mm_sd_v15_v2.safetensors)."""
    import re
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        adapter = build_tiny_motion_adapter(Path(tmp), base_model)
    out = {}
    for key, tensor in adapter.state_dict().items():
        new = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        new = new.replace(".pos_embed.", ".attention_blocks.0.pos_encoder.")
        for a, b in _TO_ORIGINAL:
            new = new.replace(a, b)
        out[new] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path
