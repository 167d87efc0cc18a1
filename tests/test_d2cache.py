"""d2Cache: full coverage equals NoCache, density and rollout against hand-computed cases, the fixed
budget never writes outside its row set, Dream's shift, compile equals eager, clear errors."""
import json
import math

import pytest
import torch

from dllm.models.layers import forward
from dllm.runtime import D2Cache, Engine, RequestError, make_policy
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.policy.d2cache import (
    D2Buffers,
    certainty_density,
    d2_full,
    d2_select,
    d2_selected,
    dedupe,
    nucleus,
    rollout_full,
    rollout_rows,
    row_mask,
    search_window,
)
from dllm.runtime.state import Cache, RequestShape, StepState
from tests.test_cache import NoHostSync

PROMPTS = [[5, 9, 33, 40, 41, 7, 8], [77, 12], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
SETTINGS = {"llada": [dict(gen_length=16, steps=16, block_length=8), dict(gen_length=24, steps=12, block_length=8),
                      dict(gen_length=16, steps=16)],
            "dream": [dict(gen_length=16, steps=16), dict(gen_length=12, steps=6, alg="maskgit_plus")]}
EVERY_ROW = D2Cache(k=64, attn_budget=10 ** 4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_budget_covering_every_row_equals_no_cache(engines, family):
    eng = engines[family]
    for kw in SETTINGS[family]:
        for prompt in PROMPTS:
            out = eng.generate(prompt, policy=EVERY_ROW, **kw)
            assert out.tokens == eng.generate(prompt, **kw).tokens
            assert out.step_kinds == {"full": 1, "selected": kw["steps"] - 1}


def _d2(G, sigma, B=1, P=4):
    from dllm.models.config import parse_config
    from dllm.models.tiny import PRESETS, tiny_config
    cfg = parse_config(tiny_config("llada", PRESETS["tiny"]))
    return cfg, D2Buffers.allocate(cfg, RequestShape(B, P, G, G, G), k=2, sigma=sigma, attn_budget=2, kmax=1,
                                   device="cpu")


def test_density_by_hand():
    # sigma 1, G = 3, nothing decoded: D(0) = (e^-1/2 + e^-2 + e^-9/2) / sum_d e^(-d^2/2), the prompt side
    _, d2 = _d2(3, 1.0)
    z = sum(math.exp(-d * d / 2) for d in range(-9, 10))
    d0 = (math.exp(-0.5) + math.exp(-2) + math.exp(-4.5)) / z
    d = certainty_density(d2, torch.zeros(1, 3, dtype=torch.bool))
    assert abs(d[0, 0].item() - d0) < 1e-6 and abs(d0 - 0.30042) < 1e-4
    assert d[0, 0] > d[0, 1] > d[0, 2]                          # decays away from the prompt
    # all decoded: every position sees known neighbours on both sides -> close to 1, never above
    full = certainty_density(d2, torch.ones(1, 3, dtype=torch.bool))
    assert (full <= 1).all() and (full > 0.99).all()
    # brute force over the extended canvas [-G, 2G): prompt side known, right side known only once
    # the last response token is
    _, d2 = _d2(7, 2.0)
    z = sum(math.exp(-d * d / 8) for d in range(-21, 22))
    for bits in ([0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0, 1]):
        known = torch.tensor([bits], dtype=torch.bool)
        ext = lambda j: 1 if j < 0 else (bits[j] if j < 7 else bits[-1])  # noqa: E731
        want = [sum(ext(j) * math.exp(-(i - j) ** 2 / 8) for j in range(-7, 14)) / z for i in range(7)]
        assert torch.allclose(certainty_density(d2, known)[0], torch.tensor(want), atol=1e-6)


def test_rollout_by_hand():
    # one layer, L = 2, every row recomputed: (A + I)/2 = [[.75, .25], [.125, .875]], column sums .875, 1.125
    _, d2 = _d2(1, 1.0, P=1)
    d2.attn_full = torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]])
    rollout_full(d2)
    assert torch.allclose(d2.importance, torch.tensor([[0.875, 1.125]]))


