"""The kohya sd-scripts delegate: the files it writes, the process it runs and what it registers.

A fake sd-scripts install (written here) plays the external program only: it parses the same three
arguments, reads both TOML files, checks the dataset folders, prints tqdm frames separated by bare \\r with
avr_loss, renders a sample PNG, saves --save_state folders and a kohya-named .safetensors. Everything of
StudioNOVA's runs for real: validation, the job, the process group, progress parsing, registration."""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import InputError
from tests.test_characters import wait
from tests.test_datasets import ingest, new_character, upload_dir
from tests.test_ingest import make_image

FAKE_TRAIN_NETWORK = r'''
"""A stand-in for sd-scripts' train_network.py: same arguments, same files read and written."""
import argparse, json, os, subprocess, sys, time, tomllib
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--config_file", required=True)
parser.add_argument("--dataset_config", required=True)
parser.add_argument("--resume")
args = parser.parse_args()
config = {}
for key, value in tomllib.loads(Path(args.config_file).read_text(encoding="utf-8")).items():
    if isinstance(value, dict):  # sd-scripts flattens the sections of --config_file
        config.update(value)
    else:
        config[key] = value
dataset = tomllib.loads(Path(args.dataset_config).read_text(encoding="utf-8"))
out = Path(config["output_dir"])
out.mkdir(parents=True, exist_ok=True)
images = 0
for ds in dataset["datasets"]:
    for subset in ds["subsets"]:
        for image in sorted(p for p in Path(subset["image_dir"]).iterdir() if p.suffix != ".txt"):
            if not image.with_suffix(".txt").is_file():
                sys.exit(f"no caption beside {image}")
            images += 1
name = config["output_name"]
(out / "received.json").write_text(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "script": Path(__file__).name,
                                               "pid": os.getpid(), "images": images}))
print("running training / 学習開始", flush=True)
if os.environ.get("FAKE_KOHYA_CHILD"):  # like a data-loader worker: same process group
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "child.pid").write_text(str(child.pid))
start = 0
if args.resume:
    start = json.loads((Path(args.resume) / "train_state.json").read_text())["current_step"]
    print(f"resume training from local state: {args.resume}", flush=True)
total = config["max_train_steps"]
pause = float(os.environ.get("FAKE_KOHYA_STEP_SLEEP", "0.01"))
fail_at = int(os.environ.get("FAKE_KOHYA_EXIT_AT", "0"))
every, sample_every = config.get("save_every_n_steps"), config.get("sample_every_n_steps")
for step in range(start + 1, total + 1):
    time.sleep(pause)
    bar = "#" * (10 * step // total)
    frame = f"\rsteps: {100 * step // total:3d}%|{bar:<10}| {step}/{total} [00:0{step % 10}<00:01,  2.00it/s"
    sys.stderr.write(f"{frame}, avr_loss={2.0 / step:.4g}]")  # progress_bar.update(): the previous postfix
    sys.stderr.write(f"{frame}, avr_loss={1.0 / step:.4g}]")  # set_postfix(avr_loss=...)
    sys.stderr.flush()
    if step == fail_at:
        sys.stderr.write("\nTraceback (most recent call last):\nRuntimeError: fake sd-scripts failure\n")
        sys.exit(3)
    if sample_every and step % sample_every == 0:
        from PIL import Image
        (out / "sample").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (40 * step % 255, 0, 0)).save(out / "sample" / f"{name}_{step:06d}_00_20260101_1234.png")
    if every and config.get("save_state") and step % every == 0:
        state = out / f"{name}-step{step:08d}-state"
        state.mkdir(exist_ok=True)
        (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": step}))
        (state / "random_states_0.pkl").write_bytes(b"rng")
sys.stderr.write("\n")
import torch
from safetensors.torch import save_file

dim, alpha = int(config["network_dim"]), float(config["network_alpha"])
key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
tensors = {f"{key}.lora_down.weight": torch.randn(dim, 32, generator=torch.Generator().manual_seed(1)).half(),
           f"{key}.lora_up.weight": torch.zeros(32, dim).half(), f"{key}.alpha": torch.tensor(alpha).half()}
meta = {"ss_network_module": config["network_module"], "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
        "ss_steps": str(total), "ss_epoch": "1", "ss_output_name": name, "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": Path(config["pretrained_model_name_or_path"]).name, "ss_sd_model_hash": "IsADirectory",
        "ss_new_sd_model_hash": "IsADirectory", "modelspec.title": name}
save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)
print("model saved.", flush=True)
'''

