"""gradio_client end to end against the launched app: /generate, /job_status, /cancel_job, errors."""

from __future__ import annotations

import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from engine.gallery.infotext import parse_infotext

SMALL = dict(prompt="a castle", negative_prompt="", steps=4, width=64, height=64)


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def test_generate_returns_png_files_with_infotext(client):
    args = {**SMALL, "steps": 40}  # long enough for a status poll to see progress
    job = client.submit(**args, seed=321, batch_size=2, loras="kohya_style:0.5", api_name="/generate")
    progress_seen = set()
    while not job.done():
        status = job.status()
        if status.progress_data:
            progress_seen.add(status.progress_data[0].index)
        time.sleep(0.01)
    images, infotext, job_id, token, state, _preview = job.result()
    assert len(images) == 2 and "succeeded" in state and job_id and token
    assert progress_seen, "no progress reached the client"
    for i, item in enumerate(images):
        png = Image.open(item["image"])
        assert png.format == "PNG" and png.size == (64, 64)
        assert parse_infotext(png.text["parameters"])["Seed"] == str(321 + i)
        assert "studionova" in png.text
    p = parse_infotext(infotext)
    assert p["Steps"] == "40" and p["Lora hashes"].startswith("kohya_style: ")
    status = client.predict(job_id, api_name="/job_status")
    assert status["status"] == "succeeded" and status["progress"]["step"] == status["progress"]["total"] == 40
    assert len(status["result"]["images"]) == 2


def test_same_seed_same_png_pixels_through_api(client):
    a = client.predict(**SMALL, seed=99, api_name="/generate")[0][0]["image"]
    b = client.predict(**SMALL, seed=99, api_name="/generate")[0][0]["image"]
    assert Image.open(a).tobytes() == Image.open(b).tobytes()


def test_cancel_through_api(client):
    job = client.submit(**{**SMALL, "steps": 150, "width": 128, "height": 128}, seed=5, api_name="/generate")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not job.outputs():
        time.sleep(0.05)
    _, _, job_id, token, _, _ = job.outputs()[0]
    with pytest.raises(AppError, match="only its owner"):
        client.predict(job_id, "not-the-token", api_name="/cancel_job")
    assert client.predict(job_id, token, api_name="/cancel_job") in ("cancelled", "cancelling")
    deadline = time.monotonic() + 30
    while client.predict(job_id, api_name="/job_status")["status"] not in ("cancelled", "succeeded"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.predict(job_id, api_name="/job_status")["status"] == "cancelled"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"model": "nope"},
            "model 'nope' not found; available: demo-single.safetensors, studionova-demo, tiny-sdxl",
        ),
        ({"model": "../../etc/passwd"}, "not found"),
        ({"steps": -1}, "steps=-1"),
        ({"width": 64000, "height": 64000}, "width=64000"),
        ({"loras": "../../studio:1"}, "lora '../../studio' not found"),
    ],
)
def test_bad_input_gets_a_clear_error(client, overrides, needle):
    with pytest.raises(AppError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        client.predict(**{**SMALL, **overrides}, seed=1, api_name="/generate")


def test_unknown_job_status(client):
    with pytest.raises(AppError, match="job 'missing' not found"):
        client.predict("missing", api_name="/job_status")


def test_internal_events_are_hidden_from_api(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {
        "/generate",
        "/job_status",
        "/cancel_job",
        "/retry_job",
        "/resume_job",
        "/list_models",
        "/usage",
    } <= names
    assert not [n for n in names if "lambda" in n or "refresh" in n or "add_lora" in n or "remember" in n]


def test_readme_client_example_runs(app):
    """The README's gradio_client example, as written, against the launched app."""
    from tests.factories import REPO

    readme = (REPO / "README.md").read_text()
    code = (
        readme.split("## From a Python script (gradio_client)", 1)[1]
        .split("```python", 1)[1]
        .split("```", 1)[0]
    )
    code = code.replace("http://127.0.0.1:7860/", app.url)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["images"]) == 2 and "Steps: 4" in namespace["infotext"]
    client = namespace["client"]
    deadline = time.monotonic() + 30
    while client.predict(namespace["long_id"], api_name="/job_status")["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_img2img_through_api(client, tmp_path):
    from gradio_client import handle_file

    src = tmp_path / "src.png"
    Image.new("RGB", (96, 80), (200, 40, 40)).save(src)
    args = dict(SMALL, seed=7, init_image=handle_file(str(src)), denoising_strength=0.5, api_name="/generate")
    first, infotext, job_id, *_ = client.predict(**args)
    again = client.predict(**args)[0]
    assert Image.open(first[0]["image"]).size == (64, 64)
    assert Image.open(first[0]["image"]).tobytes() == Image.open(again[0]["image"]).tobytes()
    assert parse_infotext(infotext)["Denoising strength"] == "0.5"
    assert client.predict(job_id, api_name="/job_status")["status"] == "succeeded"


def test_list_models_and_usage(client):
    listing = client.predict(api_name="/list_models")
    assert listing["default_model"] == "studionova-demo"
    assert listing["models"][0]["label"].endswith("demo (random weights)")
    assert {"kohya_style", "peft_style"} <= set(listing["loras"]) and "DPM++ 2M Karras" in listing["samplers"]
    client.predict(**SMALL, seed=1, api_name="/generate")
    usage = client.predict(api_name="/usage")
    demo = next(row for row in usage["per_model"] if row["model"] == "studionova-demo")
    assert demo["jobs"] >= 1


def test_readme_characters_example_runs(app, tmp_path):
    """The README's characters example, as written (a ZIP of two frames stands in for frames.zip)."""
    import zipfile

    import numpy as np
    from PIL import Image

    from tests.factories import REPO

    rng = np.random.default_rng(42)
    archive = tmp_path / "frames.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            z.write(tmp_path / f"{i}.png", f"frames/{i}.png")
    readme = (REPO / "README.md").read_text()
    code = (
        readme.split("Characters and their datasets from a script:", 1)[1]
        .split("```python", 1)[1]
        .split("```", 1)[0]
    )
    code = code.replace("http://127.0.0.1:7860/", app.url).replace('"frames.zip"', repr(str(archive)))
    code = code.replace('name="Nova"', 'name="Nova Readme"')  # other tests share the app
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["report"]["added"]) == 2
    assert namespace["queue"]["total"] == 3  # the generated image plus the two frames
    client, slug = namespace["client"], namespace["nova"]["slug"]
    assert client.predict(character=slug, api_name="/dataset_stats")["rejected"] == 0  # undone
