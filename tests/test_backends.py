"""Graph backends: compile matches eager, graph breaks are errors, buckets are prepared once and
requests outside them are refused; CUDA graphs replay bit-identically in one shared pool (GPU only)."""
import pytest
import torch

from dllm.graphs import BackendError, backends
from dllm.runtime import Bucket, D2Cache, DllmCache, DualCache, Engine, NoCache, Request, RequestError
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.state import RequestShape

PROMPTS = [[5, 9, 33, 40, 41, 7, 8], [77, 12], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
KW = {"llada": dict(gen_length=16, steps=16, block_length=8), "dream": dict(gen_length=16, steps=16)}
POLICIES = [NoCache(), DllmCache(kp=5, kr=3, rho=0.25)]    # kp 5 / kr 3 over 16 steps uses all four kinds
CUDA_POLICIES = POLICIES + [D2Cache(k=4, attn_budget=3, attn_p=0.5), DualCache()]


def _finite_close(a, b, tol):
    fin = torch.isfinite(a)
    return torch.equal(fin, torch.isfinite(b)) and torch.equal(a[~fin], b[~fin]) and \
        bool(((a[fin] - b[fin]).abs() <= tol).all())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_compile_matches_eager(tiny_dirs, engines, family):
    # One prompt bucket (12) for every prompt, so each step kind compiles once. Tolerance on the last
    # step's confidences 1e-5: Inductor fuses and reorders fp32 reductions (softmax of O(1) logits).
    eager = engines[family]
    comp = Engine.from_pretrained(tiny_dirs[family], backend="compile", keep_faster=False)   # compiled code only
    dc = DecodeConfig.make(family).structure
    for policy in POLICIES:
        kinds = set()
        for prompt in PROMPTS:
            a = eager.generate(prompt, prompt_bucket=12, policy=policy, **KW[family])
            b = comp.generate(prompt, prompt_bucket=12, policy=policy, **KW[family])
            assert b.tokens == a.tokens and b.backend == "compile"
            kinds |= set(b.step_kinds)
            shape = RequestShape(1, 12, 16, KW[family].get("block_length", 16), 16)
            assert _finite_close(eager.prepared(shape, dc, policy).state.conf,
                                 comp.prepared(shape, dc, policy).state.conf, 1e-5)
        assert kinds == ({"full"} if policy is POLICIES[0] else
                         {"full", "verify", "response_refresh", "prompt_refresh"})


def test_keep_faster_keeps_whichever_variant_ran_faster():
    import time
    calls = []

    def timed(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run
    compiled = {"full": timed("full compiled", 0.002), "partial": timed("partial compiled", 0.02)}
    eager = {"full": timed("full eager", 0.02), "partial": timed("partial eager", 0.002)}
    resets = []
    steps, speedup = backends.keep_faster(compiled, eager, lambda: resets.append(1), rounds=3)
    assert steps["full"] is compiled["full"] and steps["partial"] is eager["partial"]
    assert speedup["full"] > 2 and speedup["partial"] < 0.5
    assert len(resets) == len(calls) == 12                 # every timed call starts from a reset state


def test_cpu_compile_is_never_slower_than_eager_per_kind(tiny_dirs):
    """On CPU the compile backend serves each kind with the faster variant, measured at prepare time."""
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="compile")
    policy = DllmCache(kp=5, kr=3, rho=0.25)
    prep = eng.prepared(RequestShape(1, 12, 16, 8, 16), DecodeConfig.make("llada").structure, policy)
    eng.prepare_steps(prep, policy.kinds)
    assert set(prep.steps) == set(policy.kinds)
    for k in policy.kinds:          # either the eager body itself or the compiled wrapper
        assert prep.steps[k] is prep.bodies[k] or prep.steps[k].__qualname__.startswith("_compiled")


def test_compile_refuses_a_graph_break():
    # the compile backend traces with fullgraph=True: a host branch on a tensor value is an error,
    # not a silent fallback to eager
    t = torch.zeros(3)

    def body():
        if t.sum() > 0:
            t.add_(1)
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|Unsupported"):
        backends.prepare("compile", {"full": body}, reset=lambda: None)


def test_backend_names_and_devices():
    assert backends.available(torch.device("cpu")) == ["eager", "compile"]
    assert backends.default_backend(torch.device("cpu")) == "eager"
    assert backends.default_backend(torch.device("cuda")) == "compile+cudagraph"
    with pytest.raises(BackendError, match="unknown backend 'jit'"):
        backends.check("jit", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="backend cudagraph needs a CUDA device"):
            backends.check("cudagraph", torch.device("cpu"))


def test_buckets_are_prepared_once_and_reused(tiny_dirs):
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="compile",
                                 buckets=[Bucket(prompt=12, gen_length=16, steps=16, block_length=8)])
    assert eng.prepare_seconds > 0 and eng.prepare_on_demand == "nothing"
    out = eng.generate(PROMPTS[0], **KW["llada"])
    assert out.prepare_seconds == 0.0                      # prepared at start-up
    assert out.tokens == eng.generate(PROMPTS[0], prompt_bucket=12, **KW["llada"]).tokens
    with pytest.raises(RequestError, match="no prepared bucket fits.*prompt 13 tokens.*prepare_on_demand=True"):
        eng.generate(list(range(5, 18)), **KW["llada"])    # longer than the bucket
    with pytest.raises(RequestError, match="no prepared bucket fits.*policy dllm-cache"):
        eng.generate(PROMPTS[0], policy=DllmCache(), **KW["llada"])   # prepared for NoCache only


