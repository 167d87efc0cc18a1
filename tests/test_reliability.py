"""Issue 13: one engine under concurrent callers, every bad input a clean error (one line, exit 2),
values that must be refused are refused, and Python API types behave as a user expects."""
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.apps.main import main
from dllm.runtime import Bucket, D2Cache, DllmCache, DualCache, Engine, NoCache, RequestError
from dllm.runtime.engine import FifoLock

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(gen_length=8, steps=8, prompt_bucket=8)


# ---------------------------------------------------------------- one engine, many threads

def test_threads_each_get_their_own_answer(tiny_dirs):
    """8 threads x 25 calls on one engine, one request shape, distinct prompts: every answer is the one
    its own prompt gives single-threaded."""
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager")
    candidates = [[5 + i, 40 + 2 * i, 90 - i] for i in range(40)]
    expected = {}
    for p in candidates:
        out = tuple(eng.generate(p, **SHAPE).tokens[0])
        if out not in expected.values():
            expected[tuple(p)] = out
        if len(expected) == 8:
            break
    prompts = list(expected)[:8]
    assert len(prompts) == 8, "the tiny model should give 8 distinct answers"
    results, errors = [], []

    def worker(t):
        try:
            for i in range(25):
                p = prompts[(t + i) % len(prompts)]
                results.append((p, tuple(eng.generate(list(p), **SHAPE).tokens[0])))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(results) == 200
    assert all(out == expected[p] for p, out in results)


def test_fifo_lock_serves_in_arrival_order():
    lock, order = FifoLock(), []

    def waiter(i):
        with lock:
            order.append(i)

    with lock:                                   # held: every waiter queues behind it
        threads = []
        for i in range(6):
            th = threading.Thread(target=waiter, args=(i,))
            th.start()
            threads.append(th)
            with lock._cv:                       # wait until thread i holds its ticket
                assert lock._cv.wait_for(lambda: lock._next == i + 2, timeout=10)
    for th in threads:
        th.join()
    assert order == list(range(6))


# ---------------------------------------------------------------- bad inputs on the command line

def _copy(tiny_dirs, tmp_path, family="llada"):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs[family], d)
    return d


def _config(**changes):
    def edit(d):
        raw = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is _DELETE:
                raw.pop(k, None)
            else:
                raw[k] = v
        (d / "config.json").write_text(json.dumps(raw))
    return edit


_DELETE = object()


def _write(name, text):
    def edit(d):
        (d / name).write_text(text)
    return edit


def _delete(name):
    def edit(d):
        (d / name).unlink()
    return edit


def _weights(fn):
    def edit(d):
        t = load_file(str(d / "model.safetensors"))
        save_file(fn(t), str(d / "model.safetensors"))
    return edit


def _sharded(weight_map_of):
    def edit(d):
        t = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").rename(d / "shard.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map_of(sorted(t))}))
    return edit


def _first(t, fn):
    k = sorted(t)[0]
    return {**t, k: fn(t[k])}


GEN = ["--prompt-ids", "5,6,7", "--gen-length", "8", "--steps", "8", "--json"]
# (id, folder edit or None, extra/replacement args, message needle)
BAD_INPUTS = [
    ("config-a-list", _write("config.json", "[1, 2]"), GEN, "must be a JSON object"),
    ("config-null", _write("config.json", "null"), GEN, "must be a JSON object"),
    ("config-field-type", _config(n_layers="two", rope_theta="big"), GEN, "'n_layers' must be an integer"),
    ("config-zero-heads", _config(n_heads=0), GEN, "'n_heads' must be an integer >= 1"),
    ("config-fractional-layers", _config(n_layers=4.7), GEN, "'n_layers' must be an integer >= 1, got 4.7"),
    ("config-mask-outside-vocab", _config(mask_token_id=500), GEN, "'mask_token_id' 500 is outside the vocabulary"),
    ("config-huge-vocab", _config(vocab_size=10 ** 12, embedding_size=10 ** 12), GEN, "has shape"),
    ("shard-index-a-list", _sharded(lambda names: list(names)), GEN, "'weight_map' must map"),
    ("shard-outside-folder", _sharded(lambda names: {n: "../../shard.safetensors" for n in names}), GEN,
     "outside"),
    ("weights-int32", _weights(lambda t: _first(t, lambda x: x.to(torch.int32))), GEN, "stored as I32"),
    ("weights-bool", _weights(lambda t: _first(t, lambda x: x > 0)), GEN, "stored as BOOL"),
    ("weights-nan", _weights(lambda t: _first(t, lambda x: x.fill_(float("nan")))), GEN, "NaN or Inf"),
    ("weights-inf", _weights(lambda t: _first(t, lambda x: x.fill_(float("inf")))), GEN, "NaN or Inf"),
    ("tokenizer-corrupt-with-ids", _write("tokenizer.json", "{not json"), GEN, "cannot load the tokenizer"),
    ("tokenizer-empty", _write("tokenizer.json", ""), ["--prompt", "hi", "--gen-length", "8", "--steps", "8"],
     "cannot load the tokenizer"),
    ("tokenizer-config-only", _delete("tokenizer.json"), ["--prompt", "hi", "--gen-length", "8", "--steps", "8"],
     "tokenizer"),
    ("chat-template-broken", _write("chat_template.jinja", "{% if %}"),
     ["--prompt", "hi", "--chat", "--gen-length", "8", "--steps", "8"], "tokenizer"),
    ("prompt-not-utf8", None, ["--prompt", "caf\udce9", "--gen-length", "8", "--steps", "8"], "not valid UTF-8"),
    ("seed-over-64-bits", None, GEN + ["--seed", str(2 ** 64)], "seed must be an integer in [0, 2**64)"),
    ("seed-negative", None, GEN + ["--seed", "-1"], "seed must be"),
    ("temperature-nan", None, GEN + ["--temperature", "nan"], "temperature must be"),
    ("temperature-inf", None, GEN + ["--temperature", "inf"], "temperature must be"),
    ("temperature-huge", None, GEN + ["--temperature", "1e6"], "at most 10"),
    ("steps-huge", None, ["--prompt-ids", "5", "--gen-length", "8", "--steps", str(10 ** 9), "--json"],
     "more than the 8 tokens"),
    ("steps-more-than-tokens", None, ["--prompt-ids", "5", "--gen-length", "8", "--steps", "16", "--json"],
     "more than the 8 tokens"),
    ("block-length-zero", None, GEN + ["--block-length", "0"], "block_length must be an integer >= 1"),
    ("prompt-bucket-zero", None, GEN + ["--prompt-bucket", "0"], "prompt_bucket must be an integer >= 1"),
    ("gen-length-no-max", _config(max_sequence_length=_DELETE),
     ["--prompt-ids", "5", "--gen-length", "100000", "--steps", "100000", "--json"], "GiB available"),
]


