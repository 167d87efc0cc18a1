"""dLLM-Cache: exactness where the maths says outputs are equal, the step plan, static buffers, no host syncs."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dllm.models import prepack
from dllm.runtime import DllmCache, NoCache, RequestError, make_policy
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.policy.dllm_cache import cached_logits
from dllm.runtime.state import Cache, RequestShape, StepState
from dllm.runtime.steps import block_logits, full_forward, with_noise

PROMPTS = [[5, 9, 33, 40, 41, 7, 8], [77, 12], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
SETTINGS = {"llada": [dict(gen_length=16, steps=16, block_length=8), dict(gen_length=24, steps=12, block_length=8)],
            "dream": [dict(gen_length=16, steps=16), dict(gen_length=12, steps=6, alg="maskgit_plus")]}
FAMILIES = ["llada", "dream"]
BIG = 10 ** 6     # an interval longer than any test generation


def make_steps(w, cfg, st, cache, budget: int = 0):
    """Runnable eager dLLM-Cache steps by kind recomputing `budget` V-verify rows."""
    policy = DllmCache(rho=budget / st.shape.gen_length)
    assert policy.n_verify(st.shape.gen_length) == budget
    return {k: with_noise(st, b) for k, b in policy.bodies(w, cfg, st, cache, None).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_refresh_every_step_equals_no_cache(engines, family):
    eng = engines[family]
    for kw in SETTINGS[family]:
        for prompt in PROMPTS:
            base = eng.generate(prompt, **kw)
            for rho in (0.0, 0.25, 1.0):
                out = eng.generate(prompt, policy=DllmCache(kp=1, kr=1, rho=rho), **kw)
                assert out.tokens == base.tokens
                assert out.step_kinds == {"full": kw["steps"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_rho_one_verify_equals_response_refresh(engines, family):
    # plans [full, verify, verify, ...] with every response row recomputed vs [full, response_refresh, ...]
    eng = engines[family]
    for kw in SETTINGS[family]:
        for prompt in PROMPTS:
            part = eng.generate(prompt, policy=DllmCache(kp=BIG, kr=BIG, rho=1.0), **kw)
            resp = eng.generate(prompt, policy=DllmCache(kp=BIG, kr=1, rho=0.0), **kw)
            assert part.step_kinds == {"full": 1, "verify": kw["steps"] - 1}
            assert resp.step_kinds == {"full": 1, "response_refresh": kw["steps"] - 1}
            assert part.tokens == resp.tokens


def _exact_state(eng, prompt, G=16, block=8):
    """A state right after a full refresh, with the canvas and step counter as they were before it:
    every cache entry is exactly what a full forward of this canvas computes."""
    cfg = eng.cfg
    dc = DecodeConfig.make(cfg.family)
    shape = RequestShape(1, len(prompt), G, block if cfg.family == "llada" else G, G)
    st = StepState.allocate(cfg, shape, dc.structure, "cpu")
    cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
    st.fill(cfg, [prompt], seed=0)
    steps = make_steps(eng.weights, cfg, st, cache, budget=4)
    for _ in range(3):                        # commit a few tokens so the canvas is not all masks
        steps["full"]()
    with torch.inference_mode():
        full = block_logits(eng.weights, cfg, st, full_forward(eng.weights, cfg, st, cache))
    return st, cache, full


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,budget", [("verify", 4), ("verify", 16), ("verify", 0), ("response_refresh", 0),
                                         ("prompt_refresh", 4), ("prompt_refresh", 0)])
def test_cached_step_on_exact_caches_reproduces_full_logits(engines, family, kind, budget):
    # Tolerance 1e-4 on O(1) fp32 logits: the recomputed rows go through different matmul shapes (V
    # slice vs fused QKV, gathered rows) than the full forward, which reassociates fp32 sums (~1e-6
    # relative per layer); rows that are not recomputed reuse the cache bit for bit.
    eng = engines[family]
    for prompt in PROMPTS:
        st, cache, full = _exact_state(eng, prompt)
        with torch.inference_mode():
            got = cached_logits(eng.weights, eng.cfg, st, cache, kind, budget)
        assert full.abs().max() > 1.0
        assert (got - full).abs().max() < 1e-4


def test_stale_caches_do_change_logits(engines):
    # the check above can fail: after a token changes, pure reuse no longer reproduces a full step
    eng = engines["llada"]
    st, cache, _ = _exact_state(eng, PROMPTS[0])
    make_steps(eng.weights, eng.cfg, st, cache)["full"]()              # commits a token, caches now one behind
    with torch.inference_mode():
        reuse = cached_logits(eng.weights, eng.cfg, st, cache, "verify", 0)
        fresh = block_logits(eng.weights, eng.cfg, st, full_forward(eng.weights, eng.cfg, st))
    assert (reuse - fresh).abs().max() > 1e-3


def test_v_verify_picks_the_least_similar_rows():
    from dllm.runtime.policy.dllm_cache import v_verify
    old = torch.randn(2, 2, 6, 4)
    new = old.clone()
    new[0, :, 4] = -old[0, :, 4]            # cos -1: the most changed
    new[0, :, 1] = old[0, :, 1] + 0.5 * torch.randn(2, 4)
    new[1, 1, 2] = torch.randn(4)           # one head of one row changed: similarity over the whole width
    idx = v_verify(new, old, 2)
    assert idx[0].tolist() == [4, 1]
    assert idx[1, 0].item() == 2


def test_plan_counts():
    plan = DllmCache(kp=100, kr=7, rho=0.25).plan(256)
    assert {k: plan.count(k) for k in set(plan)} == {"full": 1, "prompt_refresh": 2, "response_refresh": 36,
                                                      "verify": 217}
    assert plan[0] == "full" and plan[100] == plan[200] == "prompt_refresh" and plan[7] == "response_refresh"
    assert DllmCache(kp=2, kr=3).plan(7) == ["full", "verify", "prompt_refresh", "response_refresh",
                                            "prompt_refresh", "verify", "full"]
    assert NoCache().plan(3) == ["full"] * 3


def test_counter_runs_across_blocks(engines):
    # 4 blocks of 4 steps, kr = 3: response refreshes at steps 4, 7, 10, 13 regardless of block starts
    out = engines["llada"].generate(PROMPTS[0], gen_length=16, steps=16, block_length=4,
                                    policy=DllmCache(kp=BIG, kr=3, rho=0.25))
    assert out.step_kinds == {"full": 1, "response_refresh": 5, "verify": 10}


def test_n_verify():
    assert DllmCache(rho=0.25).n_verify(256) == 64
    assert DllmCache(rho=0.25).n_verify(3) == 0          # int(0.75) == 0: pure reuse
    assert DllmCache(rho=1.0).n_verify(17) == 17


@pytest.mark.parametrize("params,msg", [(dict(kp=0), "kp must be an integer >= 1"),
                                        (dict(kr=-2), "kr must be an integer >= 1"),
                                        (dict(kp=2.5), "kp must be an integer"),
                                        (dict(rho=1.5), r"rho must be in \[0, 1\]"),
                                        (dict(rho=-0.1), r"rho must be in \[0, 1\]"),
                                        (dict(sigma=3), "unexpected keyword")])
def test_invalid_policy_parameters(params, msg):
    with pytest.raises(RequestError, match=msg):
        make_policy("dllm-cache", **params)


def test_unknown_policy():
    with pytest.raises(RequestError, match="unknown policy 'fast'; choose one of none, dllm-cache"):
        make_policy("fast")


# ---------------------------------------------------------------- static buffers, no host syncs

class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host or has a data-dependent shape."""
    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(b in name for b in self.BANNED):
            raise AssertionError(f"host sync inside a step: {func}")
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, torch.Tensor) and a.device.type != "cpu" and "copy" in name:
                raise AssertionError(f"device->host copy inside a step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dkw", [{}, {"temperature": 0.7}])
