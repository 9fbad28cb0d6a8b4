"""ComfyUI templates: shipped ones load, bind and validate against an /object_info built from the real
node schemas (ComfyUI a125cd84: nodes.py, comfy_extras/nodes_upscale_model.py, nodes_video_model.py,
nodes_images.py, comfy/samplers.py); the LoRA splice rewires MODEL/CLIP; errors name what is wrong."""

from __future__ import annotations

import copy
import json

import pytest

from engine.comfyui.templates import (
    COMFY_SAMPLERS,
    SHIPPED_DIR,
    ServerMismatchError,
    TemplateError,
    add_user_template,
    bind,
    comfy_sampler,
    list_templates,
    load_template,
    parse_manifest,
    user_templates_dir,
    validate_against_object_info,
)
from engine.errors import InputError
from engine.requests import LoraSpec
from engine.samplers import SAMPLER_NAMES

SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]
CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "svd_xt.safetensors"]
LORAS = ["style.safetensors", "mychar.safetensors"]
UPSCALERS = ["RealESRGAN_x4plus.pth"]
INPUT_FILES = ["example.png"]  # the server's input folder; uploads land here after object_info was read
MAX_RES = 16384


def node(inputs, outputs, *, names=None, category="", optional=None, hidden=None):
    spec = {"required": inputs}
    if optional:
        spec["optional"] = optional
    if hidden:
        spec["hidden"] = hidden
    return {
        "input": spec,
        "output": list(outputs),
        "output_name": list(names or outputs),
        "output_is_list": [False] * len(outputs),
        "category": category,
    }


def build_object_info() -> dict:
    """/object_info for the nodes the templates use, transcribed from the real INPUT_TYPES / schemas."""
    size = {"min": 16, "max": MAX_RES, "step": 8}
    save_hidden = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    info = {
        "CheckpointLoaderSimple": node(
            {"ckpt_name": [CHECKPOINTS, {}]}, ["MODEL", "CLIP", "VAE"], category="loaders"
        ),
        "CLIPTextEncode": node(
            {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP", {}]},
            ["CONDITIONING"],
            category="conditioning",
        ),
        "EmptyLatentImage": node(
            {
                "width": ["INT", {"default": 512, **size}],
                "height": ["INT", {"default": 512, **size}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            },
            ["LATENT"],
            category="latent",
        ),
        "KSampler": node(
            {
                "model": ["MODEL", {}],
                "seed": [
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True},
                ],
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
                "sampler_name": [SAMPLERS, {}],
                "scheduler": [SCHEDULERS, {}],
                "positive": ["CONDITIONING", {}],
                "negative": ["CONDITIONING", {}],
                "latent_image": ["LATENT", {}],
                "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            },
            ["LATENT"],
            category="sampling",
        ),
        "VAEDecode": node({"samples": ["LATENT", {}], "vae": ["VAE", {}]}, ["IMAGE"], category="latent"),
        "VAEEncode": node({"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"], category="latent"),
        "SaveImage": node(
            {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
            [],
            category="image",
            hidden=save_hidden,
        ),
        "LoadImage": node(
            {"image": [INPUT_FILES, {"image_upload": True}]}, ["IMAGE", "MASK"], category="image"
        ),
        "LoadImageMask": node(
            {"image": [INPUT_FILES, {"image_upload": True}], "channel": [["alpha", "red", "green", "blue"]]},
            ["MASK"],
            category="mask",
        ),
        "SetLatentNoiseMask": node(
            {"samples": ["LATENT"], "mask": ["MASK"]}, ["LATENT"], category="latent/inpaint"
        ),
        "RepeatLatentBatch": node(
            {"samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": 64}]},
            ["LATENT"],
            category="latent/batch",
        ),
        "LoraLoader": node(
            {
                "model": ["MODEL", {}],
                "clip": ["CLIP", {}],
                "lora_name": [LORAS, {}],
                "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
                "strength_clip": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
            },
            ["MODEL", "CLIP"],
            category="loaders",
        ),
        # V3 schema nodes serialise combos as ("COMBO", {"options": [...]}).
        "UpscaleModelLoader": node(
            {"model_name": ["COMBO", {"multiselect": False, "options": UPSCALERS}]},
            ["UPSCALE_MODEL"],
            category="loaders",
        ),
        "ImageUpscaleWithModel": node(
            {"upscale_model": ["UPSCALE_MODEL", {}], "image": ["IMAGE", {}]},
            ["IMAGE"],
            category="image/upscaling",
        ),
        "ImageOnlyCheckpointLoader": node(
            {"ckpt_name": [CHECKPOINTS]}, ["MODEL", "CLIP_VISION", "VAE"], category="loaders/video_models"
        ),
        "SVD_img2vid_Conditioning": node(
            {
                "clip_vision": ["CLIP_VISION"],
                "init_image": ["IMAGE"],
                "vae": ["VAE"],
                "width": ["INT", {"default": 1024, **size}],
                "height": ["INT", {"default": 576, **size}],
                "video_frames": ["INT", {"default": 14, "min": 1, "max": 4096}],
                "motion_bucket_id": ["INT", {"default": 127, "min": 1, "max": 1023}],
                "fps": ["INT", {"default": 6, "min": 1, "max": 1024}],
                "augmentation_level": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01}],
            },
            ["CONDITIONING", "CONDITIONING", "LATENT"],
            names=["positive", "negative", "latent"],
            category="conditioning/video_models",
        ),
        "VideoLinearCFGGuidance": node(
            {
                "model": ["MODEL"],
                "min_cfg": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.5}],
            },
            ["MODEL"],
            category="sampling/video_models",
        ),
        "SaveAnimatedWEBP": node(
            {
                "images": ["IMAGE"],
                "filename_prefix": ["STRING", {"default": "ComfyUI"}],
                "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
                "lossless": ["BOOLEAN", {"default": True}],
                "quality": ["INT", {"default": 80, "min": 0, "max": 100}],
                "method": [["default", "fastest", "slowest"]],
            },
            [],
            category="image/animation",
            hidden=save_hidden,
        ),
    }
    for name, entry in info.items():
        entry.update(name=name, display_name=name)
    return info