def test_selected_rollout_equals_explicit_matrices():
    # identity rows for rows not recomputed; the vector pass equals prod of explicit L x L matrices
    torch.manual_seed(0)
    nL, L, S = 3, 6, 3
    _, d2 = _d2(2, 1.0, P=4)
    d2.rows = torch.tensor([[4, 1, 1]])                          # slot 2 aliases slot 1 (surplus)
    d2.valid = torch.tensor([[True, True, False]])
    d2.attn_rows = torch.rand(nL, 1, S, L).softmax(-1)
    rollout_rows(d2)
    R = torch.eye(L)
    for layer in range(nL):
        A = torch.eye(L)
        for s in range(2):
            r = d2.rows[0, s]
            A[r] = 0.5 * d2.attn_rows[layer, 0, s] + 0.5 * torch.eye(L)[r]
        R = A @ R
    assert torch.allclose(d2.importance[0], R.sum(0), atol=1e-6)


def test_dedupe_and_nucleus():
    rows = torch.tensor([[3, 5, 3, 7, 5]])
    assert dedupe(rows, torch.ones(1, 5, dtype=torch.bool), 10).tolist() == [[True, True, False, True, False]]
    assert dedupe(rows, torch.tensor([[False, True, True, True, True]]), 10).tolist() == \
        [[False, True, True, True, False]]
    keep = nucleus(torch.tensor([[4.0, 2.0, 1.0, 1.0]]), torch.tensor([[8.0]]), 0.75)
    assert keep.tolist() == [[True, True, False, False]]        # shares .5, .75 <= .75; .875 > .75
    assert nucleus(torch.tensor([[9.0, 1.0]]), torch.tensor([[10.0]]), 0.1).tolist() == [[True, False]]
    assert row_mask(torch.tensor([[2, 2, 0]]), torch.tensor([[True, False, False]]), 4).tolist() == \
        [[False, False, True, False]]


def _state(eng, policy, prompt, G=16, block=None):
    cfg = eng.cfg
    dc = DecodeConfig.make(cfg.family)
    shape = RequestShape(1, len(prompt), G, block or G, G)
    st = StepState.allocate(cfg, shape, dc.structure, "cpu")
    cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
    d2 = D2Buffers.allocate(cfg, shape, policy.k, policy.sigma, policy.attn_budget, st.kmax, "cpu")
    st.fill(cfg, [prompt], seed=0)
    return st, cache, d2


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_selected_step_writes_only_its_rows(engines, family):
    eng = engines[family]
    pol = D2Cache(k=3, attn_budget=2)
    st, cache, d2 = _state(eng, pol, PROMPTS[0])
    with torch.inference_mode():
        d2_full(eng.weights, eng.cfg, st, cache, d2, False)
        changed = False
        for _ in range(3):
            before = {n: t.clone() for n, t in cache.tensors().items()}
            d2_selected(eng.weights, eng.cfg, st, cache, d2, None, False)
            chosen = row_mask(d2.rows, d2.valid, st.shape.length)[0]          # [L]
            assert 1 <= int(chosen.sum()) <= d2.row_budget == 3 + st.kmax + 2
            for name in ("k", "v"):                                           # [nL, B, Hkv, L, hd]
                assert torch.equal(cache.tensors()[name][:, :, :, ~chosen], before[name][:, :, :, ~chosen])
                changed |= not torch.equal(cache.tensors()[name][:, :, :, chosen], before[name][:, :, :, chosen])
            for name in ("a", "m"):                                           # [nL, B, L, d]
                assert torch.equal(cache.tensors()[name][:, :, ~chosen], before[name][:, :, ~chosen])
        assert changed              # the chosen rows were really recomputed once the canvas changed


@pytest.mark.parametrize("family,shift", [("llada", 0), ("dream", 1)])
def test_stage_one_recomputes_the_decoding_row(engines, family, shift):
    # one masked row is far more certain than the rest: stage 1 picks it, and for Dream (row j-1
    # predicts token j) the row recomputed is the one before it
    eng = engines[family]
    pol = D2Cache(k=1, attn_budget=0)
    st, cache, d2 = _state(eng, pol, PROMPTS[1], G=8)
    P = st.shape.prompt_bucket
    d2.conf_all.fill_(0.01)
    d2.conf_all[0, 5] = 0.99
    d2_select(eng.cfg, st, d2, None)
    assert d2.rows[0, 0].item() == P + 5 - shift and d2.valid[0, 0]
    assert not d2.valid[0, 1:].any()                             # no commits yet, no rollout budget


