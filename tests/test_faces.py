"""Every decoding option reaches every face under its own name: a `dllm generate` flag, a `dllm serve`
JSON field, a `dllm eval` model argument and a perf spec key give the tokens / text the Python API gives
for the same Request (issue 21: confidence_dtype reached the CLI and export only)."""
import json

import pytest

from dllm.apps.main import main
from dllm.runtime import Engine, Request
from dllm.runtime.options import parse_spec, request_options
from dllm.runtime.request import DECODING_OPTIONS, OPTION_FIELDS

CASES = [  # (family, decoding options): every option of DECODING_OPTIONS at a value that is not its default
    ("llada", {"confidence_dtype": "logits", "threshold": 0.6}),
    ("llada", {"remasking": "random", "temperature": 0.7, "seed": 3}),
    ("dream", {"alg": "topk_margin", "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 4, "schedule": "uniform"}),
]
SHAPE = {"gen_length": 8, "steps": 8}


def test_the_cases_cover_every_decoding_option():
    assert set(DECODING_OPTIONS) <= {k for _, opts in CASES for k in opts}
    assert set(DECODING_OPTIONS) <= {f.name for f in OPTION_FIELDS}


def _flags(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.parametrize("family,opts", CASES, ids=["llada-logits-threshold", "llada-random-sampled", "dream-sampled"])
def test_every_decoding_option_reaches_every_face(engines, tiny_dirs, capsys, family, opts):
    eng: Engine = engines[family]
    ref = eng.generate("hi", **SHAPE, **opts)

    assert main(["generate", "--model", str(tiny_dirs[family]), "--prompt", "hi", "--gen-length", "8",
                 "--dtype", "float32", "--backend", "eager", "--json", *_flags(opts)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ref.tokens

    spec = "none:" + ",".join(f"{k}={v}" for k, v in opts.items())
    assert eng.generate(Request("hi", **SHAPE, **parse_spec(spec))).tokens == ref.tokens          # perf's specs
    assert request_options({k: str(v) for k, v in opts.items()}, text=True) == opts                # text values typed

    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from dllm.apps.serve.app import create_app
    from dllm.apps.serve.protocol import ServeOptions
    with TestClient(create_app(eng, ServeOptions("tiny", Request(**SHAPE, block_length=8)))) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 8, **opts})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.text[0]
        assert r.json()["dllm"]["steps"] == ref.steps

    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from dllm.apps.evaluate import DllmLM
    lm = DllmLM(engine=eng, **SHAPE, **{k: str(v) for k, v in opts.items()}, report=False, baseline=False)
    out = lm.generate_until([Instance("generate_until", {}, ("hi", {"max_gen_toks": 8}), 0)])
    assert out == ref.text
