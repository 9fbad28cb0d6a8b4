"""Tiny real things the tests build: LoRA files for the demo model, images, a launched app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def make_lora_state(model_dir: Path, rank: int = 4, alpha: float = 4.0, seed: int = 0, scale: float = 1.0):
    """PEFT LoRA weights (random A and B, so the LoRA visibly changes the output) for the demo model's
    UNet attention and text-encoder attention; returns (unet_state, te_state) with PEFT key names."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    te.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )
    )
    unet_state = {k: v * scale for k, v in get_peft_model_state_dict(unet).items()}
    te_state = {k: v * scale for k, v in get_peft_model_state_dict(te).items()}
    return unet_state, te_state


def save_diffusers_lora(path: Path, model_dir: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionPipeline

    unet_state, te_state = make_lora_state(model_dir, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=unet_state, text_encoder_lora_layers=te_state, weight_name=path.name
    )
    return path


def save_kohya_lora(path: Path, model_dir: Path, seed: int = 1, rank: int = 4, alpha: float = 2.0) -> Path:
    """kohya layout: lora_unet_/lora_te_ prefixes, lora_down/lora_up, explicit alpha."""
    import torch
    from safetensors.torch import save_file

    unet_state, te_state = make_lora_state(model_dir, rank=rank, alpha=alpha, seed=seed)
    out = {}
    for prefix, state in (("lora_unet", unet_state), ("lora_te", te_state)):
        for key, tensor in state.items():
            module, _, kind = key.rpartition(".lora_")
            if prefix == "lora_te" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names CLIP modules as transformers 4 did
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def save_loha(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.hada_w1_a": torch.zeros(4, 4),
            f"{key}.hada_w1_b": torch.zeros(4, 4),
            f"{key}.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py ...` in a subprocess, as a user would start it."""

    def __init__(
        self, data_dir: Path, models_dir: Path, *extra: str, port: int | None = None, env: dict | None = None
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = [
            sys.executable,
            str(REPO / "app.py"),
            "--demo",
            "--data-dir",
            str(data_dir),
            "--models-dir",
            str(models_dir),
            "--port",
            str(self.port),
            *extra,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(data_dir) / f"app-{self.port}-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> AppProcess:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "gradio_api/info", timeout=2).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"app did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-6000:]

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def save_vae_file(path: Path, model_dir: Path, seed: int = 3) -> Path:
    """A VAE single file (diffusers key names) that fits the demo model, with perturbed decoder weights
    so the output visibly changes."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    torch.manual_seed(seed)
    sd = {
        k: (v + 0.05 * torch.randn_like(v) if k.startswith("decoder.") else v).contiguous()
        for k, v in vae.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def save_embedding_pt(path: Path, vectors: int = 2, dim: int = 32, seed: int = 4) -> Path:
    """A textual-inversion embedding in A1111's .pt layout (string_to_param)."""
    import torch

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": torch.randn(vectors, dim)}, "name": path.stem, "step": 100}, path)
    return path


def save_controlnet(folder: Path, model_dir: Path, seed: int = 5) -> Path:
    """A tiny ControlNet built from the demo UNet (diffusers folder), with its zero convs made non-zero so
    the control image changes the result."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    cn.save_pretrained(folder)
    return folder


def build_tiny_sdxl(refiner: bool = False):
    """A tiny random SDXL base (two text encoders) or refiner (text_encoder_2 only, aesthetic score),
    at diffusers-test sizes."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.model_manager.demo_model import build_tokenizer

    torch.manual_seed(7 if refiner else 6)
    te_cfg = CLIPTextConfig(
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
        projection_dim=32,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=72 if refiner else 80,
        cross_attention_dim=48 if refiner else 80,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    # text_encoder_2 wider than text_encoder, as in real SDXL (768 vs 1280): single-file loading tells the
    # two encoders of a checkpoint apart by width
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te_cfg.to_dict(), "hidden_size": 48}))
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=te2,
            tokenizer=None,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(te_cfg),
        text_encoder_2=te2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def save_compact_upscaler(path: Path, scale: int = 4) -> Path:
    """A tiny Real-ESRGAN Compact (SRVGGNet) upscaler .pth with random weights, as spandrel loads it."""
    import torch
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale).state_dict(), str(path)
    )
    return path
