"""LoRA training on the tiny demo model, on the CPU: learning, exact resume, bad input, buckets."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from engine.errors import InputError, JobCancelledError
from engine.training.trainer import (
    PRESETS,
    DataPlan,
    TrainLoraRequest,
    augment_caption,
    bucket_for,
    bucket_sizes,
    bucket_step,
    check_compatible,
    evaluate_loss,
    prepare_images,
    train_lora,
)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from engine.model_manager.demo_model import ensure_demo_model
    from engine.paths import ModelRoots

    root = tmp_path_factory.mktemp("train-models")
    ModelRoots(root).create_layout()
    return ensure_demo_model(root)


def make_image(path: Path, width: int, height: int, seed: int) -> Path:
    """A smooth colour field plus noise: something a VAE encodes to varied latents."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype("uint8")
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("train-images")
    sizes = [(64, 64), (80, 64), (128, 64)]
    captions = ["nova, red jacket, smiling", "nova, city at night, rain", "nova, wide shot, beach, sunset"]
    return [
        {"path": str(make_image(folder / f"img{i}.png", w, h, seed=i)), "caption": captions[i]}
        for i, (w, h) in enumerate(sizes)
    ]


def request(demo_model: Path, images: list[dict], **values) -> TrainLoraRequest:
    base = {
        "model": "studionova-demo",
        "model_path": str(demo_model),
        "images": images,
        "output_name": "nova-v1",
        "rank": 4,
        "alpha": 4.0,
        "resolution": 64,
        "max_train_steps": 4,
        "checkpoint_every": 0,
        "save_precision": "float",
    }
    return TrainLoraRequest.build(**{**base, **values})


def tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_loss_on_a_fixed_batch_drops_after_training(demo_model, images, tmp_path):
    req = request(
        demo_model,
        images[:2],
        locon=True,
        learning_rate=2e-3,
        max_train_steps=20,
        batch_size=2,
        bucketing=False,
    )
    before = evaluate_loss(req)
    assert before == pytest.approx(evaluate_loss(req))  # the fixed batch and draws really are fixed
    result = train_lora(req, tmp_path, lambda e: None, lambda: False)
    after = evaluate_loss(req, Path(result["peft_state"]))
    assert after < 0.85 * before, (before, after)
    assert result["steps"] == 20 and len(result["losses"]) == 20 and result["resumed_from_step"] is None
    assert result["final_loss"] == result["losses"][-1]


def test_cancelled_run_resumes_to_the_same_weights(demo_model, images, tmp_path):
    # every source of randomness on: data order, flips, caption dropout/shuffle, uncached VAE sampling,
    # offset noise, min-SNR, a warm-up + cosine schedule, gradient accumulation
    req = request(
        demo_model,
        images,
        max_train_steps=8,
        checkpoint_every=4,
        random_flip=True,
        shuffle_captions=True,
        caption_dropout=0.3,
        cache_latents=False,
        noise_offset=0.05,
        min_snr_gamma=5.0,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-4,
    )
    whole = train_lora(req, tmp_path / "whole", lambda e: None, lambda: False)
    ckpts = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000008"]

    work = tmp_path / "interrupted"
    seen = {"step": 0}

    def emit(event: dict) -> None:
        if "loss" in event:
            seen["step"] = event["step"]

    with pytest.raises(JobCancelledError, match="step 5"):
        train_lora(req, work, emit, lambda: seen["step"] >= 5)
    state = json.loads((work / "checkpoints" / "step-000005" / "state.json").read_text())
    assert state["step"] == 5 and (work / "checkpoints" / "step-000005" / "complete").is_file()
    # leftovers of a crash: a temp folder and a checkpoint without its marker, neither may be used
    (work / "checkpoints" / ".tmp-abc123").mkdir()
    partial = work / "checkpoints" / "step-000007"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({**state, "step": 7}))

    resumed = train_lora(req, work, lambda e: None, lambda: False)
    assert resumed["resumed_from_step"] == 5
    assert resumed["steps"] == 8 and len(resumed["losses"]) == 8
    assert not partial.exists() and not (work / "checkpoints" / ".tmp-abc123").exists()
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-5)
    a, b = tensors(whole["peft_state"]), tensors(resumed["peft_state"])
    assert a.keys() == b.keys() and len(a) > 0
    import torch

    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    # a finished run asked again resumes at the end and trains nothing
    again = train_lora(req, work, lambda e: None, lambda: False)
    assert again["resumed_from_step"] == 8 and again["losses"] == pytest.approx(resumed["losses"])