BASE = {
    "max_train_steps": 4,
    "resolution": 64,
    "rank": 4,
    "alpha": 2.0,
    "checkpoint_every": 0,
    "backend": "kohya",
}
TERMINAL = ("done", "failed", "cancelled", "interrupted")


def write_fake_install(root: Path, sub: str = "sd-scripts") -> Path:
    scripts = root / sub if sub else root
    scripts.mkdir(parents=True, exist_ok=True)
    for name in ("train_network.py", "sdxl_train_network.py"):
        (scripts / name).write_text(FAKE_TRAIN_NETWORK, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def fake_kohya(tmp_path_factory) -> Path:
    """A kohya_ss checkout: sd-scripts in its sd-scripts/ folder (no venv: the current interpreter runs it)."""
    return write_fake_install(tmp_path_factory.mktemp("kohya_ss"))


@pytest.fixture
def kohya(studio, fake_kohya, monkeypatch):
    for var in ("FAKE_KOHYA_EXIT_AT", "FAKE_KOHYA_STEP_SLEEP", "FAKE_KOHYA_CHILD"):
        monkeypatch.delenv(var, raising=False)
    s = studio.settings
    old = s.kohya_dir, s.kohya_python, s.min_approved_images
    s.kohya_dir, s.kohya_python, s.min_approved_images = str(fake_kohya), "", 2
    yield fake_kohya
    s.kohya_dir, s.kohya_python, s.min_approved_images = old


def approved_character(studio, name: str, n: int = 2):
    c = new_character(studio, name)
    up = upload_dir(studio, name.replace(" ", "-"))
    files = [str(make_image(up / f"{i}.png", size=(64, 64), seed=700 + i)) for i in range(n)]
    ids = [a["id"] for a in ingest(studio, c, files=files)["added"]]
    studio.review(c.slug, ids, "approve")
    return c


def kohya_dir_of(studio, jid: str) -> Path:
    return studio.settings.data_dir / "training" / jid / "kohya"


def flat_config(studio, jid: str) -> dict:
    data = tomllib.loads((kohya_dir_of(studio, jid) / "config.toml").read_text(encoding="utf-8"))
    return {k: v for section in data.values() for k, v in section.items()}


def received(studio, jid: str) -> dict:
    return json.loads((kohya_dir_of(studio, jid) / "output" / "received.json").read_text())


def events_until_end(studio, jid: str) -> list[dict]:
    events = []
    for event in studio.watch(jid):
        events.append(event)
        if event["type"] in TERMINAL:
            return events
    raise AssertionError("the job never ended")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


# --- not configured / the install ----------------------------------------------------------------------


def test_not_configured_is_a_clear_error_and_no_job(studio, kohya):
    c = approved_character(studio, "Kohya Unset")
    n = len(studio.recent_jobs(1000))
    studio.settings.kohya_dir = ""
    with pytest.raises(InputError, match=r"kohya_dir is empty.*--kohya-dir.*STUDIONOVA_KOHYA_DIR"):
        studio.submit_train_lora({"character": c.slug, **BASE})
    studio.settings.kohya_dir = str(kohya / "nowhere")
    with pytest.raises(
        InputError, match="nowhere/train_network.py and .*nowhere/sd-scripts/train_network.py"
    ):
        studio.submit_train_lora({"character": c.slug, **BASE})
    studio.settings.kohya_dir = str(kohya)
    with pytest.raises(InputError, match=r"backend='nope'; allowed: builtin, kohya"):
        studio.submit_train_lora({"character": c.slug, **BASE, "backend": "nope"})
    studio.settings.kohya_python = str(kohya / "no-python")
    with pytest.raises(InputError, match="kohya_python=.*--kohya-python.*not a file"):
        studio.submit_train_lora({"character": c.slug, **BASE})
    assert len(studio.recent_jobs(1000)) == n


def test_install_layouts_and_interpreter(tmp_path):
    from engine.training.kohya import locate_install

    bare = write_fake_install(tmp_path / "sd-scripts", sub="")
    found = locate_install(SimpleNamespace(kohya_dir=str(bare), kohya_python=""))
    assert found.scripts_dir == bare and found.python == Path(sys.executable)
    assert found.script("sdxl") == bare / "sdxl_train_network.py"
    gui = write_fake_install(tmp_path / "kohya_ss")
    venv_python = gui / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    found = locate_install(SimpleNamespace(kohya_dir=str(gui), kohya_python=""))
    assert found.scripts_dir == gui / "sd-scripts" and found.python == venv_python
    (gui / "sd-scripts" / "sdxl_train_network.py").unlink()
    with pytest.raises(InputError, match="sdxl_train_network.py is missing"):
        found.script("sdxl")
    assert found.script("sd1").name == "train_network.py"


# --- the files sd-scripts reads ------------------------------------------------------------------------


def test_toml_values_match_the_request(studio, kohya):
    c = approved_character(studio, "Kohya Options")
    values = {
        **BASE,
        "character": c.slug,
        "locon": True,
        "train_text_encoder": True,
        "text_encoder_lr": 3e-5,
        "learning_rate": 2e-4,
        "optimizer": "adafactor",
        "mixed_precision": "bf16",
        "save_precision": "bf16",
        "resume_from": "kohya_style",
        "noise_offset": 0.05,
        "min_snr_gamma": 5.0,
        "gradient_checkpointing": True,
        "lr_scheduler": "cosine_with_restarts",
        "lr_num_cycles": 2,
        "lr_warmup_steps": 1,
        "seed": 7,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 2,
        "cache_latents": False,
        "sample_every": 2,
        "sample_prompts": ["kohyaoptions, smiling"],
    }
    jid, _ = studio.submit_train_lora(values)
    wait(studio, jid)
    cfg = flat_config(studio, jid)
    train = studio.jobs.require(jid).request["train"]
    assert cfg["pretrained_model_name_or_path"] == train["model_path"] and cfg["v2"] is False
    # offline: the base model's tokenizer where sd-scripts looks before the Hub
    cached = Path(cfg["tokenizer_cache_dir"]) / "openai_clip-vit-large-patch14"
    assert (cached / "tokenizer_config.json").read_bytes() == (
        Path(train["model_path"]) / "tokenizer" / "tokenizer_config.json"
    ).read_bytes()
    assert (cfg["network_module"], cfg["network_dim"], cfg["network_alpha"]) == ("networks.lora", 4, 2.0)
    assert cfg["network_args"] == ["conv_dim=4", "conv_alpha=2.0"]
    assert cfg["network_train_unet_only"] is False and cfg["text_encoder_lr"] == 3e-5
    assert cfg["learning_rate"] == cfg["unet_lr"] == 2e-4
    assert cfg["optimizer_type"] == "Adafactor" and "relative_step=False" in cfg["optimizer_args"]
    assert cfg["lr_scheduler"] == "cosine_with_restarts"
    assert (cfg["lr_scheduler_num_cycles"], cfg["lr_warmup_steps"]) == (2, 1)
    assert cfg["mixed_precision"] == "bf16" and cfg["save_precision"] == "bf16" and cfg["seed"] == 7
    assert cfg["network_weights"] == str(studio.settings.models_dir / "loras" / "kohya_style.safetensors")
    assert (cfg["noise_offset"], cfg["min_snr_gamma"]) == (0.05, 5.0)
    assert cfg["gradient_checkpointing"] is True and cfg["cache_latents"] is False
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["max_train_steps"]) == (2, 2, 4)
    # 2 checkpoints kept, every 2 steps: sd-scripts keeps those of the last (2 - 1) * 2 steps
    assert (cfg["save_every_n_steps"], cfg["save_last_n_steps"], cfg["save_last_n_steps_state"]) == (2, 2, 2)
    assert cfg["save_state"] is True and cfg["save_model_as"] == "safetensors"
    assert cfg["output_name"] == f"{c.slug}-lora"
    assert cfg["output_dir"] == str(kohya_dir_of(studio, jid) / "output")
    assert cfg["sample_every_n_steps"] == 2 and cfg["sample_sampler"] == "euler"
    prompts = Path(cfg["sample_prompts"]).read_text(encoding="utf-8")
    assert prompts == "kohyaoptions, smiling --w 64 --h 64 --d 1234 --s 20 --l 7.0\n"
    dataset = tomllib.loads((kohya_dir_of(studio, jid) / "dataset.toml").read_text(encoding="utf-8"))
    assert dataset["datasets"][0]["batch_size"] == 2 and dataset["general"]["caption_extension"] == ".txt"
    # without text-encoder training: the UNet only, and no text-encoder learning rate
    jid2, _ = studio.submit_train_lora({**BASE, "character": c.slug, "optimizer": "adamw"})
    wait(studio, jid2)
    cfg2 = flat_config(studio, jid2)
    assert cfg2["network_train_unet_only"] is True and "text_encoder_lr" not in cfg2
    assert "network_args" not in cfg2 and "network_weights" not in cfg2 and "noise_offset" not in cfg2
    assert cfg2["optimizer_type"] == "AdamW" and cfg2["mixed_precision"] == "no"
    assert "save_every_n_steps" not in cfg2  # checkpoint_every=0: the state at the end only


