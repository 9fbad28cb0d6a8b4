"""ComfyUI client and pool benchmark (issue 7), against the protocol-speaking stub (tests/comfy_stub.py).

    .venv/bin/python -m tests.benchmarks.run_benchmarks --only comfyui
    .venv/bin/python -m tests.benchmarks.comfy_bench            (prints the rows, writes nothing)

Row 1: client overhead per job. `ComfyClient.run` on a stub whose render is a RENDER_S sleep; overhead is the
wall time from submit to image bytes in hand minus RENDER_S, median over RUNS jobs. Baseline: the same steps
written bare with httpx + websockets (open /ws, POST /prompt, wait for execution_success, GET /history,
GET /view). The two alternate job by job on the same stub.
Row 2: a batch of BATCH jobs (render a BATCH_RENDER_S sleep) through `ComfyPool.run` from BATCH threads, on a
pool of two stubs vs a pool of one; target >= 1.8x throughput.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from websockets.sync.client import connect

from engine.comfyui.client import ComfyClient
from engine.comfyui.pool import ComfyPool, ServerSpec
from tests.comfy_stub import ComfyStub
from tests.test_comfyui_client import txt2img_graph

RENDER_S = 0.2
RUNS = 20
WARMUP = 2
BATCH = 20
BATCH_RENDER_S = 0.5
SPEEDUP_TARGET = 1.8


def bare_job(http: httpx.Client, base_url: str, graph: dict) -> list[bytes]:
    """One job with nothing but httpx and websockets: what any ComfyUI script does."""
    client_id = uuid.uuid4().hex
    ws_url = base_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    with connect(ws_url, max_size=None) as ws:
        prompt_id = http.post("/prompt", json={"prompt": graph, "client_id": client_id}).json()["prompt_id"]
        while True:
            frame = ws.recv()
            if isinstance(frame, str):
                message = json.loads(frame)
                if message["type"] == "execution_success" and message["data"].get("prompt_id") == prompt_id:
                    break
    outputs = http.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]
    return [
        http.get(
            "/view", params={"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]}
        ).content
        for node in outputs.values()
        for ref in node.get("images", [])
    ]


def bench_overhead(runs: int = RUNS) -> dict:
    stub = ComfyStub(render_delay=RENDER_S, steps=4).start()
    try:
        with ComfyClient(stub.url) as client, httpx.Client(base_url=stub.url, timeout=30) as http:
            ours, bare = [], []
            for i in range(WARMUP + runs):
                graph = txt2img_graph(seed=i)
                t = time.perf_counter()
                result = client.run(graph)
                ours_s = time.perf_counter() - t
                assert len(result.images) == 1
                t = time.perf_counter()
                images = bare_job(http, stub.url, graph)
                bare_s = time.perf_counter() - t
                assert len(images) == 1
                if i >= WARMUP:
                    ours.append((ours_s - RENDER_S) * 1000)
                    bare.append((bare_s - RENDER_S) * 1000)
    finally:
        stub.stop()
    return {"ours": statistics.median(ours), "bare": statistics.median(bare), "runs": runs}


def bench_studio(runs: int = 10) -> dict:
    """Row 1b: the whole StudioNOVA path: submit_generate(engine='comfyui') -> job row -> template bound ->
    pool -> client -> PNG with infotext, recipe and prompt chunk in the library (Asset + Generation rows, a
    thumbnail) -> job done; overhead = that wall time minus the render sleep, vs the bare loop's."""
    import tempfile
    from pathlib import Path

    from engine.settings import Settings
    from engine.studio import Studio

    stub = ComfyStub(render_delay=RENDER_S, steps=4).start()
    tmp = Path(tempfile.mkdtemp(prefix="comfy-bench-"))
    studio = Studio.start(
        Settings(
            data_dir=tmp / "data", models_dir=tmp / "models", demo=True, device="cpu", comfyui_urls=stub.url
        )
    )
    values = {
        "prompt": "a lighthouse",
        "engine": "comfyui",
        "model": "sd15_tiny.safetensors",
        "steps": 4,
        "width": 64,
        "height": 64,
    }
    try:
        with httpx.Client(base_url=stub.url, timeout=30) as http:
            ours, bare = [], []
            for i in range(WARMUP + runs):
                t = time.perf_counter()
                jid, _ = studio.submit_generate({**values, "seed": i})
                done = [e for e in studio.watch(jid) if e["type"] in ("done", "failed")][-1]
                ours_s = time.perf_counter() - t
                assert done["type"] == "done" and Path(done["result"]["images"][0]["path"]).is_file(), done
                t = time.perf_counter()
                bare_job(http, stub.url, txt2img_graph(seed=i))
                bare_s = time.perf_counter() - t
                if i >= WARMUP:
                    ours.append((ours_s - RENDER_S) * 1000)
                    bare.append((bare_s - RENDER_S) * 1000)
    finally:
        studio.close()
        stub.stop()
    return {"ours": statistics.median(ours), "bare": statistics.median(bare), "runs": runs}


