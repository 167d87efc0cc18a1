"""Step functions: pure tensor code with static shapes (DESIGN.md §4).

A step is: canvas in -> canvas, caches and confidences updated in place. Python branches here are
on configuration (family, decoding options, step kind, budgets), never on tensor values, so every
step kind can be compiled with fullgraph=True and captured as a CUDA graph.

Step kinds (dLLM-Cache, reference/exact_semantics.md), for layers >= 1; layer 0 is always full:
  full              all rows recomputed, every cache written
  response_refresh  response rows recomputed; prompt rows reuse their cached deltas
  partial           V-verify: fresh V of all response rows, the `budget` least similar rows recomputed
  prompt_refresh    prompt rows recomputed, plus the V-verify rows
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dllm.models.checkpoint import Weights
from dllm.models.config import ModelConfig
from dllm.models.layers import apply_rope, attention, attention_probs, attn_out, block, ffn, head, rms_norm

from .buffers import Cache, D2Buffers, StepState
from .decoding import choose
from .selectors import certainty_density, d2_select, rollout_full, rollout_rows, row_mask

STEP_KINDS = ("full", "response_refresh", "partial", "prompt_refresh")


def commit(cfg: ModelConfig, st: StepState, logits: torch.Tensor, fresh: torch.Tensor | None = None,
           prior: torch.Tensor | None = None) -> None:
    """logits [B, Bl, V] fp32 for the current block's positions -> commit this step's tokens, step += 1.

    fresh [B, Bl] bool: positions whose logits came from rows recomputed this step; the others rank
    after them (d2Cache decodes what it recomputed). prior [B, Bl]: rank by p(x0) * prior instead of the
    confidence (quasi left-to-right decoding with the certainty density)."""
    pos = st.current_block()                                          # [Bl]
    # The mask token is never a candidate: committing it would leave a mask behind that the
    # precomputed schedule does not count (the references allow it; on the real checkpoints it never
    # changes an output, reference/exact_semantics.md).
    logits[..., cfg.mask_id] = float("-inf")
    x0, conf, p0 = choose(st.dc, logits, st.noise, st.unif)           # [B, Bl] each
    cur = st.tokens.index_select(1, pos)                              # [B, Bl]
    is_mask = cur == cfg.mask_id
    x0 = torch.where(is_mask, x0, cur)
    if prior is not None:
        conf = p0 * prior
    if fresh is not None:
        conf = torch.where(fresh, conf, conf - 1e9)
    conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    st.conf.copy_(conf)
    st.p0.copy_(p0)
    if st.dc.threshold is not None:   # every row with p(x0) >= threshold, and the best-ranked one
        take = is_mask & (p0 >= st.dc.threshold)
        if fresh is not None:
            take = take & fresh
        best = conf.argmax(dim=1, keepdim=True)                       # [B, 1]
        take = take.scatter(1, best, is_mask.gather(1, best))
        new = torch.where(take, x0, cur)
        st.commit_pos.copy_(pos.expand_as(take))
        st.commit_valid.copy_(take)
    elif st.dc.family == "dream" and st.dc.alg == "origin":
        take = is_mask & (st.unif < st.reveal_prob.index_select(0, st.step))
        new = torch.where(take, x0, cur)
    else:   # top-k with k from the schedule: rank by confidence, keep the first k of the top kmax
        idx = conf.topk(st.kmax, dim=1).indices                       # [B, kmax]
        keep = st.k_range < st.counts.index_select(0, st.step)        # [kmax]
        new = cur.scatter(1, idx, torch.where(keep, x0.gather(1, idx), cur.gather(1, idx)))
        st.commit_pos.copy_(pos[idx])
        st.commit_valid.copy_(keep & is_mask.gather(1, idx))
    st.tokens.index_copy_(1, pos, new)
    st.block.add_((new != cfg.mask_id).all().long())                  # the block is done: move on
    st.step.add_(1)


def decodable_rows(cfg: ModelConfig, st: StepState) -> torch.Tensor:
    """Hidden rows [Bl] whose logits decode the current block: the block itself, or for Dream
    (hidden row i predicts token i+1) the rows shifted back by one."""
    pos = st.current_block()
    return pos - 1 if cfg.shift_logits else pos


def block_logits(w: Weights, cfg: ModelConfig, st: StepState, x: torch.Tensor) -> torch.Tensor:
    """Final residual stream x [B, L, d] -> fp32 logits [B, Bl, V] of the current block's decodable rows."""
    return head(w, cfg, x.index_select(1, decodable_rows(cfg, st))).float()