@pytest.fixture
def object_info():
    return build_object_info()


@pytest.fixture(scope="module")
def shipped():
    return list_templates([SHIPPED_DIR])


FULL_PARAMS = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "seed": 1234,
    "steps": 12,
    "cfg_scale": 6.5,
    "sampler": "DPM++ 2M Karras",
    "width": 640,
    "height": 448,
    "batch_size": 2,
    "model": "v1-5-pruned-emaonly.safetensors",
    "loras": [{"name": "style", "weight": 0.8}],
    "init_image": "upload_1.png",
    "mask_image": "upload_1_mask.png",
    "denoising_strength": 0.6,
    "upscale_model": "RealESRGAN_x4plus.pth",
    "frames": 25,
    "fps": 8,
}


def params_for(template) -> dict:
    """The full parameter set, less what this template does not take."""
    takes = set(template.manifest.bindings) | ({"loras"} if template.manifest.lora_stack else set())
    params = {k: v for k, v in FULL_PARAMS.items() if k in takes}
    if template.manifest.kind == "img2video":
        params["model"] = "svd_xt.safetensors"
    elif template.manifest.family == "sdxl":
        params["model"] = "sd_xl_base_1.0.safetensors"
    return params


def source(graph, node_id, input_name):
    link = graph[node_id]["inputs"][input_name]
    assert isinstance(link, list) and len(link) == 2, f"{node_id}.{input_name} is not a link: {link!r}"
    return link


def by_class(graph, class_type):
    return [nid for nid, n in graph.items() if n["class_type"] == class_type]


def test_the_shipped_set(shipped):
    assert set(shipped) == {
        "txt2img",
        "txt2img_sdxl",
        "img2img",
        "inpaint",
        "upscale_with_model",
        "img2video",
    }
    kinds = {t.manifest.kind for t in shipped.values()}
    assert kinds == {"txt2img", "img2img", "inpaint", "upscale", "img2video"}
    assert shipped["txt2img"].manifest.family == "sd1"
    assert shipped["txt2img_sdxl"].manifest.family == "sdxl"