def test_every_optimizer_and_family_maps_to_sd_scripts_names(tmp_path):
    from engine.training.kohya import KohyaLayout, bucket_settings, dataset_config, training_config
    from engine.training.trainer import TrainLoraRequest

    layout = KohyaLayout(tmp_path)
    base = {"model": "m", "images": [{"path": "/x.png", "caption": "x"}], "output_name": "x-lora"}
    names = {}
    for ours in ("adamw", "adamw8bit", "prodigy", "adafactor"):
        cfg = training_config(TrainLoraRequest.build(**base, optimizer=ours), tmp_path, layout, False)
        names[ours] = cfg["optimizer"]["optimizer_type"]
    assert names == {
        "adamw": "AdamW",
        "adamw8bit": "AdamW8bit",
        "prodigy": "Prodigy",
        "adafactor": "Adafactor",
    }
    xl = TrainLoraRequest.build(**base, family="sdxl", resolution=1024, max_train_epochs=3)
    cfg = training_config(xl, tmp_path, layout, v_prediction=True)
    assert cfg["training"]["no_half_vae"] is True and cfg["model"]["v_parameterization"] is True
    assert cfg["training"]["max_train_epochs"] == 3
    sd2 = training_config(TrainLoraRequest.build(**base, family="sd2"), tmp_path, layout, False)
    assert sd2["model"]["v2"] is True and "no_half_vae" not in sd2["training"]
    # our bucket rule in sd-scripts' terms; below 512 its 64-pixel minimum grid applies (SD1.x)
    assert bucket_settings(xl) == {"min_bucket_reso": 512, "max_bucket_reso": 2048, "bucket_reso_steps": 64}
    small = TrainLoraRequest.build(**base, resolution=256)
    assert bucket_settings(small) == {"min_bucket_reso": 128, "max_bucket_reso": 512, "bucket_reso_steps": 64}
    flat = TrainLoraRequest.build(
        **base, bucketing=False, random_flip=True, caption_dropout=0.1, shuffle_captions=True, keep_tokens=2
    )
    ds = dataset_config(flat, [])
    assert ds["datasets"][0]["enable_bucket"] is False and "min_bucket_reso" not in ds["datasets"][0]
    assert ds["general"] == {
        "caption_extension": ".txt",
        "shuffle_caption": True,
        "keep_tokens": 2,
        "flip_aug": True,
        "caption_dropout_rate": 0.1,
    }


