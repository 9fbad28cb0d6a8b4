"""ComfyUI workflow templates: API-format graphs plus a manifest that says where StudioNOVA's parameters go.

A template is `<name>.json` (the API format `/prompt` takes: `{"<node_id>": {"class_type", "inputs"}}`) next
to `<name>.manifest.json`:

    {"name", "description", "kind": txt2img|img2img|inpaint|upscale|img2video, "family": sd1|sdxl|any,
     "bindings": {param: [{"node": id, "input": name}, ...]},
     "outputs": [ids of the nodes that save images/videos],
     "lora_stack": {"checkpoint_node": id, "model_output": 0, "clip_output": 1} or null}

Parameters use StudioNOVA's field names (`GenerateRequest`'s, plus `scheduler`, `upscale_model`, `frames`,
`fps`); `sampler` takes A1111 names and becomes ComfyUI's (sampler_name, scheduler) pair. LoRAs are not
bound to one input: `bind` splices a chain of LoraLoader nodes between the checkpoint loader and every
consumer of its MODEL and CLIP outputs.

Shipped templates live in the repository's `workflows/`; a user's own go to `user_templates_dir(data_dir)`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.artifacts import atomic_write
from engine.errors import InputError
from engine.paths import MODEL_FOLDERS

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "workflows"
MANIFEST_SUFFIX = ".manifest.json"
KINDS = ("txt2img", "img2img", "inpaint", "upscale", "img2video")
FAMILIES = ("sd1", "sdxl", "any")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# The parameters a manifest may bind, by StudioNOVA field name.
PARAMS: dict[str, str] = {
    "prompt": "positive prompt text",
    "negative_prompt": "negative prompt text",
    "seed": "noise seed (resolved: never -1)",
    "steps": "sampling steps",
    "cfg_scale": "classifier-free guidance scale",
    "sampler": "A1111 sampler name; fills the sampler_name bindings and, unless `scheduler` is given, the scheduler ones",
    "scheduler": "ComfyUI scheduler name, overriding the one the sampler implies",
    "width": "width in pixels",
    "height": "height in pixels",
    "batch_size": "images per batch",
    "model": "checkpoint file name as the server lists it",
    "init_image": "source image name on the server (after /upload/image)",
    "mask_image": "mask image name on the server (white = repaint)",
    "denoising_strength": "how much of the source to change",
    "upscale_model": "upscale model file name as the server lists it",
    "frames": "video frames",
    "fps": "video frames per second",
}
TEXT_PARAMS = ("prompt", "negative_prompt")  # "" is a real value here: it clears the template's text
LORAS_PARAM = "loras"  # not bound to one input: spliced in through the manifest's lora_stack

# A1111 sampler name -> (ComfyUI sampler_name, scheduler). Covers every name in engine.samplers.SAMPLER_NAMES.
COMFY_SAMPLERS: dict[str, tuple[str, str]] = {
    "Euler": ("euler", "normal"),
    "Euler a": ("euler_ancestral", "normal"),
    "Heun": ("heun", "normal"),
    "LMS": ("lms", "normal"),
    "DPM2": ("dpm_2", "normal"),
    "DPM2 a": ("dpm_2_ancestral", "normal"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "normal"),
    "DPM++ 2M": ("dpmpp_2m", "normal"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ SDE": ("dpmpp_sde", "normal"),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "normal"),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "exponential"),
    "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"),
    "DPM fast": ("dpm_fast", "normal"),
    "DPM adaptive": ("dpm_adaptive", "normal"),
    "DDIM": ("ddim", "ddim_uniform"),
    "UniPC": ("uni_pc", "normal"),
    "LCM": ("lcm", "sgm_uniform"),
}

# (class_type, input) whose options are files in a model folder -> what to call them in an error.
MODEL_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoint",
    ("CheckpointLoader", "ckpt_name"): "checkpoint",
    ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoint",
    ("LoraLoader", "lora_name"): "LoRA",
    ("LoraLoaderModelOnly", "lora_name"): "LoRA",
    ("UpscaleModelLoader", "model_name"): "upscale model",
    ("VAELoader", "vae_name"): "VAE",
}
LIST_LIMIT = 10  # names shown when a model is missing; the rest are counted


class TemplateError(InputError):
    """A template or manifest is malformed: the message names the file, node and input."""


class ServerMismatchError(InputError):
    """A bound graph cannot run on this ComfyUI server (missing node types, inputs or models)."""


@dataclass(frozen=True)
class Binding:
    node: str
    input: str


@dataclass(frozen=True)
class LoraStack:
    checkpoint_node: str
    model_output: int = 0
    clip_output: int = 1


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    kind: str
    family: str
    bindings: dict[str, tuple[Binding, ...]]
    outputs: tuple[str, ...]
    lora_stack: LoraStack | None = None


@dataclass(frozen=True)
class Template:
    name: str
    path: Path  # the workflow JSON; the manifest sits next to it
    graph: dict[str, Any]
    manifest: Manifest


# --- loading and checking templates ----------------------------------------------------------


def is_link(value: Any) -> bool:
    """An API-format input that comes from another node: `[source_node_id, output_index]`."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def check_api_graph(graph: Any, where: str) -> dict[str, Any]:
    """Refuse anything but an API-format graph whose links point at nodes it has; return it."""
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise TemplateError(
            f"{where} is a ComfyUI UI workflow (nodes/links), not the API format a server runs; "
            "in ComfyUI use Workflow > Export (API), the 'Save (API format)' button, and add that file"
        )
    if not isinstance(graph, dict) or not graph:
        raise TemplateError(f"{where} must be a JSON object of node id -> {{class_type, inputs}}")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise TemplateError(f"{where}: node {node_id!r} has no class_type; is this the API format?")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise TemplateError(f"{where}: node {node_id!r} ({node['class_type']}) inputs must be an object")
        for name, value in inputs.items():
            if is_link(value) and value[0] not in graph:
                raise TemplateError(
                    f"{where}: node {node_id!r} ({node['class_type']}) input {name!r} links to node "
                    f"{value[0]!r}, which the workflow does not have"
                )
    return graph