def _assert_one_line_error(rc, out, err, needle):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert rc == 2, err[-800:]
    assert out == "" and "Traceback" not in err
    assert lines and lines[-1].startswith("dllm: error: ") and sum("error" in ln for ln in lines) == 1, err
    assert needle in lines[-1], lines[-1]


@pytest.mark.parametrize("edit,args,needle", [pytest.param(e, a, n, id=i) for i, e, a, n in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(capsys, tiny_dirs, tmp_path, edit, args, needle):
    d = _copy(tiny_dirs, tmp_path)
    if edit is not None:
        edit(d)
    rc = main(["generate", "--model", str(d), "--backend", "eager", *args])
    cap = capsys.readouterr()
    _assert_one_line_error(rc, cap.out, cap.err, needle)


EXPORT = ["--gen-length", "8", "--steps", "8", "--prompt-bucket", "8"]
BAD_EXPORTS = [
    ("prompt-bucket-zero", lambda tmp: ["--out", str(tmp / "pkg"), "--gen-length", "8", "--steps", "8",
                                        "--prompt-bucket", "0"], "prompt_bucket must be an integer >= 1"),
    ("out-under-a-file", lambda tmp: ["--out", str(tmp / "file" / "pkg"), *EXPORT], "cannot write the package"),
    ("out-is-a-file", lambda tmp: ["--out", str(tmp / "file"), *EXPORT], "exists and is not a folder"),
    ("out-not-empty", lambda tmp: ["--out", str(tmp / "full"), *EXPORT], "is not empty; pass --force"),
    ("steps-not-a-multiple", lambda tmp: ["--out", str(tmp / "pkg"), "--gen-length", "8", "--steps", "3",
                                          "--block-length", "4"], "not a multiple"),
]


@pytest.mark.parametrize("args_of,needle", [pytest.param(a, n, id=i) for i, a, n in BAD_EXPORTS])
def test_bad_export_is_one_line_exit_2(capsys, tiny_dirs, tmp_path, args_of, needle):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    rc = main(["export", "--model", str(tiny_dirs["llada"]), *args_of(tmp_path)])
    cap = capsys.readouterr()
    _assert_one_line_error(rc, cap.out, cap.err, needle)
    assert not (tmp_path / "pkg").exists() and (tmp_path / "full" / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]      # no partial package left


def test_ctrl_c_is_one_line_exit_130(tiny_dirs):
    """SIGINT while generating: 'dllm: interrupted' and exit 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "dllm.apps.main", "generate", "--model", str(tiny_dirs["llada"]),
                             "--prompt-ids", "5,6", "--gen-length", "2048", "--steps", "2048", "--backend", "eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            # a shell starts background jobs with SIGINT ignored, and Python then keeps it
                            # ignored: give the child the default disposition a terminal's Ctrl-C meets
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:                      # progress lines: the weights are loaded, generation starts
        if "loaded" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err and err.strip().splitlines()[-1] == "dllm: interrupted"


# ---------------------------------------------------------------- values that must be refused

@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(temperature=math.inf), "temperature must be"),
    (dict(temperature=11.0), "at most 10"),
    (dict(steps=16), "more than the 8 tokens"),
    (dict(block_length=0), "block_length must be"),
    (dict(top_p=float("nan"), alg="entropy"), "top_p must be"),
    (dict(threshold=float("nan")), "threshold must be in (0, 1]"),
])
def test_refused_values(engines, kwargs, needle):
    family = "dream" if "alg" in kwargs else "llada"
    args = {**SHAPE, **kwargs}
    with pytest.raises(RequestError, match=__import__("re").escape(needle)):
        engines[family].generate([5, 6, 7], **args)


def test_memory_estimate_refuses_before_allocating(engines):
    """200 rows x a 4002-long canvas: the attention scores alone are ~51 GB; refused with the number."""
    with pytest.raises(RequestError, match=r"needs about [0-9.]+ GiB but cpu has [0-9.]+ GiB available"):
        engines["llada"].generate([[5, 6]] * 200, gen_length=4000, steps=4000)


SETTINGS = [(f, p, t, steps, thr) for f in ("llada", "dream")
            for p in (NoCache(), DllmCache(kp=3, kr=2, rho=0.25), D2Cache(k=2, attn_budget=2), DualCache())
            for t in (0.0, 1.0, 10.0) for steps, thr in ((16, None), (4, None), (16, 0.9))]


@pytest.mark.parametrize("family,policy,temperature,steps,threshold", SETTINGS,
                         ids=[f"{f}-{p.name}-t{t}-s{s}-th{th}" for f, p, t, s, th in SETTINGS])
def test_mask_never_in_a_finished_output(engines, family, policy, temperature, steps, threshold):
    eng = engines[family]
    alg = {"alg": "maskgit_plus"} if family == "dream" else {}
    out = eng.generate([[5, 9, 33], [10, 11]], gen_length=16, steps=steps, block_length=8, temperature=temperature,
                       threshold=threshold, policy=policy, seed=3, **alg)
    assert all(eng.cfg.mask_id not in row for row in out.tokens)


# ---------------------------------------------------------------- Python API types

def _ref(engines):
    return engines["llada"].generate([5, 6, 7], **SHAPE).tokens


@pytest.mark.parametrize("prompt", [np.array([5, 6, 7]), torch.tensor([5, 6, 7]), [np.int64(5), np.int32(6), 7],
                                    (5, 6, 7), np.array([[5, 6, 7]]), torch.tensor([[5, 6, 7]]),
                                    [np.array([5, 6, 7])]],
                         ids=["numpy", "tensor", "numpy-ints", "tuple", "numpy-2d", "tensor-2d", "list-of-arrays"])
def test_prompt_types_that_work(engines, prompt):
    assert engines["llada"].generate(prompt, **SHAPE).tokens == _ref(engines)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt=[True, False]), "prompt must be"),
    (dict(prompt=[[5, True]]), "token ids must be integers"),
    (dict(prompt=None), "prompt must be"),
    (dict(prompt=123), "prompt must be"),
    (dict(prompt=[5.0, 6.0]), "prompt must be"),
    (dict(prompt=np.array([5.5, 6.0])), "prompt must be"),
    (dict(prompt=[]), "prompt must be"),
    (dict(seed="1"), "seed must be"),
    (dict(seed=1.5), "seed must be"),
    (dict(seed=2 ** 64), "seed must be"),
    (dict(gen_length="8"), "gen_length must be an integer"),
    (dict(gen_length=8.0), "gen_length must be an integer"),
    (dict(steps="8"), "steps must be an integer"),           # None now means the default (G): see Request
    (dict(prompt_bucket="8"), "prompt_bucket must be an integer"),
    (dict(prompt_bucket=-1), "prompt_bucket must be an integer"),
    (dict(block_length=4.0), "block_length must be an integer"),
    (dict(policy="dllm-cache"), "use make_policy('dllm-cache')"),
    (dict(policy=42), "policy must be a Policy"),
    (dict(temperature="0.5"), "temperature must be"),
    (dict(top_k=2.5, alg="entropy"), "top_k must be an integer"),
])
def test_wrong_types_are_request_errors(engines, kwargs, needle):
    args = {"prompt": [5, 6, 7], **SHAPE, **kwargs}
    family = "dream" if "alg" in kwargs else "llada"
    with pytest.raises(RequestError, match=__import__("re").escape(needle)):
        engines[family].generate(args.pop("prompt"), **args)


@pytest.mark.parametrize("bucket", [Bucket(-1, 8, 8), Bucket(8, 0, 8), Bucket(8, 8, 8, batch=0), Bucket(8, 8, 8, 3)],
                         ids=["negative-prompt", "zero-gen", "zero-batch", "block-not-dividing"])
def test_bad_buckets_are_request_errors(engines, bucket):
    with pytest.raises(RequestError):
        engines["llada"].prepare(bucket)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(device="tpu"), "device"), (dict(device=object()), "device"), (dict(dtype="int8"), "dtype"),
    (dict(dtype=torch.int32), "dtype"), (dict(folder=42), "folder must be a path"),
])
def test_from_pretrained_argument_errors(tiny_dirs, kwargs, needle):
    args = {"folder": tiny_dirs["llada"], **kwargs}
    with pytest.raises(RequestError, match=needle):
        Engine.from_pretrained(args.pop("folder"), **args)