@pytest.mark.parametrize(
    "name", ["txt2img", "txt2img_sdxl", "img2img", "inpaint", "upscale_with_model", "img2video"]
)
def test_every_template_binds_and_validates(shipped, object_info, name):
    template = shipped[name]
    before = copy.deepcopy(template.graph)
    params = params_for(template)
    graph = bind(template.graph, template.manifest, params)
    assert template.graph == before, "bind must not change the template"
    validate_against_object_info(graph, object_info)
    # The unbound template is valid too (its placeholders are on the fixture server).
    validate_against_object_info(template.graph, object_info)

    for param, targets in template.manifest.bindings.items():
        for target in targets:
            value = graph[target.node]["inputs"][target.input]
            if param == "sampler":
                assert value == "dpmpp_2m"
            elif param == "scheduler":
                assert value == "karras"
            else:
                assert value == params[param], (param, target)
    for node_id in template.manifest.outputs:
        assert graph[node_id]["class_type"] in {"SaveImage", "SaveAnimatedWEBP"}


def test_txt2img_chain(shipped):
    g = shipped["txt2img"].graph
    (ks,) = by_class(g, "KSampler")
    (ckpt,) = by_class(g, "CheckpointLoaderSimple")
    assert source(g, ks, "model") == [ckpt, 0]
    assert g[source(g, ks, "latent_image")[0]]["class_type"] == "EmptyLatentImage"
    for side in ("positive", "negative"):
        enc = source(g, ks, side)[0]
        assert g[enc]["class_type"] == "CLIPTextEncode" and source(g, enc, "clip") == [ckpt, 1]
    (decode,) = by_class(g, "VAEDecode")
    assert source(g, decode, "samples") == [ks, 0] and source(g, decode, "vae") == [ckpt, 2]


def test_inpaint_masks_the_encoded_source(shipped):
    g = shipped["inpaint"].graph
    (ks,) = by_class(g, "KSampler")
    repeat = source(g, ks, "latent_image")[0]
    masked = source(g, repeat, "samples")[0]
    assert g[masked]["class_type"] == "SetLatentNoiseMask"
    assert g[source(g, masked, "samples")[0]]["class_type"] == "VAEEncode"
    assert g[source(g, masked, "mask")[0]]["class_type"] == "LoadImageMask"


def test_img2video_chain(shipped):
    g = shipped["img2video"].graph
    (ks,) = by_class(g, "KSampler")
    guidance = source(g, ks, "model")[0]
    assert g[guidance]["class_type"] == "VideoLinearCFGGuidance"
    loader = source(g, guidance, "model")[0]
    assert g[loader]["class_type"] == "ImageOnlyCheckpointLoader"
    cond = source(g, ks, "positive")[0]
    assert g[cond]["class_type"] == "SVD_img2vid_Conditioning"
    assert [source(g, ks, k) for k in ("positive", "negative", "latent_image")] == [
        [cond, 0],
        [cond, 1],
        [cond, 2],
    ]
    assert source(g, cond, "clip_vision") == [loader, 1]
    (save,) = shipped["img2video"].manifest.outputs
    assert g[save]["class_type"] == "SaveAnimatedWEBP"


def test_two_loras_chain_between_checkpoint_and_consumers(shipped, object_info):
    template = shipped["txt2img"]
    loras = [{"name": "style", "weight": 0.8}, {"name": "mychar.safetensors", "weight": -0.5}]
    graph = bind(template.graph, template.manifest, {"loras": loras})
    validate_against_object_info(graph, object_info)
    ckpt = template.manifest.lora_stack.checkpoint_node
    (ks,) = by_class(graph, "KSampler")

    last = source(graph, ks, "model")
    assert last[1] == 0 and graph[last[0]]["class_type"] == "LoraLoader"
    second = graph[last[0]]["inputs"]
    assert second["lora_name"] == "mychar.safetensors"
    assert second["strength_model"] == second["strength_clip"] == -0.5
    first_id = second["model"][0]
    assert second["model"] == [first_id, 0] and second["clip"] == [first_id, 1]
    first = graph[first_id]["inputs"]
    assert first["lora_name"] == "style.safetensors" and first["strength_model"] == 0.8
    assert first["model"] == [ckpt, 0] and first["clip"] == [ckpt, 1]

    for enc in by_class(graph, "CLIPTextEncode"):
        assert source(graph, enc, "clip") == [last[0], 1]
    # Nothing but the first LoraLoader reads the checkpoint's MODEL or CLIP any more; its VAE is untouched.
    readers = {
        (nid, name)
        for nid, n in graph.items()
        for name, v in n["inputs"].items()
        if v in ([ckpt, 0], [ckpt, 1])
    }
    assert readers == {(first_id, "model"), (first_id, "clip")}
    (decode,) = by_class(graph, "VAEDecode")
    assert source(graph, decode, "vae") == [ckpt, 2]
    assert len(set(graph)) == len(template.graph) + 2 and not set(template.graph) & {first_id, last[0]}


