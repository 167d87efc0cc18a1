"""Reliability, round two (issue 26): one row per defect found by an adversarial user, the server ones
over loopback against a real `dllm serve` (raw HTTP), bounded in count and time."""
from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dllm.apps.main import main
from dllm.models.tiny import write_tiny
from dllm.runtime import RequestError

pytest.importorskip("uvicorn", reason="dllm serve needs the serve extra")
httpx = pytest.importorskip("httpx2")
from test_serve import NAME, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("hostile"), "--bucket", "32:8:8", "--bucket", "32:384:384",
                     "--request-timeout", "3", "--max-tokens-limit", "384")
    yield s
    stop_server(s)


def post(s, body, path="/v1/completions", timeout=60, **kw):
    return httpx.post(s.url + path, timeout=timeout, **({"json": body} if not isinstance(body, bytes) else
                                                          {"content": body, "headers": {"content-type":
                                                                                        "application/json"}}), **kw)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# 1 ------------------------------------------------------------ a large prompt freezes nothing

def test_1_a_huge_body_is_refused_before_it_is_read_and_health_answers_while_a_prompt_tokenizes(server):
    before = rss_mb(server.proc.pid)
    big = json.dumps({"model": NAME, "prompt": "a" * (10 << 20), "max_tokens": 8}).encode()
    r = post(server, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert rss_mb(server.proc.pid) - before < 50                          # nothing of it kept

    result = {}
    slow = threading.Thread(target=lambda: result.update(r=post(server, {"model": NAME, "max_tokens": 8,
                                                                       "prompt": "reverse 1\n" * 90_000})))
    slow.start()
    time.sleep(0.3)                                                        # it is tokenizing now
    latencies = []
    while slow.is_alive() and len(latencies) < 20:
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.1)
    slow.join()
    assert max(latencies) < 1.0, latencies
    assert result["r"].status_code == 400 and "maximum sequence length" in result["r"].json()["error"]["message"]


# 2 ------------------------------------------------------------ re-entrant generate

def test_2_generate_from_inside_its_own_callback_is_refused(engines):
    eng, seen = engines["llada"], []

    def reenter(launched, planned):
        if launched == 2:
            try:
                eng.generate([7, 8], gen_length=8, steps=8)
            except RequestError as e:
                seen.append(str(e))
    out = eng.generate([5, 6, 7], gen_length=8, steps=8, progress=reenter)
    assert seen and "from inside a callback" in seen[0]
    assert out.tokens == eng.generate([5, 6, 7], gen_length=8, steps=8).tokens   # its own answer


# 3 ------------------------------------------------------------ a full disk during export

@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_3_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, fmt):
    limit = 64 << 10                                                      # 64 KiB files: a disk that fills up

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([sys.executable, "-m", "dllm.apps.main", "export", "--model", str(TRAINED), "--out",
                          str(tmp_path / "pkg"), "--prompt-bucket", "16", "--format", fmt, "--dtype", "float32",
                          "--quiet"], capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert res.returncode == 2, res.stderr[-800:]
    assert res.stderr.count("\n") == 1 and "cannot write the package" in res.stderr
    assert list(tmp_path.iterdir()) == []                                 # no .partial-* left behind


# 4 ------------------------------------------------------------ a ceiling on work per request

def test_4_work_per_request_is_bounded(server):
    r = post(server, {"model": NAME, "prompt": "reverse 1\n", "max_tokens": 1024})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and "--max-tokens-limit 1024" in err["message"], err


def test_4_a_request_past_the_timeout_gets_504(tmp_path):
    s = start_server(tmp_path, "--bucket", "32:2048:2048", "--request-timeout", "0.5", "--max-tokens-limit", "2048")
    try:
        r = post(s, {"model": NAME, "prompt": "reverse 48213\n", "max_tokens": 2048})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert httpx.get(s.url + "/health").json()["queue"] == 0
    finally:
        stop_server(s)


# 5, 6 ------------------------------------------------------------ bad text and bad JSON are 400s

@pytest.mark.parametrize("body", [
    b'{"model": "arith-llada", "prompt": "reverse \\ud800\\n", "max_tokens": 8}',
    b'{"model": "arith-llada", "messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 8}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "arith-llada", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
], ids=["surrogate-prompt", "surrogate-chat", "nested-top", "nested-field"])
def test_5_6_bad_text_and_deep_json_are_openai_400s(server, body):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = post(server, body, path=path)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text[:200]
    assert r.json()["error"]["message"]


# 7, 9, 11 ------------------------------------------------------------ configs that would cost work

def _config(tmp_path, edit) -> Path:
    d = write_tiny(tmp_path / "m", "llada", tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(edit(cfg) if callable(edit) else edit)
    return d


@pytest.mark.parametrize("edit, needle", [
    (lambda c: json.dumps({**c, "n_layers": 1_000_000}), "says 1000000 layers but the weights hold 2"),
    (lambda c: json.dumps({**c, "n_layers": 10 ** 9}), "layers but the weights hold 2"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda c: json.dumps({**c, "mask_token_id": c["eos_token_id"]}), "is also the eos id"),
], ids=["a-million-layers", "a-billion-layers", "nested-config", "mask-is-eos"])
def test_7_9_11_configs_are_refused_fast_in_one_line(capsys, tmp_path, edit, needle):
    d = _config(tmp_path, edit)
    t0 = time.perf_counter()
    rc = main(["generate", "--model", str(d), "--prompt-ids", "5,6", "--gen-length", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert time.perf_counter() - t0 < 10


# 10 ------------------------------------------------------------ stopping

def test_10_a_second_ctrl_c_answers_the_client_and_the_exit_status_says_so(tmp_path):
    s = start_server(tmp_path, "--bucket", "32:2048:2048", "--max-tokens-limit", "2048")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(s, {"model": NAME, "prompt": "reverse 1\n",
                                                                 "max_tokens": 2048})))
    t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGINT)
    t.join(30)
    rc = s.proc.wait(30)
    r = result["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert rc == 1


def test_10_sigterm_drains_and_exits_0(tmp_path):
    s = start_server(tmp_path, "--bucket", "32:8:8")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(s, {"model": NAME, "prompt": "reverse 48213\n"})))
    t.start()
    time.sleep(0.2)
    s.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert s.proc.wait(30) == 0 and result["r"].json()["choices"][0]["text"] == "31284"


# 11 ------------------------------------------------------------ the small ones

def test_11_null_is_the_default_and_a_bool_is_no_integer(server):
    r = post(server, {"model": NAME, "prompt": "reverse 48213\n", "max_tokens": None, "temperature": None,
                      "top_p": None, "seed": None})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "31284"
    r = post(server, {"model": NAME, "prompt": "reverse 48213\n", "n": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(server, {"model": NAME, "prompt": "reverse 48213\n", "max_tokens": 0})
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["message"].startswith("max_tokens must be")   # not gen_length


@pytest.mark.parametrize("args, needle", [(["seed=-1"], "seed must be"), (["seed=1e30"], "seed must be"),
                                          (["max_length=5"], "leaves no room for a prompt")])
def test_11_eval_refuses_what_it_cannot_use_before_lm_eval_starts(capsys, args, needle):
    pytest.importorskip("lm_eval")
    model_args = ",".join([f"model={TRAINED}", *args])
    t0 = time.perf_counter()
    assert main(["eval", "--model", "dllm", "--model_args", model_args, "--tasks", "arith", "--include_path",
                 str(ROOT / "perf" / "eval_tasks")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and time.perf_counter() - t0 < 20
