"""What an engine keeps is bounded (LRU eviction, explicit free), declared buckets serve every decoding
option including a threshold, and default prompt buckets round up where a shape costs a compile."""
import pytest
import torch

from dllm.graphs import backends
from dllm.runtime import Bucket, DllmCache, Engine, NoCache, RequestError
from dllm.runtime.engine import PROMPT_GRANULARITY

PROMPT = [5, 9, 33, 40, 41, 7, 8]
KW = dict(gen_length=8, steps=8)


def test_threshold_decoding_can_be_prepared_for_declared_buckets(tiny_dirs, engines):
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager", buckets=[Bucket(12, 8, 8)],
                                 policies=[NoCache(), DllmCache(kp=4, kr=2)], decoding={"threshold": 0.05})
    for policy in (NoCache(), DllmCache(kp=4, kr=2)):
        out = eng.generate(PROMPT, threshold=0.05, policy=policy, **KW)        # served, not refused
        assert out.tokens == engines["llada"].generate(PROMPT, threshold=0.05, policy=policy, prompt_bucket=12,
                                                       **KW).tokens
    # the threshold is a value in a device tensor: the same prepared steps serve every threshold ...
    assert eng.generate(PROMPT, threshold=0.5, **KW).tokens == \
        engines["llada"].generate(PROMPT, threshold=0.5, prompt_bucket=12, **KW).tokens
    with pytest.raises(RequestError, match="no prepared bucket fits"):       # ... but not a fixed schedule
        eng.generate(PROMPT, **KW)


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_one_prepared_step_set_serves_every_sampling_value(tiny_dirs, backend):
    # temperature, top-p, top-k and the threshold live in device tensors: new values reuse the prepared
    # (compiled / captured) steps, and each value really takes effect (equal to a fresh engine's run)
    eng = Engine.from_pretrained(tiny_dirs["dream"], backend=backend)
    runs = [dict(temperature=0.7, top_p=0.9, top_k=5, seed=1), dict(temperature=1.3, top_p=0.5, top_k=2, seed=1),
            dict(temperature=0.7, top_p=0.9, top_k=5, seed=1)]
    outs = [eng.generate(PROMPT, prompt_bucket=8, **run, **KW) for run in runs]
    assert [o.prepare_seconds > 0 for o in outs] == [backend == "compile", False, False]
    assert len(eng._store) == 1
    assert outs[0].tokens == outs[2].tokens != outs[1].tokens
    for run, out in zip(runs[:2], outs):
        fresh = Engine.from_pretrained(tiny_dirs["dream"], backend="eager").generate(PROMPT, prompt_bucket=8,
                                                                                    **run, **KW)
        assert out.tokens == fresh.tokens


def test_least_recently_used_prepared_requests_are_released(tiny_dirs, engines):
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager", max_prepared=3)
    ref = engines["llada"]
    for n in range(2, 9):                                                     # 7 distinct prompt lengths
        ids = PROMPT[:1] * n
        assert eng.generate(ids, **KW).tokens == ref.generate(ids, **KW).tokens
        assert len(eng._store) == min(n - 1, 3)
    assert [k[0].prompt_bucket for k in eng._store] == [6, 7, 8]          # the three most recent
    eng.generate(PROMPT[:1] * 6, **KW)                                        # a hit moves to the end
    eng.generate(PROMPT[:1] * 2, **KW)                                        # a miss evicts the oldest (7)
    assert [k[0].prompt_bucket for k in eng._store] == [8, 6, 2]


def test_byte_limit_and_declared_buckets_are_kept(tiny_dirs):
    probe = Engine.from_pretrained(tiny_dirs["llada"], backend="eager")
    probe.generate(PROMPT, policy=DllmCache(), **KW)
    one = next(iter(probe._store.values())).nbytes
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager", buckets=[Bucket(32, 8, 8)],
                                 prepare_on_demand=True, max_prepared_bytes=3 * one)
    for n in range(1, 7):
        eng.generate(PROMPT[:1] * n, policy=DllmCache(), **KW)
        assert sum(p.nbytes for p in eng._store.values()) <= 3 * one + next(
            p.nbytes for k, p in eng._store.items() if k[0].prompt_bucket == 32)
    assert any(k[0].prompt_bucket == 32 for k in eng._store)              # the declared bucket stays
    assert len(eng._store) < 7


def test_free_releases_everything(tiny_dirs, engines):
    eng = Engine.from_pretrained(tiny_dirs["dream"], backend="eager", buckets=[Bucket(12, 8, 8)],
                                 prepare_on_demand=True)
    eng.generate(PROMPT, **KW)
    eng.free()
    assert not eng._store and not eng.buckets
    assert eng.generate(PROMPT, **KW).tokens == engines["dream"].generate(PROMPT, **KW).tokens


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_limits_are_validated(tiny_dirs, bad):
    with pytest.raises(RequestError, match="max_prepared must be an integer >= 1 or None"):
        Engine.from_pretrained(tiny_dirs["llada"], backend="eager", max_prepared=bad)


def test_default_prompt_bucket_rounds_up_on_compiling_backends(tiny_dirs, engines):
    eager = engines["llada"]
    assert eager._default_bucket(7, 8) == 7                                   # eager: nothing to reuse
    comp = Engine.from_pretrained(tiny_dirs["llada"], backend="compile")
    assert comp._default_bucket(7, 8) == PROMPT_GRANULARITY == 64
    assert comp._default_bucket(65, 8) == 128
    # over the model's maximum length the prompt's own length is used
    limited = Engine(comp.cfg.__class__(**{**comp.cfg.__dict__, "max_seq_len": 72}), comp.weights,
                     backend="compile")
    assert limited._default_bucket(7, 8) == 64 and limited._default_bucket(65, 4) == 65


@pytest.mark.cuda
def test_eviction_releases_captured_graphs(tiny_dirs):
    eng = Engine.from_pretrained(tiny_dirs["llada"], device="cuda", backend="cudagraph", max_prepared=1)
    eng.generate(PROMPT, **KW)
    assert len(eng._pool.graphs) == 1
    eng.generate(PROMPT + [3] * 64, **KW)                                     # another bucket: evicts the first
    assert len(eng._pool.graphs) == 1 and len(eng._store) == 1
    torch.cuda.synchronize()


def test_pool_release_drops_only_the_given_graphs():
    class G:                                                                  # stands in for a CUDAGraph
        def replay(self):
            pass
    pool = backends.GraphPool.__new__(backends.GraphPool)                     # no CUDA needed for the list
    a, b = G(), G()
    pool.graphs = [("full", a), ("verify", b)]
    pool.release([a.replay])
    assert pool.graphs == [("verify", b)]


def test_a_zero_block_length_bucket_is_refused_not_one_block(tiny_dirs):
    with pytest.raises(RequestError, match="block_length must be an integer >= 1"):
        Engine.from_pretrained(tiny_dirs["llada"], backend="eager", buckets=[Bucket(12, 8, 8, block_length=0)])


def test_a_request_larger_than_the_byte_limit_is_still_served(tiny_dirs, engines):
    # eviction never drops the prepared request it is serving, even when it alone is over the limit
    eng = Engine.from_pretrained(tiny_dirs["llada"], backend="eager", max_prepared_bytes=1)
    for n in (3, 5):
        assert eng.generate(PROMPT[:n], **KW).tokens == engines["llada"].generate(PROMPT[:n], **KW).tokens
        assert [k[0].prompt_bucket for k in eng._store] == [n]