def batch_seconds(servers: int, jobs: int = BATCH) -> float:
    stubs = [ComfyStub(render_delay=BATCH_RENDER_S, steps=4).start() for _ in range(servers)]
    try:
        with ComfyPool([ServerSpec(s.url) for s in stubs], max_inflight=1) as pool:
            pool.run(txt2img_graph(seed=0))  # the first call probes every server (/system_stats): untimed
            t = time.perf_counter()
            with ThreadPoolExecutor(jobs) as workers:
                results = list(
                    workers.map(lambda seed: pool.run(txt2img_graph(seed=seed)), range(1, jobs + 1))
                )
            seconds = time.perf_counter() - t
        assert all(len(r.images) == 1 for r in results)
        assert all(s.submitted for s in stubs)
    finally:
        for stub in stubs:
            stub.stop()
    return seconds


def bench_comfy(runs: int = RUNS) -> dict:
    overhead = bench_overhead(runs)
    studio = bench_studio()
    one = batch_seconds(1)
    two = batch_seconds(2)
    return {"overhead": overhead, "studio": studio, "one": one, "two": two}


def rows(data: dict) -> list[dict]:
    o = data["overhead"]
    speedup = data["one"] / data["two"]
    return [
        dict(
            benchmark=f"1. client overhead per job beyond the {RENDER_S * 1000:.0f} ms render, `ComfyClient.run` vs "
            "bare httpx + websockets (median ms)",
            ours=f"{o['ours']:.1f}",
            base=f"{o['bare']:.1f}",
            ratio=f"{o['ours'] / o['bare']:.2f}x ({o['ours'] - o['bare']:+.1f} ms)",
            target="report",
            ok=True,
        ),
        dict(
            benchmark=f"1b. submit to PNG in the library beyond the {RENDER_S * 1000:.0f} ms render: "
            "`submit_generate(engine='comfyui')` (job row, template, pool, client, PNG + rows + thumbnail) vs bare "
            "httpx + websockets (median ms)",
            ours=f"{data['studio']['ours']:.1f}",
            base=f"{data['studio']['bare']:.1f}",
            ratio=f"+{data['studio']['ours'] - data['studio']['bare']:.1f} ms",
            target="report",
            ok=True,
        ),
        dict(
            benchmark=f"2. {BATCH} jobs ({BATCH_RENDER_S * 1000:.0f} ms render each) via `ComfyPool.run`, two "
            "stubs vs one (wall s)",
            ours=f"{data['two']:.2f}",
            base=f"{data['one']:.2f}",
            ratio=f"{speedup:.2f}x throughput",
            target=f">= {SPEEDUP_TARGET}x",
            ok=speedup >= SPEEDUP_TARGET,
        ),
    ]


def markdown_table(results: list[dict]) -> str:
    lines = ["| benchmark | ours | baseline | ratio | target | result |", "|---|---:|---:|---:|---|---|"]
    for r in results:
        lines.append(
            f"| {r['benchmark']} | {r['ours']} | {r['base']} | {r['ratio']} | {r['target']} | "
            f"{'PASS' if r['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def bench_comfy_section(args, write_section, heading: str, machine: str) -> bool:
    from datetime import UTC, datetime

    started = time.perf_counter()
    data = bench_comfy(max(args.runs, RUNS))
    results = rows(data)
    table = markdown_table(results)
    print(table)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_section(
        args.out,
        heading,
        (
            f"{heading}\n\nCommand: `.venv/bin/python -m tests.benchmarks.run_benchmarks --only comfyui`\n\n"
            f"Machine: {machine}\n\nRun: {stamp}, {time.perf_counter() - started:.0f} s. Against `tests/comfy_stub.py` "
            "(uvicorn + starlette on 127.0.0.1, ComfyUI's HTTP + websocket protocol; a render is a sleep split "
            "over 4 sampler steps, each with a progress message and a PNG preview frame), the 7-node txt2img "
            "graph of tests/test_comfyui_client.py.\n\n"
            f"Row 1: {data['overhead']['runs']} jobs each side after {WARMUP} warm-ups, alternating on one stub "
            f"(render {RENDER_S * 1000:.0f} ms); overhead = wall time from the call to the image bytes in hand minus "
            "the render sleep, so it includes the stub's own work (validation, messages, PNG encode) on both sides. "
            "Ours: `ComfyClient.run` (own websocket per run, progress/preview decoding, cancel checks every "
            "250 ms, /history status check, /view per image, timings). Baseline: httpx.Client + "
            "websockets.sync: open /ws, POST /prompt, read until execution_success, GET /history, GET /view.\n\n"
            f"Row 1b: {data['studio']['runs']} jobs through the studio (a Studio on a temp data dir, the stub "
            "as its only ComfyUI server), each followed to its `done` event, alternating with the bare loop.\n\n"
            f"Row 2: {BATCH} jobs submitted at once from {BATCH} threads through `ComfyPool.run` "
            f"(max_inflight=1 per server, render {BATCH_RENDER_S * 1000:.0f} ms), one warm-up job first; wall "
            "time for the batch on a pool of two stubs vs a pool of one.\n\n"
            f"{table}\n"
        ),
    )
    return all(r["ok"] for r in results)


def main() -> int:
    print(markdown_table(rows(bench_comfy())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
