"""Decoding: schedules pinned to hand-computed values, and the static-shape decode loop against a
literal transcription of the reference samplers (LLaDA generate.py, Dream _sample) at temperature 0."""
import pytest
import torch

from dllm.models.layers import forward
from dllm.runtime import DecodeConfig, RequestError
from dllm.runtime.decoding import choose, commit_counts, dream_block_counts, dream_reveal_probs, llada_block_counts

PROMPTS = [[5, 9, 33, 40, 41], [77, 12], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]

def _choose(dc, logits, noise, unif, raw=None):
    """decoding.choose for a request's options: its structure and its values."""
    return choose(dc.structure, logits, noise, unif, raw, dc.values.sampling)



# ---------------------------------------------------------------- schedules

def test_llada_even_split_remainder_first():
    assert llada_block_counts(10, 4) == [3, 3, 2, 2]
    assert llada_block_counts(32, 32) == [1] * 32
    assert llada_block_counts(8, 3) == [3, 3, 2]
    dc = DecodeConfig.make("llada")
    assert commit_counts(dc, 16, 8, 6) == [3, 3, 2, 3, 3, 2]        # per block, repeated over blocks


def test_dream_linspace_schedule_by_hand():
    # t = linspace(1, 1e-3, 5) = [1, .75025, .5005, .25075, .001]
    # step 0: int(8 * (1 - .75025))    = int(1.998) = 1, 7 left
    # step 1: int(7 * (1 - .5005/.75025)) = int(2.330) = 2, 5 left
    # step 2: int(5 * (1 - .25075/.5005)) = int(2.495) = 2, 3 left; last step: all 3
    assert dream_block_counts(8, 4) == [1, 2, 2, 3]
    # steps == gen commits 0 at step 0, one per step, 2 on the last (reference behaviour)
    c = dream_block_counts(256, 256)
    assert c[0] == 0 and c[-1] == 2 and set(c[1:-1]) == {1} and sum(c) == 256
    c = dream_block_counts(32, 16)
    assert c[0] == 1 and c[-1] == 3 and set(c[1:-1]) == {2}
    assert dream_reveal_probs(4)[-1] == 1.0 and abs(dream_reveal_probs(4)[0] - (1 - 0.75025)) < 1e-6


def test_schedule_option():
    # unset: each family's own; uniform: LLaDA's even split for Dream too (n tokens per step, as the
    # reference d2Cache); timesteps: Dream's linspace schedule for LLaDA too
    assert commit_counts(DecodeConfig.make("dream").structure, 16, 8, 8) == dream_block_counts(8, 4) * 2
    assert commit_counts(DecodeConfig.make("dream", schedule="uniform").structure, 16, 8, 8) == [2] * 8
    assert commit_counts(DecodeConfig.make("dream", schedule="uniform").structure, 16, 8, 6) == [3, 3, 2] * 2
    assert commit_counts(DecodeConfig.make("llada", schedule="timesteps").structure, 16, 8, 8) == [1, 2, 2, 3] * 2
    assert DecodeConfig.make("dream", schedule="timesteps").structure == DecodeConfig.make("dream").structure
    with pytest.raises(RequestError, match="unknown schedule 'even'; choose one of uniform, timesteps"):
        DecodeConfig.make("dream", schedule="even")
    with pytest.raises(RequestError, match="'origin' alg reveals each row .* needs --alg"):
        DecodeConfig.make("dream", alg="origin", schedule="uniform")


def test_dream_commits_per_step_follow_the_schedule(engines):
    eng = engines["dream"]
    for prompt in PROMPTS:
        kw = dict(gen_length=8, steps=4, alg="maskgit_plus")
        assert [len(c) for c in _commits(eng, prompt, schedule="uniform", **kw)] == [2, 2, 2, 2]
        assert [len(c) for c in _commits(eng, prompt, **kw)] == dream_block_counts(8, 4) == [1, 2, 2, 3]


def _commits(eng, prompt, **kw):
    out = []
    eng.generate(prompt, on_step=lambda ev: out.append(ev.committed[0]), **kw)
    return out


