"""Flags, environment variables and safe defaults (the layering rules: tests/test_layering.py)."""

from __future__ import annotations

import pytest

from app import build_parser, launch_kwargs, settings_from_args
from engine.errors import InputError


def test_every_flag_has_help_and_env(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--data-dir",
        "--models-dir",
        "--database-url",
        "--device",
        "--dtype",
        "--auth",
        "--max-upload-mb",
        "--insecure",
        "--demo",
    ):
        assert flag in out
        assert "STUDIONOVA_" + flag[2:].replace("-", "_").upper() in out


def test_flags_beat_env_beat_defaults(tmp_path):
    env = {"STUDIONOVA_PORT": "9001", "STUDIONOVA_DEMO": "true", "STUDIONOVA_DATA_DIR": str(tmp_path)}
    s = settings_from_args([], environ=env)
    assert s.port == 9001 and s.demo and s.data_dir == tmp_path and s.host == "127.0.0.1"
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'studio.db'}"
    assert settings_from_args(["--port", "9002"], environ=env).port == 9002


def test_space_binds_as_platform_requires(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "me/studio")
    s = settings_from_args([], environ={"SPACE_ID": "me/studio"})
    assert s.host == "0.0.0.0" and s.port == 7860
    s.check_exposure()  # the Space's own visibility guards it


def test_exposed_host_needs_auth_or_insecure():
    with pytest.raises(InputError, match="--auth"):
        settings_from_args(["--host", "0.0.0.0"], environ={}).check_exposure()
    settings_from_args(["--host", "0.0.0.0", "--auth", "a:b"], environ={}).check_exposure()
    settings_from_args(["--host", "0.0.0.0", "--insecure"], environ={}).check_exposure()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--device", "tpu"], "device='tpu'"),
        (["--dtype", "int4"], "dtype='int4'"),
        (["--auth", "nopassword"], "user:password"),
        (["--port", "70000"], "port=70000"),
    ],
)
def test_bad_settings_name_the_value(argv, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        settings_from_args(argv, environ={})


def test_private_files_are_blocked_from_gradio(tmp_path):
    s = settings_from_args(["--data-dir", str(tmp_path)], environ={})
    kw = launch_kwargs(s)
    assert str(tmp_path / "studio.db") in kw["blocked_paths"] and str(s.models_dir) in kw["blocked_paths"]
    assert kw["allowed_paths"] == [str(s.outputs_dir)] and kw["max_file_size"] == "50mb"
