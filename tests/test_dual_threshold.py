"""Fast-dLLM dual cache and threshold decoding."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dllm.runtime import D2Cache, DllmCache, DualCache, Engine, NoCache, RequestError
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.policy.dual_cache import dual_logits
from dllm.runtime.state import Cache, RequestShape, StepState
from dllm.runtime.steps import block_logits, full_forward, full_step

PROMPTS = [[5, 9, 33, 40, 41, 7, 8], [77, 12], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
ALL_POLICIES = [NoCache(), DllmCache(kp=5, kr=3, rho=0.25), D2Cache(k=4, attn_budget=4), DualCache()]


def test_dual_cache_plan():
    assert DualCache().plan(8, 4) == ["full", "block", "block", "block"] * 2
    assert DualCache().plan(3) == ["full", "block", "block"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dual_block_step_on_exact_caches_reproduces_full_logits(engines, family):
    # same tolerance and reason as the dLLM-Cache check: gathered rows reassociate fp32 sums
    eng = engines[family]
    cfg = eng.cfg
    for prompt in PROMPTS:
        shape = RequestShape(1, len(prompt), 16, 8, 16)
        st = StepState.allocate(cfg, shape, DecodeConfig.make(family).structure, "cpu")
        cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
        st.fill(cfg, [prompt], seed=0)
        with torch.inference_mode():
            for _ in range(3):                                     # commit a few tokens, caches exact
                full_step(eng.weights, cfg, st, cache)
            full = block_logits(eng.weights, cfg, st, full_forward(eng.weights, cfg, st, cache))
            got = dual_logits(eng.weights, cfg, st, cache)
        assert (got - full).abs().max() < 1e-4 and full.abs().max() > 1.0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dual_cache_runs_and_one_step_per_block_equals_no_cache(engines, family):
    eng = engines[family]
    for prompt in PROMPTS:
        out = eng.generate(prompt, gen_length=16, steps=16, block_length=8, policy=DualCache())
        assert out.step_kinds == {"full": 2, "block": 14} and eng.cfg.mask_id not in out.tokens[0]
        # one step per block: every step is a block start, i.e. a full refresh
        one = eng.generate(prompt, gen_length=16, steps=2, block_length=8, policy=DualCache())
        assert one.step_kinds == {"full": 2}
        assert one.tokens == eng.generate(prompt, gen_length=16, steps=2, block_length=8).tokens


def test_threshold_one_is_one_token_per_step(engines):
    # p(x0) >= 1 never holds on these weights, so each step commits exactly its best row: the same as
    # LLaDA's one-token-per-step schedule
    eng = engines["llada"]
    for prompt in PROMPTS:
        out = eng.generate(prompt, gen_length=16, steps=16, block_length=8, threshold=1.0)
        assert out.steps == 16 and out.step_kinds == {"full": 16}
        assert out.tokens == eng.generate(prompt, gen_length=16, steps=16, block_length=8).tokens


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("item", "_local_scalar_dense"):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
def test_threshold_commits_confident_rows_under_every_policy(engines, family, policy):
    eng = engines[family]
    kw = dict(gen_length=16, steps=16, block_length=8, threshold=0.2, policy=policy)
    eng.generate(PROMPTS[0], **kw)                                 # prepare (allocation may read values)
    with CountSyncs() as c:
        out = eng.generate(PROMPTS[0], **kw)
    assert eng.cfg.mask_id not in out.tokens[0]
    assert 2 <= out.steps <= 16 and sum(out.step_kinds.values()) == out.steps
    assert c.n == out.steps                                       # one host read per step, no more


def test_low_threshold_takes_fewer_steps(engines):
    eng = engines["llada"]
    steps = [eng.generate(PROMPTS[2], gen_length=32, steps=32, block_length=32, threshold=t).steps
             for t in (1.0, 0.3, 0.1, 0.01)]
    assert steps[0] == 32 and steps == sorted(steps, reverse=True) and steps[-1] < 8


def test_threshold_errors(engines):
    with pytest.raises(RequestError, match=r"threshold must be in \(0, 1\]"):
        engines["llada"].generate([5], gen_length=8, steps=8, threshold=1.5)
    with pytest.raises(RequestError, match="'origin' alg reveals rows at random"):
        engines["dream"].generate([5], gen_length=8, steps=8, alg="origin", threshold=0.9)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_compile_matches_eager(tiny_dirs, engines, family):
    comp = Engine.from_pretrained(tiny_dirs[family], backend="compile")
    for kw in (dict(policy=DualCache()), dict(policy=DualCache(), threshold=0.2)):
        for prompt in PROMPTS:
            a = engines[family].generate(prompt, prompt_bucket=12, gen_length=16, steps=16, block_length=8, **kw)
            b = comp.generate(prompt, prompt_bucket=12, gen_length=16, steps=16, block_length=8, **kw)
            assert a.tokens == b.tokens and a.step_kinds == b.step_kinds


def test_cli(capsys, tiny_dirs, engines):
    from dllm.apps.main import main
    rc = main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,6,7", "--gen-length", "16",
               "--steps", "16", "--block-length", "8", "--policy", "dual-cache", "--threshold", "0.2",
               "--backend", "eager", "--json"])
    obj = json.loads(capsys.readouterr().out)
    ref = engines["llada"].generate([5, 6, 7], gen_length=16, steps=16, block_length=8, policy=DualCache(),
                                    threshold=0.2)
    assert rc == 0 and obj["tokens"] == ref.tokens and obj["steps"] == ref.steps
    assert obj["step_kinds"]["full"] == 2