@pytest.mark.parametrize("g,b,s,msg", [(10, 4, 4, "not a multiple of block_length"),
                                       (16, 8, 5, "not a multiple of the number of blocks 2"),
                                       (0, 8, 8, ">= 1")])
def test_shape_errors(g, b, s, msg):
    with pytest.raises(RequestError, match=msg):
        commit_counts(DecodeConfig.make("llada"), g, b, s)


# ---------------------------------------------------------------- reference loops (whole canvas, host loops)

def ref_llada(eng, prompt, G, steps, Bl):
    w, cfg = eng.weights, eng.cfg
    P = len(prompt)
    x = torch.full((1, P + G), cfg.mask_id)
    x[0, :P] = torch.tensor(prompt)
    nb = G // Bl
    spb = steps // nb
    for b in range(nb):
        n = int((x[0, P + b * Bl:P + (b + 1) * Bl] == cfg.mask_id).sum())
        ntt = [n // spb + (i < n % spb) for i in range(spb)]
        for i in range(spb):
            mi = x == cfg.mask_id
            logits = forward(w, cfg, x).float()
            logits[..., cfg.mask_id] = float("-inf")                     # ours never commits the mask id
            x0 = logits.argmax(-1)
            p = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, P + (b + 1) * Bl:] = float("-inf")
            x0 = torch.where(mi, x0, x)
            conf = torch.where(mi, p, torch.tensor(float("-inf")))
            sel = conf[0].topk(ntt[i]).indices
            x[0, sel] = x0[0, sel]
    return x[0, P:].tolist()


