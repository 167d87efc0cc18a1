"""What every step shares: the commit of a step's tokens, the full layer and the row-subset layer.

A step is pure tensor code with static shapes: canvas in -> canvas, caches and confidences updated in
place. Python branches here are on configuration (family, decoding options, step kind, row budgets),
never on tensor values, so every step kind compiles with fullgraph=True and captures as a CUDA graph.
Each policy (runtime/policy/) builds its step kinds from these pieces; the layer math itself is
models.layers.layer_rows (docs/ARCHITECTURE.md, "Steps").
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dllm.models.checkpoint import Weights
from dllm.models.config import ModelConfig
from dllm.models.layers import head, layer_rows

from .decoding import choose
from .state import Cache, StepState


def commit(cfg: ModelConfig, st: StepState, raw: torch.Tensor, fresh: torch.Tensor | None = None,
           prior: torch.Tensor | None = None) -> None:
    """raw [B, Bl, V] logits (model dtype) for the current block's positions -> commit this step's
    tokens, step += 1. Tokens are chosen from the fp32 logits; confidences are ranked and compared with
    the threshold in st.structure.confidence_dtype (float64 by default, see decoding.choose).

    fresh [B, Bl] bool: positions whose logits came from rows recomputed this step; the others rank
    after them (d2Cache decodes what it recomputed). prior [B, Bl]: rank by p(x0) * prior instead of the
    confidence (quasi left-to-right decoding with the certainty density)."""
    pos = st.current_block()                                          # [Bl]
    # The mask token is never a candidate: committing it would leave a mask behind that the
    # precomputed schedule does not count (the references allow it; on the real checkpoints it never
    # changes an output, docs/ARCHITECTURE.md "Decoding").
    raw[..., cfg.mask_id] = float("-inf")                             # (head output: written in place)
    logits = raw.float()                                              # [B, Bl, V] fp32
    x0, conf, p0 = choose(st.structure, logits, st.noise, st.unif, raw,   # [B, Bl] each
                          (st.temperature, st.top_p, st.top_k))
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
    if st.structure.threshold:   # every row with p(x0) >= threshold, and the best-ranked one
        take = is_mask & (p0 >= st.threshold.to(p0.dtype))          # [B, Bl] against each row's
        if fresh is not None:
            take = take & fresh
        best = conf.argmax(dim=1, keepdim=True)                       # [B, 1]
        take = take.scatter(1, best, is_mask.gather(1, best))
        new = torch.where(take, x0, cur)
        st.commit_pos.copy_(pos.expand_as(take))
        st.commit_valid.copy_(take)
    elif st.structure.reveals:       # Dream 'origin': each masked row revealed with the step's probability
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
    """Final residual stream x [B, L, d] -> logits [B, Bl, V] (model dtype) of the current block's decodable rows."""
    return head(w, cfg, x.index_select(1, decodable_rows(cfg, st)))


def full_layer(w: Weights, cfg: ModelConfig, i: int, x: torch.Tensor, st: StepState, cache: Cache | None,
               probs_out: torch.Tensor | None = None) -> torch.Tensor:
    """Every row through layer i, writing the layer's cache if there is one -> stream [B, L, d]."""
    a, m, k, v = layer_rows(w, cfg, i, x, st.cos, st.sin, st.key_mask, probs_out=probs_out)
    if cache is not None:
        cache.put_layer(i, k, v, a, m)
    return x + a + m


def full_forward(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None = None) -> torch.Tensor:
    """All L rows through all layers, writing every cache if there is one -> final stream [B, L, d]."""
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    for i in range(cfg.n_layers):
        x = full_layer(w, cfg, i, x, st, cache)
    return x


def full_step(w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None = None) -> None:
    """The full step: full forward, logits for the current block only, commit."""
    commit(cfg, st, block_logits(w, cfg, st, full_forward(w, cfg, st, cache)))


def rows_layer(w: Weights, cfg: ModelConfig, i: int, x: torch.Tensor, st: StepState, cache: Cache,
               rows: torch.Tensor, at: torch.Tensor | None = None, *, with_v: bool = True,
               store: Callable | None = None, probs_out: torch.Tensor | None = None):
    """Recompute the canvas rows [B, S] of layer i against the cache and store their K (and V),
    attention and FFN deltas at those rows -> the rows' deltas (a [B, S, d], m [B, S, d]).

    x [B, T, d] is the residual stream of the rows the caller tracks (a partial step carries only
    the rows something reads, never the whole canvas); at [B, S] says where each recomputed row sits
    in x (None: x holds exactly the rows, in order). The caller advances its stream with
    `x + a + m` (x holds the rows) or `advance` (tracked rows that were not all recomputed).
    with_v False: the rows' values are already in cache.v (dLLM-Cache projects V for the whole response
    in V-verify). store(xn), if given, runs with the rows' normed inputs xn [B, S, d] before attention
    (dLLM-Cache's prompt refresh writes the prompt rows' V from it). probs_out [B, S, L] receives the
    rows' head-averaged attention probabilities."""
    B, S = rows.shape
    rows_r = rows[:, None, :, None].expand(B, 1, S, cfg.head_dim)

    def keys(k, v, xn):                                               # write the rows' K/V, attend over all
        cache.put_kv(i, rows, k, v)
        if store is not None:
            store(xn)
        return cache.k[i], cache.v[i]
    xr = x if at is None else x.gather(1, at[..., None].expand(B, S, cfg.d_model))    # [B, S, d]
    a, m, _, _ = layer_rows(w, cfg, i, xr, st.cos.gather(2, rows_r), st.sin.gather(2, rows_r),
                            st.key_mask, keys, with_v=with_v, probs_out=probs_out)
    cache.put_deltas(i, rows, a, m)
    return a, m


def advance(cache: Cache, i: int, x: torch.Tensor, lo: int | None = None,
            track: torch.Tensor | None = None) -> torch.Tensor:
    """The tracked stream x [B, T, d] after layer i from the cached deltas (just written for the rows
    recomputed in this layer): x + A + M at the canvas rows lo..lo+T-1, or at track [B, T]. The adds
    are the full layer's own (x + a) + m, so every row carries bit-for-bit what a whole-canvas step
    would give it."""
    if track is None:
        T = x.shape[1]
        return x + cache.a[i, :, lo:lo + T] + cache.m[i, :, lo:lo + T]
    idx = track[..., None].expand(*track.shape, x.shape[-1])
    return x + cache.a[i].gather(1, idx) + cache.m[i].gather(1, idx)


def embed_rows(w: Weights, st: StepState, rows: torch.Tensor) -> torch.Tensor:
    """The embeddings of the canvas rows [B, T] -> [B, T, d] (a partial step's starting stream)."""
    return F.embedding(st.tokens.gather(1, rows), w.embed)


def with_noise(st: StepState, run: Callable[[], None]) -> Callable[[], None]:
    """A runnable step: refill this step's random numbers in place (one op, outside any graph), then run."""
    def step():
        st.draw_noise()
        run()
    return step
