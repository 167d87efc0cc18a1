"""`dllm serve` as clients meet it (issue 24): sampled and greedy requests on a server started with
buckets, every refusal naming its field and the flag that would allow it, dynamic batching (32 concurrent
clients, each answer its caller's and equal to the request run alone), no device read per step for a
non-streaming request (a dispatch watcher at the real 8B shapes), the API key, the access log, and the
default length from the model folder's generation_config.json."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

for _extra in ("uvicorn", "starlette", "sse_starlette", "prometheus_client"):    # the `serve` extra
    pytest.importorskip(_extra, reason="dllm serve needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")

from starlette.testclient import TestClient  # noqa: E402
from test_serve import NAME, start_server, stop_server  # noqa: E402

from dllm.apps.serve.app import create_app  # noqa: E402
from dllm.apps.serve.main import batch_sizes, startup_decodings  # noqa: E402
from dllm.apps.serve.metrics import Metrics  # noqa: E402
from dllm.apps.serve.protocol import ServeOptions, ServeRequest  # noqa: E402
from dllm.apps.serve.worker import Job, Worker  # noqa: E402
from dllm.models.train_tiny import held_out  # noqa: E402
from dllm.runtime import Engine, Request  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "trained" / "arith-llada"


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("batched"), "--bucket", "32:8:8", "--bucket", "32:8:8:4",
                     "--max-batch", "8", "--queue", "64", "--dtype", "float32")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def solo():
    return Engine.from_pretrained(MODEL)                   # float32, eager: what each answer must equal


def test_sampled_and_greedy_requests_are_served(batched, solo):
    c = batched.client()
    greedy = c.completions.create(model=NAME, prompt="reverse 48213\n", max_tokens=8)
    assert greedy.choices[0].text == "31284"
    for temperature, seed in ((0.7, 1), (1.3, 2)):
        out = c.completions.create(model=NAME, prompt="sort 93142\n", max_tokens=8, temperature=temperature,
                                   seed=seed, top_p=1.0)
        ref = solo.generate("sort 93142\n", gen_length=8, steps=8, temperature=temperature, seed=seed)
        assert out.choices[0].text == ref.text[0]
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "reverse 7705"}],
                                     temperature=0.8, extra_body={"block_length": 4, "threshold": 0.9})
    assert chat.choices[0].message.content == "5077"
    # no max_tokens: the model folder's generation_config.json (8), not 16
    assert c.completions.create(model=NAME, prompt="reverse 48213\n").usage.completion_tokens == 5


@pytest.mark.parametrize("body, param, words", [
    ({"max_tokens": 12}, "max_tokens", "start dllm serve with --bucket 32:12:12:12"),
    ({"max_tokens": 8, "steps": 4}, "max_tokens", "or with --prepare-on-demand shapes"),
    ({"max_tokens": 8, "temperature": 11}, "temperature", "at most 10"),
    ({"max_tokens": 8, "top_k": 3}, "top_k", "Dream options"),
    ({"max_tokens": 8, "alg": "entropy"}, "alg", "Dream option"),
    ({"max_tokens": 8, "policy": "d2cache", "k": 0}, "k", "k must be an integer >= 1"),
    ({"max_tokens": 8, "confidence_dtype": "fp8"}, "confidence_dtype", "float64, logits"),
    ({"max_tokens": 8, "seed": True}, "seed", "an integer"),
])
def test_every_refusal_names_its_field(batched, body, param, words):
    r = RawClient(batched).post(body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err
    assert "DecodeConfig(" not in err["message"] and "Engine(" not in err["message"]     # no Python in it


class RawClient:
    """Raw HTTP to a running server (so the status and the error body are read as sent)."""

    def __init__(self, server):
        import httpx2
        self.httpx, self.server = httpx2, server

    def post(self, body: dict, path: str = "/v1/completions", **kw):
        return self.httpx.post(self.server.url + path, json={"model": NAME, "prompt": "reverse 48213\n", **body},
                               timeout=60, **kw)


def test_32_concurrent_clients_each_get_their_own_answer(batched, solo):
    """Dynamic batching: answers matched to callers, each equal to the same request run alone (greedy,
    and sampled with each caller's own seed and temperature), and some requests really shared a batch."""
    examples = held_out(32)
    c = batched.client()

    def ask(i):
        prompt = examples[i][0] + "\n"
        kw = dict(temperature=0.3 + 0.05 * i, seed=i) if i % 2 else {}
        out = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, **kw)
        ref = solo.generate(prompt, gen_length=8, steps=8, **kw)
        return out.choices[0].text, ref.text[0]

    with ThreadPoolExecutor(32) as pool:
        pairs = list(pool.map(ask, range(32)))
    assert all(got == want for got, want in pairs), pairs
    metrics = RawClient(batched).httpx.get(batched.url + "/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("dllm_batch_size_bucket")]
    one = next(float(x.split()[-1]) for x in sizes if 'le="1.0"' in x)
    total = next(float(x.split()[-1]) for x in sizes if 'le="+Inf"' in x)
    assert total > one, metrics                       # at least one batch of more than one request


def test_startup_prepares_batch_buckets_and_both_decodings():
    assert batch_sizes(1) == [1] and batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(6) == [1, 2, 4, 6]
    greedy, sampled = startup_decodings("llada", Request())
    assert greedy["temperature"] == 0.0 and sampled["temperature"] == 1.0
    assert len(startup_decodings("dream", Request())) == 3      # + top-p


# ---------------------------------------------------------------- no host read per step

class HostReads(TorchFunctionMode):
    """Records every read of a device value by the host (.item(), .tolist(), bool(t), int(t), a copy to the
    CPU) and how many steps had been launched when it happened. A function mode sees the Python calls
    whatever the dispatcher does with them (inference mode hides meta copies from a dispatch mode)."""
    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self, launched: list):
        super().__init__()
        self.launched, self.reads = launched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        device = kwargs.get("device", args[1] if name == "to" and len(args) > 1 else None)
        to_cpu = name == "to" and isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"
        if (name in self.READS or to_cpu) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            self.reads.append((name, self.launched[0]))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_served_request_reads_nothing_from_the_device_until_the_end(family):
    """The worker runs a non-streaming request with no per-step observer: on meta tensors at the real
    8B / 7B shapes (where any read of a value fails), every step is launched before the first read, the
    read-back of the answer."""
    from test_capture_safety import meta_model
    cfg, w = meta_model(family, 2)
    engine = Engine(cfg, w, device="meta", dtype=torch.bfloat16, backend="eager")
    launched = [0]
    worker = Worker(engine, 4, Metrics.create())
    request = Request([[11, 12, 13]], gen_length=64, steps=64, block_length=32, seed=0)
    job = Job(ServeRequest(False, [11, 12, 13], request, request.decode_config(cfg.family).structure),
              "completions", asyncio.new_event_loop(), asyncio.Queue())
    real = engine.generate_batch

    def counting(reqs, progress=None, on_block=None):
        assert on_block is None                           # not streaming: no per-block read either
        def counted(n, planned):
            launched[0] = n
            progress(n, planned)
        return real(reqs, progress=counted, on_block=on_block)
    engine.generate_batch = counting                      # the test's own instrumented engine
    with HostReads(launched) as watch:
        worker._run([job])
    assert launched[0] == 64
    assert watch.reads and watch.reads[0][1] == 64, watch.reads   # the first read comes after the last step


