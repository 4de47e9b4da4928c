"""The OpenAI-compatible server, driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

if not torch.cuda.is_available():   # the async-decode test runs the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from crosspool.config import EngineConfig  # noqa: E402
from crosspool.engine.engine import Engine  # noqa: E402
from crosspool.server.app import build_app  # noqa: E402
from crosspool.server.runtime import EngineRuntime  # noqa: E402

KEY = "sk-crosspool-test"
MODELS = {"olmoe": "tiny-olmoe", "qwen3": "tiny-qwen3-moe", "dsv3": "tiny-deepseek-v3"}


class Server:
    def __init__(self, models: dict[str, str], api_key: str | None = KEY, max_in_flight: int = 64,
                 device: str = "cpu", **config: object) -> None:
        self.engine = Engine(models, EngineConfig(block_size=16, device=device, **config))
        self.runtime = EngineRuntime(self.engine, max_in_flight=max_in_flight)
        self.app = build_app(self.runtime, api_key=api_key, shutdown_timeout_s=5)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0)

    def http(self, method: str, path: str, key: str | None = KEY, headers: dict | None = None,
             **kw: object) -> httpx.Response:
        headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model_dirs(tiny_models) -> dict[str, str]:
    return {name: str(tiny_models(preset)) for name, preset in MODELS.items()}


@pytest.fixture(scope="module")
def server(model_dirs):
    s = Server(model_dirs)
    yield s
    s.stop()


def test_models_health_and_metrics(server: Server) -> None:
    assert sorted(m.id for m in server.client.models.list().data) == sorted(MODELS)
    assert server.http("GET", "/health", key=None).json()["status"] == "ok"
    server.client.completions.create(model="olmoe", prompt="metrics please", max_tokens=3)
    text = server.http("GET", "/metrics").text
    for name in ("crosspool:time_to_first_token_seconds", "crosspool:inter_token_latency_seconds",
                 "crosspool:e2e_request_latency_seconds", "crosspool:request_queue_time_seconds",
                 "crosspool:num_requests_running", "crosspool:num_requests_waiting", "crosspool:kv_cache_usage_perc",
                 "crosspool:num_preemptions", "crosspool:prompt_tokens", "crosspool:generation_tokens",
                 "crosspool:kv_bytes_mapped", "crosspool:kv_pool_usage_perc", "crosspool:weights_pool_bytes"):
        assert name in text, name
    assert 'crosspool:generation_tokens_total{model_name="olmoe"}' in text


def test_completion_and_chat_usage_and_seeds(server: Server) -> None:
    c = server.client
    r = c.completions.create(model="olmoe", prompt="The pools", max_tokens=7, temperature=0,
                             extra_body={"ignore_eos": True})
    ids = server.engine.tokenize("olmoe", "The pools")[1]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 7 and r.usage.total_tokens == len(ids) + 7
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    a = c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                  temperature=0.9, seed=7, extra_body={"ignore_eos": True})
    b = c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                  temperature=0.9, seed=7, extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content          # seeds reproduce
    assert a.choices[0].message.role == "assistant" and a.usage.completion_tokens == 8
    n3 = c.completions.create(model="dsv3", prompt="x y", max_tokens=4, n=3, temperature=1.0, seed=1,
                              extra_body={"ignore_eos": True})
    assert len(n3.choices) == 3 and sorted(ch.index for ch in n3.choices) == [0, 1, 2]
    assert n3.usage.completion_tokens == 12
    assert n3.usage.prompt_tokens == len(server.engine.tokenize("dsv3", "x y")[1])
    lp = c.completions.create(model="olmoe", prompt="a", max_tokens=3, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True})
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)


def test_streaming_equals_non_streaming(server: Server) -> None:
    c = server.client
    full = c.completions.create(model="dsv3", prompt="stream me", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(c.completions.create(model="dsv3", prompt="stream me", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    chat = list(c.chat.completions.create(model="olmoe", messages=[{"role": "user", "content": "yo"}], max_tokens=6,
                                          temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"
    raw = server.http("POST", "/v1/completions",
                      json={"model": "olmoe", "prompt": "x", "max_tokens": 2, "stream": True})
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_three_models_concurrently(server: Server) -> None:
    def one(i: int) -> tuple[str, str]:
        model = list(MODELS)[i % 3]
        r = server.client.completions.create(model=model, prompt=f"request {i}", max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True})
        return model, r.choices[0].text

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, range(24)))
    alone = [one(i) for i in range(6)]
    assert together[:6] == alone                                                 # batching changes nothing


BAD_INPUTS = [
    # (what, path, body, status, message fragment)
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ("prompt past the context", "/v1/completions", {"model": "olmoe", "prompt": [5] * 2100, "max_tokens": 1}, 400,
     "maximum context length is 2048"),
    ("max_tokens past the context", "/v1/completions", {"model": "olmoe", "prompt": "x", "max_tokens": 5000}, 400,
     "maximum context length"),
    ("max_tokens 0", "/v1/completions", {"model": "olmoe", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {"model": "olmoe", "prompt": "x", "temperature": -1}, 400,
     "temperature"),
    ("top_p 0", "/v1/completions", {"model": "olmoe", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_k 0", "/v1/completions", {"model": "olmoe", "prompt": "x", "top_k": 0}, 400, "top_k"),
    ("n 0", "/v1/completions", {"model": "olmoe", "prompt": "x", "n": 0}, 400, "n"),
    ("presence_penalty 5", "/v1/completions", {"model": "olmoe", "prompt": "x", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("logprobs 50", "/v1/completions", {"model": "olmoe", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("empty stop string", "/v1/completions", {"model": "olmoe", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("empty prompt", "/v1/completions", {"model": "olmoe", "prompt": ""}, 400, "empty"),
    ("token id out of vocab", "/v1/completions", {"model": "olmoe", "prompt": [1, 99999]}, 400, "out of range"),
    ("missing model field", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("wrong type", "/v1/completions", {"model": "olmoe", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("echo", "/v1/completions", {"model": "olmoe", "prompt": "x", "echo": True}, 400, "echo"),
    ("empty messages", "/v1/chat/completions", {"model": "olmoe", "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": "olmoe", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "role"),
    ("image content part", "/v1/chat/completions",
     {"model": "olmoe", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "content part"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": "olmoe", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
]


@pytest.mark.parametrize("what,path,body,status,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_clear_errors(server: Server, what: str, path: str, body: dict, status: int,
                                     fragment: str) -> None:
    r = server.http("POST", path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] and err["code"] == status
    assert server.client.completions.create(model="olmoe", prompt="still fine", max_tokens=2).choices  # nothing lost


def test_malformed_json_and_auth(server: Server) -> None:
    r = server.http("POST", "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    assert server.http("GET", "/v1/models", key=None).status_code == 401
    assert server.http("GET", "/v1/models", key="wrong").status_code == 401
    assert server.http("POST", "/v1/admin/models", key="wrong", json={"name": "x", "path": "/x"}).status_code == 401


def test_admin_errors(server: Server, model_dirs) -> None:
    r = server.http("POST", "/v1/admin/models", json={"name": "olmoe", "path": model_dirs["olmoe"]})
    assert r.status_code == 409
    r = server.http("POST", "/v1/admin/models", json={"name": "new", "path": "/nonexistent"})
    assert r.status_code == 400 and "config.json" in r.json()["error"]["message"]
    assert server.http("DELETE", "/v1/admin/models/ghost").status_code == 404


def test_admin_needs_a_key_on_the_server(model_dirs) -> None:
    s = Server({"olmoe": model_dirs["olmoe"]}, api_key=None)
    try:
        r = s.http("POST", "/v1/admin/models", key=None, json={"name": "q", "path": model_dirs["qwen3"]})
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
        assert s.http("GET", "/v1/models", key=None).status_code == 200           # no key: user endpoints open
    finally:
        s.stop()


def test_overload_is_refused_with_503(model_dirs) -> None:
    s = Server({"olmoe": model_dirs["olmoe"]}, max_in_flight=1)
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(s.http, "POST", "/v1/completions",
                               json={"model": "olmoe", "prompt": "x", "max_tokens": 400, "ignore_eos": True})
            time.sleep(0.3)
            r = s.http("POST", "/v1/completions", json={"model": "olmoe", "prompt": "y", "max_tokens": 2})
            assert r.status_code == 503 and "in flight" in r.json()["error"]["message"]
            assert slow.result().status_code == 200
    finally:
        s.stop()


def test_add_and_remove_models_while_others_stream(model_dirs) -> None:
    s = Server({"olmoe": model_dirs["olmoe"], "qwen3": model_dirs["qwen3"]})
    failures: list[str] = []
    stop = threading.Event()

    def stream_forever(model: str) -> int:
        done = 0
        while not stop.is_set():
            try:
                text = "".join(ch.choices[0].text for ch in s.client.completions.create(
                    model=model, prompt="keep going", max_tokens=20, stream=True, extra_body={"ignore_eos": True}))
                assert text
                done += 1
            except Exception as exc:    # any failure on the two other models fails the test
                failures.append(f"{model}: {exc!r}")
        return done

    try:
        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(stream_forever, m) for m in ("olmoe", "qwen3", "olmoe", "qwen3")]
            r = s.http("POST", "/v1/admin/models", json={"name": "dsv3", "path": model_dirs["dsv3"]})
            assert r.status_code == 201, r.text
            assert "dsv3" in [m.id for m in s.client.models.list().data]
            out = s.client.completions.create(model="dsv3", prompt="new model", max_tokens=5)
            assert out.choices[0].text is not None
            pages_with_dsv3 = s.engine.kv_pool.models["dsv3"].vrange
            r = s.http("DELETE", "/v1/admin/models/dsv3?drain=true")
            assert r.status_code == 200 and r.json()["deleted"]
            assert "dsv3" not in [m.id for m in s.client.models.list().data]
            assert "dsv3" not in s.engine.kv_pool.models and "dsv3" not in s.engine.layout.weights.models
            assert pages_with_dsv3 is not None
            r = s.http("POST", "/v1/completions", json={"model": "dsv3", "prompt": "x"})
            assert r.status_code == 404
            time.sleep(0.5)
            stop.set()
            completed = [f.result() for f in runs]
        assert not failures, failures
        assert all(n >= 1 for n in completed)
    finally:
        stop.set()
        s.stop()


def test_streaming_with_async_decode_matches(model_dirs, server: Server) -> None:
    """The fast path's async decode (tokens read one step late) streams the same text as the plain engine:
    greedy completions and chats, streamed and not, on two models at once (CPU: Triton interpreter, the
    decode graphs' buffers run eagerly)."""
    pytest.importorskip("triton")
    fast = Server({"olmoe": model_dirs["olmoe"], "qwen3": model_dirs["qwen3"]}, kernels="triton", cuda_graphs=True,
                  dtype=torch.float32)
    try:
        def both(srv: Server) -> list[str]:
            out = []
            for model in ("olmoe", "qwen3"):
                args = {"model": model, "max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
                out.append(srv.client.completions.create(prompt="pools", **args).choices[0].text)
                chunks = srv.client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                                            stream=True, **args)
                out.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            return out

        launches = {"n": 0}
        orig_launch = fast.engine._launch

        def counting_launch(*args: object) -> list:
            launches["n"] += 1
            return orig_launch(*args)

        fast.engine._launch = counting_launch
        assert both(fast) == both(server)
        assert launches["n"] >= 10                 # the decode steps really ran asynchronously
    finally:
        fast.stop()


def test_disconnect_mid_stream_frees_kv_within_one_step(model_dirs) -> None:
    s = Server({"olmoe": model_dirs["olmoe"], "qwen3": model_dirs["qwen3"]})
    steps = {"n": 0}
    orig_step = s.engine.step

    def counting_step():   # noqa: ANN202
        steps["n"] += 1
        return orig_step()

    s.engine.step = counting_step
    queued_at: list[int] = []          # step count when the server queued the abort (client gone)
    freed: list[tuple[int, int]] = []   # (step count, blocks still used) right after the engine ran it
    orig_queue, orig_abort = s.runtime.abort, s.engine.abort

    def recording_queue(rid: str) -> None:
        queued_at.append(steps["n"])
        orig_queue(rid)

    def recording_abort(rid: str) -> None:   # runs on the engine thread, between steps
        orig_abort(rid)
        freed.append((steps["n"], s.engine.models["olmoe"].blocks.num_used))

    s.runtime.abort, s.engine.abort = recording_queue, recording_abort
    try:
        with ThreadPoolExecutor(1) as pool:   # keeps the engine stepping on another model meanwhile
            busy = pool.submit(s.client.completions.create, model="qwen3", prompt="busy", max_tokens=300,
                               extra_body={"ignore_eos": True})
            with httpx.stream("POST", f"{s.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "olmoe", "prompt": "long one", "max_tokens": 1000, "stream": True,
                                    "ignore_eos": True}, timeout=30) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data:") for line in got)
                assert s.engine.models["olmoe"].blocks.num_used > 0
            deadline = time.monotonic() + 10
            while not freed and time.monotonic() < deadline:
                time.sleep(0.005)
            assert queued_at and freed, "the disconnect never aborted the request"
            step, still_used = freed[0]
            assert still_used == 0                                          # all its blocks are back
            assert step - queued_at[0] <= 1                                 # within one engine step
            busy.result()
    finally:
        s.stop()


