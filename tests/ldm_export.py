"""Write a tiny diffusers SD1-style pipeline as an original (LDM/A1111) single-file checkpoint.

Test helper only: the inverse of diffusers' single-file conversion, generic over the number of UNet
levels so the tiny demo model (block_out_channels (32, 64)) exports too. Tests check it by loading
the file back through diffusers' own conversion and comparing images with the folder model.
"""

from __future__ import annotations

from pathlib import Path

import torch

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _rename_resnet(rest: str) -> str:
    for hf, ldm in _RESNET:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf) :]
    return rest


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        head, new = ".".join(parts[:-1]), None
        if head in fixed:
            new = f"{fixed[head]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(n + 1) * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                rest = ".".join(parts[4:])
                idx = (n + 1) * i + j + 1
                new = (
                    f"input_blocks.{idx}.0.{_rename_resnet(rest)}"
                    if kind == "resnets"
                    else f"input_blocks.{idx}.1.{rest}"
                )
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = (
                f"middle_block.{2 * j}.{_rename_resnet(rest)}"
                if parts[1] == "resnets"
                else f"middle_block.1.{rest}"
            )
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                new = f"output_blocks.{(n + 1) * i + n}.{2 if up_has_attn[i] else 1}." + ".".join(parts[4:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                idx = (n + 1) * i + j
                new = (
                    f"output_blocks.{idx}.0.{_rename_resnet(rest)}"
                    if kind == "resnets"
                    else f"output_blocks.{idx}.1.{rest}"
                )
        if new is None:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    assert levels == len(config["down_block_types"])
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        for side in ("encoder", "decoder"):
            for i in range(levels):
                ldm_i = i if side == "encoder" else levels - 1 - i
                blocks = "down" if side == "encoder" else "up"
                k = k.replace(f"{side}.{blocks}_blocks.{i}.resnets.", f"{side}.{blocks}.{ldm_i}.block.")
                k = k.replace(f"{side}.down_blocks.{i}.downsamplers.0.", f"{side}.down.{ldm_i}.downsample.")
                k = k.replace(f"{side}.up_blocks.{i}.upsamplers.0.", f"{side}.up.{ldm_i}.upsample.")
        for j in range(2):
            k = k.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for hf, ldm in attn.items():
                k = k.replace(f"attn_1.{hf}.", f"attn_1.{ldm}.")
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + k] = value
    return out


def hf_clip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 state dicts drop the text_model. level original checkpoints (and diffusers) use."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()
    }


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (as SDXL checkpoints hold it)."""
    sd = hf_clip_keys(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in sd.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            rest = key.removeprefix("text_model.encoder.layers.")
            n, rest = rest.split(".", 1)
            base = f"{prefix}transformer.resblocks.{n}."
            for proj in ("q", "k", "v"):
                if rest.startswith(f"self_attn.{proj}_proj."):
                    kind = rest.rsplit(".", 1)[1]  # weight | bias
                    qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
                    break
            else:
                rest = (
                    rest.replace("layer_norm1", "ln_1")
                    .replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj")
                    .replace("self_attn.out_proj", "attn.out_proj")
                )
                out[base + rest] = value
        elif key != "text_model.embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def export_sdxl_checkpoint(pipe, target: Path) -> Path:
    """A tiny diffusers SDXL base or refiner pipeline as an original SDXL single-file checkpoint."""
    from safetensors.torch import save_file

    sd = {
        **unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
    }
    if pipe.text_encoder is not None:  # base: CLIP-L in HF layout, OpenCLIP-G in its own
        sd.update(
            {
                "conditioner.embedders.0.transformer." + k: v
                for k, v in hf_clip_keys(pipe.text_encoder.state_dict()).items()
            }
        )
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:  # refiner: OpenCLIP-G only, as embedder 0
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model."))
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(target))
    return Path(target)


def export_sd1_checkpoint(model_dir: Path, target: Path, fmt: str = "safetensors", **metadata: str) -> Path:
    """The pipeline folder `model_dir` as one LDM checkpoint (`.safetensors` or a tensor-only `.ckpt`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    sd = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
    }
    sd.update({"cond_stage_model.transformer." + k: v for k, v in hf_clip_keys(te.state_dict()).items()})
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target), metadata=metadata or None)
    else:
        torch.save({"state_dict": sd, "global_step": 1}, str(target))
    return target


def tiny_config_folder(model_dir: Path, target: Path) -> Path:
    """A pipeline folder's configs and tokenizer without its weights (a per-family config folder)."""
    import shutil

    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt"))
    return target