# ---------------------------------------------------------------- operations

def test_api_key_tokenize_and_access_log(solo, caplog):
    opts = ServeOptions(NAME, Request(gen_length=8, steps=8, block_length=8), api_key="s3cret")
    with TestClient(create_app(solo, opts)) as http:
        assert http.get("/health").status_code == 200                  # open
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "reverse 48213\n"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x"}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=http, max_retries=0)
        with caplog.at_level("INFO", logger="dllm.serve.access"):
            assert client.completions.create(model=NAME, prompt="reverse 48213\n").choices[0].text == "31284"
        line = [rec.getMessage() for rec in caplog.records if rec.name == "dllm.serve.access"][-1]
        assert " 200 completions tokens=5 steps=8 seconds=" in line and "queued=" in line and "batch=1" in line
        auth = {"Authorization": "Bearer s3cret"}
        tok = http.post("/tokenize", json={"prompt": "reverse 48213\n"}, headers=auth).json()
        assert tok["tokens"] == solo.encode("reverse 48213\n") and tok["count"] == len(tok["tokens"])
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "sort 1"}]}, headers=auth).json()
        assert chat["tokens"] == solo.encode("sort 1", chat=True)
        text = http.post("/detokenize", json={"tokens": tok["tokens"]}, headers=auth).json()["prompt"]
        assert text.endswith("reverse 48213\n")
        assert http.post("/detokenize", json={"tokens": [-1]}, headers=auth).json()["error"]["param"] == "tokens"


def test_streaming_reads_once_per_block(solo):
    """A streamed request's text arrives block by block and concatenates to the whole text."""
    opts = ServeOptions(NAME, Request(gen_length=8, steps=8, block_length=8).resolved(solo.defaults))
    with TestClient(create_app(solo, opts)) as http:
        body = {"model": NAME, "prompt": "reverse 48213\n", "max_tokens": 8, "block_length": 4, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
        texts = [c["choices"][0]["text"] for c in chunks]
        assert "".join(texts) == "31284" and texts[0] == "3128"      # the first block's text, then the rest


def test_worker_runs_the_oldest_job_alone_when_nothing_waits(solo):
    """A lone request is never held back waiting for company (its batch is itself)."""
    worker = Worker(solo, 8, Metrics.create(), max_batch=8)
    loop = asyncio.new_event_loop()
    request = Request([solo.encode("sort 93142\n")], gen_length=8, steps=8, block_length=8)
    job = Job(ServeRequest(False, request.prompt[0], request, request.decode_config("llada").structure),
              "completions", loop, asyncio.Queue())
    worker._queue.append(job)
    worker.waiting = 1
    threading.Timer(5, lambda: worker._queue.append(None)).start()
    assert worker._next_batch() == [job] and job.batch == 1


def test_the_watcher_sees_a_per_step_read():
    """The check can fail: an on_step observer (a read after every step) is caught at the first step."""
    from test_capture_safety import meta_model
    cfg, w = meta_model("llada", 2)
    engine = Engine(cfg, w, device="meta", dtype=torch.bfloat16, backend="eager")
    launched = [0]
    with HostReads(launched) as watch, pytest.raises(NotImplementedError):
        engine.generate([[11, 12, 13]], gen_length=64, steps=64, block_length=32, on_step=lambda e: None,
                        progress=lambda n, planned: launched.__setitem__(0, n))
    assert watch.reads and watch.reads[0][1] < 64
