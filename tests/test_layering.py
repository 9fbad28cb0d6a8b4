"""The layering rules, checked on the import graph (not by grepping text):

- the import-linter contracts in pyproject.toml (engine never imports gradio or ui/; ui/ never imports torch,
  diffusers, transformers, peft or the database layer itself; capability packages never import the facade;
  no cycles between engine packages), the same check `lint-imports` runs in tests/run_tests.sh;
- no module-level import cycle anywhere in engine/, and engine-internal imports only at module top;
- importing the app and every ui/ module loads no torch, diffusers, transformers, peft or accelerate.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import grimp
from importlinter.cli import lint_imports

from tests.factories import REPO

HEAVY = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate")


def test_import_linter_contracts_hold():
    assert lint_imports(config_filenames=(str(REPO / "pyproject.toml"),), no_cache=True, no_logo=True) == 0


def test_engine_modules_import_each_other_without_cycles():
    graph = grimp.build_graph("engine", cache_dir=None, exclude_type_checking_imports=True)  # they never run
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if imported.startswith("engine") and back:
                cycles.append(" -> ".join((module, *back)))
    assert cycles == []


def test_engine_internal_imports_sit_at_module_top():
    """Imports inside functions hide cycles; only heavy optional libraries are imported there."""
    inside = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                if any(n == "engine" or n.startswith("engine.") for n in names):
                    inside.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert inside == []


def test_the_app_and_every_ui_module_import_without_torch():
    code = (
        "import importlib, pkgutil, sys, app, ui, engine.studio, engine.jobs.service\n"
        "for m in pkgutil.walk_packages(ui.__path__, 'ui.'): importlib.import_module(m.name)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('LEAK', bad) if bad else print('OK')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "OK", out.stdout + out.stderr