def test_steps_never_sync_the_host(engines, family, dkw):
    eng = engines[family]
    cfg = eng.cfg
    dc = DecodeConfig.make(cfg.family, temperature=dkw.get("temperature", 0.0))
    shape = RequestShape(2, 8, 16, 8, 16)
    st = StepState.allocate(cfg, shape, dc.structure, "cpu")
    st.write_values(dc.values)
    cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
    st.fill(cfg, PROMPTS[:2], seed=0)
    steps = make_steps(eng.weights, cfg, st, cache, budget=4)
    # the sanity check of the checker: .item() is caught
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        st.step.item()
    with torch.inference_mode(), NoHostSync():
        for kind in ["full", "verify", "response_refresh", "prompt_refresh", "verify"]:
            steps[kind]()


def test_nothing_is_allocated_across_100_steps(engines):
    eng = engines["llada"]
    kw = dict(gen_length=128, steps=128, block_length=32)
    policy = DllmCache(kp=50, kr=7, rho=0.25)
    eng.generate(PROMPTS[0], policy=policy, **kw)                      # warm-up: allocates state and cache
    shape = RequestShape(1, len(PROMPTS[0]), 128, 32, 128)
    prep = eng.prepared(shape, DecodeConfig.make("llada").structure, policy)
    st, cache = prep.state, prep.cache
    before = {n: (t.data_ptr(), t.shape) for n, t in {**cache.tensors(), "tokens": st.tokens}.items()}
    steps = make_steps(eng.weights, eng.cfg, st, cache, policy.n_verify(128))
    plan = policy.plan(128)
    with torch.inference_mode():
        st.fill(eng.cfg, [PROMPTS[0]], seed=0)
        steps["full"]()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for kind in plan[1:101]:                                   # 100 steps of every cached kind
                steps[kind]()
    retained = sum(e.self_cpu_memory_usage for e in prof.events())
    assert retained == 0, f"{retained} bytes still allocated after 100 steps"
    assert {n: (t.data_ptr(), t.shape) for n, t in {**cache.tensors(), "tokens": st.tokens}.items()} == before
    assert set(plan[1:101]) == {"verify", "response_refresh", "prompt_refresh"}


