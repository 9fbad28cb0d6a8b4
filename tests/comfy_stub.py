"""A local stand-in for a ComfyUI server, speaking its HTTP + websocket protocol.

Message shapes follow ComfyUI's server.py, execution.py, main.py and comfy_execution/progress.py at
commit a125cd84b054a57729b5eecab930ca9408719832 (Comfy-Org/ComfyUI, 2025-10-12); nothing is copied.

- `/ws?clientId=`: a `status` message on connect; execution messages go only to the prompt's client.
- POST `/prompt`: validates like ComfyUI (missing class_type / unknown node -> `invalid_prompt`, no
  output node -> `prompt_no_outputs`, missing input / value not in list -> `node_errors`).
- One prompt runs at a time: `execution_start`, `execution_cached`, `executing` per node, `progress`
  + `progress_state` per sampler step with a binary PNG preview (type 1), `executed` with images,
  `execution_success`, then `executing` {node: null}; history keeps outputs and status messages.
- `/history/{id}`, `/view`, `/upload/image`, `/interrupt`, GET/POST `/queue`, `/object_info`,
  `/models/{folder}`, `/system_stats`.

Knobs: `render_delay` (seconds per sampler, slept), `steps`, `fail_class` (that node raises, giving an
`execution_error` with a real traceback), `drop_sockets()` (a network blip), `restart()` (drops
sockets, forgets queue and history), `basic_auth` / `token` (every request must carry it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import struct
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MODELS = {
    "checkpoints": ["sd15_tiny.safetensors", "sdxl_tiny.safetensors"],
    "loras": ["character_a.safetensors", "style_b.safetensors"],
    "vae": ["vae_tiny.safetensors"],
    "upscale_models": ["RealESRGAN_x4plus.pth"],
    "embeddings": [],
}
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim"]
SCHEDULERS = ["normal", "karras", "exponential", "simple", "sgm_uniform"]


def _node(inputs: dict, output: tuple, category: str, output_node: bool = False, names=None) -> dict:
    """One /object_info entry in ComfyUI's node_info() shape."""
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(output),
        "output_is_list": [False] * len(output),
        "output_name": list(names or output),
        "description": "",
        "python_module": "nodes",
        "category": category,
        "output_node": output_node,
    }


def node_schemas(input_files: list[str]) -> dict[str, dict]:
    """The node classes this stub knows, shaped like ComfyUI's /object_info."""
    nodes = {
        "CheckpointLoaderSimple": _node(
            {"required": {"ckpt_name": [MODELS["checkpoints"], {"tooltip": "The name of the checkpoint."}]}},
            ("MODEL", "CLIP", "VAE"),
            "loaders",
        ),
        "CLIPTextEncode": _node(
            {
                "required": {
                    "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                    "clip": ["CLIP", {}],
                }
            },
            ("CONDITIONING",),
            "conditioning",
        ),
        "KSampler": _node(
            {
                "required": {
                    "model": ["MODEL", {}],
                    "seed": [
                        "INT",
                        {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True},
                    ],
                    "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                    "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
                    "sampler_name": [SAMPLERS, {}],
                    "scheduler": [SCHEDULERS, {}],
                    "positive": ["CONDITIONING", {}],
                    "negative": ["CONDITIONING", {}],
                    "latent_image": ["LATENT", {}],
                    "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
                }
            },
            ("LATENT",),
            "sampling",
        ),
        "EmptyLatentImage": _node(
            {
                "required": {
                    "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                    "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                    "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                }
            },
            ("LATENT",),
            "latent",
        ),
        "VAEDecode": _node(
            {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}}, ("IMAGE",), "latent"
        ),
        "VAEEncode": _node({"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}}, ("LATENT",), "latent"),
        "SaveImage": _node(
            {
                "required": {
                    "images": ["IMAGE", {}],
                    "filename_prefix": ["STRING", {"default": "ComfyUI"}],
                },
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
            },
            (),
            "image",
            output_node=True,
        ),
        "LoraLoader": _node(
            {
                "required": {
                    "model": ["MODEL", {}],
                    "clip": ["CLIP", {}],
                    "lora_name": [MODELS["loras"], {}],
                    "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
                    "strength_clip": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}],
                }
            },
            ("MODEL", "CLIP"),
            "loaders",
        ),
        "LoadImage": _node(
            {"required": {"image": [sorted(input_files), {"image_upload": True}]}}, ("IMAGE", "MASK"), "image"
        ),
        # as nodes.py declares them (LoadImageMask, RepeatLatentBatch), for the img2img and inpaint templates
        "LoadImageMask": _node(
            {
                "required": {
                    "image": [sorted(input_files), {"image_upload": True}],
                    "channel": [["alpha", "red", "green", "blue"]],
                }
            },
            ("MASK",),
            "mask",
        ),
        "RepeatLatentBatch": _node(
            {"required": {"samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": 64}]}},
            ("LATENT",),
            "latent/batch",
        ),
        "SetLatentNoiseMask": _node(
            {"required": {"samples": ["LATENT"], "mask": ["MASK"]}}, ("LATENT",), "latent/inpaint"
        ),
        "UpscaleModelLoader": _node(
            {"required": {"model_name": [MODELS["upscale_models"], {}]}}, ("UPSCALE_MODEL",), "loaders"
        ),
        "ImageUpscaleWithModel": _node(
            {"required": {"upscale_model": ["UPSCALE_MODEL", {}], "image": ["IMAGE", {}]}},
            ("IMAGE",),
            "image/upscaling",
        ),
    }
    for name, info in nodes.items():
        info["name"] = name
        info["display_name"] = name
    return nodes