def _full_layer(w, cfg, i, x, st: StepState, cache: Cache | None, probs_out=None) -> torch.Tensor:
    a, m, k, v = block(w, cfg, i, x, st.cos, st.sin, st.key_mask, probs_out)
    if cache is not None:
        cache.k[i].copy_(k)
        cache.v[i].copy_(v)
        cache.a[i].copy_(a)
        cache.m[i].copy_(m)
    return x + a + m


def full_forward(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None = None) -> torch.Tensor:
    """All L rows through all layers, writing every cache if there is one -> final stream [B, L, d]."""
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    for i in range(cfg.n_layers):
        x = _full_layer(w, cfg, i, x, st, cache)
    return x


def full_refresh(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None = None) -> None:
    """The full step: full forward, logits for the current block only, commit."""
    commit(cfg, st, block_logits(w, cfg, st, full_forward(w, cfg, st, cache)))


def _response_v(w: Weights, cfg: ModelConfig, i: int, n_resp: torch.Tensor) -> torch.Tensor:
    """n_resp [B, G, d] normed response rows -> V [B, Hkv, G, hd] (only the V slice of the fused weight)."""
    lo = cfg.q_width + cfg.kv_width
    v = n_resp @ w.wqkv[i, lo:].t()
    if w.bqkv is not None:
        v = v + w.bqkv[i, lo:]
    B, G, _ = v.shape
    return v.view(B, G, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)


def v_verify(v_new: torch.Tensor, v_old: torch.Tensor, budget: int) -> torch.Tensor:
    """Rows whose value vectors changed most: v_new, v_old [B, Hkv, G, hd] -> indices [B, budget] of the
    lowest cosine similarity over the whole flattened V width (per batch row)."""
    a, b = v_new.float(), v_old.float()
    dot = (a * b).sum(dim=(1, 3))                                     # [B, G]
    norms = a.pow(2).sum(dim=(1, 3)).sqrt() * b.pow(2).sum(dim=(1, 3)).sqrt()
    cos = dot / norms.clamp_min(1e-8)
    return cos.topk(budget, dim=1, largest=False).indices


