"""Generation with engine='comfyui' against stub ComfyUI servers that speak the real protocol: the studio binds
a workflow template, the pool renders, and the images land in the library like local ones (infotext, recipe,
Asset and Generation rows) with the workflow as ComfyUI's own `prompt` chunk."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from engine.errors import InputError
from tests.comfy_stub import ComfyStub
from tests.test_characters import wait


@pytest.fixture
def stubs():
    servers = [ComfyStub(render_delay=0.3, steps=4).start(), ComfyStub(render_delay=0.3, steps=4).start()]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture
def comfy_studio(stubs, models_dir, model_configs, tmp_path):
    from engine.settings import Settings
    from engine.studio import Studio

    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        demo=True,
        device="cpu",
        model_configs=str(model_configs),
        comfyui_urls=",".join(s.url for s in stubs),
    )
    st = Studio.start(settings)
    yield st
    st.close()


BASE = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "blurry",
    "engine": "comfyui",
    "model": "sd15_tiny.safetensors",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 1234,
}


def test_a_comfyui_generation_lands_in_the_library_with_its_workflow(comfy_studio, stubs):
    jid, _ = comfy_studio.submit_generate({**BASE, "batch_count": 2, "sampler": "DPM++ 2M Karras"})
    events = list(comfy_studio.watch(jid))
    assert any(e["type"] == "progress" and e.get("desc", "").startswith("ComfyUI step") for e in events)
    result = next(e for e in events if e["type"] == "done")["result"]
    assert len(result["images"]) == 2 and result["device"].startswith("comfyui:http://127.0.0.1:")
    first = result["images"][0]
    png = Image.open(first["path"])
    graph = json.loads(png.text["prompt"])  # ComfyUI opens it: its own API-format graph
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["seed"]) == ("dpmpp_2m", "karras", 1234)
    assert "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras" in png.text["parameters"]
    assert "Seed: 1234" in png.text["parameters"] and "Model: sd15_tiny" in png.text["parameters"]
    recipe = json.loads(png.text["studionova"])
    assert recipe["engine"] == "comfyui" and recipe["comfyui"]["template"] == "txt2img"
    assert recipe["comfyui"]["server"] in {s.url for s in stubs}
    # the second batch is seed + batch_size, as A1111 numbers them
    assert result["images"][1]["seed"] == 1235
    from sqlmodel import select

    from engine.store.database import Generation

    with comfy_studio.db.session() as s:
        rows = list(s.exec(select(Generation).where(Generation.job_id == jid)))
    assert len(rows) == 2 and {r.model for r in rows} == {"sd15_tiny.safetensors"}
    # the generation is a comfy job, not on the local GPU queue
    assert comfy_studio.job_status(jid)["kind"] == "comfy_generate"


def test_loras_are_spliced_and_a_batch_spreads_over_the_pool(comfy_studio, stubs):
    jobs = [
        comfy_studio.submit_generate({**BASE, "seed": 10 + i, "loras": "style_b:0.7"})[0] for i in range(4)
    ]
    for jid in jobs:
        wait(comfy_studio, jid)
    assert all(stub.submitted for stub in stubs), "both servers of the pool rendered"
    graph = stubs[0].submitted[0]["prompt"]
    lora = next(n for n in graph.values() if n["class_type"] == "LoraLoader")["inputs"]
    assert lora["lora_name"] == "style_b.safetensors" and lora["strength_model"] == 0.7


def test_img2img_and_inpaint_upload_their_images_and_bind_them(comfy_studio, stubs):
    """The source and the (blurred) mask are uploaded to the server's input/ and named in the graph; the
    template follows the mode."""
    from tests.test_datasets import upload_dir

    folder = upload_dir(comfy_studio, "comfy-inputs")
    src, mask = folder / "src.png", folder / "mask.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(src)
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    for stub in stubs:
        stub.submitted.clear()
    wait(
        comfy_studio,
        comfy_studio.submit_generate({**BASE, "init_image": str(src), "denoising_strength": 0.4})[0],
    )
    wait(
        comfy_studio,
        comfy_studio.submit_generate(
            {**BASE, "init_image": str(src), "mask_image": str(mask), "mask_blur": 4}
        )[0],
    )
    graphs = [body["prompt"] for stub in stubs for body in stub.submitted]
    img2img = next(g for g in graphs if not any(n["class_type"] == "LoadImageMask" for n in g.values()))
    inpaint = next(g for g in graphs if any(n["class_type"] == "LoadImageMask" for n in g.values()))
    sampler = next(n for n in img2img.values() if n["class_type"] == "KSampler")["inputs"]
    assert sampler["denoise"] == 0.4
    init_name = next(n for n in inpaint.values() if n["class_type"] == "LoadImage")["inputs"]["image"]
    mask_name = next(n for n in inpaint.values() if n["class_type"] == "LoadImageMask")["inputs"]["image"]
    uploaded = {
        name: data for (kind, _, name), data in (stubs[0].files | stubs[1].files).items() if kind == "input"
    }
    assert init_name in uploaded and mask_name in uploaded
    import io

    import numpy as np

    sent = np.asarray(Image.open(io.BytesIO(uploaded[mask_name])).convert("L"))
    assert sent[32, 32] == 255 and sent[0, 0] == 0 and 0 < sent[32, 15] < 255  # white = repaint, blurred edge


def test_bad_comfyui_requests_are_refused_before_a_job(comfy_studio, studio):
    n = len(comfy_studio.recent_jobs(1000))
    with pytest.raises(InputError, match="does not support enable_hr"):
        comfy_studio.submit_generate({**BASE, "enable_hr": True})
    with pytest.raises(InputError, match="needs model="):
        comfy_studio.submit_generate({**BASE, "model": ""})
    with pytest.raises(InputError, match="comfy_template='nope' is not a workflow template"):
        comfy_studio.submit_generate({**BASE, "comfy_template": "nope"})
    assert len(comfy_studio.recent_jobs(1000)) == n
    with pytest.raises(InputError, match="--comfyui-urls"):  # the shared studio has no servers configured
        studio.submit_generate({**BASE})


def test_server_errors_reach_the_job_verbatim(comfy_studio, stubs):
    jid, _ = comfy_studio.submit_generate({**BASE, "model": "not_on_server.safetensors"})
    status = None
    for event in comfy_studio.watch(jid):
        if event["type"] in ("failed", "done"):
            status = event
    assert status["type"] == "failed" and "not_on_server.safetensors" in status["error"]
    assert "sd15_tiny.safetensors" in status["error"]  # what the server does have
    for stub in stubs:
        stub.fail_class = "KSampler"
    jid, _ = comfy_studio.submit_generate({**BASE})
    failed = [e for e in comfy_studio.watch(jid) if e["type"] == "failed"]
    assert failed and "KSampler" in failed[0]["error"]


def test_comfyui_through_gradio_client(stubs, models_dir, model_configs, tmp_path):
    """The app with --comfyui-urls: /comfy_servers and /comfy_models show the pool, /generate with
    engine='comfyui' renders on it and returns the files."""
    from gradio_client import Client

    from tests.factories import AppProcess

    urls = ",".join(s.url for s in stubs)
    app = AppProcess(
        tmp_path / "appdata", models_dir, "--model-configs", str(model_configs), "--comfyui-urls", urls
    ).start()
    try:
        client = Client(app.url, verbose=False)
        models = client.predict(api_name="/comfy_models")
        assert "sd15_tiny.safetensors" in models["checkpoints"] and "style_b.safetensors" in models["loras"]
        files, infotext, job_id, *_ = client.predict(
            prompt="a lighthouse",
            steps=4,
            width=64,
            height=64,
            seed=5,
            model="sd15_tiny.safetensors",
            engine="comfyui",
            api_name="/generate",
        )
        assert len(files) == 1 and "Seed: 5" in infotext
        servers = client.predict(api_name="/comfy_servers")
        assert {s["url"] for s in servers} == {s.url for s in stubs} and all(s["healthy"] for s in servers)
        assert client.predict(job_id, api_name="/job_status")["kind"] == "comfy_generate"
    finally:
        app.stop()


def test_a_users_api_workflow_becomes_a_template(comfy_studio, stubs):
    """An exported API-format workflow plus a manifest is kept under the data dir and renders by name; a
    UI-format export is refused with what to do instead."""
    from engine.comfyui.generate import SHIPPED_WORKFLOWS

    graph = json.loads((SHIPPED_WORKFLOWS / "txt2img.json").read_text())
    manifest = json.loads((SHIPPED_WORKFLOWS / "txt2img.manifest.json").read_text())
    manifest["name"] = "my_txt2img"
    added = comfy_studio.add_comfy_workflow(json.dumps(graph), json.dumps(manifest))
    assert added["name"] == "my_txt2img" and "prompt" in added["bindings"]
    assert "my_txt2img" in comfy_studio.comfy_template_names()
    result = wait(comfy_studio, comfy_studio.submit_generate({**BASE, "comfy_template": "my_txt2img"})[0])
    assert (
        json.loads(Image.open(result["images"][0]["path"]).text["studionova"])["comfyui"]["template"]
        == "my_txt2img"
    )
    with pytest.raises(InputError, match="API format"):
        comfy_studio.add_comfy_workflow(
            json.dumps({"nodes": [], "links": []}), json.dumps({**manifest, "name": "ui"})
        )


def test_no_healthy_server_fails_clearly_or_falls_back_when_enabled(models_dir, model_configs, tmp_path):
    """All servers down: the job fails naming the URL (after the job layer's retries), unless
    --comfyui-fallback-local is on, when local diffusers renders it and the result says so."""
    from engine.settings import Settings
    from engine.studio import Studio
    from tests.factories import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    for fallback in (False, True):
        settings = Settings(
            data_dir=tmp_path / f"data-{fallback}",
            models_dir=models_dir,
            demo=True,
            device="cpu",
            model_configs=str(model_configs),
            comfyui_urls=dead,
            comfyui_fallback_local=fallback,
        )
        st = Studio.start(settings)
        try:
            jid, _ = st.submit_generate({**BASE, "steps": 2})
            final = [e for e in st.watch(jid) if e["type"] in ("done", "failed")][-1]
            if fallback:
                assert final["type"] == "done", final
                assert "fallback from comfyui" in final["result"]["device"]
                assert final["result"]["model"] == st.default_model()
            else:
                assert final["type"] == "failed" and dead in final["error"], final
        finally:
            st.close()


def test_a_character_or_project_defaults_to_the_comfyui_engine(comfy_studio, stubs):
    """A character whose style says engine='comfyui' renders there when the caller does not choose."""
    c = comfy_studio.characters.create(
        {
            "name": "Comfy Char",
            "trigger_word": "comfychar",
            "style": {"engine": "comfyui", "model": "sd15_tiny.safetensors"},
        }
    )
    values = {k: v for k, v in BASE.items() if k not in ("engine", "model")}
    jid, _ = comfy_studio.submit_generate({**values, "character": c.slug})
    result = wait(comfy_studio, jid)
    assert comfy_studio.job_status(jid)["kind"] == "comfy_generate" and result["device"].startswith(
        "comfyui:"
    )
    assert comfy_studio.characters.effective_style(c)["engine"] == {"value": "comfyui", "source": "character"}