def test_on_demand_capture_serves_unprepared_shapes(tiny_dirs, engines):
    eng = Engine.from_pretrained(tiny_dirs["dream"], backend="eager", buckets=[Bucket(12, 16, 16)],
                                 prepare_on_demand=True)
    assert eng.generate(PROMPTS[1], gen_length=8, steps=8).tokens == \
        engines["dream"].generate(PROMPTS[1], gen_length=8, steps=8).tokens
    with pytest.raises(RequestError, match="unknown decoding options"):
        eng.prepare(Bucket(12, 16, 16), NoCache(), temprature=0.5)


def test_smallest_fitting_bucket_wins(tiny_dirs):
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager",
                                 buckets=[Bucket(32, 16, 16, 8), Bucket(8, 16, 16, 8), Bucket(16, 16, 16, 8)])
    assert {k[0].prompt_bucket for k in eng._store} == {8, 16, 32}
    # an 11-token prompt goes to the 16 bucket, not the 32 one
    req = Request(PROMPTS[2], gen_length=16, steps=16, block_length=8)
    assert eng._pick_shape(1, len(PROMPTS[2]), req, DecodeConfig.make("llada").structure).prompt_bucket == 16


# ---------------------------------------------------------------- CUDA

def _cuda_pair(tiny_dirs, family, backend):
    return (Engine.from_pretrained(tiny_dirs[family], device="cuda", backend="eager"),
            Engine.from_pretrained(tiny_dirs[family], device="cuda", backend=backend))


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cudagraph_replay_is_bit_identical_to_eager(tiny_dirs, family):
    eager, graph = _cuda_pair(tiny_dirs, family, "cudagraph")
    dc = DecodeConfig.make(family).structure
    for policy in CUDA_POLICIES:
        for prompt in PROMPTS:
            a = eager.generate(prompt, prompt_bucket=12, policy=policy, **KW[family])
            b = graph.generate(prompt, prompt_bucket=12, policy=policy, **KW[family])
            assert a.tokens == b.tokens
            t = eager.generate(prompt, prompt_bucket=12, policy=policy, threshold=0.2, **KW[family])
            assert graph.generate(prompt, prompt_bucket=12, policy=policy, threshold=0.2, **KW[family]).tokens \
                == t.tokens
            shape = RequestShape(1, 12, 16, KW[family].get("block_length", 16), 16)
            if policy.uses_cache:
                for name, t in eager.prepared(shape, dc, policy).cache.tensors().items():
                    assert torch.equal(t, graph.prepared(shape, dc, policy).cache.tensors()[name]), name
            assert torch.equal(eager.prepared(shape, dc, policy).state.conf,
                               graph.prepared(shape, dc, policy).state.conf)


@pytest.mark.cuda
def test_compile_cudagraph_matches_eager_tokens(tiny_dirs):
    eager, graph = _cuda_pair(tiny_dirs, "llada", "compile+cudagraph")
    for policy in CUDA_POLICIES:
        for prompt in PROMPTS:
            assert graph.generate(prompt, prompt_bucket=12, policy=policy, **KW["llada"]).tokens == \
                eager.generate(prompt, prompt_bucket=12, policy=policy, **KW["llada"]).tokens


@pytest.mark.cuda
def test_100_generations_leave_memory_unchanged_and_share_one_pool(tiny_dirs):
    eng = Engine.from_pretrained(tiny_dirs["llada"], device="cuda", backend="cudagraph")
    kw = dict(prompt_bucket=12, policy=DllmCache(kp=5, kr=3, rho=0.25), **KW["llada"])
    eng.generate(PROMPTS[0], **kw)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(100):
        eng.generate(PROMPTS[i % 3], **kw)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    kinds = [k for k, _ in eng._pool.graphs]
    assert sorted(kinds) == ["full", "verify", "prompt_refresh", "response_refresh"]
    assert {g.pool() for _, g in eng._pool.graphs} == {eng._pool.handle}
