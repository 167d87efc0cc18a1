"""Issue 17: the dual cache and threshold decoding give Fast-dLLM's tokens on a confident model.

Fast-dLLM's LLaDA samplers (`generate` and `generate_with_dual_cache`, with the commit rule of
`get_transfer_index`) are transcribed below as plain PyTorch loops over the layer functions of
`dllm.models.layers`. Only the network math is shared with the runtime; the caching (Fast-dLLM keeps
pre-RoPE K/V of every position from the block start and overwrites the block's entries in place each
step) and the decoding (top-k schedule, threshold rule, stopping) are written here from the
reference's description, independently of runtime/steps.py and runtime/policy/.

The checkpoints are the tiny LLaDA of `models/tiny.py` with the LM head scaled up (x4, x16, x64) in
the on-disk file, so p(x0) spans the whole range: below 0.5, between the thresholds, within 1e-8 of
1 and exactly 1.0 in float64. Threshold decoding then commits many rows per step.

Tokens and step counts (`Generation.steps` = Fast-dLLM's nfe) must be equal. Where the reference's
commit depends on torch.topk's order among exactly equal confidences (p(x0) = 1.0 in float64 on the
x64 checkpoint, top-k schedule), that order is unspecified, so the transcription checks that the
runtime's rows are one valid choice and continues with them. The transcription also ranks every step
in float32 and counts the cases whose output that changes; for those, the runtime with
confidence_dtype="logits" must equal the float32 transcription.

One deliberate difference from the reference: the mask token is never a candidate (its logit is -inf
before the argmax and the softmax), as in the runtime; the reference may commit it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.models.layers import (
    apply_rope,
    attention,
    attn_out,
    ffn,
    head,
    heads,
    positions_and_mask,
    project,
    rms_norm,
    rope_tables,
)
from dllm.models.tiny import write_tiny
from dllm.runtime import DualCache, Engine, NoCache
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.state import RequestShape, StepState
from dllm.runtime.steps import commit

HEAD = "model.transformer.ff_out.weight"          # LLaDA's untied LM head, on disk
SCALES = {4: 31, 16: 12, 64: 13}                  # head scale -> seed of the tiny checkpoint
PROMPT_LENGTHS = (3, 7, 12, 20)
SHAPES = [(16, 4), (16, 8), (16, 16), (32, 4), (32, 8), (32, 16)]   # (gen_length, block_length)
THRESHOLDS = (0.5, 0.9, 1.0)


# ---------------------------------------------------------------- checkpoints

def write_confident(folder, seed: int, scale: float):
    """A tiny LLaDA checkpoint in the real format whose LM head is multiplied by `scale` on disk."""
    write_tiny(folder, "llada", seed=seed, tokenizer=False)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors[HEAD] = (tensors[HEAD] * scale).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's ops are too small to split: on shared cores a second intra-op thread only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def confident(tmp_path_factory):
    root = tmp_path_factory.mktemp("confident")
    return {s: Engine.from_pretrained(write_confident(root / f"x{s}", seed, s), backend="eager")
            for s, seed in SCALES.items()}


def prompts_for(cfg, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in PROMPT_LENGTHS:
        ids = torch.randint(0, cfg.vocab_size - 1, (n,), generator=g)
        ids = ids + (ids >= cfg.mask_id).long()                # [0, vocab) without the mask id
        out.append(ids.tolist())
    return out


# ---------------------------------------------------------------- the transcription

def _keys_ok(L: int) -> torch.Tensor:
    """Batch 1, no padding: every key is real (the reference calls SDPA without a mask)."""
    return positions_and_mask(torch.zeros(1, L, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))[1]


def _rope(cfg, lo: int, hi: int):
    return rope_tables(torch.arange(lo, hi)[None], cfg)


def _qkv(w, cfg, i, h):
    """Residual rows h [1, S, d] of layer i -> pre-RoPE q [1, H, S, hd], k and v [1, Hkv, S, hd]."""
    y = project(w, cfg, i, rms_norm(h, w.attn_norm[i], cfg.norm_eps))
    q = heads(y[..., :cfg.q_width], cfg.n_heads, cfg.head_dim)
    k = heads(y[..., cfg.q_width:cfg.q_width + cfg.kv_width], cfg.n_kv_heads, cfg.head_dim)
    v = heads(y[..., cfg.q_width + cfg.kv_width:], cfg.n_kv_heads, cfg.head_dim)
    return q, k, v


def model_full(w, cfg, x):
    """model(x, use_cache=True): every position -> (logits [1, L, V], past [(pre-RoPE k, v)] per layer)."""
    L = x.shape[1]
    cos, sin = _rope(cfg, 0, L)
    keys_ok = _keys_ok(L)
    h = w.embed[x]
    past = []
    for i in range(cfg.n_layers):
        q, k, v = _qkv(w, cfg, i, h)
        past.append((k.clone(), v.clone()))
        q, k = apply_rope(q, cos, sin, cfg.rope_fp32), apply_rope(k, cos, sin, cfg.rope_fp32)
        h = h + attn_out(w, i, attention(q, k, v, keys_ok, cfg.n_heads != cfg.n_kv_heads))
        h = h + ffn(w, cfg, i, h)
    return head(w, cfg, h), past


def model_dual(w, cfg, x, s: int, e: int, past):
    """model(x[:, s:e], past_key_values=past, replace_position=[s, e)): only the block's rows are
    computed; their fresh K/V overwrite positions s..e of the cached (block-start) K/V in place, and
    they attend to the cached prefix, themselves and the cached suffix -> logits [1, e - s, V]."""
    L = x.shape[1]
    cos_q, sin_q = _rope(cfg, s, e)                    # queries at e - q_len .. e
    cos_k, sin_k = _rope(cfg, 0, L)
    keys_ok = _keys_ok(L)
    h = w.embed[x[:, s:e]]
    for i in range(cfg.n_layers):
        q, k, v = _qkv(w, cfg, i, h)
        pk, pv = past[i]
        pk[:, :, s:e] = k
        pv[:, :, s:e] = v
        q, kk = apply_rope(q, cos_q, sin_q, cfg.rope_fp32), apply_rope(pk, cos_k, sin_k, cfg.rope_fp32)
        h = h + attn_out(w, i, attention(q, kk, pv, keys_ok, cfg.n_heads != cfg.n_kv_heads))
        h = h + ffn(w, cfg, i, h)
    return head(w, cfg, h)


def num_transfer_tokens(n_mask: int, steps: int) -> list[int]:
    """get_num_transfer_tokens: n // steps each, the first n % steps steps one more."""
    return [n_mask // steps + (1 if i < n_mask % steps else 0) for i in range(steps)]


@dataclass
class Trace:
    """What one transcribed run did. follow: the runtime's committed canvas positions per forward; at a
    forward whose commit the reference leaves to torch.topk's order among exactly equal confidences,
    the transcription checks that the runtime's rows are one valid choice and goes on with them."""
    follow: list[set[int]] | None = None
    per_step: list[int] = field(default_factory=list)   # tokens committed at each forward
    ties: int = 0                                       # forwards decided by an exact tie
    fp32_steps: int = 0                                 # forwards where float32 ranking commits other rows


def _select(confidence, mask_index, k, threshold):
    """The commit rule on confidences [1, n]: top-k, or under a threshold the best masked row plus
    every other masked row whose confidence >= threshold."""
    if threshold is not None:
        k = int(mask_index.sum())
    transfer = torch.zeros_like(mask_index)
    _, select = torch.topk(confidence[0], k=k)
    transfer[0, select] = True
    if threshold is not None:
        for j in range(1, k):
            if confidence[0, select[j]] < threshold:
                transfer[0, select[j]] = False
    return transfer


def _tied(confidence, mask_index, k, threshold) -> bool:
    """Does the rule's outcome depend on the order of exactly equal confidences?"""
    c = confidence[mask_index].sort(descending=True).values.tolist()
    if threshold is not None:
        return len(c) > 1 and c[0] == c[1] and c[0] < threshold
    return 0 < k < len(c) and c[k - 1] == c[k]


def _valid(confidence, mask_index, k, threshold, take) -> bool:
    """Is `take` [1, n] one of the outcomes the rule allows under some order of equal confidences?"""
    if (take & ~mask_index).any():
        return False
    best = confidence[mask_index].max()
    if threshold is not None:
        above = mask_index & (confidence >= threshold)
        return torch.equal(take, above) if above.any() else int(take.sum()) == 1 and confidence[take].item() == best
    rest = confidence[mask_index & ~take]
    return int(take.sum()) == k and (rest.numel() == 0 or confidence[take].min() >= rest.max())


def transfer_index(cfg, logits, mask_index, x, k, threshold, cdtype, trace: Trace, offset: int):
    """get_transfer_index at temperature 0, low_confidence -> (x0, transfer [1, n] bool). Confidence is
    the softmax probability of the argmax token in cdtype (float64 in Fast-dLLM), -inf at rows outside
    mask_index. logits [1, n, V] for canvas positions offset..offset+n; mask_index [1, n] (False
    outside the block); k: the top-k count (None under a threshold). The trace also counts the forwards
    where float32 ranking would commit other rows than float64 ranking."""
    logits = logits.clone()
    logits[..., cfg.mask_id] = float("-inf")            # deliberate: the mask token is never committed
    x0 = logits.argmax(-1)
    conf, chosen = {}, {}
    for dt in (torch.float64, torch.float32):
        x0_p = logits.to(dt).softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
        conf[dt] = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=dt))
        chosen[dt] = _select(conf[dt], mask_index, k, threshold)
    x0 = torch.where(mask_index, x0, x)
    transfer = chosen[cdtype]
    n = len(trace.per_step)
    if trace.follow is not None and n < len(trace.follow) and _tied(conf[cdtype], mask_index, k, threshold):
        theirs = torch.zeros_like(mask_index)
        rows = [pos - offset for pos in trace.follow[n]]
        assert all(0 <= r < theirs.shape[1] for r in rows), f"forward {n}: runtime commits outside the rows"
        theirs[0, rows] = True
        assert _valid(conf[cdtype], mask_index, k, threshold, theirs), \
            f"forward {n}: the runtime committed {sorted(trace.follow[n])}, not a valid choice among the tied rows"
        transfer = theirs
        trace.ties += 1
    trace.per_step.append(int(transfer.sum()))
    trace.fp32_steps += not torch.equal(chosen[torch.float64], chosen[torch.float32])
    return x0, transfer