def test_health_turns_503_when_the_engine_dies(model_dirs) -> None:
    s = Server({"olmoe": model_dirs["olmoe"]})
    try:
        def broken():   # noqa: ANN202
            raise RuntimeError("simulated engine failure")

        s.engine.step = broken
        r = s.http("POST", "/v1/completions", json={"model": "olmoe", "prompt": "x", "max_tokens": 3})
        assert r.status_code in (500, 503)
        deadline = time.monotonic() + 5
        while s.http("GET", "/health", key=None).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = s.http("POST", "/v1/completions", json={"model": "olmoe", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    finally:
        s.stop()


@pytest.mark.gpu
def test_server_on_gpu(model_dirs) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    s = Server(model_dirs, device="cuda")
    try:
        def one(i: int) -> str:
            model = list(MODELS)[i % 3]
            chunks = s.client.completions.create(model=model, prompt=f"gpu {i}", max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        with ThreadPoolExecutor(9) as pool:
            texts = list(pool.map(one, range(18)))
        assert texts[:3] == [one(i) for i in range(3)]
        assert "crosspool:kv_bytes_mapped" in s.http("GET", "/metrics").text
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_streams_then_releases_every_page(model_dirs, tmp_path) -> None:  # noqa: ANN001
    """`crosspool serve` as its own process: SIGTERM during a stream lets the stream finish, then the engine
    stops and releases its KV pages, and the process ends."""
    import signal
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "crosspool.cli", "serve", "--model",
                                 f"olmoe={model_dirs['olmoe']}", "--port", str(port), "--device", "cpu",
                                 "--shutdown-timeout", "20"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": "olmoe", "prompt": "hello", "max_tokens": 300, "stream": True, "ignore_eos": True,
                "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)                 # mid-stream
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        chunks = [first, *rest[:-1]]
        after_signal = [c for c in rest if '"text"' in c]
        assert len(after_signal) >= 50 and '"finish_reason":"length"' in chunks[-1].replace(" ", "")
        code = proc.wait(timeout=60)
        assert code in (0, -signal.SIGTERM), code       # uvicorn re-raises the signal after its graceful exit
        text = log.read_text()
        assert "draining in-flight requests" in text and "engine stopped; KV pages released" in text
        with pytest.raises(httpx.TransportError):        # nothing listens any more
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
