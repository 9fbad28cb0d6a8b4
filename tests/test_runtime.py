"""engine.runtime.WorkerRuntime: the warm-model caches it declares, its one memory policy (make_room), the
out-of-memory guard, and the services a runner reaches through its RunContext. Tiny real models on the CPU;
a GPU plan is a DevicePlan value (nothing here touches CUDA)."""

from __future__ import annotations

import pytest

from engine.device import DevicePlan, oom_guard
from engine.errors import InputError, OutOfMemoryError
from engine.jobs.kinds import RunContext
from engine.model_manager.demo_model import DEMO_MODEL_NAME, ensure_demo_model
from engine.paths import ModelRoots
from engine.runtime import ROOM_ON_GPU, WorkerRuntime
from engine.store.database import Database
from engine.video.generate import list_video_models
from tests.factories import save_compact_upscaler
from tests.video_factories import build_tiny_svd

CPU = DevicePlan("cpu", "float32")
GPU = DevicePlan("cuda:0", "float16")  # a plan only: make_room reads is_gpu, the caches keep their CPU plans
CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total capacity)"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    models = root / "models"
    ModelRoots(models).create_layout()
    ensure_demo_model(models)
    save_compact_upscaler(models / "upscale_models" / "tiny-compact-x4.pth")
    build_tiny_svd(models / "diffusers" / "tiny-svd")
    db = Database(f"sqlite:///{root / 'studio.db'}")
    db.create_all()
    return WorkerRuntime.create(CPU, models, db, root / "outputs", "test")


def warm(rt: WorkerRuntime) -> None:
    """Load one entry into each cache (on the CPU)."""
    models = rt.models.roots.models_dir
    rt.models.get(DEMO_MODEL_NAME)
    rt.upscalers.get(models / "upscale_models" / "tiny-compact-x4.pth", CPU)
    svd = next(m for m in list_video_models(models) if m.name == "tiny-svd")
    rt.video_pipes.get(svd, "img2video")


def warm_caches(rt: WorkerRuntime) -> set[str]:
    return {
        name
        for name, loaded in (
            ("models", rt.models.loaded is not None),
            ("upscalers", len(rt.upscalers) > 0),
            ("video_pipes", rt.video_pipes.loaded_key is not None),
        )
        if loaded
    }


ALL = {"models", "upscalers", "video_pipes"}


@pytest.mark.parametrize(
    ("kind", "kept"),
    [
        ("image", {"models", "upscalers"}),  # upscale models are small: they stay beside an image pipeline
        ("upscale", {"models", "upscalers"}),
        ("upscale_sd_x4", {"upscalers"}),
        ("video", {"video_pipes"}),
        ("train", set()),
    ],
)
def test_make_room_on_a_gpu_empties_the_caches_a_kind_does_not_share_the_device_with(runtime, kind, kept):
    warm(runtime)
    assert warm_caches(runtime) == ALL
    runtime.plan = GPU
    try:
        runtime.make_room(kind)
    finally:
        runtime.plan = CPU
    assert warm_caches(runtime) == kept
    assert set(ROOM_ON_GPU[kind]) == ALL - kept


def test_make_room_on_the_cpu_keeps_warm_pipelines_except_for_training(runtime):
    warm(runtime)
    for kind in ("image", "upscale", "upscale_sd_x4", "video"):
        runtime.make_room(kind)
        assert warm_caches(runtime) == ALL, kind
    runtime.make_room("train")  # the trainer loads its own copy of the model
    assert warm_caches(runtime) == {"upscalers", "video_pipes"}
    with pytest.raises(ValueError, match="kind='paint' is unknown"):
        runtime.make_room("paint")


def test_oom_guard_turns_out_of_memory_into_what_to_lower_and_leaves_other_errors_alone(runtime):
    expected = r"^out of memory on cpu \(float32\): lower batch_size$"
    with pytest.raises(OutOfMemoryError, match=expected), runtime.oom_guard("lower batch_size"):
        raise RuntimeError(CUDA_OOM)
    with pytest.raises(RuntimeError, match="shape mismatch"), runtime.oom_guard("lower batch_size"):
        raise RuntimeError("shape mismatch")
    with pytest.raises(InputError, match="bad"), runtime.oom_guard("lower batch_size"):
        raise InputError("bad")
    # a guard further in already said what to lower: the outer one keeps that message
    with (
        pytest.raises(OutOfMemoryError, match="^inner: lower tile$"),
        runtime.oom_guard("outer"),
        oom_guard("cpu", "inner: lower tile"),
    ):
        raise RuntimeError(CUDA_OOM)
    with runtime.oom_guard("unused"):
        pass


def test_the_context_gives_services_built_once_per_runtime(runtime):
    ctx = RunContext("job", "cpu", lambda event: None, lambda: False, runtime)
    other = ctx.part(0, 2, "cell")
    assert ctx.characters is ctx.characters is other.characters is runtime.characters
    assert ctx.datasets is runtime.datasets and ctx.datasets.characters is ctx.characters
    assert ctx.library is other.library and ctx.library.root == runtime.outputs_dir / "library"
    assert ctx.outputs == runtime.outputs_dir