def _canvas(cfg, prompt, gen_length):
    x = torch.full((1, len(prompt) + gen_length), cfg.mask_id, dtype=torch.int64)
    x[0, :len(prompt)] = torch.tensor(prompt)
    return x


def fd_generate(cfg, w, prompt, steps, gen_length, block_length, threshold=None, cdtype=torch.float64,
                follow=None):
    """Fast-dLLM `generate` (no cache) -> (response ids, nfe, trace)."""
    P, x = len(prompt), _canvas(cfg, prompt, gen_length)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps //= num_blocks
    nfe, trace = 0, Trace(follow)
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        schedule = num_transfer_tokens(int((x[:, s:e] == cfg.mask_id).sum()), steps)
        i = 0
        while True:
            nfe += 1
            mask_index = x == cfg.mask_id
            logits, _ = model_full(w, cfg, x)
            mask_index[:, e:] = False
            x0, transfer = transfer_index(cfg, logits, mask_index, x, None if threshold is not None else schedule[i],
                                          threshold, cdtype, trace, 0)
            x[transfer] = x0[transfer]
            i += 1
            if int((x[:, s:e] == cfg.mask_id).sum()) == 0:
                break
    return x[0, P:].tolist(), nfe, trace


def fd_generate_with_dual_cache(cfg, w, prompt, steps, gen_length, block_length, threshold=None,
                                cdtype=torch.float64, follow=None):
    """Fast-dLLM `generate_with_dual_cache` -> (response ids, nfe, trace)."""
    P, x = len(prompt), _canvas(cfg, prompt, gen_length)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps //= num_blocks
    nfe, trace = 0, Trace(follow)
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        schedule = num_transfer_tokens(int((x[:, s:e] == cfg.mask_id).sum()), steps)
        logits, past = model_full(w, cfg, x)               # cache init: K/V of every position
        mask_index = x == cfg.mask_id
        mask_index[:, e:] = False
        x0, transfer = transfer_index(cfg, logits, mask_index, x, None if threshold is not None else schedule[0],
                                      threshold, cdtype, trace, 0)
        x[transfer] = x0[transfer]
        nfe += 1
        i = 1
        while True:
            if int((x[:, s:e] == cfg.mask_id).sum()) == 0:
                break
            nfe += 1
            mask_index = x[:, s:e] == cfg.mask_id
            logits = model_dual(w, cfg, x, s, e, past)
            x0, transfer = transfer_index(cfg, logits, mask_index, x[:, s:e],
                                          None if threshold is not None else schedule[i], threshold, cdtype,
                                          trace, s)
            blk = x[:, s:e]
            blk[transfer] = x0[transfer]
            i += 1
    return x[0, P:].tolist(), nfe, trace