def test_lora_ids_never_collide():
    graph = {
        "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["9", 0]}},
        "x": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["9", 1], "text": ""}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0]}},
    }
    manifest = parse_manifest(
        {
            "name": "t",
            "kind": "txt2img",
            "family": "any",
            "bindings": {},
            "outputs": ["11"],
            "lora_stack": {"checkpoint_node": "9"},
        },
        graph,
        "t.manifest.json",
    )
    out = bind(graph, manifest, {"loras": [{"name": "a"}, LoraSpec(name="b", weight=0.3), {"name": "c"}]})
    assert out["13"]["inputs"]["lora_name"] == "b.safetensors" and out["13"]["inputs"]["strength_clip"] == 0.3
    new = set(out) - set(graph)
    assert new == {"12", "13", "14"}
    assert out["10"]["inputs"]["model"] == ["14", 0] and out["x"]["inputs"]["clip"] == ["14", 1]


def test_sampler_mapping():
    assert comfy_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert comfy_sampler("Euler a") == ("euler_ancestral", "normal")
    assert set(SAMPLER_NAMES) <= set(COMFY_SAMPLERS), "every StudioNOVA sampler must map to ComfyUI"
    for sampler, scheduler in COMFY_SAMPLERS.values():
        assert sampler in SAMPLERS and scheduler in SCHEDULERS
    with pytest.raises(InputError, match=r"sampler='Nope'.*allowed: .*DPM\+\+ 2M Karras"):
        comfy_sampler("Nope")


def test_explicit_scheduler_wins(shipped):
    t = shipped["txt2img"]
    graph = bind(t.graph, t.manifest, {"sampler": "Euler", "scheduler": "beta"})
    assert (graph["3"]["inputs"]["sampler_name"], graph["3"]["inputs"]["scheduler"]) == ("euler", "beta")
    kept = bind(t.graph, t.manifest, {"scheduler": "", "model": None, "negative_prompt": ""})
    assert kept["3"]["inputs"]["scheduler"] == t.graph["3"]["inputs"]["scheduler"]
    assert kept["4"]["inputs"]["ckpt_name"] == t.graph["4"]["inputs"]["ckpt_name"]
    assert kept["7"]["inputs"]["text"] == ""


def test_bind_refuses_what_the_template_does_not_take(shipped):
    up = shipped["upscale_with_model"]
    with pytest.raises(InputError, match=r"does not take seed"):
        bind(up.graph, up.manifest, {"seed": 3})
    with pytest.raises(InputError, match=r"takes no LoRAs"):
        bind(up.graph, up.manifest, {"loras": [{"name": "style"}]})
    with pytest.raises(InputError, match=r"unknown parameter\(s\) cfg"):
        bind(up.graph, up.manifest, {"cfg": 3})
    t = shipped["txt2img"]
    with pytest.raises(InputError, match=r"resolve a random seed"):
        bind(t.graph, t.manifest, {"seed": -1})


def test_missing_node_type(shipped, object_info):
    t = shipped["upscale_with_model"]
    del object_info["UpscaleModelLoader"]
    with pytest.raises(
        ServerMismatchError, match=r"no node type UpscaleModelLoader \(node 2\).*install the custom node"
    ):
        validate_against_object_info(t.graph, object_info)