def test_dataset_layout_has_every_image_with_its_caption_and_repeats(studio, kohya):
    c = approved_character(studio, "Kohya Layout", n=3)
    reg = studio.settings.import_dir / "kohya-reg" / "1_person"
    reg.mkdir(parents=True)
    make_image(reg / "r0.png", size=(64, 64), seed=910)
    (reg / "r0.txt").write_text("a person", encoding="utf-8")
    jid, _ = studio.submit_train_lora(
        {**BASE, "character": c.slug, "repeats": 3, "reg_dir": str(reg.parent), "prior_loss_weight": 0.5}
    )
    wait(studio, jid)
    images = studio.jobs.require(jid).request["train"]["images"]
    dataset = tomllib.loads((kohya_dir_of(studio, jid) / "dataset.toml").read_text(encoding="utf-8"))
    subsets = dataset["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["is_reg"]) for s in subsets] == [
        (f"3_{c.slug}-lora", 3, False),
        ("3_reg", 3, True),
    ]
    assert dataset["datasets"][0]["resolution"] == 64 and dataset["datasets"][0]["enable_bucket"] is True
    assert flat_config(studio, jid)["prior_loss_weight"] == 0.5
    for index, item in enumerate(images):
        folder = Path(subsets[1 if item.get("reg") else 0]["image_dir"])
        copy = folder / f"{index:05d}.png"
        assert copy.read_bytes() == Path(item["path"]).read_bytes()
        assert (folder / f"{index:05d}.txt").read_text(encoding="utf-8") == item["caption"]
    assert sum(1 for i in images if not i.get("reg")) == 3 and images[-1]["caption"] == "a person"
    assert received(studio, jid)["images"] == 4