SAMPLERS = {"none": (fd_generate, NoCache()), "dual-cache": (fd_generate_with_dual_cache, DualCache())}


# ---------------------------------------------------------------- the comparison

def grid(scale: int, prompts):
    """(prompt, gen, block, steps, threshold) for one checkpoint: every shape with one of the prompts
    (rotating over the lengths), the top-k schedule at one step per block and at three per block
    (remainders on the first steps; one token per step too for gen 16), and each threshold (which
    ignores steps; the eval scripts pass one step per block)."""
    for n, (gen, block) in enumerate(SHAPES):
        prompt = prompts[(n + scale) % len(prompts)]
        nb = gen // block
        for steps in sorted({nb, 3 * nb} | ({gen} if gen == 16 else set())):
            yield prompt, gen, block, steps, None
        for tau in THRESHOLDS:
            yield prompt, gen, block, nb, tau


def run_runtime(eng, prompt, gen, block, steps, tau, policy, confidence_dtype="float64"):
    """Engine.generate -> (Generation, the canvas positions committed at each step)."""
    P, follow = len(prompt), []
    out = eng.generate(prompt, gen_length=gen, steps=steps, block_length=block, threshold=tau, policy=policy,
                       confidence_dtype=confidence_dtype,
                       on_step=lambda ev: follow.append({P + j for j in ev.committed[0]}))
    return out, follow