def ref_dream(eng, prompt, G, steps, alg):
    w, cfg = eng.weights, eng.cfg
    x = torch.cat([torch.tensor(prompt), torch.full((G,), cfg.mask_id)])[None]
    ts = torch.linspace(1, 1e-3, steps + 1)
    for i in range(steps):
        mi = x == cfg.mask_id
        logits = forward(w, cfg, x).float()
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)       # row j-1 predicts token j
        logits[..., cfg.mask_id] = float("-inf")                         # ours never commits the mask id
        probs = logits[mi].softmax(-1)
        conf, x0 = probs.max(-1)
        if alg == "topk_margin":
            sp = probs.sort(-1, descending=True).values
            conf = sp[:, 0] - sp[:, 1]
        elif alg == "entropy":
            conf = (probs * (probs + 1e-10).log()).sum(-1)
        num_mask = mi.sum() / mi.shape[0]
        k = int(num_mask * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(num_mask)
        full_conf = torch.full(x.shape, float("-inf"))
        full_conf[mi] = conf
        cand = torch.full_like(x, cfg.mask_id)
        cand[mi] = x0
        if k > 0:
            sel = full_conf[0].topk(k).indices
            x[0, sel] = cand[0, sel]
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("G,steps,Bl", [(16, 16, 16), (16, 8, 4), (24, 12, 8)])
def test_llada_matches_reference_loop(engines, G, steps, Bl):
    eng = engines["llada"]
    for prompt in PROMPTS:
        out = eng.generate(prompt, gen_length=G, steps=steps, block_length=Bl)
        assert out.tokens[0] == ref_llada(eng, prompt, G, steps, Bl)
        assert eng.cfg.mask_id not in out.tokens[0]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("G,steps", [(16, 16), (16, 8), (12, 5)])
def test_dream_matches_reference_loop(engines, alg, G, steps):
    eng = engines["dream"]
    for prompt in PROMPTS:
        out = eng.generate(prompt, gen_length=G, steps=steps, alg=alg)
        assert out.tokens[0] == ref_dream(eng, prompt, G, steps, alg)
        assert eng.cfg.mask_id not in out.tokens[0]


# ---------------------------------------------------------------- buckets and batches

@pytest.mark.parametrize("family", ["llada", "dream"])
def test_same_tokens_in_two_buckets(engines, family):
    eng = engines[family]
    kw = dict(gen_length=16, steps=16, block_length=8 if family == "llada" else 16)
    for prompt in PROMPTS:
        a = eng.generate(prompt, **kw)
        b = eng.generate(prompt, prompt_bucket=len(prompt) + 9, **kw)
        c = eng.generate(prompt, prompt_bucket=32, **kw)
        assert a.tokens == b.tokens == c.tokens


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_batch_equals_single_runs(engines, family):
    eng = engines[family]
    kw = dict(gen_length=16, steps=8, block_length=8 if family == "llada" else 16)
    batch = eng.generate(PROMPTS, **kw)
    assert batch.tokens == [eng.generate(p, **kw).tokens[0] for p in PROMPTS]


def test_prompt_longer_than_bucket(engines):
    with pytest.raises(RequestError, match="prompt has 5 tokens but the prompt bucket holds 4"):
        engines["llada"].generate(PROMPTS[0], gen_length=8, steps=8, prompt_bucket=4)


def test_prompt_and_response_beyond_max_length(engines):
    with pytest.raises(RequestError, match="maximum sequence length 4096"):
        engines["dream"].generate([5], gen_length=4096, steps=4096)


@pytest.mark.parametrize("prompt,msg", [([5, 200], "outside the vocabulary"), ([5, 2], "is the mask id"),
                                        ([], "prompt must be"), ([[5], []], "prompt 1 is empty")])
def test_bad_prompt_ids(engines, prompt, msg):
    with pytest.raises(RequestError, match=msg):
        engines["llada"].generate(prompt, gen_length=8, steps=8)


def test_options_of_the_other_family(engines):
    with pytest.raises(RequestError, match="Dream option"):
        engines["llada"].generate([5], gen_length=8, steps=8, alg="entropy")
    with pytest.raises(RequestError, match="LLaDA option"):
        engines["dream"].generate([5], gen_length=8, steps=8, remasking="random")
    with pytest.raises(RequestError, match="top_p must be"):
        engines["dream"].generate([5], gen_length=8, steps=8, top_p=1.5)


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("family,kw", [
    ("llada", dict(temperature=0.7)), ("llada", dict(remasking="random")),
    ("llada", dict(remasking="random", temperature=1.0)),
    ("dream", dict(temperature=0.5, top_p=0.9)), ("dream", dict(temperature=1.0, top_k=5, alg="maskgit_plus")),
    ("dream", dict(alg="origin")), ("dream", dict(alg="origin", temperature=0.3, top_p=0.95))])
def test_sampling_is_seeded_and_complete(engines, family, kw):
    eng = engines[family]
    run = lambda seed: eng.generate(PROMPTS[:2], gen_length=16, steps=16, seed=seed, **kw).tokens  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert a == b                                   # same seed, same tokens
    assert a != c                                   # the seed matters
    assert all(eng.cfg.mask_id not in row for row in a)


def test_gumbel_max_samples_the_softmax():
    # temperature 1: the float64 Gumbel-max choice is a sample from softmax(logits); check frequencies
    dc = DecodeConfig.make("llada", temperature=1.0)
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]).expand(1, 20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 20000, 4, dtype=torch.float64, generator=g)
    x0, _, _ = _choose(dc, logits, noise, None)
    freq = torch.bincount(x0.flatten(), minlength=4).double() / 20000
    expect = logits[0, 0].double().softmax(-1)
    assert (freq - expect).abs().max() < 0.015      # ~3 standard errors at n = 20000


def test_top_p_top_k_filters():
    from dllm.runtime.decoding import _top_k_filter, _top_p_filter
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _top_p_filter(lg, 0.7) > -1e30
    assert kept.tolist() == [[True, True, False, False]]   # 0.5 < 0.7, 0.8 > 0.7: keep the first two
    kept = _top_p_filter(lg, 0.4) > -1e30
    assert kept.tolist() == [[True, False, False, False]]  # always keeps the top token
    kept = _top_k_filter(lg, 3) > -1e30
    assert kept.tolist() == [[True, True, True, False]]