def test_options_run_end_to_end(demo_model, images, tmp_path):
    """LoCon, text encoder training, gradient checkpointing, a v-prediction model, samples."""
    vmodel = tmp_path / "demo-v"
    shutil.copytree(demo_model, vmodel)
    config = vmodel / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    req = request(
        vmodel,
        images,
        locon=True,
        train_text_encoder=True,
        gradient_checkpointing=True,
        batch_size=2,
        max_train_steps=2,
        sample_every=2,
        sample_prompts=["nova on a beach"],
        save_precision="fp16",
        checkpoint_every=1,
        keep_checkpoints=1,
    )
    events = []
    result = train_lora(req, tmp_path / "work", events.append, lambda: False)
    steps = [e for e in events if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    assert all({"step", "total", "eta", "desc", "loss", "lr"} <= e.keys() and e["total"] == 2 for e in steps)
    assert all(math.isfinite(x) for x in result["losses"])
    assert [p.name for p in (tmp_path / "work" / "checkpoints").iterdir()] == ["step-000002"]  # keep 1
    unet = tensors(result["peft_state"])
    assert any(".conv1.lora_A" in k for k in unet) and any(".to_q.lora_B" in k for k in unet)
    import torch

    assert {v.dtype for v in unet.values()} == {torch.float16}
    te = tensors(result["peft_state_text_encoders"]["text_encoder"])
    assert any("q_proj.lora_A" in k for k in te)
    assert [Path(p).name for p in result["samples"]] == ["step-000002-0.png"]
    assert any(e.get("type") == "sample" for e in events)


def test_resume_from_a_kohya_lora_rescales_alpha(demo_model, images, tmp_path):
    import torch

    from engine.training.trainer import add_lora_adapters, load_parts, load_resume_from
    from tests.factories import make_lora_state, save_kohya_lora

    path = save_kohya_lora(tmp_path / "k.safetensors", demo_model, seed=3, rank=4, alpha=2.0)
    req = request(demo_model, images, rank=4, alpha=4.0, train_text_encoder=True, resume_from=str(path))
    parts = load_parts(req)
    trained = add_lora_adapters(req, parts)
    assert load_resume_from(req, parts, trained) == ["unet", "text_encoder"]
    original, _ = make_lora_state(demo_model, rank=4, alpha=2.0, seed=3)
    from engine.training.trainer import lora_state

    ours = lora_state(parts.unet)
    key = next(k for k in original if k.endswith("attn1.to_q.lora_B.weight"))
    # kohya alpha 2 / rank 4 = 0.5 vs ours 4 / 4 = 1.0: the same update needs lora_B halved
    assert torch.allclose(ours[key], original[key] * 0.5, atol=1e-6)
    a_key = key.replace("lora_B", "lora_A")
    assert torch.allclose(ours[a_key], original[a_key], atol=1e-6)

    with pytest.raises(InputError, match="rank"):
        wrong = request(demo_model, images, rank=8, alpha=8.0, resume_from=str(path))
        load_resume_from(wrong, parts := load_parts(wrong), add_lora_adapters(wrong, parts))


def test_resume_from_our_own_output_continues_it(demo_model, images, tmp_path):
    first = train_lora(
        request(demo_model, images, max_train_steps=2, learning_rate=1e-3),
        tmp_path / "a",
        lambda e: None,
        lambda: False,
    )
    req = request(demo_model, images, max_train_steps=2, resume_from=first["peft_state"])
    from engine.training.trainer import add_lora_adapters, load_parts, load_resume_from, lora_state

    parts = load_parts(req)
    load_resume_from(req, parts, add_lora_adapters(req, parts))
    loaded, saved = lora_state(parts.unet), tensors(first["peft_state"])
    import torch

    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_sdxl_trains_both_text_encoders_in_bf16(tmp_path, images, monkeypatch):
    from engine.training import trainer as training
    from tests.factories import build_tiny_sdxl

    build_tiny_sdxl().save_pretrained(tmp_path / "tiny-sdxl")
    monkeypatch.setitem(training.FAMILY_MIN_RESOLUTION, "sdxl", 64)  # the tiny model works at 64px
    req = request(
        tmp_path / "tiny-sdxl",
        images,
        family="sdxl",
        train_text_encoder=True,
        max_train_steps=2,
        batch_size=2,
        mixed_precision="bf16",
    )
    result = train_lora(req, tmp_path / "work", lambda e: None, lambda: False)
    assert set(result["peft_state_text_encoders"]) == {"text_encoder", "text_encoder_2"}
    assert all(math.isfinite(x) for x in result["losses"])


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"images": []}, "the dataset has no approved images"),
        ({"rank": 0}, "rank=0"),
        ({"family": "sdxl", "resolution": 256}, "sdxl minimum of 512"),
        ({"resolution": 100}, "resolution=100"),
        ({"output_name": "../x"}, "output_name"),
        ({"lr_warmup_steps": 10}, "lr_scheduler='constant'"),
        ({"images": [{"caption": "no path"}]}, "path"),
    ],
)
def test_bad_requests_name_the_field(demo_model, images, values, match):
    values = {"images": images, **values}
    with pytest.raises(InputError, match=match):
        request(demo_model, values.pop("images"), **values)