def compare(eng, scale):
    """Every grid case through the runtime and the transcription -> (counts, differing cases)."""
    cfg, w = eng.cfg, eng.weights
    stats = dict(cases=0, threshold_cases=0, threshold_multi=0, max_per_step=0, max_per_threshold_step=0, ties=0,
                 fp32_steps=0, fp32_differs=0)
    bad = []
    with torch.inference_mode():
        for prompt, gen, block, steps, tau in grid(scale, prompts_for(cfg, seed=scale)):
            for name, (sampler, policy) in SAMPLERS.items():
                case = (name, len(prompt), gen, block, steps, tau)
                got, follow = run_runtime(eng, prompt, gen, block, steps, tau, policy)
                ref, nfe, trace = sampler(cfg, w, prompt, steps, gen, block, tau, follow=follow)
                if got.tokens[0] != ref or got.steps != nfe:
                    bad.append((case, got.steps, nfe))
                assert cfg.mask_id not in ref and sum(trace.per_step) == gen and len(trace.per_step) == nfe
                most = max(trace.per_step)
                stats["cases"] += 1
                stats["max_per_step"] = max(stats["max_per_step"], most)
                if tau is not None:
                    stats["threshold_cases"] += 1
                    stats["threshold_multi"] += most > 1
                    stats["max_per_threshold_step"] = max(stats["max_per_threshold_step"], most)
                stats["ties"] += trace.ties > 0
                if trace.fp32_steps:      # float32 ranking commits other rows somewhere: does the output change?
                    stats["fp32_steps"] += 1
                    ref32, nfe32, _ = sampler(cfg, w, prompt, steps, gen, block, tau, torch.float32)
                    if (ref32, nfe32) != (ref, nfe):
                        stats["fp32_differs"] += 1
                        # the runtime ranking in the logits' dtype (fp32 here) follows the fp32 rule
                        got32, follow32 = run_runtime(eng, prompt, gen, block, steps, tau, policy, "logits")
                        ref32, nfe32, _ = sampler(cfg, w, prompt, steps, gen, block, tau, torch.float32,
                                                  follow=follow32)
                        if got32.tokens[0] != ref32 or got32.steps != nfe32:
                            bad.append((case + ("logits",), got32.steps, nfe32))
    return stats, bad


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_runtime_equals_fastdllm_transcription(confident, scale):
    stats, bad = compare(confident[scale], scale)
    print(f"\nhead x{scale}: {stats}")
    assert not bad, f"{len(bad)} of {stats['cases']} cases differ (case, runtime steps, reference nfe): {bad[:5]}"
    assert stats["threshold_multi"] > stats["threshold_cases"] // 4    # threshold decoding does decode in parallel
    if scale == max(SCALES):
        assert stats["fp32_differs"] > 0     # the most confident checkpoint tells the two rankings apart


