"""Row selectors that run on the device before a partial step (d2Cache, DESIGN.md §4).

All shapes are fixed by the policy's budget; when fewer rows really need work the surplus slots are
marked invalid and alias a real row (their recomputation writes the same values, a no-op).
"""
from __future__ import annotations

import torch

from dllm.models.config import ModelConfig

from .buffers import D2Buffers, StepState


def certainty_density(d2: D2Buffers, known: torch.Tensor) -> torch.Tensor:
    """known [B, G] bool (response rows already decoded) -> D [B, G] in [0, 1]: the Gaussian-weighted
    fraction of decoded neighbours, the prompt side counting as decoded and the right side only once
    the last response token is."""
    kf = known.float()
    num = kf @ d2.kernel.t() + d2.left + kf[:, -1:] * d2.right
    return (num / d2.z).clamp(max=1.0)


def dedupe(rows: torch.Tensor, valid: torch.Tensor, n_rows: int) -> torch.Tensor:
    """valid [B, S] with every repeated row after its first occurrence marked invalid."""
    B, S = rows.shape
    key = torch.where(valid, rows, n_rows + torch.arange(S, device=rows.device))
    skey, order = key.sort(dim=1)
    dup_sorted = torch.cat([torch.zeros_like(skey[:, :1], dtype=torch.bool), skey[:, 1:] == skey[:, :-1]], dim=1)
    dup = torch.zeros_like(dup_sorted).scatter(1, order, dup_sorted)
    return valid & ~dup


def row_mask(rows: torch.Tensor, valid: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[B, S] row set -> [B, n_rows] bool membership."""
    hits = torch.zeros(rows.shape[0], n_rows, device=rows.device).scatter_add(1, rows, valid.float())
    return hits > 0


def nucleus(values: torch.Tensor, total: torch.Tensor, p: float) -> torch.Tensor:
    """values [B, K] sorted descending (importance of the picks), total [B, 1] importance of all
    candidates -> [B, K] bool: the prefix whose cumulative share stays <= p, at least one."""
    cum = (values / total.clamp_min(1e-12)).cumsum(dim=1)
    keep = cum <= p
    keep[:, 0] = True
    return keep


def d2_select(cfg: ModelConfig, st: StepState, d2: D2Buffers, attn_p: float | None) -> None:
    """Choose this step's rows from the last step's outputs; writes d2.rows and d2.valid."""
    P, L = st.shape.prompt_bucket, st.shape.length
    resp = st.tokens[:, P:]                                          # [B, G]
    masked = resp == cfg.mask_id
    dens = certainty_density(d2, ~masked)
    score = d2.conf_all * dens                                       # in [0, 1]
    pos = st.current_block()                                         # [Bl] canvas positions
    g_idx = torch.arange(resp.shape[1], device=resp.device) + P
    in_block = (g_idx >= pos[0]) & (g_idx <= pos[-1])
    score = torch.where(in_block, score + 2.0, score)                # current block first
    score = torch.where(masked, score, torch.full_like(score, float("-inf")))
    top1 = score.topk(d2.s1, dim=1)
    s1_valid = top1.values > float("-inf")
    shift = 1 if cfg.shift_logits else 0                             # Dream: row j-1 decodes position j
    s1_rows = P + top1.indices - shift
    chosen = row_mask(torch.cat([s1_rows, st.commit_pos], 1), torch.cat([s1_valid, st.commit_valid], 1), L)
    imp = torch.where(chosen, torch.full_like(d2.importance, float("-inf")), d2.importance)
    top2 = imp.topk(d2.s2, dim=1)
    s2_valid = top2.values > float("-inf")
    if attn_p is not None:
        total = torch.where(chosen, torch.zeros_like(d2.importance), d2.importance).sum(1, keepdim=True)
        s2_valid = s2_valid & nucleus(top2.values.clamp_min(0), total, attn_p)
    rows = torch.cat([s1_rows, st.commit_pos, top2.indices], dim=1)
    valid = dedupe(rows, torch.cat([s1_valid, st.commit_valid, s2_valid], dim=1), L)
    d2.rows.copy_(torch.where(valid, rows, rows[:, :1]))
    d2.valid.copy_(valid)


def rollout_full(d2: D2Buffers) -> None:
    """Column sums of the rollout of a full step, R = prod_l (A_l + I)/2, as a backward vector pass."""
    v = torch.ones_like(d2.importance)                               # [B, L]
    for layer in range(d2.attn_full.shape[0] - 1, -1, -1):
        v = 0.5 * v + 0.5 * (v[:, None, :] @ d2.attn_full[layer])[:, 0]
    d2.importance.copy_(v)


def rollout_rows(d2: D2Buffers) -> None:
    """The same for a partial step: recomputed rows are (A + I)/2, the other rows identity rows, so
    no L x L matrix is ever formed (O(S L) per layer)."""
    v = torch.ones_like(d2.importance)
    w = d2.valid.float()
    for layer in range(d2.attn_rows.shape[0] - 1, -1, -1):
        vs = v.gather(1, d2.rows) * w                                # [B, S]
        v = v - 0.5 * torch.zeros_like(v).scatter_add(1, d2.rows, vs) + 0.5 * (vs[:, None, :] @ d2.attn_rows[layer])[:, 0]
    d2.importance.copy_(v)
