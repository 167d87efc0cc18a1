"""`dllm serve` end to end: the real server in a subprocess on 127.0.0.1 (a port the OS picks), the shipped
trained model, and the official openai client. Every server is stopped with SIGINT by the test or fixture
that started it, which checks the exit status and that the port is free again."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

for _extra in ("uvicorn", "starlette", "sse_starlette", "prometheus_client"):    # the `serve` extra
    pytest.importorskip(_extra, reason="dllm serve needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")
httpx = pytest.importorskip("httpx2")            # the HTTP client the openai package itself uses
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "trained" / "arith-llada"
NAME = "arith-llada"
START_SECONDS = 90            # loading torch + the model + preparing the buckets, on a busy 2-core machine


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60, **kw)


def start_server(tmp_path: Path, *args: str) -> Server:
    """`dllm serve` on a free port; returns once it printed its ready line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost"}
    err = open(tmp_path / f"serve-{time.monotonic_ns()}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dllm.apps.main", "serve", "--model", str(MODEL), "--port", "0",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        ready = lines.get(timeout=START_SECONDS)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"the server printed no ready line: {(tmp_path / err.name).read_text()}") from None
    assert ready.startswith("dllm serve: ready on http://127.0.0.1:"), ready
    port = int(ready.split("http://127.0.0.1:")[1].split()[0])
    return Server(proc, port, lines)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # TIME_WAIT leftovers do not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_server(server: Server) -> None:
    """Ctrl-C: the server drains, exits 0 and frees its port."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
    try:
        rc = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    assert rc == 0, f"exit status {rc} after SIGINT"
    assert port_is_free(server.port)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("serve"), "--bucket", "32:8:8", "--bucket", "32:8:8:4", "--queue", "64")
    yield s
    stop_server(s)


def metrics(server: Server) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics, parsed by prometheus_client."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------- answers

def test_completion_and_chat_answers(server):
    c = server.client()
    out = c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8)
    assert out.choices[0].text == "31284" and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == 14 and out.usage.completion_tokens == 5
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "sort 93142"}], max_tokens=8)
    assert chat.choices[0].message.content == "12349" and chat.choices[0].message.role == "assistant"
    assert [m.id for m in c.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_stop_sequence_cuts_text(server):
    c = server.client()
    out = c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8, stop=["28"])
    assert out.choices[0].text == "31" and out.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8,
                                                                 stop="28", stream=True)]
    assert "".join(pieces) == "31"


@pytest.mark.parametrize("block", [None, 4])
def test_stream_concatenates_to_whole_text(server, block):
    c = server.client()
    extra = {"block_length": block} if block else {}
    whole = c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8, extra_body=extra)
    chunks = list(c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8, stream=True,
                                       extra_body=extra))
    texts = [ch.choices[0].text for ch in chunks]
    assert "".join(texts) == whole.choices[0].text == "31284"
    assert chunks[-1].choices[0].finish_reason == "stop"
    nonempty = [t for t in texts if t]
    # one block: all text at the last commit; blocks of 4: "3128" once block 1 is final, then "4"
    assert nonempty == (["31284"] if block is None else ["3128", "4"])

    stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "sort 93142"}],
                                       max_tokens=8, stream=True, stream_options={"include_usage": True},
                                       extra_body=extra)
    deltas, last = [], None
    for ch in stream:
        last = ch
        if ch.choices:
            deltas.append(ch.choices[0].delta.content or "")
    assert "".join(deltas) == "12349" and last.usage.completion_tokens == 5


# ---------------------------------------------------------------- errors

def error_of(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("kwargs, status, param, words", [
    ({"max_tokens": 8, "extra_body": {"policy": "warp"}}, 400, "policy", "unknown policy 'warp'"),
    ({"max_tokens": 0}, 400, "max_tokens", "integer >= 1"),
    ({"max_tokens": 12}, 400, "max_tokens", "start dllm serve with --bucket 32:12:12:12"),   # names the flag
    ({"max_tokens": 8, "extra_body": {"kp": 3}}, 400, "kp", "belongs to policy dllm-cache, not none"),
    ({"max_tokens": 8, "extra_body": {"policy": "dllm-cache", "kp": 0}}, 400, "kp", "kp must be an integer >= 1"),
    ({"max_tokens": 8, "extra_body": {"threshold": 2.0}}, 400, "threshold", "threshold must be in (0, 1]"),
    ({"max_tokens": 8, "extra_body": {"steps": 0}}, 400, "steps", "steps must be an integer >= 1"),
    ({"max_tokens": 8, "extra_body": {"warp_speed": 9}}, 400, "warp_speed", "unrecognized request argument"),
    ({"max_tokens": 8, "n": 2}, 400, "n", "not supported"),
    ({"max_tokens": 8, "prompt": [1, 2, 3]}, 400, "prompt", "prompt must be one non-empty string"),
    ({"max_tokens": 8, "model": "gpt-9"}, 404, "model", "not served here"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, param, words):
    c = server.client()
    kwargs = {"model": NAME, "prompt": "reverse 48213\n", **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(**kwargs)
    assert e.value.status_code == status
    err = error_of(e)
    assert err["param"] == param and words in err["message"], err


def test_bad_json_and_routes(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json=["reverse 48213\n"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": "hi", "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": "8"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_metrics_parse(server):
    server.client().completions.create(model=NAME, prompt="sort 93142\n", max_tokens=8)
    m = metrics(server)
    assert m[("dllm_steps_total", (("kind", "full"),))] >= 8 and m[("dllm_step_seconds_count", ())] >= 1
    assert m[("dllm_queue_length", ())] == 0 and m[("dllm_tokens_per_second", ())] > 0
    shapes = [k for k in m if k[0] == "dllm_prepared_shape"]
    assert len(shapes) == 2 and all(m[k] == 1 for k in shapes)
    assert m[("dllm_requests_total", (("endpoint", "completions"), ("outcome", "ok")))] >= 1


def test_bad_start_up_is_one_line(capsys, tmp_path):
    from dllm.apps.serve.main import main
    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dllm serve: error:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["--model", str(MODEL), "--bucket", "32:8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "PROMPT:GEN:STEPS[:BLOCK]" in err and err.count("\n") == 1


# ---------------------------------------------------------------- load

def correct_pairs(n: int) -> list[tuple[str, str]]:
    """n held-out prompts the model answers correctly (checked here on an engine of our own)."""
    import torch

    from dllm.models.train_tiny import held_out
    from dllm.runtime import Engine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = Engine.from_pretrained(MODEL, backend="eager")
        good = [(p, a) for p, a in held_out(n + 20)
                if eng.generate(p + "\n", gen_length=8, steps=8).text[0] == a]
    finally:
        torch.set_num_threads(threads)
    assert len(good) >= n
    return good[:n]


def test_load_200_requests_8_clients(server):
    pairs = correct_pairs(200)
    local = threading.local()

    def ask(i: int) -> tuple[int, str, str]:
        if not hasattr(local, "client"):
            local.client = server.client()
        prompt, _ = pairs[i]
        if i % 2:
            out = local.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=8)
            return i, prompt, out.choices[0].message.content
        out = local.client.completions.create(model=NAME, prompt=prompt + "\n", max_tokens=8)
        return i, prompt, out.choices[0].text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(len(pairs))))
    wall = time.perf_counter() - t0
    assert [(p, text) for _, p, text in results] == pairs        # every answer right, and its own
    print(f"\nload: {len(pairs)} requests, 8 clients, {wall:.1f} s, {len(pairs) / wall:.1f} req/s")
    m = metrics(server)
    assert m[("dllm_queue_length", ())] == 0 and m[("dllm_running_requests", ())] == 0


# ---------------------------------------------------------------- queue, disconnects, drain

def post(server: Server, prompt: str, max_tokens: int, timeout: float = 60) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens},
                      timeout=timeout)


SLOW = 384


def test_queue_full_and_disconnects(tmp_path):
    # SLOW tokens take about a second on a 2-core machine: long enough that a request queued behind one,
    # or running, is still there when its client's 0.5 s / 0.2 s timeout fires (64 tokens were not)
    s = start_server(tmp_path, "--bucket", "32:8:8", "--bucket", f"32:{SLOW}:{SLOW}", "--queue", "2")
    try:
        # a burst of 12 slow requests at once: 1 runs, 2 wait, the rest are refused with 429
        with ThreadPoolExecutor(12) as pool:
            # the third accepted one waits for two SLOW generations first: on a slow or busy machine
            # that passes post's 60 s hang guard, so the burst's guard is longer
            burst = list(pool.map(lambda i: post(s, "reverse 48213\n", SLOW, timeout=300), range(12)))
        codes = [r.status_code for r in burst]
        refused = [r for r in burst if r.status_code == 429]
        assert set(codes) <= {200, 429} and codes.count(200) >= 3 and refused, codes
        err = refused[0].json()["error"]
        assert err["code"] == "queue_full" and "--queue 2" in err["message"]
        print(f"\nburst: 12 requests, --queue 2: {len(refused)} answered 429")
        assert post(s, "reverse 48213\n", 8).json()["choices"][0]["text"] == "31284"   # still healthy

        # a client that leaves while queued frees its place; one that leaves while running is cancelled
        before = metrics(s).get(("dllm_requests_total", (("endpoint", "completions"), ("outcome", "cancelled"))), 0)
        slow = threading.Thread(target=post, args=(s, "reverse 48213\n", SLOW))
        slow.start()
        wait_for(lambda: metrics(s)[("dllm_running_requests", ())] == 1)
        with pytest.raises(httpx.ReadTimeout):
            post(s, "sort 93142\n", SLOW, timeout=0.5)         # queued behind `slow`, then gone
        wait_for(lambda: metrics(s)[("dllm_queue_length", ())] == 0)
        slow.join()
        with pytest.raises(httpx.ReadTimeout):
            post(s, "sort 93142\n", SLOW, timeout=0.2)         # running when it goes
        wait_for(lambda: metrics(s)[("dllm_running_requests", ())] == 0)
        m = metrics(s)
        assert m[("dllm_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))] == before + 2
        assert httpx.get(s.url + "/health").json()["queue"] == 0
        assert post(s, "sort 93142\n", 8).json()["choices"][0]["text"] == "12349"     # the engine is fine after
    finally:
        stop_server(s)


def test_sigint_drains_running_and_queued(tmp_path):
    s = start_server(tmp_path, "--bucket", "32:64:64", "--bucket", "32:8:8")
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(post(s, "reverse 48213\n", 64))) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: metrics(s)[("dllm_queue_length", ())] == 2)
    stop_server(s)                                        # SIGINT while one runs and two wait
    for t in threads:
        t.join(timeout=30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert len({json.dumps(r.json()["choices"]) for r in results}) == 1