def test_confidences_span_the_whole_range(confident):
    """p(x0) in float64 on the block-start canvases of the checkpoints: below 0.5, between the
    thresholds, above 0.9, within 1e-8 of 1 and exactly 1.0 all occur."""
    seen = torch.zeros(5, dtype=torch.int64)
    edges = torch.tensor([0.5, 0.9, 1 - 1e-8, 1.0], dtype=torch.float64)
    with torch.inference_mode():
        for scale, eng in confident.items():
            cfg = eng.cfg
            for prompt in prompts_for(cfg, seed=scale):
                logits, _ = model_full(eng.weights, cfg, _canvas(cfg, prompt, 32))
                logits[..., cfg.mask_id] = float("-inf")
                p = logits[0, len(prompt):].double().softmax(-1).amax(-1)
                seen += torch.bucketize(p, edges, right=True).bincount(minlength=5)
    assert (seen > 0).all(), f"p(x0) per range [<0.5, <0.9, <1-1e-8, <1, ==1]: {seen.tolist()}"


# ---------------------------------------------------------------- the commit rule on constructed logits

def constructed(cfg, rows):
    """rows [(token, [gaps of the competitors])] -> logits [1, n, V] fp32: the token at 0, one competitor
    per gap at -gap, everything else at -1000 (exp underflows to 0 in both precisions)."""
    raw = torch.full((1, len(rows), cfg.vocab_size), -1000.0)
    for r, (tok, gaps) in enumerate(rows):
        assert tok != cfg.mask_id
        raw[0, r, tok] = 0.0
        others = [t for t in range(cfg.vocab_size) if t not in (tok, cfg.mask_id)]
        for j, gap in enumerate(gaps):
            raw[0, r, others[j]] = -gap
    return raw


def runtime_commit(cfg, raw, steps, threshold, confidence_dtype) -> set[int]:
    """One runtime commit (dllm.runtime.steps.commit) of raw as the first block's logits -> block rows committed."""
    prompt, Bl = [5, 6, 7], raw.shape[1]
    dc = DecodeConfig.make("llada", threshold=threshold, confidence_dtype=confidence_dtype)
    st = StepState.allocate(cfg, RequestShape(1, len(prompt), Bl, Bl, steps), dc.structure, "cpu")
    st.write_values(dc.values)
    st.fill(cfg, [prompt], seed=0)
    with torch.inference_mode():
        commit(cfg, st, raw.clone())
    block = st.tokens[0, len(prompt):]
    done = {r for r in range(Bl) if block[r] != cfg.mask_id}
    assert all(block[r] == raw[0, r].argmax() for r in done)
    return done