def test_device_and_package_checks(demo_model, images, tmp_path):
    with pytest.raises(InputError, match="mixed_precision='fp16'"):
        check_compatible(request(demo_model, images, mixed_precision="fp16"), "cpu")
    with pytest.raises(InputError, match="mixed_precision"):
        train_lora(
            request(demo_model, images, mixed_precision="fp16"), tmp_path, lambda e: None, lambda: False
        )
    check_compatible(request(demo_model, images, mixed_precision="bf16"), "cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            check_compatible(request(demo_model, images), "cuda:0")
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install prodigyopt"):
            check_compatible(request(demo_model, images, optimizer="prodigy"), "cpu")
    with pytest.raises(InputError, match="model_path"):
        train_lora(
            request(demo_model, images, model_path=str(tmp_path)), tmp_path, lambda e: None, lambda: False
        )
    for name, overrides in PRESETS.items():
        assert request(demo_model, images, **overrides).max_train_steps > 0, name


def test_buckets_keep_the_aspect_ratio(images):
    # rule: sides on a grid of resolution/8 (clamped to 8..64), area at most resolution^2
    assert bucket_step(64) == 8 and bucket_step(512) == 64 and bucket_step(1024) == 64
    w, h = bucket_for(128, 64, 64)
    assert 1.8 <= w / h <= 2.3 and w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64
    assert bucket_for(64, 64, 64) == (64, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in bucket_sizes(512))
    w, h = bucket_for(1024, 512, 512)
    assert 1.8 <= w / h <= 2.3
    req = TrainLoraRequest.build(model="m", images=images, output_name="x", resolution=64)
    items = prepare_images(req)
    assert items[2].bucket == bucket_for(128, 64, 64) and items[0].bucket == (64, 64)
    assert tuple(items[2].pixels(flip=True).shape) == (3, items[2].bucket[1], items[2].bucket[0])
    square = prepare_images(req.model_copy(update={"bucketing": False}))
    assert {it.bucket for it in square} == {(64, 64)}


def test_data_order_and_captions_are_a_function_of_seed_and_step(images):
    req = TrainLoraRequest.build(
        model="m",
        images=images,
        output_name="x",
        resolution=64,
        shuffle_captions=True,
        caption_dropout=0.25,
        random_flip=True,
        keep_tokens=1,
        repeats=3,
    )
    buckets = [it.bucket for it in prepare_images(req)]
    one, two = DataPlan(req, buckets), DataPlan(req, buckets)
    steps = list(range(40))
    assert [one.micro_batch(g) for g in steps] == [two.micro_batch(g) for g in reversed(steps)][::-1]
    other = DataPlan(req.model_copy(update={"seed": 7}), buckets)
    assert [one.micro_batch(g) for g in steps] != [other.micro_batch(g) for g in steps]
    samples = [s for g in steps for s in one.micro_batch(g)]
    assert any(s.caption == "" for s in samples) and any(s.flip for s in samples)
    assert all(s.caption.startswith("nova") for s in samples if s.caption)
    # every epoch shows every (repeated) image exactly once
    per_epoch = [i for b in one.epoch_batches(1) for i in b]
    assert sorted(per_epoch) == sorted([0, 1, 2] * 3)

    caption = "nova, a, b, c, d, e"
    shuffled = {augment_caption(caption, random.Random(s), 0.0, True, 2) for s in range(20)}
    assert len(shuffled) > 1 and all(c.startswith("nova, a, ") for c in shuffled)
    assert augment_caption(caption, random.Random(3), 0.0, True, 2) == augment_caption(
        caption, random.Random(3), 0.0, True, 2
    )
    assert augment_caption(caption, random.Random(3), 1.0, True, 2) == ""


def test_concepts_repeats_and_regularisation_images_in_an_epoch(images, demo_model):
    """Each image's own repeats (a concept's) win over the request's; regularisation images are cycled to as
    many as the repeated training images (kohya), and their loss is weighted by prior_loss_weight."""
    import torch

    from engine.training.trainer import diffusion_loss, load_parts, steps_for_epochs

    concept = [{**images[0], "repeats": 3}, {**images[1], "repeats": 1}]
    reg = [{**images[2], "caption": "person", "reg": True}]
    req = TrainLoraRequest.build(model="m", images=concept + reg, output_name="x", resolution=64, repeats=5)
    plan = DataPlan(req, [it.bucket for it in prepare_images(req)])
    per_epoch = sorted(i for b in plan.epoch_batches(0) for i in b)
    assert per_epoch == [0, 0, 0, 1, 2, 2, 2, 2]  # 3 + 1 training images -> 4 regularisation images
    assert plan.weights == [1.0, 1.0, 1.0]
    heavy = req.model_copy(update={"prior_loss_weight": 0.5})
    assert DataPlan(heavy, [it.bucket for it in prepare_images(heavy)]).weights == [1.0, 1.0, 0.5]
    # epochs -> steps from the real buckets: 8 single-image batches an epoch, 2 epochs, accumulation 2
    epochs = req.model_copy(update={"max_train_epochs": 2, "gradient_accumulation_steps": 2})
    assert steps_for_epochs(epochs) == 8
    with pytest.raises(InputError, match="repeats=0"):
        TrainLoraRequest.build(
            model="m", images=[{**images[0], "repeats": 0}], output_name="x", resolution=64
        )
    with pytest.raises(InputError, match="regularisation"):
        TrainLoraRequest.build(model="m", images=reg, output_name="x", resolution=64)
    # the weighted loss: a batch of two identical samples weighted (1, w) is (1 + w) / 2 times the plain loss
    parts = load_parts(request(demo_model, images))
    latents = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    embeds = torch.randn(1, 77, parts.text_encoders[0].config.hidden_size).repeat(2, 1, 1)

    def loss(weights):
        return float(
            diffusion_loss(
                parts, req, latents, embeds, None, torch.Generator().manual_seed(3), weights=weights
            )
        )

    with torch.no_grad():
        plain, weighted = loss(None), loss([1.0, 0.5])
    # each sample has its own noise and timestep, so compare against the per-sample mean: weights (1, 1) = plain
    with torch.no_grad():
        assert loss([1.0, 1.0]) == pytest.approx(plain, rel=1e-5)
        assert loss([0.0, 0.0]) == 0.0
    assert weighted < plain


def test_out_of_memory_says_what_to_lower(demo_model, images, tmp_path, monkeypatch):
    import torch

    from engine.errors import OutOfMemoryError
    from engine.training import trainer as training

    def out_of_memory(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training._Run, "train_step", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="lower batch_size or resolution"):
        train_lora(request(demo_model, images, max_train_steps=1), tmp_path, lambda e: None, lambda: False)
    assert training._TRAINING_LOCK.acquire(blocking=False)  # released for the next job
    training._TRAINING_LOCK.release()