def test_last_commits_and_rollout_fill_the_budget(engines):
    eng = engines["llada"]
    pol = D2Cache(k=2, attn_budget=3)
    st, cache, d2 = _state(eng, pol, PROMPTS[0], G=8)
    with torch.inference_mode():
        d2_full(eng.weights, eng.cfg, st, cache, d2, False)
        committed = st.commit_pos[st.commit_valid].tolist()
        d2_select(eng.cfg, st, d2, None)
    rows = d2.rows[0][d2.valid[0]].tolist()
    assert set(committed) <= set(rows) and len(rows) == len(set(rows)) == 2 + 1 + 3
    masked = (st.tokens[0] == eng.cfg.mask_id).nonzero().flatten().tolist()
    assert len(set(rows[:2]) & set(masked)) == 2                  # stage 1: masked rows
    imp = d2.importance[0].clone()
    imp[rows[:3]] = float("-inf")
    assert set(rows[3:]) == set(imp.topk(3).indices.tolist())     # stage 2: most important of the rest


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_d2_steps_never_sync_the_host(engines, family):
    eng = engines[family]
    pol = D2Cache(k=3, attn_budget=2, attn_p=0.5)
    st, cache, d2 = _state(eng, pol, PROMPTS[0])
    with torch.inference_mode(), NoHostSync():
        d2_full(eng.weights, eng.cfg, st, cache, d2, True)
        d2_selected(eng.weights, eng.cfg, st, cache, d2, pol.attn_p, True)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_compile_matches_eager(tiny_dirs, engines, family):
    comp = Engine.from_pretrained(tiny_dirs[family], backend="compile")
    pol = D2Cache(k=4, attn_budget=3, attn_p=0.5, quasi_l2r=True)
    kw = SETTINGS[family][0]
    for prompt in PROMPTS:
        assert comp.generate(prompt, prompt_bucket=12, policy=pol, **kw).tokens == \
            engines[family].generate(prompt, prompt_bucket=12, policy=pol, **kw).tokens


def _commit_distances(eng, prompt, quasi):
    """Distance of each step's commit to the nearest known position (prompt side counts as known)."""
    pol = D2Cache(k=16, attn_budget=0, sigma=1.0, quasi_l2r=quasi)
    st, cache, d2 = _state(eng, pol, prompt, G=16)
    P, dist = st.shape.prompt_bucket, []
    with torch.inference_mode():
        for i in range(16):
            known = (st.tokens[0, P:] != eng.cfg.mask_id).tolist()
            if i == 0:
                d2_full(eng.weights, eng.cfg, st, cache, d2, quasi)
            else:
                d2_selected(eng.weights, eng.cfg, st, cache, d2, None, quasi)
            new = [j for j, k in enumerate((st.tokens[0, P:] != eng.cfg.mask_id).tolist()) if k and not known[j]]
            for j in new:
                dist.append(min([j + 1] + [abs(j - q) for q, k in enumerate(known) if k]))
    return dist


def test_quasi_l2r_decodes_near_the_frontier(engines):
    # sigma 1: the density prior makes each commit land next to decoded text (or the prompt)
    eng = engines["llada"]
    for prompt in PROMPTS:
        near, free = _commit_distances(eng, prompt, True), _commit_distances(eng, prompt, False)
        assert len(near) == len(free) == 16
        assert max(near) == 1 and sum(near) < sum(free)


@pytest.mark.parametrize("params,msg", [(dict(k=0), "k must be an integer >= 1"),
                                        (dict(attn_budget=-1), "attn_budget must be an integer >= 0"),
                                        (dict(sigma=0), "sigma .* must be > 0"),
                                        (dict(attn_p=0.0), r"attn_p must be in \(0, 1\]")])
def test_invalid_parameters(params, msg):
    with pytest.raises(RequestError, match=msg):
        make_policy("d2cache", **params)