def reference_commit(cfg, raw, k, threshold, cdtype) -> set[int]:
    mask_index = torch.ones(1, raw.shape[1], dtype=torch.bool)
    x = torch.full((1, raw.shape[1]), cfg.mask_id)
    _, transfer = transfer_index(cfg, raw, mask_index, x, k, threshold, cdtype, Trace(), 0)
    return set(transfer[0].nonzero().flatten().tolist())


def test_float64_ranking_of_two_rows_within_1e8_of_one(confident):
    cfg = confident[min(SCALES)].cfg
    # row 0: p = 1 - 5e-9, row 1: p = 1 - 1e-9; float32 rounds both to exactly 1.0 (a tie its
    # ranking breaks to row 0, the first maximum), float64 ranks row 1 first
    raw = constructed(cfg, [(10, [-math.log(5e-9)]), (20, [-math.log(1e-9)]), (30, [0.4, 0.9]), (40, [0.2])])
    p64, p32 = raw.double().softmax(-1).amax(-1)[0], raw.softmax(-1).amax(-1)[0]
    assert 1 - 1e-8 < p64[0] < p64[1] < 1 and p32[0] == p32[1] == 1.0
    assert int(p64.argmax()) == 1 and int(p32.argmax()) == 0
    # top-k, one token per step: the runtime commits the float64 choice, as Fast-dLLM
    assert runtime_commit(cfg, raw, 4, None, "float64") == reference_commit(cfg, raw, 1, None, torch.float64) == {1}
    # the threshold's best row too: threshold 1.0 commits only it in float64; ranked in the logits'
    # dtype (fp32) both rows reach 1.0
    assert runtime_commit(cfg, raw, 1, 1.0, "float64") == reference_commit(cfg, raw, None, 1.0, torch.float64) == {1}
    assert runtime_commit(cfg, raw, 1, 1.0, "logits") == reference_commit(cfg, raw, None, 1.0, torch.float32) \
        == {0, 1}
    # a threshold between the two rows: float64 separates them, float32 cannot
    assert runtime_commit(cfg, raw, 1, 1 - 3e-9, "float64") == {1}
    assert runtime_commit(cfg, raw, 1, 1 - 3e-9, "logits") == {0, 1}


def test_threshold_one_commits_only_rows_of_p_exactly_one(confident):
    cfg = confident[min(SCALES)].cfg
    # p in float64: 1 - 1e-12, exactly 1.0 (exp(-40) vanishes next to 1), ~0.57, exactly 1.0, 1 - 2e-16
    raw = constructed(cfg, [(10, [-math.log(1e-12)]), (20, [40.0]), (30, [0.3]), (40, [60.0]), (50, [36.0])])
    p64 = raw.double().softmax(-1).amax(-1)[0]
    assert p64[1] == p64[3] == 1.0 and p64[0] < 1 and p64[4] < 1
    assert runtime_commit(cfg, raw, 1, 1.0, "float64") == reference_commit(cfg, raw, None, 1.0, torch.float64) \
        == {1, 3}
    # fp32 rounds rows 0 and 4 to 1.0 as well
    assert runtime_commit(cfg, raw, 1, 1.0, "logits") == {0, 1, 3, 4}
    # no row at exactly 1.0: only the best one
    raw = constructed(cfg, [(10, [-math.log(1e-12)]), (20, [2.0]), (30, [-math.log(1e-13)])])
    assert runtime_commit(cfg, raw, 1, 1.0, "float64") == reference_commit(cfg, raw, None, 1.0, torch.float64) \
        == {2}