# --- the job ---------------------------------------------------------------------------------------------


def test_progress_loss_samples_and_the_registered_version(studio, kohya, models_dir):
    from engine.artifacts import safetensors_header
    from engine.characters.characters import inspect_lora

    c = approved_character(studio, "Kohya Result")
    jid, _ = studio.submit_train_lora(
        {
            **BASE,
            "character": c.slug,
            "max_train_steps": 6,
            "sample_every": 3,
            "sample_prompts": ["kohyaresult"],
        }
    )
    events = events_until_end(studio, jid)
    assert events[-1]["type"] == "done", events[-1]
    res = events[-1]["result"]
    steps = [e for e in events if e["type"] == "progress" and "loss" in e]
    assert steps[-1]["step"] == steps[-1]["total"] == 6
    assert steps[-1]["loss"] == pytest.approx(1 / 6, rel=1e-3)
    assert steps[-1]["desc"].startswith("step 6/6 loss")
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    assert len(samples) == 2 and all(Path(p).is_relative_to(studio.settings.outputs_dir) for p in samples)
    status = studio.job_status(jid)
    assert status["status"] == "succeeded" and status["progress"]["step"] == status["progress"]["total"] == 6
    # every step's last avr_loss (the frame after set_postfix), in step order
    assert res["losses"] == pytest.approx([1 / s for s in range(1, 7)], rel=1e-3) and res["steps"] == 6
    assert len(res["samples"]) == 2 and res["backend"] == "kohya"
    assert Path(received(studio, jid)["cwd"]) == (kohya / "sd-scripts").resolve()
    assert received(studio, jid)["argv"][1:] == [
        "--config_file",
        str(kohya_dir_of(studio, jid) / "config.toml"),
        "--dataset_config",
        str(kohya_dir_of(studio, jid) / "dataset.toml"),
    ]
    # registered as the character's next version, in models/loras, loadable by our inspection
    path = models_dir / "loras" / f"{c.slug}-v1.safetensors"
    assert res["lora"] == f"{c.slug}-v1" and res["file"] == f"loras/{c.slug}-v1.safetensors"
    info = inspect_lora(path)
    assert info["format"] == "kohya" and info["metadata"]["ss_network_dim"] == "4"
    meta = safetensors_header(path)[1]["__metadata__"]
    assert (meta["studionova_job"], meta["studionova_character"]) == (jid, c.slug) and meta["sshs_model_hash"]
    assert meta["ss_sd_model_name"] == studio.jobs.require(jid).request["train"]["model"]
    assert meta["ss_sd_model_hash"] != "IsADirectory" and "ss_new_sd_model_hash" not in meta
    view = studio.character_view(c.slug)
    assert view["loras"][0]["name"] == f"{c.slug}-v1" and view["active_lora"] == view["loras"][0]["id"]
    report = json.loads(Path(res["report"]).read_text())
    assert report["backend"] == "kohya" and report["losses"] == res["losses"] and report["version"] == 1
    res2 = wait(studio, studio.submit_train_lora({**BASE, "character": c.slug, "max_train_steps": 2})[0])
    assert res2["lora"] == f"{c.slug}-v2" and (models_dir / "loras" / f"{c.slug}-v2.safetensors").is_file()