def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG rendered with Pillow."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class _Interrupted(Exception):
    """The stub's InterruptProcessingException."""


@dataclass
class _Task:
    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_queue_item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class ComfyStub:
    """A ComfyUI stand-in on 127.0.0.1:<free port>; `start()` it, `stop()` it."""

    render_delay: float = 0.2
    steps: int = 4
    fail_class: str | None = None
    basic_auth: tuple[str, str] | None = None
    token: str | None = None
    port: int = 0
    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (type, subfolder, name)
    submitted: list[dict[str, Any]] = field(default_factory=list)  # every accepted /prompt body

    def __post_init__(self) -> None:
        self._sockets: dict[str, WebSocket] = {}
        self._pending: list[_Task] = []
        self._running: _Task | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._number = 0
        self._interrupt = False
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ComfyStub:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="comfy-stub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("ComfyStub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def restart(self) -> None:
        """Behave like a restarted ComfyUI: sockets dropped, queue, history and running prompt gone."""
        asyncio.run_coroutine_threadsafe(self._restart(), self._loop).result(timeout=10)

    def drop_sockets(self) -> None:
        """Close every websocket (a network blip) while the queue, history and running prompt live on."""
        asyncio.run_coroutine_threadsafe(self._drop_sockets(), self._loop).result(timeout=10)

    async def _drop_sockets(self) -> None:
        for ws in list(self._sockets.values()):
            with contextlib.suppress(RuntimeError):
                await ws.close(code=1012)  # service restart
        self._sockets.clear()

    async def _restart(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._pending.clear()
        self._running = None
        self._history.clear()
        await self._drop_sockets()
        self._worker = asyncio.create_task(self._work())

    def pending_ids(self) -> list[str]:
        return [task.prompt_id for task in self._pending]

    def history_ids(self) -> list[str]:
        return list(self._history)

    # -- app -----------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        routes = [
            WebSocketRoute("/ws", self._ws),
            Route("/prompt", self._post_prompt, methods=["POST"]),
            Route("/queue", self._get_queue, methods=["GET"]),
            Route("/queue", self._post_queue, methods=["POST"]),
            Route("/interrupt", self._post_interrupt, methods=["POST"]),
            Route("/history/{prompt_id}", self._get_history, methods=["GET"]),
            Route("/view", self._view, methods=["GET"]),
            Route("/upload/image", self._upload, methods=["POST"]),
            Route("/object_info", self._object_info, methods=["GET"]),
            Route("/models/{folder}", self._models, methods=["GET"]),
            Route("/system_stats", self._system_stats, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self._lifespan)
        return _AuthGate(app, self._allowed)

    def _lifespan(self, app: Starlette):
        stub = self

        class _Lifespan:
            async def __aenter__(self):
                stub._loop = asyncio.get_running_loop()
                stub._wakeup = asyncio.Event()
                stub._worker = asyncio.create_task(stub._work())

            async def __aexit__(self, *exc):
                stub._worker.cancel()

        return _Lifespan()

    def _allowed(self, headers: dict[str, str]) -> bool:
        if self.basic_auth is None and self.token is None:
            return True
        given = headers.get("authorization", "")
        if self.token is not None and given == f"Bearer {self.token}":
            return True
        if self.basic_auth is not None:
            expected = base64.b64encode(f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()).decode()
            return given == f"Basic {expected}"
        return False

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._pending) + (1 if self._running else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    async def _send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        targets = list(self._sockets.values()) if sid is None else [self._sockets.get(sid)]
        for ws in targets:
            if ws is None:
                continue
            # ComfyUI's send_socket_catch_exception ignores dead sockets too
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                await ws.send_json({"type": event, "data": data})

    async def _send_bytes(self, payload: bytes, sid: str | None) -> None:
        ws = self._sockets.get(sid) if sid else None
        if ws is not None:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                await ws.send_bytes(payload)

    async def _queue_updated(self) -> None:
        await self._send("status", {"status": self._queue_info()}, None)

    async def _ws(self, ws: WebSocket) -> None:
        await ws.accept()
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        self._sockets[sid] = ws
        try:
            await ws.send_json({"type": "status", "data": {"status": self._queue_info(), "sid": sid}})
            while True:
                await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self._sockets.get(sid) is ws:
                del self._sockets[sid]

    # -- /prompt and validation ----------------------------------------------------------------

    def _validate(self, prompt: Any) -> tuple[dict | None, dict, list[str]]:
        """(error, node_errors, outputs) the way execution.validate_prompt reports them."""
        schemas = node_schemas(self._input_names())
        if not isinstance(prompt, dict):
            prompt = {}
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return (
                    {
                        "type": "invalid_prompt",
                        "message": "Cannot execute because a node is missing the class_type property.",
                        "details": f"Node ID '#{node_id}'",
                        "extra_info": {},
                    },
                    {},
                    [],
                )
            if node["class_type"] not in schemas:
                return (
                    {
                        "type": "invalid_prompt",
                        "message": f"Cannot execute because node {node['class_type']} does not exist.",
                        "details": f"Node ID '#{node_id}'",
                        "extra_info": {},
                    },
                    {},
                    [],
                )
            if schemas[node["class_type"]]["output_node"]:
                outputs.append(node_id)
        if not outputs:
            return (
                {
                    "type": "prompt_no_outputs",
                    "message": "Prompt has no outputs",
                    "details": "",
                    "extra_info": {},
                },
                {},
                [],
            )
        node_errors = {}
        for node_id, node in prompt.items():
            reasons = []
            for name, spec in schemas[node["class_type"]]["input"].get("required", {}).items():
                inputs = node.get("inputs", {})
                if name not in inputs:
                    reasons.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{name}",
                            "extra_info": {"input_name": name},
                        }
                    )
                elif (
                    isinstance(spec[0], list)
                    and not isinstance(inputs[name], list)
                    and inputs[name] not in spec[0]
                ):
                    reasons.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{name}: '{inputs[name]}' not in {spec[0]}",
                            "extra_info": {
                                "input_name": name,
                                "input_config": spec[1] if len(spec) > 1 else None,
                                "received_value": inputs[name],
                            },
                        }
                    )
            if reasons:
                node_errors[node_id] = {
                    "errors": reasons,
                    "dependent_outputs": outputs,
                    "class_type": node["class_type"],
                }
        if node_errors:
            details = "\n".join(
                f"{r['message']}: {r['details']}" for e in node_errors.values() for r in e["errors"]
            )
            return (
                {
                    "type": "prompt_outputs_failed_validation",
                    "message": "Prompt outputs failed validation",
                    "details": details,
                    "extra_info": {},
                },
                node_errors,
                [],
            )
        return None, {}, outputs

    async def _post_prompt(self, request: Request) -> Response:
        body = await request.json()
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return JSONResponse({"error": error, "node_errors": {}}, status_code=400)
        error, node_errors, outputs = self._validate(body["prompt"])
        if error is not None:
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        extra_data = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        number = self._number
        self._number += 1
        self.submitted.append(body)
        self._pending.append(_Task(number, prompt_id, body["prompt"], extra_data, outputs))
        self._wakeup.set()
        await self._queue_updated()
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    # -- execution -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            task = self._pending.pop(0)
            self._running = task
            messages: list[tuple[str, dict]] = []
            success, ui_outputs = await self._execute(task, messages)
            self._history[task.prompt_id] = {
                "prompt": task.as_queue_item(),
                "outputs": ui_outputs,
                "status": {
                    "status_str": "success" if success else "error",
                    "completed": success,
                    "messages": messages,
                },
                "meta": {node_id: {"node_id": node_id, "display_node": node_id} for node_id in ui_outputs},
            }
            self._running = None
            await self._queue_updated()
            sid = task.extra_data.get("client_id")
            if sid is not None:
                await self._send("executing", {"node": None, "prompt_id": task.prompt_id}, sid)

    async def _execute(self, task: _Task, messages: list) -> tuple[bool, dict[str, Any]]:
        sid = task.extra_data.get("client_id")
        prompt_id = task.prompt_id
        self._interrupt = False

        async def add_message(event: str, data: dict, broadcast: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append((event, data))
            if sid is not None or broadcast:
                await self._send(event, data, sid)

        await add_message("execution_start", {"prompt_id": prompt_id})
        await add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        executed: list[str] = []
        ui_outputs: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for node_id in _topological(task.prompt):
            node = task.prompt[node_id]
            await self._send(
                "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, sid
            )
            try:
                output = await self._run_node(task, node_id, node, values)
            except _Interrupted:
                await add_message(
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": node["class_type"],
                        "executed": executed,
                    },
                    broadcast=True,
                )
                return False, ui_outputs
            except Exception as exc:
                await add_message(
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": node["class_type"],
                        "executed": executed,
                        "exception_message": f"{exc}\n",
                        "exception_type": type(exc).__qualname__
                        if type(exc).__module__ == "builtins"
                        else f"{type(exc).__module__}.{type(exc).__qualname__}",
                        "traceback": traceback.format_tb(exc.__traceback__),
                        "current_inputs": {},
                        "current_outputs": executed,
                    },
                    broadcast=False,
                )
                return False, ui_outputs
            executed.append(node_id)
            if output is not None:
                ui_outputs[node_id] = output
                await self._send(
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id},
                    sid,
                )
        await add_message("execution_success", {"prompt_id": prompt_id})
        return True, ui_outputs

    async def _run_node(self, task: _Task, node_id: str, node: dict, values: dict) -> dict | None:
        """Fake one node: values flow along links; SaveImage writes PNGs into the output folder."""
        kind = node["class_type"]
        inputs = node.get("inputs", {})

        def resolve(name: str, default: Any = None) -> Any:
            value = inputs.get(name, default)
            return values.get(value[0]) if isinstance(value, list) and len(value) == 2 else value

        if kind == self.fail_class:
            raise RuntimeError(
                f"stub failure in {kind} (node {node_id}): mat1 and mat2 shapes cannot be multiplied"
            )
        sid = task.extra_data.get("client_id")
        if kind == "EmptyLatentImage":
            values[node_id] = {
                "size": (int(inputs.get("width", 64)), int(inputs.get("height", 64))),
                "batch": int(inputs.get("batch_size", 1)),
            }
        elif kind == "KSampler":
            latent = dict(resolve("latent_image") or {"size": (64, 64), "batch": 1})
            seed = int(inputs.get("seed", 0))
            latent["color"] = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
            total = self.steps
            for step in range(1, total + 1):
                await asyncio.sleep(self.render_delay / total)
                if self._interrupt:
                    raise _Interrupted()
                await self._send(
                    "progress",
                    {"value": step, "max": total, "prompt_id": task.prompt_id, "node": node_id},
                    sid,
                )
                await self._send(
                    "progress_state",
                    {
                        "prompt_id": task.prompt_id,
                        "nodes": {
                            node_id: {
                                "value": step,
                                "max": total,
                                "state": "running",
                                "node_id": node_id,
                                "prompt_id": task.prompt_id,
                                "display_node_id": node_id,
                                "parent_node_id": None,
                                "real_node_id": node_id,
                            }
                        },
                    },
                    sid,
                )
                preview = png_bytes((8, 8), latent["color"])
                await self._send_bytes(struct.pack(">I", 1) + struct.pack(">I", 2) + preview, sid)
            values[node_id] = latent
        elif kind in ("VAEDecode", "ImageUpscaleWithModel"):
            source = resolve("samples") if kind == "VAEDecode" else resolve("image")
            image = dict(source or {"size": (64, 64), "batch": 1, "color": (0, 0, 0)})
            if kind == "ImageUpscaleWithModel":
                image["size"] = (image["size"][0] * 4, image["size"][1] * 4)
            values[node_id] = image
        elif kind == "SaveImage":
            image = resolve("images") or {"size": (64, 64), "batch": 1, "color": (0, 0, 0)}
            prefix = inputs.get("filename_prefix", "ComfyUI")
            refs = []
            for _ in range(image.get("batch", 1)):
                counter = sum(1 for key in self.files if key[0] == "output") + 1
                name = f"{prefix}_{counter:05}_.png"
                self.files[("output", "", name)] = png_bytes(image["size"], image.get("color", (0, 0, 0)))
                refs.append({"filename": name, "subfolder": "", "type": "output"})
            return {"images": refs}
        elif kind == "LoadImage":
            values[node_id] = {"size": (64, 64), "batch": 1, "color": (128, 128, 128)}
        elif kind == "RepeatLatentBatch":
            values[node_id] = {
                **(resolve("samples") or {"size": (64, 64)}),
                "batch": int(inputs.get("amount", 1)),
            }
        else:
            values[node_id] = resolve("model") or resolve("samples") or {}
        return None

    # -- the other routes ----------------------------------------------------------------------

    async def _get_queue(self, request: Request) -> Response:
        running = [self._running.as_queue_item()] if self._running else []
        return JSONResponse(
            {"queue_running": running, "queue_pending": [task.as_queue_item() for task in self._pending]}
        )

    async def _post_queue(self, request: Request) -> Response:
        body = await request.json()
        if body.get("clear"):
            self._pending.clear()
        for prompt_id in body.get("delete", []):
            self._pending = [task for task in self._pending if task.prompt_id != prompt_id]
        await self._queue_updated()
        return Response(status_code=200)

    async def _post_interrupt(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if not prompt_id or (self._running is not None and self._running.prompt_id == prompt_id):
            self._interrupt = True
        return Response(status_code=200)

    async def _get_history(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        entry = self._history.get(prompt_id)
        return JSONResponse({prompt_id: entry} if entry is not None else {})

    async def _view(self, request: Request) -> Response:
        query = request.query_params
        key = (query.get("type", "output"), query.get("subfolder", ""), query.get("filename", ""))
        if key not in self.files:
            return Response(status_code=404)
        return Response(self.files[key], media_type="image/png")

    def _input_names(self) -> list[str]:
        return [f"{sub}/{name}" if sub else name for kind, sub, name in self.files if kind == "input"]

    async def _upload(self, request: Request) -> Response:
        form = await request.form()
        image = form.get("image")
        if image is None or not getattr(image, "filename", None):
            return Response(status_code=400)
        kind = form.get("type") or "input"
        subfolder = form.get("subfolder", "")
        name = image.filename
        if form.get("overwrite") not in ("true", "1"):
            stem, dot, ext = name.rpartition(".")
            counter = 1
            while (kind, subfolder, name) in self.files:
                name = f"{stem} ({counter}){dot}{ext}"
                counter += 1
        self.files[(kind, subfolder, name)] = await image.read()
        return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})

    async def _object_info(self, request: Request) -> Response:
        return JSONResponse(node_schemas(self._input_names()))

    async def _models(self, request: Request) -> Response:
        folder = request.path_params["folder"]
        if folder not in MODELS:
            return Response(status_code=404)
        return JSONResponse(MODELS[folder])

    async def _system_stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 8 << 30,
                    "ram_free": 4 << 30,
                    "comfyui_version": "0.3.64",
                    "python_version": "3.11",
                    "pytorch_version": "2.8.0",
                    "embedded_python": False,
                    "argv": ["main.py"],
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 0,
                        "vram_free": 0,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )


class _AuthGate:
    """ASGI wrapper: 401 for HTTP and a refused handshake (403) for websockets without credentials."""

    def __init__(self, app, allowed):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
            if not self.allowed(headers):
                if scope["type"] == "http":
                    await Response("Unauthorized", status_code=401)(scope, receive, send)
                else:
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def _topological(prompt: dict[str, Any]) -> list[str]:
    """Node ids so that every node comes after the nodes it links from."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                visit(str(value[0]))
        order.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return order