def parse_manifest(data: Any, graph: Mapping[str, Any], where: str) -> Manifest:
    """Check a manifest against its graph: every binding, output and the LoRA splice point must exist."""
    if not isinstance(data, dict):
        raise TemplateError(f"{where} must be a JSON object")
    missing = [k for k in ("name", "kind", "family", "bindings", "outputs") if k not in data]
    if missing:
        raise TemplateError(f"{where} lacks {', '.join(missing)}")
    name = data["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise TemplateError(f"{where}: name {name!r} must be lower-case letters, digits, '_' or '-'")
    if data["kind"] not in KINDS:
        raise TemplateError(f"{where}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    if data["family"] not in FAMILIES:
        raise TemplateError(f"{where}: family {data['family']!r} is not one of {', '.join(FAMILIES)}")
    unknown_keys = set(data) - {"name", "description", "kind", "family", "bindings", "outputs", "lora_stack"}
    if unknown_keys:
        raise TemplateError(f"{where}: unknown keys {', '.join(sorted(unknown_keys))}")

    if not isinstance(data["bindings"], dict):
        raise TemplateError(f"{where}: bindings must be an object of param -> [{{node, input}}, ...]")
    bindings: dict[str, tuple[Binding, ...]] = {}
    for param, targets in data["bindings"].items():
        if param not in PARAMS:
            raise TemplateError(
                f"{where}: binding {param!r} is not a StudioNOVA parameter; allowed: {', '.join(PARAMS)}"
                + (" (LoRAs go through lora_stack)" if param == LORAS_PARAM else "")
            )
        if not isinstance(targets, list) or not targets:
            raise TemplateError(f"{where}: binding {param!r} must be a non-empty list of {{node, input}}")
        parsed = []
        for target in targets:
            if not isinstance(target, dict) or set(target) != {"node", "input"}:
                raise TemplateError(f"{where}: binding {param!r} entry {target!r} must be {{node, input}}")
            node_id, input_name = str(target["node"]), target["input"]
            if node_id not in graph:
                raise TemplateError(
                    f"{where}: binding {param!r} points to node {node_id!r}, which the workflow does not have"
                )
            node = graph[node_id]
            if input_name not in node.get("inputs", {}):
                raise TemplateError(
                    f"{where}: binding {param!r} points to input {input_name!r} of node {node_id!r} "
                    f"({node['class_type']}), which has inputs: {', '.join(node.get('inputs', {})) or 'none'}"
                )
            if is_link(node["inputs"][input_name]):
                raise TemplateError(
                    f"{where}: binding {param!r} points to node {node_id!r} input {input_name!r}, "
                    "which is a link to another node, not a value"
                )
            parsed.append(Binding(node_id, input_name))
        bindings[param] = tuple(parsed)

    outputs = data["outputs"]
    if not isinstance(outputs, list) or not outputs:
        raise TemplateError(f"{where}: outputs must list the nodes that save images or videos")
    for node_id in outputs:
        if str(node_id) not in graph:
            raise TemplateError(f"{where}: output node {node_id!r} is not in the workflow")

    lora_stack = None
    if data.get("lora_stack") is not None:
        raw = data["lora_stack"]
        if not isinstance(raw, dict) or "checkpoint_node" not in raw:
            raise TemplateError(f"{where}: lora_stack must be {{checkpoint_node, model_output, clip_output}}")
        try:
            lora_stack = LoraStack(
                str(raw["checkpoint_node"]), int(raw.get("model_output", 0)), int(raw.get("clip_output", 1))
            )
        except (TypeError, ValueError) as e:
            raise TemplateError(f"{where}: lora_stack outputs must be integers ({e})") from None
        if lora_stack.checkpoint_node not in graph:
            raise TemplateError(
                f"{where}: lora_stack checkpoint_node {lora_stack.checkpoint_node!r} is not in the workflow"
            )
    return Manifest(
        name=name,
        description=str(data.get("description", "")),
        kind=data["kind"],
        family=data["family"],
        bindings=bindings,
        outputs=tuple(str(n) for n in outputs),
        lora_stack=lora_stack,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TemplateError(f"{path} is not valid JSON: {e}") from None


def manifest_path(workflow_path: Path) -> Path:
    return workflow_path.with_name(workflow_path.stem + MANIFEST_SUFFIX)


def load_template(workflow_path: Path) -> Template:
    """Load `<name>.json` and its `<name>.manifest.json`, raising TemplateError naming what is wrong."""
    workflow_path = Path(workflow_path)
    graph = check_api_graph(_read_json(workflow_path), str(workflow_path))
    mpath = manifest_path(workflow_path)
    manifest = parse_manifest(_read_json(mpath), graph, str(mpath))
    if manifest.name != workflow_path.stem:
        raise TemplateError(
            f"{mpath}: name {manifest.name!r} must match the file name {workflow_path.stem!r}"
        )
    return Template(manifest.name, workflow_path, graph, manifest)


def list_templates(dirs: Iterable[Path]) -> dict[str, Template]:
    """name -> Template from every `*.manifest.json` in `dirs`; a later folder's template replaces an
    earlier one of the same name (so a user's folder, listed last, can override a shipped template)."""
    found: dict[str, Template] = {}
    for folder in dirs:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for mpath in sorted(folder.glob("*" + MANIFEST_SUFFIX)):
            template = load_template(mpath.with_name(mpath.name.removesuffix(MANIFEST_SUFFIX) + ".json"))
            found[template.name] = template
    return found


# --- binding parameters ---------------------------------------------------------------------


def comfy_sampler(a1111_name: str) -> tuple[str, str]:
    """A1111 sampler name -> ComfyUI (sampler_name, scheduler)."""
    try:
        return COMFY_SAMPLERS[a1111_name]
    except KeyError:
        raise InputError(
            f"sampler={a1111_name!r} has no ComfyUI equivalent; allowed: {', '.join(COMFY_SAMPLERS)}"
        ) from None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple | dict) and not value)


def bind(template: Mapping[str, Any], manifest: Manifest, params: Mapping[str, Any]) -> dict[str, Any]:
    """A new graph with `params` written into the manifest's bindings and `params["loras"]` spliced in.

    The template is not changed. A parameter the template does not bind raises unless it is empty (None,
    "", []); an empty value keeps the template's own, except for prompt texts, where "" clears it.
    Images are names on the server (upload first).
    """
    unknown = set(params) - set(PARAMS) - {LORAS_PARAM}
    if unknown:
        raise InputError(
            f"unknown parameter(s) {', '.join(sorted(unknown))} for template {manifest.name!r}; "
            f"allowed: {', '.join([*PARAMS, LORAS_PARAM])}"
        )
    values = {k: v for k, v in params.items() if k != LORAS_PARAM}
    if "seed" in values and isinstance(values["seed"], int) and values["seed"] < 0:
        raise InputError(
            f"seed={values['seed']}: resolve a random seed before binding (ComfyUI needs seed >= 0)"
        )
    if not _is_empty(values.get("sampler")):
        sampler_name, scheduler = comfy_sampler(values["sampler"])
        values["sampler"] = sampler_name
        if _is_empty(values.get("scheduler")) and "scheduler" in manifest.bindings:
            values["scheduler"] = scheduler

    unbound = sorted(k for k, v in values.items() if k not in manifest.bindings and not _is_empty(v))
    if unbound:
        raise InputError(
            f"template {manifest.name!r} does not take {', '.join(unbound)}; "
            f"it takes: {', '.join([*manifest.bindings, *([LORAS_PARAM] if manifest.lora_stack else [])])}"
        )

    graph = copy.deepcopy(dict(template))
    for param, value in values.items():
        if _is_empty(value) and param not in TEXT_PARAMS:
            continue  # an empty name or choice means "the template's own"
        for target in manifest.bindings.get(param, ()):
            graph[target.node]["inputs"][target.input] = value

    loras = list(params.get(LORAS_PARAM) or [])
    if loras:
        if manifest.lora_stack is None:
            raise InputError(f"template {manifest.name!r} takes no LoRAs (its manifest has no lora_stack)")
        splice_loras(graph, manifest.lora_stack, loras)
    return graph


def lora_file_name(name: str) -> str:
    """StudioNOVA names LoRAs without their suffix; ComfyUI lists them as files."""
    suffixes = MODEL_FOLDERS["loras"][1]
    return name if name.lower().endswith(suffixes) else name + suffixes[0]


def _fresh_id(graph: Mapping[str, Any]) -> str:
    numbers = [int(k) for k in graph if k.isdigit()]
    candidate = max(numbers, default=0) + 1
    while str(candidate) in graph:
        candidate += 1
    return str(candidate)


def splice_loras(graph: dict[str, Any], stack: LoraStack, loras: Iterable[Any]) -> list[str]:
    """Chain one LoraLoader per LoRA after the checkpoint loader and move every consumer of its MODEL and
    CLIP outputs onto the last one. `loras` holds {name, weight} dicts or LoraSpec-like objects. Changes
    `graph` in place and returns the new node ids in chain order."""
    ckpt = stack.checkpoint_node
    model_src, clip_src = [ckpt, stack.model_output], [ckpt, stack.clip_output]
    consumers = [
        (node_id, name, value)
        for node_id, node in graph.items()
        for name, value in node.get("inputs", {}).items()
        if value in (model_src, clip_src)
    ]
    added = []
    prev_model, prev_clip = model_src, clip_src
    for lora in loras:
        name = lora["name"] if isinstance(lora, Mapping) else lora.name
        weight = float(lora.get("weight", 1.0) if isinstance(lora, Mapping) else lora.weight)
        node_id = _fresh_id(graph)
        graph[node_id] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": list(prev_model),
                "clip": list(prev_clip),
                "lora_name": lora_file_name(name),
                "strength_model": weight,
                "strength_clip": weight,
            },
        }
        added.append(node_id)
        prev_model, prev_clip = [node_id, 0], [node_id, 1]
    if added:
        for node_id, name, value in consumers:
            graph[node_id]["inputs"][name] = list(prev_model if value == model_src else prev_clip)
    return added


