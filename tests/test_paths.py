"""Model listings: cached by the mtimes of the folders walked, never stale after a file is added or removed."""

from __future__ import annotations

import json
import os

from engine.paths import ModelRoots

OLD = 1_000_000_000  # 2001: an mtime far enough in the past that a listing may be cached


def _age(root):
    """Give every directory under `root` an old mtime, as a models folder untouched for a while has."""
    for directory, _, _ in os.walk(root):
        os.utime(directory, (OLD, OLD))


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_a_new_lora_is_listed_at_once(tmp_path):
    roots = ModelRoots(tmp_path)
    roots.create_layout()
    _touch(tmp_path / "loras" / "first.safetensors")
    assert list(roots.list_files("loras")) == ["first"]
    _touch(tmp_path / "loras" / "second.safetensors")  # within the same second as the listing above
    assert list(roots.list_files("loras")) == ["first", "second"]

    _age(tmp_path)
    assert list(roots.list_files("loras")) == ["first", "second"]  # now cached
    _touch(tmp_path / "loras" / "style" / "third.safetensors")  # a new nested folder
    assert list(ModelRoots(tmp_path).list_files("loras")) == ["first", "second", "style/third"]

    _age(tmp_path)
    assert "style/third" in roots.list_files("loras")
    _touch(tmp_path / "loras" / "style" / "fourth.safetensors")  # only the nested folder's mtime changes
    assert list(roots.list_files("loras")) == ["first", "second", "style/fourth", "style/third"]
    (tmp_path / "loras" / "first.safetensors").unlink()
    assert list(roots.list_files("loras")) == ["second", "style/fourth", "style/third"]


def test_an_unchanged_folder_is_not_walked_again(tmp_path):
    roots = ModelRoots(tmp_path)
    roots.create_layout()
    _touch(tmp_path / "loras" / "a" / "one.safetensors")
    _age(tmp_path)
    assert list(roots.list_files("loras")) == ["a/one"]

    # A file slipped in behind the cache's back (its folder's mtime put back) is not seen: no re-walk ...
    _touch(tmp_path / "loras" / "a" / "two.safetensors")
    os.utime(tmp_path / "loras" / "a", (OLD, OLD))
    assert list(roots.list_files("loras")) == ["a/one"]
    # ... until the folder's mtime moves, as it does whenever an entry is added, removed or renamed.
    os.utime(tmp_path / "loras" / "a", (OLD + 1, OLD + 1))
    assert list(roots.list_files("loras")) == ["a/one", "a/two"]


def test_diffusers_folders_and_checkpoints_follow_their_folders(tmp_path):
    roots = ModelRoots(tmp_path)
    roots.create_layout()
    _touch(tmp_path / "checkpoints" / "single.safetensors")
    _age(tmp_path)
    assert list(roots.list_models()) == ["single.safetensors"]

    # A diffusers folder becomes a model when its model_index.json lands; its weights are not checkpoints.
    model = tmp_path / "diffusers" / "tiny"
    _touch(model / "unet" / "diffusion_pytorch_model.safetensors")
    assert list(roots.list_models()) == ["single.safetensors"]
    _age(tmp_path)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert list(roots.list_models()) == ["tiny", "single.safetensors"]

    # The same inside checkpoints/ (A1111's habit): the folder is a model, its files are not listed.
    inside = tmp_path / "checkpoints" / "sd"
    _touch(inside / "unet" / "weights.safetensors")
    assert "sd/unet/weights.safetensors" in roots.list_checkpoint_files()
    _age(tmp_path)
    (inside / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert list(roots.list_checkpoint_files()) == ["single.safetensors"]
    assert list(roots.list_models()) == ["tiny", "sd", "single.safetensors"]


def test_a_folder_added_under_an_a1111_name_is_listed(tmp_path):
    roots = ModelRoots(tmp_path)
    roots.create_layout()
    _age(tmp_path)
    assert roots.list_files("loras") == {}
    _touch(tmp_path / "Lora" / "old_style.safetensors")  # A1111's folder name, created after the listing
    assert list(roots.list_files("loras")) == ["old_style"]


def test_a_listing_is_a_copy(tmp_path):
    roots = ModelRoots(tmp_path)
    roots.create_layout()
    _touch(tmp_path / "vae" / "v.safetensors")
    _age(tmp_path)
    roots.list_files("vae").clear()
    assert list(roots.list_files("vae")) == ["v"]
