"""IP-Adapter on the demo model, with a tiny random image encoder and adapter built here (CPU, fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError

STEPS, SIZE = 2, 64


def _touch(path: str) -> None:  # what the malicious pickle would run
    Path(path).write_text("code ran", encoding="utf-8")


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (_touch, (self.sentinel,))


def _tiny_encoder():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(7)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def _tiny_adapter_state_dict(unet, image_embed_dim: int) -> dict[str, dict]:
    """diffusers' create_ip_adapter_state_dict (tests/models/unets/test_models_unet_2d_condition.py)."""
    import torch
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(11)
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(
            hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim, scale=1.0
        ).state_dict()
        ip[f"{key_id}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        ip[f"{key_id}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
        key_id += 2
    sd = ImageProjection(
        cross_attention_dim=unet.config.cross_attention_dim,
        image_embed_dim=image_embed_dim,
        num_image_text_embeds=4,
    ).state_dict()
    proj = {
        "proj.weight": sd["image_embeds.weight"],
        "proj.bias": sd["image_embeds.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    root = tmp_path_factory.mktemp("ipa") / "models"
    ModelRoots(root).create_layout()
    demo = ensure_demo_model(root)
    encoder = _tiny_encoder()
    (root / "clip_vision").mkdir(exist_ok=True)
    encoder.save_pretrained(root / "clip_vision" / "tiny-encoder")
    flat = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    flat["vision_model.embeddings.position_ids"] = torch.arange(65).expand((1, -1)).contiguous()  # old files
    save_file(flat, str(root / "clip_vision" / "tiny-encoder.safetensors"))

    unet = UNet2DConditionModel.from_pretrained(demo / "unet")
    assert unet.config.cross_attention_dim == 32
    state = _tiny_adapter_state_dict(unet, encoder.config.projection_dim)
    (root / "ipadapter").mkdir(exist_ok=True)
    save_file(
        {f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()},
        str(root / "ipadapter" / "tiny-ip-adapter.safetensors"),
    )
    torch.save(state, root / "ipadapter" / "tiny-ip-adapter.bin")
    return root


@pytest.fixture
def pipe(models):
    import torch
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(models / "diffusers" / "studionova-demo", dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, **kw) -> np.ndarray:
    import torch

    out = pipe(
        "a red fox",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
        **kw,
    )
    return out.images[0]


def _images():
    from PIL import Image

    rng = np.random.default_rng(3)
    red = Image.new("RGB", (48, 40), (220, 30, 20))
    noise = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return red, noise


def test_missing_weights_say_where_to_put_them(tmp_path):
    from engine.generation.ip_adapter import find_ip_adapter

    models = tmp_path / "models"
    (models / "ipadapter").mkdir(parents=True)
    (models / "clip_vision").mkdir()
    with pytest.raises(InputError) as e:
        find_ip_adapter(models)
    msg = str(e.value)
    assert "models/ipadapter" in msg and "models/clip_vision" in msg and "ip-adapter_sd15" in msg


def test_find_by_name(models):
    from engine.errors import NotFoundError
    from engine.generation.ip_adapter import find_ip_adapter

    files = find_ip_adapter(models)
    assert files.adapter.name == "tiny-ip-adapter.bin" and files.image_encoder.name == "tiny-encoder"
    files = find_ip_adapter(models, "tiny-ip-adapter.safetensors", "tiny-encoder.safetensors")
    assert files.adapter == models / "ipadapter" / "tiny-ip-adapter.safetensors"
    assert files.image_encoder == models / "clip_vision" / "tiny-encoder.safetensors"
    with pytest.raises(NotFoundError, match="tiny-ip-adapter.safetensors"):
        find_ip_adapter(models, "nope.safetensors")
    with pytest.raises(InputError):
        find_ip_adapter(models, "../diffusers/studionova-demo/unet/config.json")


def test_attach_generate_scale_and_detach(models, pipe):
    from engine.generation.ip_adapter import attach_ip_adapter, detach_ip_adapter, find_ip_adapter

    base = _run(pipe)
    red, noise = _images()
    files = find_ip_adapter(models, "tiny-ip-adapter.safetensors", "tiny-encoder")
    digest = attach_ip_adapter(pipe, files, scale=1.0)
    assert len(digest) == 10 and int(digest, 16) >= 0
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}

    a, b = _run(pipe, ip_adapter_image=red), _run(pipe, ip_adapter_image=noise)
    assert a.shape == (SIZE, SIZE, 3)
    assert np.abs(a - b).max() > 1e-3, "two reference images must give different images"
    assert np.abs(a - base).max() > 1e-3

    proj = pipe.unet.encoder_hid_proj
    assert attach_ip_adapter(pipe, files, scale=0.0) == digest  # same files: only the scale changes
    assert pipe.unet.encoder_hid_proj is proj
    assert np.abs(_run(pipe, ip_adapter_image=red) - base).max() < 1e-5

    detach_ip_adapter(pipe)
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    assert pipe.unet.encoder_hid_proj is None
    assert np.array_equal(_run(pipe), base)
    detach_ip_adapter(pipe)  # no-op


def test_bin_adapter_and_single_file_encoder_match(models, pipe):
    import torch

    from engine.generation.ip_adapter import (
        attach_ip_adapter,
        detach_ip_adapter,
        find_ip_adapter,
        load_image_encoder,
    )

    folder = load_image_encoder(models / "clip_vision" / "tiny-encoder", torch.float32, "cpu")
    single = load_image_encoder(models / "clip_vision" / "tiny-encoder.safetensors", torch.float32, "cpu")
    for key in (
        "hidden_size",
        "intermediate_size",
        "projection_dim",
        "num_hidden_layers",
        "image_size",
        "patch_size",
        "hidden_act",
    ):
        assert getattr(single.config, key) == getattr(folder.config, key), key
    sd_a, sd_b = folder.state_dict(), single.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert all(p.device.type == "cpu" for p in single.parameters())

    red, _ = _images()
    st = attach_ip_adapter(pipe, find_ip_adapter(models, "tiny-ip-adapter.safetensors", "tiny-encoder"), 1.0)
    with_st = _run(pipe, ip_adapter_image=red)
    # other files replace the attached ones; the .bin holds the same weights
    bn = attach_ip_adapter(pipe, find_ip_adapter(models, "tiny-ip-adapter.bin", "tiny-encoder"), 1.0)
    assert bn != st
    assert np.abs(_run(pipe, ip_adapter_image=red) - with_st).max() < 1e-5
    detach_ip_adapter(pipe)
    # the single-file encoder (heads inferred) still drives the adapter
    attach_ip_adapter(pipe, find_ip_adapter(models, "tiny-ip-adapter.bin", "tiny-encoder.safetensors"), 1.0)
    assert _run(pipe, ip_adapter_image=red).shape == (SIZE, SIZE, 3)
    detach_ip_adapter(pipe)


def test_pickle_with_code_is_refused(models, pipe, tmp_path):
    import torch

    from engine.generation.ip_adapter import attach_ip_adapter, find_ip_adapter, read_ip_adapter

    state = torch.load(models / "ipadapter" / "tiny-ip-adapter.bin", weights_only=True)
    control_sentinel, sentinel = tmp_path / "control-ran", tmp_path / "code-ran"
    # control: the payload really runs when a pickle is loaded without weights_only
    torch.save({**state, "extra": _Payload(control_sentinel)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_sentinel.exists()

    evil_models = tmp_path / "models"
    (evil_models / "ipadapter").mkdir(parents=True)
    (evil_models / "clip_vision").mkdir()
    shutil.copy(models / "clip_vision" / "tiny-encoder.safetensors", evil_models / "clip_vision")
    torch.save({**state, "extra": _Payload(sentinel)}, evil_models / "ipadapter" / "evil.bin")
    files = find_ip_adapter(evil_models)
    with pytest.raises(InputError, match="evil.bin"):
        attach_ip_adapter(pipe, files)
    with pytest.raises(InputError, match="weights_only"):
        read_ip_adapter(files.adapter)
    assert not sentinel.exists()
    assert pipe.image_encoder is None and pipe.unet.encoder_hid_proj is None


def test_wrong_encoder_is_named(models, pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.generation.ip_adapter import IPAdapterFiles, attach_ip_adapter

    sd = load_file(str(models / "clip_vision" / "tiny-encoder.safetensors"))
    sd["visual_projection.weight"] = sd["visual_projection.weight"][:16].contiguous()
    save_file(sd, str(tmp_path / "other-encoder.safetensors"))
    files = IPAdapterFiles(
        models / "ipadapter" / "tiny-ip-adapter.safetensors", tmp_path / "other-encoder.safetensors"
    )
    with pytest.raises(InputError, match="projection_dim 32"):
        attach_ip_adapter(pipe, files)
    assert pipe.image_encoder is None


def test_studio_generates_and_makes_a_sheet_through_ip_adapter(models, tmp_path):
    """The whole path: /generate's ip_adapter_image and a character reference sheet from a source image
    through IP-Adapter; the infotext names the adapter, and the warm pipeline is left as it was."""
    from PIL import Image

    from engine.settings import Settings
    from engine.studio import Studio
    from tests.test_characters import wait

    st = Studio.start(Settings(data_dir=tmp_path / "data", models_dir=models, demo=True, device="cpu"))
    try:
        src = st.settings.outputs_dir / "src.png"
        _images()[0].save(src)
        fast = dict(steps=STEPS, width=SIZE, height=SIZE, sampler="Euler", seed=4, prompt="a red fox")
        plain = wait(st, st.submit_generate(dict(fast))[0])["images"][0]
        jid, _ = st.submit_generate(
            {
                **fast,
                "ip_adapter_image": str(src),
                "ip_adapter": "tiny-ip-adapter.safetensors",
                "ip_adapter_encoder": "tiny-encoder",
            }
        )
        guided = wait(st, jid)["images"][0]
        params = Image.open(guided["path"]).info["parameters"]
        assert "IP-Adapter: tiny-ip-adapter [" in params and "IP-Adapter weight: 0.6" in params
        assert Image.open(guided["path"]).tobytes() != Image.open(plain["path"]).tobytes()
        again = wait(st, st.submit_generate(dict(fast))[0])["images"][0]  # detached: same pixels as before
        assert Image.open(again["path"]).tobytes() == Image.open(plain["path"]).tobytes()

        c = st.characters.create(
            {"name": "Ipa", "trigger_word": "ipa", "style": {"steps": STEPS, "width": SIZE, "height": SIZE}}
        )
        jid, _ = st.submit_reference_sheet(
            {
                "character": c.slug,
                "seed": 2,
                "source_image": str(src),
                "use_ip_adapter": True,
                "ip_adapter": "tiny-ip-adapter.safetensors",
                "ip_adapter_encoder": "tiny-encoder",
                "views": ["front"],
                "expressions": ["smiling"],
            }
        )
        res = wait(st, jid)
        assert len(res["views"]) == 2
        assert all(
            "IP-Adapter: tiny-ip-adapter" in Image.open(v["path"]).info["parameters"] for v in res["views"]
        )
        assert (
            "Denoising strength" not in Image.open(res["views"][0]["path"]).info["parameters"]
        )  # not img2img
    finally:
        st.close()