@pytest.mark.cuda
def test_cuda_memory_flat_across_100_steps(tiny_dirs):
    from dllm.runtime import Engine
    eng = Engine.from_pretrained(tiny_dirs["llada"], device="cuda", backend="cudagraph")
    kw = dict(gen_length=128, steps=128, block_length=32, policy=DllmCache(kp=50, kr=7, rho=0.25))
    eng.generate(PROMPTS[0], **kw)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    eng.generate(PROMPTS[0], **kw)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_padded_batch_equals_single_runs(engines, family):
    # pads are masked keys in cached attention too, and V-verify selects per batch row
    eng = engines[family]
    kw = dict(SETTINGS[family][0], policy=DllmCache(kp=5, kr=3, rho=0.25))
    batch = eng.generate(PROMPTS, **kw)
    assert batch.tokens == [eng.generate(p, **kw).tokens[0] for p in PROMPTS]
    bucketed = eng.generate(PROMPTS[0], prompt_bucket=len(PROMPTS[0]) + 5, **kw)
    assert bucketed.tokens[0] == batch.tokens[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_every_kind(tiny_dirs, family, dtype):
    from dllm.runtime import Engine
    eng = Engine.from_pretrained(tiny_dirs[family], dtype=dtype, backend="eager")
    assert eng.weights.wqkv.dtype == dtype
    out = eng.generate(PROMPTS[0], gen_length=16, steps=16, policy=DllmCache(kp=5, kr=3, rho=0.25))
    assert set(out.step_kinds) == {"full", "verify", "response_refresh", "prompt_refresh"}
    assert eng.cfg.mask_id not in out.tokens[0]
    full32 = Engine.from_pretrained(tiny_dirs[family], backend="eager").generate(PROMPTS[0], gen_length=16, steps=16)
    # low precision changes some choices, but on O(1) logits most survive
    assert sum(a == b for a, b in zip(eng.generate(PROMPTS[0], gen_length=16, steps=16).tokens[0],
                                      full32.tokens[0])) >= 8


def test_step_bodies_compile_as_one_graph(engines):
    # The design promise behind graph capture: a step body (here the V-verify partial step of Dream,
    # with top-p sampling) traces with fullgraph=True, i.e. no graph break and no host sync, and the
    # compiled body updates canvas and caches like the eager one (tolerance 1e-4: Inductor fuses and
    # reorders fp32 reductions).
    eng = engines["dream"]
    cfg = eng.cfg
    dc = DecodeConfig.make("dream", temperature=0.7, top_p=0.9)
    shape = RequestShape(2, 11, 16, 16, 16)
    runs = []
    for compiled in (False, True):
        st = StepState.allocate(cfg, shape, dc.structure, "cpu")
        st.write_values(dc.values)
        cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
        st.fill(cfg, PROMPTS[1:], seed=3)
        w = prepack.plain(eng.weights)      # Inductor takes plain matrices, as the compile backend does
        bodies = DllmCache(rho=4 / 16).bodies(w, cfg, st, cache, None)
        verify = torch.compile(bodies["verify"], fullgraph=True, dynamic=False) if compiled else bodies["verify"]
        with torch.inference_mode():
            for body in (bodies["full"], verify, verify):
                st.draw_noise()
                body()
        runs.append((st, cache))
    (a, ca), (b, cb) = runs
    assert torch.equal(a.tokens, b.tokens) and a.step.item() == b.step.item() == 3
    for name, t in ca.tensors().items():
        assert (t - cb.tensors()[name]).abs().max() < 1e-4, name
