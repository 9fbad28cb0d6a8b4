"""The facade stays thin and nothing below it reaches back up (issue 14: "a thin facade")."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
MAX_FACADE_LINES = 350


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(ENGINE.rglob("*.py"))]


def test_studio_is_a_thin_facade():
    lines = len((ENGINE / "studio.py").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FACADE_LINES, f"engine/studio.py has {lines} lines; at most {MAX_FACADE_LINES}"


def test_no_engine_module_imports_the_facade():
    offenders = []
    for path, tree in _modules():
        if path == ENGINE / "studio.py":
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "engine.studio" or n.startswith("engine.studio.") for n in names):
                offenders.append(f"{path.relative_to(ENGINE.parent)}:{node.lineno}")
    assert not offenders, f"engine modules importing engine.studio: {offenders}"


def test_no_engine_function_takes_the_studio():
    """Rooms get explicit dependencies (settings, db, characters, ...), never the facade object."""
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "studio" for a in args):
                    offenders.append(f"{path.relative_to(ENGINE.parent)}:{node.lineno} {node.name}")
    assert not offenders, f"engine functions taking the Studio object: {offenders}"


def test_a_generation_service_without_the_comfyui_check_refuses_comfyui_requests(studio):
    """The facade injects engine.comfyui's check; a service built without it refuses rather than skips it."""
    import dataclasses

    import pytest

    from engine.errors import InputError

    bare = dataclasses.replace(studio.generator, remote_check=None)
    with pytest.raises(InputError, match="engine='comfyui' is not available"):
        bare.build_generate_request({"prompt": "x", "engine": "comfyui", "model": "sd15.safetensors"})
    assert studio.generator.remote_check is not None
