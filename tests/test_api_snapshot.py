"""Every API endpoint name and parameter stays as it was (issue 14, "Done when").

tests/data/api_snapshot.json was written from the app at commit 34235df (before the engine rooms and the
UI forms) by running this file as a script:

    PYTHONPATH=<checkout of 34235df> .venv/bin/python tests/test_api_snapshot.py tests/data/api_snapshot.json

The app is built the way app.py builds it (demo model, temp data dir) and its API description is the one
/gradio_api/info serves (`Blocks.get_api_info()`), normalised to what a caller depends on: endpoint names,
parameter names in their order, defaults and Python types, and the types of the returned values.
Choices (they change with the data) and component ids (they change with the layout) are dropped.
New endpoints and new parameters may be added; nothing in the snapshot may change or disappear.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "api_snapshot.json"


def _python_type(text: str) -> str:
    """`Literal['a', 'b']` -> `Literal`: the choices follow the data (models, characters, ...)."""
    return re.sub(r"Literal\[[^\]]*\]", "Literal", text)


def normalise(info: dict) -> dict:
    endpoints = {}
    for name, endpoint in sorted(info["named_endpoints"].items()):
        endpoints[name] = {
            "parameters": [
                {
                    "name": p["parameter_name"],
                    "has_default": p.get("parameter_has_default", False),
                    "default": p.get("parameter_default"),
                    "python_type": _python_type(p["python_type"]["type"]),
                    "component": p["component"],
                }
                for p in endpoint["parameters"]
            ],
            "returns": [
                {"python_type": _python_type(r["python_type"]["type"]), "component": r["component"]}
                for r in endpoint["returns"]
            ],
        }
    return endpoints


def current_api(data_dir: Path) -> dict:
    """The API description of the app as app.py builds it, with the demo model in `data_dir`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import app
    from engine.settings import Settings
    from engine.studio import Studio

    settings = Settings(data_dir=data_dir / "data", models_dir=data_dir / "models", demo=True, device="cpu")
    studio = Studio.start(settings)
    try:
        return normalise(app.build_app(studio, settings).get_api_info())
    finally:
        studio.close()


def test_api_matches_snapshot(tmp_path):
    before = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    now = current_api(tmp_path)
    missing = sorted(set(before) - set(now))
    assert not missing, f"endpoints gone: {missing}"
    for name, old in before.items():
        new = now[name]
        new_params = {p["name"]: p for p in new["parameters"]}
        for p in old["parameters"]:
            assert p["name"] in new_params, f"{name}: parameter {p['name']!r} gone"
            assert new_params[p["name"]] == p, f"{name}: parameter {p['name']!r} changed"
        old_order = [p["name"] for p in old["parameters"]]
        new_order = [p["name"] for p in new["parameters"] if p["name"] in set(old_order)]
        assert new_order == old_order, f"{name}: positional order changed"
        assert new["returns"] == old["returns"], f"{name}: returned values changed"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SNAPSHOT
    with tempfile.TemporaryDirectory() as tmp:
        api = current_api(Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(api)} endpoints -> {out}")
