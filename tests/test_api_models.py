"""Models through gradio_client: download a single-file checkpoint from a (stub) Hub with
/download_model, see it in /list_model_files with family and hashes, and generate with it offline."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from engine.gallery.infotext import parse_infotext
from tests.factories import AppProcess
from tests.hub_stub import HubStub

SMALL = dict(prompt="a lighthouse", negative_prompt="", steps=2, width=64, height=64, cfg_scale=7.0, seed=21)


@pytest.fixture(scope="module")
def hub():
    with HubStub() as stub:
        yield stub


@pytest.fixture(scope="module")
def online_app(hub, models_dir, model_configs, tmp_path_factory):
    """A second app whose Hub is the local stub (the shared app runs with the Hub off)."""
    models = tmp_path_factory.mktemp("models_online")
    for sub in ("diffusers", "loras"):
        (models / sub).symlink_to(models_dir / sub, target_is_directory=True)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}
    proc = AppProcess(
        tmp_path_factory.mktemp("appdata_online"), models, "--model-configs", str(model_configs), env=env
    ).start()
    yield proc
    proc.stop()


def test_download_scan_and_generate_with_a_single_file_checkpoint(hub, online_app, models_dir):
    data = (models_dir / "checkpoints" / "demo-single.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    hub.add_repo("acme/tiny-sd1", {"tiny-sd1.safetensors": data})
    client = Client(online_app.url, verbose=False)

    result, status = client.predict(
        repo_id="acme/tiny-sd1",
        filename="tiny-sd1.safetensors",
        kind="checkpoints",
        sha256=sha,
        api_name="/download_model",
    )
    assert (result["status"], result["saved_as"]) == ("succeeded", "checkpoints/tiny-sd1.safetensors")
    assert "tiny-sd1.safetensors" in status
    rows = {r["name"]: r for r in client.predict(api_name="/list_model_files")}
    row = rows["tiny-sd1.safetensors"]
    assert (row["kind"], row["family"], row["sha256"], row["short_hash"]) == (
        "checkpoints",
        "SD1.x",
        sha,
        sha[:10],
    )

    listing = client.predict(api_name="/list_models")
    assert "tiny-sd1.safetensors" in {m["name"] for m in listing["models"]}
    single = client.predict(**SMALL, model="tiny-sd1.safetensors", api_name="/generate")
    folder = client.predict(**SMALL, model="studionova-demo", api_name="/generate")
    a = np.asarray(Image.open(single[0][0]["image"]).convert("RGB"))
    b = np.asarray(Image.open(folder[0][0]["image"]).convert("RGB"))
    assert np.array_equal(a, b)  # same weights, same pixels: the checkpoint loaded right
    info = parse_infotext(single[1])
    assert (info["Model"], info["Model hash"]) == ("tiny-sd1", sha[:10])

    # A wrong expected hash is refused and leaves nothing in models/checkpoints.
    hub.add_repo("acme/other", {"other.safetensors": data})
    with pytest.raises(Exception, match="(?i)sha-?256"):
        client.predict(
            repo_id="acme/other",
            filename="other.safetensors",
            kind="checkpoints",
            sha256="0" * 64,
            api_name="/download_model",
        )
    names = {r["name"] for r in client.predict(api_name="/list_model_files")}
    assert "other.safetensors" not in names