def _rows_layer(w, cfg, i, x, st: StepState, cache: Cache, rows: torch.Tensor, n_prompt: int = 0,
                v_resp: torch.Tensor | None = None, fused: bool = False, probs_out=None) -> torch.Tensor:
    """Recompute the rows [B, S] of layer i against the cache; everything else reuses cached deltas.

    fused: q, k and v of every row come from the fused projection (d2Cache, DualCache). Otherwise
    (dLLM-Cache) only q and k are projected here: the first n_prompt rows are prompt rows whose V is
    computed here, and the response V cache is written from v_resp (V-verify has it for all rows).
    probs_out [B, S, L] receives the rows' head-averaged attention probabilities."""
    B, S = rows.shape
    d, hd, P = cfg.d_model, cfg.head_dim, st.shape.prompt_bucket
    if v_resp is not None:
        cache.v[i, :, :, P:].copy_(v_resp)
    rows_d = rows[..., None].expand(B, S, d)
    n = rms_norm(x.gather(1, rows_d), w.attn_norm[i], cfg.norm_eps)  # [B, S, d]
    width = cfg.q_width + cfg.kv_width * (2 if fused else 1)
    qk = n @ w.wqkv[i, :width].t()
    if w.bqkv is not None:
        qk = qk + w.bqkv[i, :width]
    if fused:
        qk, v = qk.split([cfg.q_width + cfg.kv_width, cfg.kv_width], dim=-1)
        v = v.view(B, S, cfg.n_kv_heads, hd).transpose(1, 2)         # [B, Hkv, S, hd]
        cache.v[i].scatter_(2, rows[:, None, :, None].expand(B, cfg.n_kv_heads, S, hd), v)
    q, k = qk.split([cfg.q_width, cfg.kv_width], dim=-1)
    q = q.view(B, S, cfg.n_heads, hd).transpose(1, 2)                # [B, H, S, hd]
    k = k.view(B, S, cfg.n_kv_heads, hd).transpose(1, 2)             # [B, Hkv, S, hd]
    rows_r = rows[:, None, :, None].expand(B, 1, S, hd)
    cos, sin = st.cos.gather(2, rows_r), st.sin.gather(2, rows_r)    # [B, 1, S, hd] at the rows' positions
    q, k = apply_rope(q, cos, sin, cfg.rope_fp32), apply_rope(k, cos, sin, cfg.rope_fp32)
    cache.k[i].scatter_(2, rows[:, None, :, None].expand(B, cfg.n_kv_heads, S, hd), k)
    if n_prompt:
        cache.v[i, :, :, :P].copy_(_response_v(w, cfg, i, n[:, :n_prompt]))   # same V slice, prompt rows
    if probs_out is not None:
        probs_out.copy_(attention_probs(q, cache.k[i], st.key_mask, cfg))
    a = attn_out(w, i, attention(q, cache.k[i], cache.v[i], st.key_mask, cfg.n_heads != cfg.n_kv_heads))
    cache.a[i].scatter_(1, rows_d, a)
    h = x + cache.a[i]
    cache.m[i].scatter_(1, rows_d, ffn(w, cfg, i, h.gather(1, rows_d)))
    return h + cache.m[i]


def cached_forward(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache, kind: str,
                   budget: int) -> torch.Tensor:
    """The forward of a dLLM-Cache step kind (budget = int(rho * G) V-verify rows) -> stream [B, L, d]."""
    P = st.shape.prompt_bucket
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    x = _full_layer(w, cfg, 0, x, st, cache)                          # layer 0 is always fully recomputed
    for i in range(1, cfg.n_layers):
        if kind == "response_refresh":
            n_resp = rms_norm(x[:, P:], w.attn_norm[i], cfg.norm_eps)
            x = _rows_layer(w, cfg, i, x, st, cache, cache.resp_rows, 0, _response_v(w, cfg, i, n_resp))
            continue
        rows, v_resp = [], None
        if kind == "prompt_refresh":
            rows.append(cache.prompt_rows)
        if budget > 0:                                                # V-verify
            n_resp = rms_norm(x[:, P:], w.attn_norm[i], cfg.norm_eps)
            v_resp = _response_v(w, cfg, i, n_resp)
            rows.append(P + v_verify(v_resp, cache.v[i, :, :, P:], budget))
        if rows:
            x = _rows_layer(w, cfg, i, x, st, cache, torch.cat(rows, dim=1),
                            P if kind == "prompt_refresh" else 0, v_resp)
        else:                                                         # pure reuse
            x = x + cache.a[i] + cache.m[i]
    return x


def cached_step(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache, kind: str, budget: int) -> None:
    commit(cfg, st, block_logits(w, cfg, st, cached_forward(w, cfg, st, cache, kind, budget)))


# ---------------------------------------------------------------- d2Cache

def _d2_commit(cfg: ModelConfig, st: StepState, d2: D2Buffers, logits, fresh, quasi_l2r: bool) -> None:
    """Commit, then remember each recomputed block position's p(x0) as its latest certainty."""
    P = st.shape.prompt_bucket
    blk = st.current_block() - P                                     # [Bl] response indices (before step += 1)
    prior = None
    if quasi_l2r:
        known = st.tokens[:, P:] != cfg.mask_id
        prior = certainty_density(d2, known).index_select(1, blk)
    commit(cfg, st, logits, fresh, prior)
    old = d2.conf_all.index_select(1, blk)
    d2.conf_all.index_copy_(1, blk, st.p0 if fresh is None else torch.where(fresh, st.p0, old))