def test_sdxl_runs_sdxl_train_network_and_a_single_file_base_its_diffusers_conversion(studio, kohya):
    from engine.characters.characters import inspect_lora

    c = approved_character(studio, "Kohya XL")
    jid, _ = studio.submit_train_lora({**BASE, "character": c.slug, "model": "tiny-sdxl", "resolution": 512})
    wait(studio, jid)
    assert received(studio, jid)["script"] == "sdxl_train_network.py"
    cfg = flat_config(studio, jid)
    assert cfg["no_half_vae"] is True and cfg["v2"] is False
    jid, _ = studio.submit_train_lora({**BASE, "character": c.slug, "model": "demo-single.safetensors"})
    res = wait(studio, jid)
    folder = Path(flat_config(studio, jid)["pretrained_model_name_or_path"])
    assert received(studio, jid)["script"] == "train_network.py" and (folder / "model_index.json").is_file()
    assert folder.is_relative_to(studio.settings.cache_dir)  # the cached conversion the built-in trainer uses
    meta = inspect_lora(studio.settings.models_dir / res["file"])["metadata"]
    assert meta["ss_sd_model_name"] == "demo-single.safetensors" and len(meta["ss_sd_model_hash"]) == 10


def test_exit_code_3_fails_the_job_with_the_code_and_the_output_tail(studio, kohya, models_dir, monkeypatch):
    c = approved_character(studio, "Kohya Fails")
    monkeypatch.setenv("FAKE_KOHYA_EXIT_AT", "2")
    jid, _ = studio.submit_train_lora({**BASE, "character": c.slug})
    end = events_until_end(studio, jid)[-1]
    assert end["type"] == "failed"
    status = studio.job_status(jid)
    assert status["status"] == "failed" and "exited with code 3" in status["error"]
    assert "RuntimeError: fake sd-scripts failure" in status["error"] and "Traceback" in status["error"]
    # the tail keeps the bar's last frame only, not every redraw
    assert status["error"].count("steps:") == 1 and "2/4" in status["error"]
    assert not list((models_dir / "loras").glob(f"{c.slug}-v*.safetensors"))
    log = (kohya_dir_of(studio, jid) / "train.log").read_text(encoding="utf-8")
    assert "running training" in log and "avr_loss=0.5" in log


def test_cancel_terminates_the_process_group(studio, kohya, monkeypatch):
    c = approved_character(studio, "Kohya Cancel")
    monkeypatch.setenv("FAKE_KOHYA_STEP_SLEEP", "0.5")
    monkeypatch.setenv("FAKE_KOHYA_CHILD", "1")
    jid, token = studio.submit_train_lora({**BASE, "character": c.slug, "max_train_steps": 200})
    for event in studio.watch(jid):
        assert event["type"] not in TERMINAL, event
        if event["type"] == "progress" and event.get("step", 0) >= 1:
            break
    out = kohya_dir_of(studio, jid) / "output"
    pids = [received(studio, jid)["pid"], int((out / "child.pid").read_text())]
    assert all(alive(p) for p in pids)
    started = time.monotonic()
    assert studio.cancel(jid, token=token) == "cancelling"
    end = events_until_end(studio, jid)[-1]
    assert end["type"] == "cancelled" and time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "sd-scripts and its child were ended"
    assert not (kohya_dir_of(studio, jid) / "process.json").exists()