def test_missing_models_list_what_the_server_has(shipped, object_info):
    t = shipped["txt2img"]
    object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = [
        f"m{i}.safetensors" for i in range(15)
    ]
    graph = bind(t.graph, t.manifest, {"model": "absent.safetensors", "loras": [{"name": "ghost"}]})
    with pytest.raises(ServerMismatchError) as err:
        validate_against_object_info(graph, object_info)
    message = str(err.value)
    assert "checkpoint 'absent.safetensors' is not on the server; it has: m0.safetensors" in message
    assert "m9.safetensors ... (5 more)" in message and "m10.safetensors" not in message
    assert (
        "LoRA 'ghost.safetensors' is not on the server; it has: style.safetensors, mychar.safetensors"
        in message
    )

    up = shipped["upscale_with_model"]
    graph = bind(up.graph, up.manifest, {"upscale_model": "4x-Nope.pth"})
    with pytest.raises(
        ServerMismatchError, match=r"upscale model '4x-Nope.pth' is not on the server; it has: RealESRGAN"
    ):
        validate_against_object_info(graph, object_info)


def test_missing_inputs_bad_links_and_ranges(shipped, object_info):
    graph = copy.deepcopy(shipped["txt2img"].graph)
    del graph["3"]["inputs"]["denoise"]
    graph["8"]["inputs"]["vae"] = ["4", 1]  # CLIP into a VAE input
    graph["9"]["inputs"]["images"] = ["8", 3]
    graph["5"]["inputs"]["width"] = 8
    with pytest.raises(ServerMismatchError) as err:
        validate_against_object_info(graph, object_info)
    message = str(err.value)
    assert "node 3 (KSampler) is missing required input 'denoise'" in message
    assert (
        "node 8 (VAEDecode) input 'vae' wants VAE but output 1 of node 4 (CheckpointLoaderSimple) is CLIP"
        in message
    )
    assert (
        "node 9 (SaveImage) input 'images' reads output 3 of node 8 (VAEDecode), which has 1 output(s)"
        in message
    )
    assert "node 5 (EmptyLatentImage) input 'width'=8 is outside 16..16384" in message


def test_binding_to_a_missing_node_or_input(tmp_path):
    src = SHIPPED_DIR / "txt2img.json"
    (tmp_path / "txt2img.json").write_text(src.read_text())
    manifest = json.loads((SHIPPED_DIR / "txt2img.manifest.json").read_text())
    manifest["bindings"]["steps"] = [{"node": "99", "input": "steps"}]
    (tmp_path / "txt2img.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TemplateError, match=r"txt2img\.manifest\.json: binding 'steps' points to node '99'"):
        load_template(tmp_path / "txt2img.json")

    manifest["bindings"]["steps"] = [{"node": "3", "input": "stepz"}]
    (tmp_path / "txt2img.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        TemplateError, match=r"input 'stepz' of node '3' \(KSampler\), which has inputs: seed"
    ):
        load_template(tmp_path / "txt2img.json")

    manifest["bindings"]["steps"] = [{"node": "3", "input": "model"}]
    (tmp_path / "txt2img.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TemplateError, match=r"is a link to another node"):
        load_template(tmp_path / "txt2img.json")


def test_user_template_round_trip_and_ui_format_refused(tmp_path, object_info):
    user_dir = user_templates_dir(tmp_path)
    graph = json.loads((SHIPPED_DIR / "txt2img.json").read_text())
    manifest = json.loads((SHIPPED_DIR / "txt2img.manifest.json").read_text())
    manifest["name"] = "my_txt2img"
    saved = add_user_template(json.dumps(graph), manifest, user_dir)
    assert saved.path == user_dir / "my_txt2img.json"
    with pytest.raises(TemplateError, match=r"already exists"):
        add_user_template(graph, manifest, user_dir)

    listed = list_templates([SHIPPED_DIR, user_dir])
    assert "my_txt2img" in listed and "txt2img" in listed
    bound = bind(listed["my_txt2img"].graph, listed["my_txt2img"].manifest, params_for(listed["my_txt2img"]))
    validate_against_object_info(bound, object_info)

    ui_format = {
        "last_node_id": 9,
        "last_link_id": 9,
        "nodes": [{"id": 3, "type": "KSampler"}],
        "links": [],
        "version": 0.4,
    }
    ui_path = tmp_path / "exported.json"
    ui_path.write_text(json.dumps(ui_format))
    manifest["name"] = "from_ui"
    with pytest.raises(TemplateError, match=r"UI workflow \(nodes/links\).*Save \(API format\)"):
        add_user_template(ui_path, manifest, user_dir)
    assert not (user_dir / "from_ui.json").exists()
