"""Step functions: pure tensor code with static shapes (DESIGN.md §4).

A step is: canvas in -> canvas (and caches, confidences) updated in place. Python branches here are
on configuration (family, decoding options, whether a cache exists), never on tensor values, so a
step can be compiled with fullgraph=True and captured as a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.checkpoint import Weights
from models.config import ModelConfig
from models.layers import block, head

from .buffers import StepState
from .decoding import choose


def commit(cfg: ModelConfig, st: StepState, logits: torch.Tensor) -> None:
    """logits [B, Bl, V] fp32 for the current block's positions -> commit this step's tokens, step += 1."""
    pos = st.current_block()                                          # [Bl]
    # The mask token is never a candidate: committing it would leave a mask behind that the
    # precomputed schedule does not count (the references allow it; on the real checkpoints it never
    # changes an output, reference/exact_semantics.md).
    logits[..., cfg.mask_id] = float("-inf")
    st.draw_noise()
    x0, conf = choose(st.dc, logits, st.noise, st.unif)               # [B, Bl] each
    cur = st.tokens.index_select(1, pos)                              # [B, Bl]
    is_mask = cur == cfg.mask_id
    x0 = torch.where(is_mask, x0, cur)
    conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    st.conf.copy_(conf)
    if st.dc.family == "dream" and st.dc.alg == "origin":
        take = is_mask & (st.unif < st.reveal_prob.index_select(0, st.step))
        new = torch.where(take, x0, cur)
    else:   # top-k with k from the schedule: rank by confidence, keep the first k of the top kmax
        idx = conf.topk(st.kmax, dim=1).indices                       # [B, kmax]
        keep = st.k_range < st.counts.index_select(0, st.step)        # [kmax]
        new = cur.scatter(1, idx, torch.where(keep, x0.gather(1, idx), cur.gather(1, idx)))
    st.tokens.index_copy_(1, pos, new)
    st.step.add_(1)


def decodable_rows(cfg: ModelConfig, st: StepState) -> torch.Tensor:
    """Hidden rows [Bl] whose logits decode the current block: the block itself, or for Dream
    (hidden row i predicts token i+1) the rows shifted back by one."""
    pos = st.current_block()
    return pos - 1 if cfg.shift_logits else pos


def full_refresh(w: Weights, cfg: ModelConfig, st: StepState) -> None:
    """All L rows through all layers; logits only for the current block's rows."""
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    for i in range(cfg.n_layers):
        a, m, _, _ = block(w, cfg, i, x, st.cos, st.sin, st.key_mask)
        x = x + a + m
    logits = head(w, cfg, x.index_select(1, decodable_rows(cfg, st))).float()   # [B, Bl, V]
    commit(cfg, st, logits)