def test_a_saved_state_is_resumed_with_resume(studio, kohya, monkeypatch):
    from sqlalchemy import update

    from engine.store.database import Job

    c = approved_character(studio, "Kohya Resume")
    monkeypatch.setenv("FAKE_KOHYA_EXIT_AT", "3")
    jid, token = studio.submit_train_lora({**BASE, "character": c.slug, "checkpoint_every": 2})
    assert events_until_end(studio, jid)[-1]["type"] == "failed"
    out = kohya_dir_of(studio, jid) / "output"
    state = out / f"{c.slug}-lora-step00000002-state"
    assert (state / "train_state.json").is_file()
    newer_incomplete = out / f"{c.slug}-lora-step00000003-state"  # killed while saving: no RNG state yet
    newer_incomplete.mkdir()
    (newer_incomplete / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 3}))
    with studio.db.session() as s:  # what recover() makes of a job whose app died under it
        s.execute(update(Job).where(Job.id == jid).values(status="interrupted"))
        s.commit()
    monkeypatch.delenv("FAKE_KOHYA_EXIT_AT")
    assert studio.resume(jid, token=token) == "queued"
    res = wait(studio, jid)
    argv = received(studio, jid)["argv"]
    assert argv[-2:] == ["--resume", str(state)]
    assert res["resumed_from_step"] == 2 and res["lora"] == f"{c.slug}-v1"
    assert res["losses"][0] == pytest.approx(1 / 3, rel=1e-3)  # this attempt's steps: 3 and 4


def test_resume_from_that_sd_scripts_would_misread_is_refused_before_a_job(studio, kohya):
    c = approved_character(studio, "Kohya Resume From")
    n = len(studio.recent_jobs(1000))
    with pytest.raises(InputError, match="alpha 2, but alpha=3; use the file's alpha"):
        studio.submit_train_lora({**BASE, "character": c.slug, "resume_from": "kohya_style", "alpha": 3.0})
    with pytest.raises(InputError, match="rank 4, but rank=8"):
        studio.submit_train_lora({**BASE, "character": c.slug, "resume_from": "kohya_style", "rank": 8})
    with pytest.raises(InputError, match="is a diffusers LoRA; sd-scripts continues only from kohya-format"):
        studio.submit_train_lora({**BASE, "character": c.slug, "resume_from": "peft_style"})
    with pytest.raises(InputError, match=r"sample_prompts\[0\].*' --'"):
        studio.submit_train_lora(
            {**BASE, "character": c.slug, "sample_every": 2, "sample_prompts": ["a --n b"]}
        )
    assert len(studio.recent_jobs(1000)) == n


def test_progress_parsing_and_line_splitting():
    from engine.training.kohya import LineSplitter, parse_progress

    frame = parse_progress("steps:  12%|█▏        | 12/100 [00:05<00:40,  2.10it/s, avr_loss=0.123]")
    assert (frame.desc, frame.n, frame.total, frame.eta, frame.loss) == ("steps", 12, 100, 40.0, 0.123)
    frame = parse_progress("steps: 100%|##########| 3/3 [1:02:03<?, 1.5s/it, Keys Scaled=1, avr_loss=nan]")
    assert frame.eta is None and frame.loss != frame.loss  # nan
    caching = parse_progress(" 40%|████      | 2/5 [00:01<00:01,  1.99it/s]")
    assert caching.desc == "" and caching.loss is None
    assert parse_progress("INFO     loading model") is None
    split = LineSplitter()
    assert split.feed(b"a\rb\r\nc") == ["a", "b"]
    assert split.feed(b"\xe5\xad\xa6\r\x1b[32mgreen\x1b[0m\n") == ["c\u5b66", "green"]
    assert split.flush() == []
