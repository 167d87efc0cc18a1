"""Issue 23: d2Cache with semi-autoregressive blocks (block < G) gives the reference's tokens and rows.

The reference d2Cache (`d2Cache.on_step_end` with `vanilla_generate`, Kamichanw/d2Cache) is
transcribed below as plain PyTorch over the layer functions of `dllm.models.layers`: a forward that
computes only the rows of a query mask against full-length K/V caches (pre-RoPE, re-rotated every
layer), zero logits for the rows it did not compute, the attention rollout as explicit L x L matrices,
the certainty density as a direct sum over the extended canvas (the reference's FFT convolution computes
the same sum), the stage-1 search window, the block bias `scores.max()`, the top-p nucleus over the
rollout importance, and the commit of n tokens per step among the rows recomputed this step. Only the
network math is shared with the runtime; the selection is written from the reference, independently of
runtime/policy/d2cache.py.

Four reference bugs are fixed in the transcription, as the runtime does (docs/policies.md): the
confidence cache takes the confidence of every row recomputed at a step and still masked (the
reference's update is a no-op, so it freezes at step 1); rows not recomputed cannot be committed (its
restriction is a no-op on a copy); the search window uses the whole block (its `check_can_generate`
shrinks the caller's block mask in place); Dream's last prompt row is OR-ed into the nucleus (the
reference assigns it). For Dream the certainty of position j is taken when row j - 1, whose logits
decode j, was recomputed. As elsewhere, the mask token is never a candidate.

Compared on tiny checkpoints with the LM head scaled up (confident enough that the ranking is not a
coin toss): the rows recomputed at every forward (the first of each new block included), the tokens
and the number of forwards.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.models.layers import apply_rope, attention, attn_out, ffn, head, positions_and_mask, rope_tables
from dllm.models.tiny import PRESETS, write_tiny
from dllm.runtime import D2Cache, Engine
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.policy.d2cache import D2Buffers, d2_full, d2_selected
from dllm.runtime.state import Cache, RequestShape, StepState
from tests.test_fastdllm import _qkv

HEADS = {"llada": "model.transformer.ff_out.weight", "dream": "lm_head.weight"}
VOCAB = 256                      # prompts drawn from 0..249 as in the issue's minimal case


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_confident(folder, family: str, seed: int, scale: float):
    """A tiny checkpoint (vocabulary 256) in the real format whose LM head is multiplied by `scale`."""
    write_tiny(folder, family, dataclasses.replace(PRESETS["tiny"], vocab_size=VOCAB), seed=seed, tokenizer=False)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[HEADS[family]] = (tensors[HEADS[family]] * scale).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2ref")
    return {f: Engine.from_pretrained(write_confident(root / f, f, 0, 4.0), backend="eager")
            for f in ("llada", "dream")}


def prompt_of(cfg, seed: int, n: int = 8) -> list[int]:
    ids = torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.where(ids == cfg.mask_id, ids + 1, ids).tolist()     # never the mask token


# ---------------------------------------------------------------- the transcription

def density(known: torch.Tensor, sigma: float) -> torch.Tensor:
    """certainty_density: known [G] bool -> [G]. The canvas extended to 3G (left: known; right: known
    iff the last token is), a Gaussian of width sigma, normalised by its sum over distances -3G..3G-1."""
    G = known.shape[0]
    ext = torch.cat([torch.ones(G), known.float(), known[-1:].float().expand(G)])      # positions -G .. 2G-1
    i = torch.arange(G, dtype=torch.float32)[:, None]
    j = torch.arange(-G, 2 * G, dtype=torch.float32)[None, :]
    g = lambda d: torch.exp(-d ** 2 / (2 * sigma ** 2))                               # noqa: E731
    return (g(i - j) * ext).sum(1) / g(torch.arange(-3 * G, 3 * G, dtype=torch.float32)).sum()


def nucleus_select(scores: torch.Tensor, p: float, mask: torch.Tensor) -> torch.Tensor:
    """scores [T], candidates mask [T] -> [T] bool: sorted shares whose cumulative sum <= p, at least one."""
    scores = torch.where(mask, scores, torch.zeros_like(scores))
    probs = scores / (scores.sum() + 1e-9)
    sp, order = probs.sort(descending=True)
    keep = sp.cumsum(0) <= p
    keep[0] = True
    keep &= mask[order]
    return torch.zeros_like(mask).scatter(0, order, keep)


class Reference:
    """One request through the transcribed reference: batch 1, no padding, fp32."""

    def __init__(self, cfg, w, prompt, gen, block, n, k, p, sigma, quasi, top_p=None, follow=None):
        self.cfg, self.w = cfg, w
        self.follow, self.ties = follow, 0   # the runtime's commits per forward: taken where the reference's
        # commit is decided by torch.topk's order among exactly equal scores (p(x0) = 1.0 after top-p)
        self.P, self.G, self.block, self.n, self.k, self.p, self.sigma, self.quasi = \
            len(prompt), gen, block, n, k, p, sigma, quasi
        self.top_p = top_p
        self.x = torch.full((len(prompt) + gen,), cfg.mask_id, dtype=torch.int64)
        self.x[:len(prompt)] = torch.tensor(prompt)
        self.kv = None                 # per layer (pre-RoPE k [1, Hkv, T, hd], v)
        self.q_mask = None             # [T] rows the next forward computes (None: all)
        self.conf_cache = None         # [G]
        self.rows = []                 # per forward, the rows it computed

    def forward(self):
        """model(x) under the cache -> (logits [T, V] with zeros at rows not computed, rollout [T, T])."""
        cfg, w, T = self.cfg, self.w, self.x.shape[0]
        rows = torch.arange(T) if self.q_mask is None else self.q_mask.nonzero().flatten()
        self.rows.append(set(rows.tolist()))
        cos, sin = rope_tables(torch.arange(T)[None], cfg)
        keys_ok = positions_and_mask(self.x[None], torch.zeros(1, dtype=torch.int64))[1]
        first = self.kv is None
        if first:
            self.kv = []
        h = w.embed[self.x[rows]][None]                                  # [1, S, d]
        R = torch.eye(T)
        for i in range(cfg.n_layers):
            q, k, v = _qkv(w, cfg, i, h)
            if first:
                self.kv.append((k.clone(), v.clone()))
            else:
                self.kv[i][0][:, :, rows] = k
                self.kv[i][1][:, :, rows] = v
            kc, vc = self.kv[i]
            q = apply_rope(q, cos[:, :, rows], sin[:, :, rows], cfg.rope_fp32)
            kk = apply_rope(kc, cos, sin, cfg.rope_fp32)
            g = cfg.n_heads // cfg.n_kv_heads
            kr = kk.repeat_interleave(g, dim=1) if g > 1 else kk
            probs = ((q @ kr.transpose(-1, -2)) * cfg.head_dim ** -0.5).softmax(-1)   # [1, H, S, T] eager
            eff = torch.eye(T)
            eff[rows] = probs.mean(1)[0]
            res = eff + torch.eye(T)
            R = (res / res.sum(-1, keepdim=True)) @ R
            h = h + attn_out(w, i, attention(q, kk, vc, keys_ok, g > 1))
            h = h + ffn(w, cfg, i, h)
        logits = torch.zeros(T, cfg.vocab_size)
        logits[rows] = head(w, cfg, h)[0]
        return logits, R

    def step(self, b: int) -> None:
        """generate_step + d2Cache.on_step_end for block b."""
        cfg, P, G = self.cfg, self.P, self.G
        logits, R = self.forward()
        computed = torch.ones(P + G, dtype=torch.bool) if self.q_mask is None else self.q_mask
        if cfg.shift_logits:                                             # Dream: row j - 1 decodes j
            logits = torch.cat([logits[:1], logits[:-1]])
            valid = computed[P - 1:-1]
        else:
            valid = computed[P:]
        logits = logits[P:].clone()
        logits[:, cfg.mask_id] = float("-inf")
        if self.top_p is not None:                                       # Dream's top_p_logits
            sl, order = logits.sort(-1, descending=True)
            drop = sl.softmax(-1).cumsum(-1) > self.top_p
            drop[..., 1:] = drop[..., :-1].clone()
            drop[..., 0] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), torch.finfo(logits.dtype).min)
        conf, x0 = logits.softmax(-1).max(-1)                            # maskgit_plus at temperature 0
        remaining = self.x[P:] == cfg.mask_id
        block_mask = torch.zeros(G, dtype=torch.bool)
        block_mask[b * self.block:(b + 1) * self.block] = True
        transfer_ok = remaining & valid                                  # only recomputed rows commit
        confidence = torch.where(transfer_ok, conf, torch.tensor(float("-inf")))
        scores = confidence * density(~remaining, self.sigma) if self.quasi else confidence
        cand = transfer_ok & block_mask
        count = min(self.n, int(cand.sum()))
        ranked = torch.where(cand, scores, torch.tensor(float("-inf")))
        transfer = ranked.topk(count).indices
        order = ranked[cand].sort(descending=True).values
        f = len(self.rows) - 1
        if 0 < count < order.numel() and order[count - 1] == order[count] and self.follow is not None:
            theirs = torch.tensor(sorted(self.follow[f]), dtype=torch.int64) - P
            assert theirs.numel() == count and cand[theirs].all() and ranked[theirs].min() >= order[count - 1], \
                f"forward {f}: the runtime's commit {theirs.tolist()} is not a valid choice among the tied rows"
            transfer, self.ties = theirs, self.ties + 1
        self.x[P + transfer] = x0[transfer]
        # on_step_end
        if self.conf_cache is None:
            self.conf_cache = confidence.clone()
        else:
            upd = valid & remaining
            self.conf_cache[upd] = confidence[upd]
        remaining = self.x[P:] == cfg.mask_id
        meets = remaining.long().cumsum(0) >= self.k
        end = int(meets.long().argmax()) if meets.any() else G - 1
        end = (end // self.block + 1) * self.block - 1
        col = torch.arange(G)
        search = (col >= b * self.block) & (col <= end)
        sc = self.conf_cache * density(~remaining, self.sigma)
        sc[block_mask] += sc.max()
        idx = torch.where(search & remaining, sc, torch.tensor(float("-inf"))).topk(min(self.k, G)).indices
        selected = torch.zeros(G, dtype=torch.bool)
        selected[idx] = True
        selected &= remaining
        resp = torch.cat([selected[1:], torch.zeros(1, dtype=torch.bool)]) if cfg.shift_logits else selected.clone()
        resp[transfer] = True
        q_mask = torch.cat([torch.zeros(P, dtype=torch.bool), resp])
        q_mask |= nucleus_select(R.sum(0), self.p, ~q_mask)
        if cfg.shift_logits:
            q_mask[P - 1] |= selected[0]
        self.q_mask = q_mask

    def run(self) -> tuple[list[int], int]:
        for b in range(self.G // self.block):
            while (self.x[self.P + b * self.block:self.P + (b + 1) * self.block] == self.cfg.mask_id).any():
                self.step(b)
        return self.x[self.P:].tolist(), len(self.rows)


# ---------------------------------------------------------------- the runtime, step by step

def decoding(family: str, top_p=None):
    if family == "dream":
        return dict(alg="maskgit_plus", top_p=top_p, schedule="uniform", confidence_dtype="logits")
    return dict(confidence_dtype="logits")


def runtime_rows(eng, prompt, gen, block, n, pol, top_p=None):
    """The d2Cache step bodies driven one by one -> (response ids, forwards, rows recomputed per forward)."""
    cfg, w = eng.cfg, eng.weights
    opts = decoding(cfg.family, top_p)
    dc = DecodeConfig.make(cfg.family, alg=opts.get("alg"), top_p=top_p, confidence_dtype="logits",
                           schedule=opts.get("schedule"))
    shape = RequestShape(1, len(prompt), gen, block, gen // n)
    st = StepState.allocate(cfg, shape, dc.structure, "cpu")
    st.write_values(dc.values)
    cache = Cache.allocate(cfg, shape, "cpu", torch.float32)
    d2 = D2Buffers.allocate(cfg, shape, pol.k, pol.sigma, pol.attn_budget, st.kmax, "cpu")
    st.fill(cfg, [prompt], seed=0)
    d2.reset()
    rows, commits = [set(range(shape.length))], []
    with torch.inference_mode():
        d2_full(w, cfg, st, cache, d2, pol.quasi_l2r)
        commits.append(set(st.commit_pos[0][st.commit_valid[0]].tolist()))
        for _ in range(shape.steps - 1):
            d2_selected(w, cfg, st, cache, d2, pol.attn_p, pol.quasi_l2r)
            rows.append(set(d2.rows[0][d2.valid[0]].tolist()))
            commits.append(set(st.commit_pos[0][st.commit_valid[0]].tolist()))
    return st.tokens[0, len(prompt):].tolist(), shape.steps, rows, commits


def compare(eng, prompt, gen, block, n, k, p, sigma, quasi, top_p=None):
    """-> (None if the runtime equals the transcription (rows, tokens, forwards), else what differs;
    the forwards whose commit was decided by a tie)."""
    pol = D2Cache(k=k, sigma=sigma, attn_budget=10 ** 4, attn_p=p, quasi_l2r=quasi)
    tokens, forwards, rows, commits = runtime_rows(eng, prompt, gen, block, n, pol, top_p)
    ref = Reference(eng.cfg, eng.weights, prompt, gen, block, n, k, p, sigma, quasi, top_p, follow=commits)
    with torch.inference_mode():
        ref_tokens, ref_forwards = ref.run()
    assert eng.cfg.mask_id not in ref_tokens
    for f, (a, b) in enumerate(zip(rows, ref.rows)):
        if a != b:
            return f"forward {f} (block {f // (block // n)}): runtime rows {sorted(a)}, reference {sorted(b)}", ref.ties
    if (tokens, forwards) != (ref_tokens, ref_forwards):
        return f"tokens {tokens} / {forwards} forwards, reference {ref_tokens} / {ref_forwards}", ref.ties
    got = eng.generate(prompt, gen_length=gen, steps=gen // n, block_length=block, policy=pol,
                       **decoding(eng.cfg.family, top_p))                 # the engine's path gives the same
    if got.tokens[0] != tokens or got.steps != forwards:
        return f"engine tokens {got.tokens[0]} / {got.steps} steps, step bodies {tokens} / {forwards}", ref.ties
    return None, ref.ties


def test_the_issues_minimal_case(models):
    """LLaDA, head x4, the prompt of seed 1, G 32, block 8, k 4, p 0.1, sigma 10, one token per step:
    before the fix stage 1 ranked the rows past the block by density alone and 21 of 32 tokens differed."""
    eng = models["llada"]
    assert compare(eng, prompt_of(eng.cfg, 1), 32, 8, 1, 4, 0.1, 10.0, False) == (None, 0)


CASES = [  # (gen, block, tokens per step, k, p, sigma, quasi)
    (32, 8, 1, 4, 0.1, 10.0, False), (32, 8, 1, 12, 0.2, 4.0, False), (32, 4, 1, 6, 0.1, 10.0, True),
    (32, 8, 2, 16, 0.3, 2.0, False), (32, 16, 1, 8, 0.1, 10.0, True), (16, 4, 1, 4, 0.5, 6.0, False),
    (32, 8, 1, 32, 0.1, 10.0, False), (32, 32, 1, 8, 0.2, 10.0, True),
]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_semi_autoregressive_blocks_equal_the_reference(models, family):
    eng = models[family]
    bad, n_cases, tied = [], 0, 0
    for c, (gen, block, n, k, p, sigma, quasi) in enumerate(CASES):
        for seed in (1, 2):
            n_cases += 1
            why, ties = compare(eng, prompt_of(eng.cfg, 10 * c + seed, 5 + 3 * seed), gen, block, n, k, p, sigma, quasi,
                          0.9 if family == "dream" and seed == 2 else None)
            tied += ties > 0
            if why:
                bad.append(((gen, block, n, k, p, sigma, quasi, seed), why))
    assert not bad, f"{len(bad)} of {n_cases} cases differ: {bad[:3]}"
    assert tied < n_cases // 2          # most cases are decided without following the runtime through a tie