def d2_full(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache, d2: D2Buffers, quasi_l2r: bool) -> None:
    """d2Cache's first step: a full refresh that also records every layer's attention for the rollout."""
    x = F.embedding(st.tokens, w.embed)
    for i in range(cfg.n_layers):
        x = _full_layer(w, cfg, i, x, st, cache, probs_out=d2.attn_full[i])
    _d2_commit(cfg, st, d2, block_logits(w, cfg, st, x), None, quasi_l2r)
    rollout_full(d2)


def d2_partial(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache, d2: D2Buffers,
               attn_p: float | None, quasi_l2r: bool) -> None:
    """d2Cache step: choose the rows from the last step's outputs, recompute only them in every layer
    (the rest reuse cached K/V and deltas), decode what was recomputed first, roll out attention."""
    d2_select(cfg, st, d2, attn_p)
    x = F.embedding(st.tokens, w.embed)
    for i in range(cfg.n_layers):
        x = _rows_layer(w, cfg, i, x, st, cache, d2.rows, fused=True, probs_out=d2.attn_rows[i])
    fresh = row_mask(d2.rows, d2.valid, st.shape.length).index_select(1, decodable_rows(cfg, st))
    _d2_commit(cfg, st, d2, block_logits(w, cfg, st, x), fresh, quasi_l2r)
    rollout_rows(d2)


# ---------------------------------------------------------------- Fast-dLLM dual cache

def dual_forward(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache) -> torch.Tensor:
    """Recompute only the current block's rows (Dream: from the row before the block, whose logits
    decode its first position) in every layer; prefix and suffix reuse the cache -> stream [B, L, d]."""
    pos = st.current_block()                                         # [Bl]
    rows = torch.cat([pos[:1] - 1, pos]) if cfg.shift_logits else pos
    rows = rows.expand(st.shape.batch, -1)                           # [B, Bl (+1)]
    x = F.embedding(st.tokens, w.embed)
    for i in range(cfg.n_layers):
        x = _rows_layer(w, cfg, i, x, st, cache, rows, fused=True)
    return x


def dual_block(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache) -> None:
    commit(cfg, st, block_logits(w, cfg, st, dual_forward(w, cfg, st, cache)))


def step_bodies(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None, budget: int = 0):
    """Zero-argument step bodies by kind, bound to one request's buffers: pure tensor code that reads the
    step's random numbers from st.noise / st.unif (refilled before each step) and compiles with
    fullgraph=True (a torch.Generator inside the body would break the graph)."""
    if cache is None:
        return {"full": lambda: full_refresh(w, cfg, st)}
    bodies = {"full": lambda: full_refresh(w, cfg, st, cache)}
    for kind in STEP_KINDS[1:]:
        bodies[kind] = (lambda k: lambda: cached_step(w, cfg, st, cache, k, budget))(kind)
    return bodies


def policy_bodies(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None, policy,
                  d2: D2Buffers | None = None):
    """The step bodies a policy's plan uses, by kind."""
    if policy.name == "dual-cache":
        return {"full": lambda: full_refresh(w, cfg, st, cache), "block": lambda: dual_block(w, cfg, st, cache)}
    if policy.name == "d2cache":
        return {"full": lambda: d2_full(w, cfg, st, cache, d2, policy.quasi_l2r),
                "partial": lambda: d2_partial(w, cfg, st, cache, d2, policy.attn_p, policy.quasi_l2r)}
    return step_bodies(w, cfg, st, cache, policy.budget(st.shape.gen_length))


def with_noise(st: StepState, run):
    """A runnable step: refill this step's random numbers in place (one op, outside any graph), then run."""
    def step():
        st.draw_noise()
        run()
    return step


def make_steps(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None, budget: int = 0):
    """Runnable eager steps by kind (tests and tools; the engine wraps backend-prepared runners)."""
    return {k: with_noise(st, b) for k, b in step_bodies(w, cfg, st, cache, budget).items()}