# --- checking a graph against a server's /object_info ----------------------------------------


def _combo_options(spec: list | tuple) -> list | None:
    """The allowed values of a combo input: V1 nodes give the list as the type, V3 nodes give "COMBO"."""
    kind = spec[0] if spec else None
    if isinstance(kind, list | tuple):
        return list(kind)
    if kind == "COMBO":
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return list(opts.get("options", []))
    return None


def _is_upload(opts: Mapping[str, Any]) -> bool:
    # Image inputs list the server's input folder, which changes with every upload: do not judge them here.
    return any(key.endswith("upload") and value for key, value in opts.items())


def _truncated(names: list) -> str:
    shown = ", ".join(str(n) for n in names[:LIST_LIMIT])
    more = len(names) - LIST_LIMIT
    return (shown + (f" ... ({more} more)" if more > 0 else "")) if names else "nothing"


def _types_match(wanted: Any, given: Any) -> bool:
    if not isinstance(wanted, str) or not isinstance(given, str) or "*" in (wanted, given):
        return True
    return bool(set(wanted.split(",")) & set(given.split(",")))


def _check_value(where: str, name: str, spec: list | tuple, value: Any) -> str | None:
    kind = spec[0] if spec else None
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{where} input {name!r}={value!r} must be an integer"
    if kind == "FLOAT" and (not isinstance(value, int | float) or isinstance(value, bool)):
        return f"{where} input {name!r}={value!r} must be a number"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{where} input {name!r}={value!r} must be true or false"
    if kind == "STRING" and not isinstance(value, str):
        return f"{where} input {name!r}={value!r} must be text"
    if kind in ("INT", "FLOAT"):
        low, high = opts.get("min"), opts.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{where} input {name!r}={value!r} is outside {low}..{high}"
    return None


