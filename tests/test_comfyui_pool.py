"""ComfyPool routing, health and spec parsing against two protocol-speaking ComfyUI stubs."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import tests.comfy_stub as comfy_stub
from engine.comfyui.client import ComfyClient, ComfyConnectionError
from engine.comfyui.pool import ComfyPool, NoServerError, ServerSpec, parse_server_spec, server_models
from engine.errors import InputError, TransientError
from tests.comfy_stub import MODELS, ComfyStub
from tests.test_comfyui_client import txt2img_graph


class CountingClient(ComfyClient):
    """A real ComfyClient that records how many runs it has in flight at once (the per-server limit)."""

    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("timeout", 5)
        super().__init__(*args, **kwargs)
        self.active = 0
        self.peak = 0
        self.runs = 0

    def run(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.runs += 1
            self.peak = max(self.peak, self.active)
        try:
            return super().run(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


class _FixedPortProbe:
    """Stands in for the socket ComfyStub.start() binds to find a free port, so it reuses `port`."""

    def __init__(self, port: int):
        self.port = port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def bind(self, address):
        pass

    def getsockname(self):
        return ("127.0.0.1", self.port)


def start_stub_on(monkeypatch, port: int, **knobs) -> ComfyStub:
    """Start a stub on a given port: a server coming (back) up where the pool expects it."""
    with monkeypatch.context() as patch:
        patch.setattr(comfy_stub, "socket", SimpleNamespace(socket=lambda: _FixedPortProbe(port)))
        return ComfyStub(**knobs).start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def stubs():
    servers = [ComfyStub(render_delay=0.3, steps=2).start() for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def make_pool(urls, **kwargs) -> ComfyPool:
    return ComfyPool([ServerSpec(url) for url in urls], client_factory=CountingClient, **kwargs)


def clients(pool: ComfyPool) -> dict[str, CountingClient]:
    return {row["url"]: pool._servers[i].client for i, row in enumerate(pool.status())}


def test_leases_go_to_the_least_busy_server_ties_round_robin(stubs):
    a, b = stubs[0].url, stubs[1].url
    with make_pool([a, b], max_inflight=3) as pool, ExitStackish() as held:
        assert [held.take(pool) for _ in range(3)] == [a, b, a]
        assert held.take(pool) == b  # a has 2 in flight, b 1
        held.release(a)
        assert held.take(pool) == a  # a 1, b 2
        assert {row["url"]: row["in_flight"] for row in pool.status()} == {a: 2, b: 2}
        assert all(row["limit"] == 3 and row["healthy"] is True for row in pool.status())


def test_a_full_pool_blocks_until_a_slot_frees_then_times_out_naming_each_server(stubs):
    a, b = stubs[0].url, stubs[1].url
    with make_pool([a, b], max_inflight=1) as pool, ExitStackish() as held:
        held.take(pool)
        held.take(pool)
        with pytest.raises(NoServerError) as caught, pool.acquire(timeout=0.1):
            pass
        assert isinstance(caught.value, TransientError)
        assert f"{a}: busy (1/1 jobs in flight)" in str(caught.value)
        assert f"{b}: busy (1/1 jobs in flight)" in str(caught.value)

        threading.Timer(0.2, held.release, args=(b,)).start()
        started = time.monotonic()
        with pool.acquire(timeout=5) as lease:
            assert lease.url == b
        assert time.monotonic() - started >= 0.15  # it waited on the condition, then got the freed slot


def test_a_batch_of_six_is_shared_and_each_server_keeps_its_limit(stubs):
    with make_pool([s.url for s in stubs], max_inflight=1) as pool:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as workers:
            results = list(workers.map(lambda seed: pool.run(txt2img_graph(seed=seed)), range(6)))
        wall = time.monotonic() - started
        assert len(results) == 6 and all(len(r.images) == 1 for r in results)
        counts = [c.runs for c in clients(pool).values()]
        assert sum(counts) == 6 and min(counts) >= 2  # both served a share
        assert all(c.peak == 1 for c in clients(pool).values())
        assert [len(s.submitted) for s in stubs] == counts
        assert wall < 6 * 0.3  # two servers at once: about 3 renders long, not 6


def test_an_unreachable_server_is_skipped_then_used_again_after_retry_after(stubs, monkeypatch):
    a_stub, b_stub = stubs
    a, b = a_stub.url, b_stub.url
    port = b_stub.port
    with make_pool([a, b], max_inflight=1, retry_after_s=1.0) as pool:
        pool.run(txt2img_graph())
        pool.run(txt2img_graph())
        assert [len(s.submitted) for s in stubs] == [1, 1]

        b_stub.stop()
        pool.run(txt2img_graph())  # round robin: a's turn
        with pytest.raises(ComfyConnectionError):  # the job that went to b; the job layer retries it
            pool.run(txt2img_graph())
        down = {row["url"]: row for row in pool.status()}[b]
        assert down["healthy"] is False and "unreachable" in down["last_error"] and down["last_checked"]

        b_back = start_stub_on(monkeypatch, port, render_delay=0.3, steps=2)
        try:
            for _ in range(3):  # before retry_after_s: b is skipped although it is back
                with pool.acquire(timeout=1) as lease:
                    assert lease.url == a
            time.sleep(1.1)
            with pool.acquire(timeout=1) as first, pool.acquire(timeout=1) as second:
                assert {first.url, second.url} == {a, b}  # b probed with /system_stats: healthy again
            assert {row["url"]: row["healthy"] for row in pool.status()} == {a: True, b: True}
            pool.run(txt2img_graph())
            pool.run(txt2img_graph())
            assert len(b_back.submitted) == 1
        finally:
            b_back.stop()


def test_all_servers_down_raises_naming_both_urls():
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with make_pool(urls, retry_after_s=60) as pool:
        with pytest.raises(NoServerError) as caught:
            pool.run(txt2img_graph())
        message = str(caught.value)
        for url in urls:
            assert f"{url}: unhealthy (ComfyUI at {url} is unreachable" in message
        assert "next check in 60 s" in message
        assert [row["healthy"] for row in pool.status()] == [False, False]
        with pytest.raises(NoServerError), pool.acquire(timeout=5):  # no probe before retry_after_s
            pass


def test_mark_unhealthy_skips_a_server_and_wakes_waiters(stubs):
    a, b = stubs[0].url, stubs[1].url
    with make_pool([a, b], max_inflight=1, retry_after_s=60) as pool:
        pool.mark_unhealthy(b, "maintenance")
        with pool.acquire(timeout=1) as lease:
            assert lease.url == a
            threading.Timer(0.1, pool.mark_unhealthy, args=(a, "disk full")).start()
            with pytest.raises(NoServerError) as caught, pool.acquire(timeout=5):  # waits for a; a goes down
                pass
        assert f"{a}: unhealthy (disk full)" in str(caught.value)
        assert f"{b}: unhealthy (maintenance)" in str(caught.value)
        with pytest.raises(InputError, match="not in the pool"):
            pool.mark_unhealthy("http://elsewhere:1", "x")


def test_parse_server_spec_auth_token_and_bad_entries():
    specs = parse_server_spec(
        " http://Gpu1:8188, https://alice:s%40cret@gpu2.local:8443/comfy/\n http://gpu3:8188#token=XYZ "
    )
    assert specs == [
        ServerSpec("http://gpu1:8188"),
        ServerSpec("https://gpu2.local:8443/comfy", auth=("alice", "s@cret")),
        ServerSpec("http://gpu3:8188", auth="XYZ"),
    ]
    assert "s@cret" not in repr(specs) and "XYZ" not in repr(specs)
    assert parse_server_spec("  ") == []

    for entry, why in [
        ("gpu1:8188", "must be an http:// or https:// URL"),
        ("ftp://gpu1", "must be an http:// or https:// URL"),
        ("http://gpu1:99999", "bad port"),
        ("http://gpu1:8188#tok=1", "#token="),
        ("http://bob@gpu1:8188", "user:password@"),
        ("http://bob:pw@gpu1:8188#token=1", "not both"),
    ]:
        with pytest.raises(InputError, match=why) as caught:
            parse_server_spec(f"http://ok:8188 {entry}")
        assert "pw" not in str(caught.value)
        assert entry.split("//")[-1].split("@")[-1].split("#")[0] in str(caught.value)  # names the entry
    with pytest.raises(InputError, match="listed twice"):
        parse_server_spec("http://gpu1:8188, http://GPU1:8188/")


def test_credentials_from_the_spec_reach_the_servers():
    basic = ComfyStub(render_delay=0.05, steps=1, basic_auth=("alice", "s@cret")).start()
    bearer = ComfyStub(render_delay=0.05, steps=1, token="XYZ").start()
    try:
        host_b, host_t = basic.url.removeprefix("http://"), bearer.url.removeprefix("http://")
        specs = parse_server_spec(f"http://alice:s%40cret@{host_b} http://{host_t}#token=XYZ")
        with ComfyPool(specs, max_inflight=1) as pool:
            with ThreadPoolExecutor(2) as workers:
                list(workers.map(lambda seed: pool.run(txt2img_graph(seed=seed)), range(2)))
            assert [row["url"] for row in pool.status()] == [basic.url, bearer.url]
            assert [len(basic.submitted), len(bearer.submitted)] == [1, 1]
    finally:
        basic.stop()
        bearer.stop()


def test_server_models_from_object_info_cached(stubs):
    with make_pool([s.url for s in stubs], object_info_ttl_s=60) as pool:
        info = pool.object_info()
        assert server_models(info) == {
            "checkpoints": MODELS["checkpoints"],
            "loras": MODELS["loras"],
            "upscale_models": MODELS["upscale_models"],
        }
        for stub in stubs:
            stub.stop()
        assert pool.object_info() is info  # served from the cache while the servers are gone


def test_server_models_reads_combo_shaped_inputs_and_missing_nodes():
    info = {
        "CheckpointLoaderSimple": {
            "input": {"required": {"ckpt_name": ["COMBO", {"options": ["a.safetensors", "b.ckpt"]}]}}
        },
        "LoraLoader": {"input": {"required": {"lora_name": [["x.safetensors"], {}]}}},
    }
    assert server_models(info) == {
        "checkpoints": ["a.safetensors", "b.ckpt"],
        "loras": ["x.safetensors"],
        "upscale_models": [],
    }


def test_pool_arguments_are_validated():
    with pytest.raises(InputError, match="at least one server"):
        ComfyPool([])
    with pytest.raises(InputError, match="max_inflight"):
        ComfyPool([ServerSpec("http://a:1")], max_inflight=0)


class ExitStackish:
    """Holds pool leases by URL so a test can release one at a chosen moment."""

    def __init__(self):
        self.held: list[tuple[str, object]] = []

    def take(self, pool: ComfyPool) -> str:
        lease_cm = pool.acquire(timeout=1)
        lease = lease_cm.__enter__()
        self.held.append((lease.url, lease_cm))
        return lease.url

    def release(self, url: str) -> None:
        i = next(i for i, (held_url, _) in enumerate(self.held) if held_url == url)
        self.held.pop(i)[1].__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        while self.held:
            self.held.pop()[1].__exit__(None, None, None)
