"""Confidence precision: p(x0) is ranked and thresholded in float64 by default, or in the logits' own
dtype on request; the option reaches every path (engine, CLI, export)."""
import json

import pytest
import torch

from dllm.apps import export as ex
from dllm.apps.main import main
from dllm.runtime import DualCache, RequestError
from dllm.runtime.decoding import DecodeConfig, choose


def _choose(dc, logits, noise, unif, raw=None):
    """decoding.choose for a request's options: its structure and its values."""
    return choose(dc.structure, logits, noise, unif, raw, dc.values.sampling)


V = 16


def _near_one_logits() -> torch.Tensor:
    """[1, 3, V] fp32 logits: rows 0 and 1 have p(argmax) within 2e-8 of 1 (both exactly 1.0 in fp32),
    row 1 the closer one; row 2 is unsure."""
    logits = torch.zeros(1, 3, V)
    logits[0, 0, 3] = 20.5          # p = 1 - 15 e^-20.5 ~ 1 - 1.9e-8
    logits[0, 1, 5] = 30.0          # p = 1 - 15 e^-30  ~ 1 - 1.4e-12
    logits[0, 2, 7] = 1.0
    return logits


def test_float64_separates_what_float32_rounds_to_one():
    logits = _near_one_logits()
    x0, c64, p64 = _choose(DecodeConfig.make("llada"), logits.clone(), None, None)
    _, c32, p32 = _choose(DecodeConfig.make("llada", confidence_dtype="logits"), logits.clone(), None, None)
    assert x0.tolist() == [[3, 5, 7]]
    assert p32.dtype == torch.float32 and p64.dtype == torch.float64
    assert p32[0, 0] == p32[0, 1] == 1.0                         # a tie in fp32: topk's order decides
    assert p64[0, 1] > p64[0, 0] and p64[0, 1] < 1.0            # fp64 ranks the closer row first
    assert c64.argmax(1).item() == 1


def test_threshold_one_only_takes_exact_ones_in_float64(tiny_dirs):
    # p >= 1.0 in fp64 means 1 - p < 2^-53; rows 0 and 1 above are below 1.0 in fp64, 1.0 in fp32
    logits = _near_one_logits()
    _, _, p64 = _choose(DecodeConfig.make("llada", threshold=1.0), logits.clone(), None, None)
    _, _, p32 = _choose(DecodeConfig.make("llada", threshold=1.0, confidence_dtype="logits"), logits.clone(),
                       None, None)
    assert ((p64 >= 1.0).tolist(), (p32 >= 1.0).tolist()) == ([[False, False, False]], [[True, True, False]])


def test_logits_mode_computes_in_the_model_dtype():
    raw = _near_one_logits().bfloat16()
    dc = DecodeConfig.make("dream", alg="topk_margin", confidence_dtype="logits")
    x0, conf, p0 = _choose(dc, raw.float(), None, None, raw)
    assert conf.dtype == p0.dtype == torch.bfloat16 and x0.tolist() == [[3, 5, 7]]
    x0, conf, p0 = _choose(DecodeConfig.make("dream", alg="topk_margin"), raw.float(), None, None, raw)
    assert conf.dtype == p0.dtype == torch.float64


def test_unknown_confidence_dtype_is_refused(engines):
    with pytest.raises(RequestError, match="unknown confidence_dtype 'half'; choose one of float64, logits"):
        engines["llada"].generate([5, 9], gen_length=8, steps=8, confidence_dtype="half")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_both_dtypes_run_every_path_and_agree_on_fp32_models_off_ties(engines, family):
    # On a fp32 model the two modes differ only where fp32 rounds two confidences to the same value;
    # the tiny random model has no such ties, so the tokens agree (a fp32 tie is shown above).
    eng = engines[family]
    kw = dict(gen_length=16, steps=16, block_length=8 if family == "llada" else 16)
    for policy in (None, DualCache()):
        for threshold in (None, 0.05):
            a = eng.generate([5, 9, 33, 40], policy=policy, threshold=threshold, **kw)
            b = eng.generate([5, 9, 33, 40], policy=policy, threshold=threshold, confidence_dtype="logits", **kw)
            assert a.tokens == b.tokens and a.steps == b.steps


def test_option_round_trips_through_the_cli_and_export(engines, tiny_dirs, capsys, tmp_path):
    eng = engines["llada"]
    ref = eng.generate([5, 9, 33], gen_length=8, steps=8, confidence_dtype="logits")
    assert main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,9,33", "--gen-length", "8",
                 "--steps", "8", "--confidence-dtype", "logits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ref.tokens
    info = ex.export(eng, tmp_path / "pkg", prompt_bucket=4, gen_length=8, steps=8, confidence_dtype="logits")
    assert info["decoding"]["confidence_dtype"] == "logits"
    assert json.loads((tmp_path / "pkg" / "plan.json").read_text())["decoding"]["confidence_dtype"] == "logits"
    mod, plan = ex.load(tmp_path / "pkg")
    assert ex.run(mod, plan, [5, 9, 33]) == ref.tokens[0]
