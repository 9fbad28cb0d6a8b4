"""PEFT -> kohya LoRA export: key names, alpha, metadata and hashes, and that diffusers' kohya loader
reproduces the PEFT adapter's output exactly (tiny SD1 demo model and tiny SDXL on CPU)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from engine.errors import InputError

RANK, ALPHA = 4, 8.0  # alpha != rank: a converter that writes alpha = rank changes the output
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _lora_config(targets, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    return LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets)


def _latents(pipe, **kwargs):
    with torch.no_grad():
        return pipe(
            "a red fox",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images


def _expected_names(prefix: str, blocks, layers, attns, projs) -> set[str]:
    return {
        f"{prefix}_{b}_{layer}_{a}_{p}{s}"
        for b, layer, a, p, s in itertools.product(blocks, layers, attns, projs, SUFFIXES)
    }


def _data_sha256(path) -> str:
    from engine.artifacts import safetensors_header

    n, _ = safetensors_header(path)
    return hashlib.sha256(path.read_bytes()[8 + n :]).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # toy-sized matmuls: thread start-up costs more than it saves, and far more on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    root = tmp_path_factory.mktemp("lora_export_models")
    ModelRoots(root).create_layout()
    return ensure_demo_model(root)


def _sd1_pipe(demo_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_pipe():
    from tests.factories import build_tiny_sdxl

    pipe = build_tiny_sdxl()  # seeded: every call builds the same weights
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1_export(demo_dir, tmp_path_factory):
    """(file, kohya tensors, latents with the PEFT adapters active) for UNet + text-encoder LoRAs."""
    from peft import get_peft_model_state_dict

    from engine.training.export import kohya_metadata, peft_to_kohya, save_kohya_lora

    pipe = _sd1_pipe(demo_dir)
    pipe.unet.add_adapter(_lora_config(UNET_TARGETS, seed=11))
    pipe.text_encoder.add_adapter(_lora_config(TE_TARGETS, seed=12))
    peft_latents = _latents(pipe)
    tensors = peft_to_kohya(
        get_peft_model_state_dict(pipe.unet),
        {"te1": get_peft_model_state_dict(pipe.text_encoder)},
        ALPHA,
        "sd1",
    )
    meta = kohya_metadata(
        family="sd1",
        rank=RANK,
        alpha=ALPHA,
        base_model_name="studionova-demo",
        base_model_hash="0123456789",
        resolution=(512, 512),
        steps=100,
        epochs=2,
        learning_rate=1e-4,
        name="nova-fox",
        extra={"modelspec.trigger_phrase": "nova fox", "ss_tag_frequency": {"fox": {"fox": 3}}},
    )
    path = tmp_path_factory.mktemp("loras") / "nova-fox.safetensors"
    file_sha = save_kohya_lora(path, tensors, meta)
    return path, tensors, peft_latents, file_sha


@pytest.fixture(scope="module")
def sdxl_export(tmp_path_factory):
    from peft import get_peft_model_state_dict

    from engine.training.export import kohya_metadata, peft_to_kohya, save_kohya_lora

    pipe = _sdxl_pipe()
    pipe.unet.add_adapter(_lora_config(UNET_TARGETS, seed=21))
    pipe.text_encoder.add_adapter(_lora_config(TE_TARGETS, seed=22))
    pipe.text_encoder_2.add_adapter(_lora_config(TE_TARGETS, seed=23))
    peft_latents = _latents(pipe)
    tensors = peft_to_kohya(
        get_peft_model_state_dict(pipe.unet),
        {
            "te1": get_peft_model_state_dict(pipe.text_encoder),
            "te2": get_peft_model_state_dict(pipe.text_encoder_2),
        },
        ALPHA,
        "sdxl",
    )
    meta = kohya_metadata(
        family="sdxl",
        rank=RANK,
        alpha=ALPHA,
        base_model_name="tiny-sdxl",
        base_model_hash="abcdef0123",
        resolution=(1024, 768),
        steps=10,
        epochs=1,
        learning_rate=5e-5,
        name="xl-fox",
    )
    path = tmp_path_factory.mktemp("loras_xl") / "xl-fox.safetensors"
    save_kohya_lora(path, tensors, meta)
    return path, tensors, peft_latents


# --- names and alpha ------------------------------------------------------------------------

SD1_UNET_BLOCKS = [
    "down_blocks_1_attentions_0",
    "down_blocks_1_attentions_1",
    "mid_block_attentions_0",
    "up_blocks_0_attentions_0",
    "up_blocks_0_attentions_1",
    "up_blocks_0_attentions_2",
]
# tiny SDXL: attention in down level 1 (sgm input_blocks 4, 5), the middle block, and up level 0
# (output_blocks 0-2); two transformer blocks each
SDXL_UNET_BLOCKS = [
    "input_blocks_4_1",
    "input_blocks_5_1",
    "middle_block_1",
    "output_blocks_0_1",
    "output_blocks_1_1",
    "output_blocks_2_1",
]
TE_LAYERS = [f"text_model_encoder_layers_{i}_self_attn" for i in range(5)]


def test_sd1_names_are_kohya_diffusers_paths_with_trained_alpha(sd1_export):
    _, tensors, _, _ = sd1_export
    expected = _expected_names(
        "lora_unet",
        SD1_UNET_BLOCKS,
        ["transformer_blocks_0"],
        ["attn1", "attn2"],
        ["to_q", "to_k", "to_v", "to_out_0"],
    )
    expected |= {f"lora_te_{layer}_{p}{s}" for layer in TE_LAYERS for p in TE_TARGETS for s in SUFFIXES}
    assert set(tensors) == expected
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    for key, t in tensors.items():
        if key.endswith(".alpha"):
            assert t.ndim == 0 and t.item() == ALPHA
        elif key.endswith(".lora_down.weight"):
            assert t.shape[0] == RANK
        else:
            assert t.shape[1] == RANK


def test_sdxl_names_are_sgm_layout(sdxl_export):
    _, tensors, _ = sdxl_export
    expected = _expected_names(
        "lora_unet",
        SDXL_UNET_BLOCKS,
        ["transformer_blocks_0", "transformer_blocks_1"],
        ["attn1", "attn2"],
        ["to_q", "to_k", "to_v", "to_out_0"],
    )
    for prefix in ("lora_te1", "lora_te2"):
        expected |= {f"{prefix}_{layer}_{p}{s}" for layer in TE_LAYERS for p in TE_TARGETS for s in SUFFIXES}
    assert set(tensors) == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj.alpha" in tensors
    assert all(t.item() == ALPHA for k, t in tensors.items() if k.endswith(".alpha"))


def test_locon_conv_layers_keep_shapes_and_get_sgm_resnet_names():
    from peft import get_peft_model_state_dict

    from engine.training.export import peft_to_kohya

    unet = _sdxl_pipe().unet
    unet.add_adapter(
        _lora_config(
            r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv)$", seed=31
        )
    )
    state = get_peft_model_state_dict(unet)
    sdxl = peft_to_kohya(state, {}, ALPHA, "sdxl")
    for name, shape in {
        "lora_unet_input_blocks_1_0_in_layers_2": (RANK, 32, 3, 3),  # down 0 resnet 0 conv1
        "lora_unet_input_blocks_3_0_op": (RANK, 32, 3, 3),  # down 0 downsampler
        "lora_unet_input_blocks_4_0_skip_connection": (RANK, 32, 1, 1),
        "lora_unet_middle_block_2_out_layers_3": (RANK, 64, 3, 3),
        "lora_unet_output_blocks_2_2_conv": (RANK, 64, 3, 3),  # up 0 upsampler
        "lora_unet_output_blocks_5_0_emb_layers_1": (RANK, 128),
    }.items():
        assert tuple(sdxl[f"{name}.lora_down.weight"].shape) == shape
        assert sdxl[f"{name}.lora_up.weight"].shape[1] == RANK
        assert sdxl[f"{name}.alpha"].item() == ALPHA
    sd1 = peft_to_kohya(state, {}, ALPHA, "sd1")
    assert sd1["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in sd1


def test_bad_inputs_raise_input_error_naming_the_value():
    from engine.training.export import kohya_metadata, peft_to_kohya

    state = {
        "down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
        "down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4),
    }
    with pytest.raises(InputError, match=r"'flux'.*sd1, sd2, sdxl"):
        peft_to_kohya(state, {}, ALPHA, "flux")
    with pytest.raises(InputError, match="'te2'"):
        peft_to_kohya(state, {"te2": {}}, ALPHA, "sd1")
    with pytest.raises(InputError, match="lora_magnitude_vector"):
        peft_to_kohya(
            {**state, "down_blocks.1.attentions.0.proj_in.lora_magnitude_vector": torch.ones(8)},
            {},
            ALPHA,
            "sd1",
        )
    with pytest.raises(InputError, match=r"'unet\.down_blocks"):
        peft_to_kohya({"unet." + k: v for k, v in state.items()}, {}, ALPHA, "sd1")
    with pytest.raises(InputError, match="lacks its lora_B"):
        peft_to_kohya(dict(list(state.items())[:1]), {}, ALPHA, "sdxl")
    with pytest.raises(InputError, match="already given"):
        peft_to_kohya({**state, **{"base_model.model." + k: v for k, v in state.items()}}, {}, ALPHA, "sd1")
    with pytest.raises(InputError, match="alpha 0"):
        peft_to_kohya(state, {}, 0, "sd1")
    with pytest.raises(InputError, match=r"'sd3'.*sd1, sd2, sdxl"):
        kohya_metadata(
            family="sd3",
            rank=4,
            alpha=8,
            base_model_name="m",
            base_model_hash="h",
            resolution=(512, 512),
            steps=1,
            epochs=1,
            learning_rate=1e-4,
            name="n",
        )


# --- the file: metadata, hashes, StudioNOVA's detection ------------------------------------------


def test_file_metadata_hashes_and_format(sd1_export):
    from engine.artifacts import lora_short_hash, safetensors_header, sha256_file
    from engine.model_manager.pipelines import lora_format

    path, tensors, _, file_sha = sd1_export
    _, header = safetensors_header(path)
    meta = header["__metadata__"]
    assert set(header) - {"__metadata__"} == set(tensors)
    assert {
        k: meta[k]
        for k in (
            "ss_network_module",
            "ss_network_dim",
            "ss_network_alpha",
            "ss_base_model_version",
            "ss_v2",
            "ss_output_name",
            "ss_resolution",
            "ss_steps",
            "ss_epoch",
        )
    } == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "nova-fox",
        "ss_resolution": "(512, 512)",
        "ss_steps": "100",
        "ss_epoch": "2",
    }
    assert meta["ss_sd_model_name"] == "studionova-demo" and meta["ss_sd_model_hash"] == "0123456789"
    assert float(meta["ss_learning_rate"]) == 1e-4 and meta["ss_network_args"] == "{}"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.title"] == "nova-fox"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.sai_model_spec"]
    assert meta["modelspec.date"][:2] == "20" and meta["modelspec.trigger_phrase"] == "nova fox"
    assert meta["ss_tag_frequency"] == '{"fox": {"fox": 3}}'
    assert meta["sshs_model_hash"] == _data_sha256(path)
    assert lora_short_hash(path) == meta["sshs_model_hash"][:12]
    assert len(meta["sshs_legacy_hash"]) == 8
    assert file_sha == sha256_file(path)
    assert lora_format(path) == "kohya"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_sdxl_file_metadata(sdxl_export):
    from engine.artifacts import lora_short_hash, safetensors_header
    from engine.model_manager.pipelines import lora_format

    path, _, _ = sdxl_export
    meta = safetensors_header(path)[1]["__metadata__"]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x768" and meta["ss_resolution"] == "(1024, 768)"
    assert lora_short_hash(path) == _data_sha256(path)[:12]
    assert lora_format(path) == "kohya"


def test_hash_does_not_depend_on_metadata(tmp_path, sd1_export):
    from engine.artifacts import safetensors_header
    from engine.training.export import save_kohya_lora

    _, tensors, _, _ = sd1_export
    a = save_kohya_lora(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a"})
    b = save_kohya_lora(tmp_path / "b.safetensors", tensors, {"ss_output_name": "bbbbbbbb", "x": "y"})
    assert a != b
    hashes = {
        safetensors_header(tmp_path / n)[1]["__metadata__"]["sshs_model_hash"]
        for n in ("a", "b")
        for n in [f"{n}.safetensors"]
    }
    assert len(hashes) == 1
    with pytest.raises(InputError, match="'ss_steps'"):
        save_kohya_lora(tmp_path / "c.safetensors", tensors, {"ss_steps": 3})
    with pytest.raises(InputError, match="c.pt"):
        save_kohya_lora(tmp_path / "c.pt", tensors, {})


# --- the file loads in diffusers' kohya loader and gives the PEFT adapter's output ---------------


def test_sd1_export_loads_with_kohya_loader_and_matches_peft(demo_dir, sd1_export):
    path, _, peft_latents, _ = sd1_export
    pipe = _sd1_pipe(demo_dir)
    base = _latents(pipe)
    pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="export")
    loaded = _latents(pipe)
    torch.testing.assert_close(loaded, peft_latents, atol=1e-4, rtol=1e-4)
    assert (loaded - base).abs().max() > 1e-2  # the LoRA (UNet and text encoder) really acts
    pipe.unload_lora_weights()
    assert torch.equal(_latents(pipe), base)


def test_sd1_text_encoder_lora_alone_matches(demo_dir, sd1_export, tmp_path):
    """The text-encoder half on its own: catches a te key set the loader silently ignores."""
    from safetensors.torch import save_file

    path, tensors, _, _ = sd1_export
    te_only = {k: v for k, v in tensors.items() if k.startswith("lora_te_")}
    save_file(te_only, str(tmp_path / "te.safetensors"))
    pipe = _sd1_pipe(demo_dir)
    base = _latents(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="te.safetensors")
    assert (_latents(pipe) - base).abs().max() > 1e-3


def test_sdxl_export_loads_with_kohya_loader_and_matches_peft(sdxl_export):
    path, _, peft_latents = sdxl_export
    pipe = _sdxl_pipe()
    base = _latents(pipe)
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    loaded = _latents(pipe)
    torch.testing.assert_close(loaded, peft_latents, atol=1e-4, rtol=1e-4)
    assert (loaded - base).abs().max() > 1e-2
    pipe.unload_lora_weights()
    assert torch.equal(_latents(pipe), base)


def test_sdxl_locon_export_loads_and_matches_peft(tmp_path):
    """Conv/resnet modules on the sgm names (in_layers_2, op, output_blocks_2_2_conv, ...) map back to the
    same diffusers modules in diffusers' SDXL kohya loader."""
    from peft import get_peft_model_state_dict

    from engine.training.export import peft_to_kohya, save_kohya_lora

    pipe = _sdxl_pipe()
    targets = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv|attn1\.to_q)$"
    pipe.unet.add_adapter(_lora_config(targets, seed=41))
    peft_latents = _latents(pipe)
    tensors = peft_to_kohya(get_peft_model_state_dict(pipe.unet), {}, ALPHA, "sdxl")
    save_kohya_lora(tmp_path / "locon.safetensors", tensors, {"ss_network_module": "networks.lora"})
    fresh = _sdxl_pipe()
    fresh.load_lora_weights(tmp_path, weight_name="locon.safetensors")
    torch.testing.assert_close(_latents(fresh), peft_latents, atol=1e-4, rtol=1e-4)