def test_origin_is_refused(engines):
    with pytest.raises(RequestError, match="fixed commit count"):
        engines["dream"].generate([5, 6], gen_length=8, steps=8, alg="origin", policy=D2Cache())


def test_cli_flags(capsys, tiny_dirs, engines):
    from dllm.apps.main import main
    rc = main(["generate", "--model", str(tiny_dirs["dream"]), "--prompt-ids", "5,6,7", "--gen-length", "16",
               "--steps", "16", "--policy", "d2cache", "--k", "4", "--sigma", "5", "--attn-budget", "3",
               "--attn-p", "0.2", "--quasi-l2r", "--backend", "eager", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["step_kinds"] == {"full": 1, "selected": 15}
    pol = D2Cache(k=4, sigma=5.0, attn_budget=3, attn_p=0.2, quasi_l2r=True)
    assert obj["tokens"] == engines["dream"].generate([5, 6, 7], gen_length=16, steps=16, policy=pol).tokens


# ---------------------------------------------------------------- issue 23: blocks shorter than the response

def test_certainty_window_size():
    # the block, then ceil(k / block) blocks: the k-th remaining mask lies inside whether or not the step
    # finishes its block; capped at G (one block: the block itself)
    assert D2Buffers.window_rows(RequestShape(1, 4, 32, 8, 32), 4) == 16
    assert D2Buffers.window_rows(RequestShape(1, 4, 32, 8, 32), 12) == 24
    assert D2Buffers.window_rows(RequestShape(1, 4, 32, 8, 32), 64) == 32
    assert D2Buffers.window_rows(RequestShape(1, 4, 256, 32, 256), 32) == 64
    assert D2Buffers.window_rows(RequestShape(1, 4, 256, 256, 256), 32) == 256


def test_search_window_by_hand():
    # G 12, block 4, k 3: masks at 1, 5, 6, 9, 10 -> the 3rd is at 6 (block 1): candidates from the block
    # start to 7; with k 5 the 5th is at 10 (block 2): to 11; with fewer masks than k: to the end
    _, d2 = _d2(12, 1.0)
    masked = torch.zeros(1, 12, dtype=torch.bool)
    masked[0, [1, 5, 6, 9, 10]] = True
    for k, start, want in ((3, 0, range(0, 8)), (3, 4, range(4, 8)), (5, 0, range(0, 12)), (9, 4, range(4, 12))):
        d2.k = k
        got = search_window(d2, masked, torch.tensor([start]), 4)[0].nonzero().flatten().tolist()
        assert got == list(want), (k, start, got)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_full_step_gives_a_certainty_to_every_window_row(engines, family):
    # after step 1 every row of the window (block 0 and the ceil(k / block) blocks after it) holds p(x0)
    # of a whole-canvas forward, not only the block's rows
    eng = engines[family]
    pol = D2Cache(k=6, attn_budget=2)
    st, cache, d2 = _state(eng, pol, PROMPTS[0], G=24, block=4)
    P = st.shape.prompt_bucket
    with torch.inference_mode():
        logits = forward(eng.weights, eng.cfg, st.tokens.clone())[0].float()
        logits[:, eng.cfg.mask_id] = float("-inf")
        d2_full(eng.weights, eng.cfg, st, cache, d2, False)
    shift = 1 if eng.cfg.shift_logits else 0
    p0 = logits[P - shift:P - shift + 24].double().softmax(-1).amax(-1).float()
    W = D2Buffers.window_rows(st.shape, 6)
    assert W == 12
    assert torch.allclose(d2.conf_all[0, :W], p0[:W], atol=1e-6)
    assert (d2.conf_all[0, W:] == 1.0).all()                     # never read before a later step writes them


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_d2_steps_with_blocks_never_sync_the_host(engines, family):
    eng = engines[family]
    pol = D2Cache(k=5, attn_budget=2, attn_p=0.5)
    st, cache, d2 = _state(eng, pol, PROMPTS[0], G=16, block=4)
    with torch.inference_mode(), NoHostSync():
        d2_full(eng.weights, eng.cfg, st, cache, d2, True)
        for _ in range(5):
            d2_selected(eng.weights, eng.cfg, st, cache, d2, pol.attn_p, True)