def validate_against_object_info(graph: Mapping[str, Any], object_info: Mapping[str, Any]) -> None:
    """Raise ServerMismatchError listing every reason `graph` would not run on the server whose
    `GET /object_info` is `object_info`: node types it lacks, required inputs left out, links to missing
    nodes or outputs or of the wrong type, values out of range, and models it does not have."""
    problems: list[str] = []
    missing_types: dict[str, list[str]] = {}
    for node_id in sorted(graph, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        node = graph[node_id]
        class_type = node["class_type"]
        info = object_info.get(class_type)
        if info is None:
            missing_types.setdefault(class_type, []).append(node_id)
            continue
        where = f"node {node_id} ({class_type})"
        schema_inputs = info.get("input", {})
        declared = {**schema_inputs.get("required", {}), **schema_inputs.get("optional", {})}
        inputs = node.get("inputs", {})
        for name in schema_inputs.get("required", {}):
            if name not in inputs:
                problems.append(f"{where} is missing required input {name!r}")
        for name, value in inputs.items():
            spec = declared.get(name)
            if spec is None:
                problems.append(
                    f"{where} has input {name!r}, which the server's {class_type} does not take; "
                    f"it takes: {', '.join(declared) or 'nothing'}"
                )
                continue
            spec = list(spec) if isinstance(spec, list | tuple) else [spec]
            if is_link(value):
                source = graph.get(value[0])
                if source is None:
                    problems.append(
                        f"{where} input {name!r} links to node {value[0]!r}, which is not in the graph"
                    )
                    continue
                source_info = object_info.get(source["class_type"])
                if source_info is None:
                    continue  # reported as a missing node type
                outputs = list(source_info.get("output", []))
                if not 0 <= value[1] < len(outputs):
                    problems.append(
                        f"{where} input {name!r} reads output {value[1]} of node {value[0]} "
                        f"({source['class_type']}), which has {len(outputs)} output(s)"
                    )
                elif not _types_match(spec[0], outputs[value[1]]):
                    problems.append(
                        f"{where} input {name!r} wants {spec[0]} but output {value[1]} of node {value[0]} "
                        f"({source['class_type']}) is {outputs[value[1]]}"
                    )
                continue
            options = _combo_options(spec)
            if options is not None:
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if value not in options and not _is_upload(opts):
                    label = MODEL_INPUTS.get((class_type, name))
                    if label:
                        problems.append(
                            f"{label} {value!r} is not on the server; it has: {_truncated(options)}"
                        )
                    else:
                        problems.append(
                            f"{where} input {name!r}={value!r} is not one of: {_truncated(options)}"
                        )
                continue
            problem = _check_value(where, name, spec, value)
            if problem:
                problems.append(problem)
    if missing_types:
        listed = ", ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(missing_types.items()))
        problems.insert(
            0,
            f"the server has no node type {listed}: install the custom node that provides it (or update ComfyUI) and restart the server",
        )
    if problems:
        raise ServerMismatchError("; ".join(problems))


# --- a user's own templates -----------------------------------------------------------------


def user_templates_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "workflows"


def add_user_template(
    workflow: Mapping[str, Any] | str | Path,
    manifest: Mapping[str, Any],
    user_dir: Path,
    *,
    overwrite: bool = False,
) -> Template:
    """Check a workflow exported from ComfyUI (API format: a dict, JSON text or a file path) against its
    manifest and write both into `user_dir`; refuses UI-format workflows and, unless `overwrite`, a name
    that is already there."""
    if isinstance(workflow, Path):
        graph = _read_json(workflow)
        where = str(workflow)
    elif isinstance(workflow, str):
        try:
            graph = json.loads(workflow)
        except json.JSONDecodeError as e:
            raise TemplateError(f"the workflow is not valid JSON: {e}") from None
        where = "the workflow"
    else:
        graph, where = copy.deepcopy(dict(workflow)), "the workflow"
    graph = check_api_graph(graph, where)
    parsed = parse_manifest(dict(manifest), graph, f"manifest {manifest.get('name')!r}")

    user_dir = Path(user_dir)
    target = user_dir / f"{parsed.name}.json"
    if target.exists() and not overwrite:
        raise TemplateError(f"a user template named {parsed.name!r} already exists in {user_dir}")
    user_dir.mkdir(parents=True, exist_ok=True)
    # The workflow first: a manifest is what list_templates looks for, so it must never lack its graph.
    with atomic_write(target, "w") as f:
        json.dump(graph, f, indent=2)
    with atomic_write(manifest_path(target), "w") as f:
        json.dump(dict(manifest), f, indent=2)
    return load_template(target)
