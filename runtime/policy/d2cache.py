"""d2Cache with a fixed row budget: the first step is a full refresh; every later (`selected`) step
recomputes exactly k + (most commits per step) + attn_budget rows chosen on the device from the last
step's outputs: the k masked rows of highest certainty x density inside the stage-1 window (the last
step's block first; Dream: the row before), the rows committed last step, and the attn_budget rows of
highest attention-rollout importance (attn_p additionally masks the picks beyond the reference's top-p
nucleus). docs/policies.md lists what this reproduces of the reference and where it deviates.

Certainty: every masked response row keeps the p(x0) of its last recomputation, as the reference's
confidence cache. It is not stored when computed but re-derived: a row that is not recomputed carries
its last recomputation's final state exactly (its cached deltas, its unchanged token), so the logits
of the rows the next selection can read (the stage-1 window: this step's block and the
ceil(k / block) blocks after it) are computed each step from the tracked stream.

All shapes are fixed by the row budget; when fewer rows really need work the surplus slots are marked
invalid and alias a real row (their recomputation writes the same values, a no-op).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from dllm.models.config import ModelConfig
from dllm.models.layers import head

from ..decoding import top_p0
from ..errors import RequestError
from ..state import RequestShape, StepState
from ..steps import advance, commit, embed_rows, full_layer, rows_layer
from .base import LayerWork, Policy, check_int, full_work


@dataclass
class D2Buffers:
    """d2Cache scratch, allocated once per (shape, policy): the certainty-density kernel, the latest
    certainty per response row, last step's block, attention rows and rollout importance, and the row set."""
    s1: int                    # stage 1: masked rows chosen by certainty x density
    s2: int                    # stage 2: rows chosen by attention-rollout importance
    k: int                     # stage 1's count before capping (the window holds the k-th remaining mask)
    kernel: torch.Tensor       # [G, G]  exp(-(i-j)^2 / 2 sigma^2) over the response
    left: torch.Tensor         # [G]     kernel mass of the prompt side (always known)
    right: torch.Tensor        # [G]     kernel mass right of the response (known once the last token is)
    z: float                   # kernel normaliser: D(i) in [0, 1]
    conf_all: torch.Tensor     # [B, G] fp32  latest p(x0) computed for each response row
    window: torch.Tensor       # [W] int64    0..W-1: the rows whose certainty a step computes, from its block on
    last_block: torch.Tensor   # [1] int64    the block the last step worked on (the selection's block)
    importance: torch.Tensor   # [B, L] fp32  column sums of last step's attention rollout
    attn_full: torch.Tensor    # [nL, B, L, L] head-averaged attention of a full step
    attn_rows: torch.Tensor    # [nL, B, S, L] head-averaged attention of the recomputed rows
    rows: torch.Tensor         # [B, S] int64 rows recomputed this step (surplus slots alias a real row)
    valid: torch.Tensor        # [B, S] bool  slots that are real, distinct rows
    STATIC: ClassVar[tuple[str, ...]] = ("kernel", "left", "right", "window")   # no step writes these

    @property
    def row_budget(self) -> int:
        """S: the rows every selected step recomputes (k + kmax + attn_budget, capped)."""
        return self.rows.shape[1]

    @staticmethod
    def budget(shape: RequestShape, k: int, attn_budget: int, kmax: int) -> tuple[int, int, int]:
        """(s1, s2, S): stage-1 and stage-2 rows (capped by the response / canvas) and the row budget."""
        s1, s2 = min(k, shape.gen_length), min(attn_budget, shape.length)
        return s1, s2, s1 + kmax + s2

    @staticmethod
    def window_rows(shape: RequestShape, k: int) -> int:
        """W: the response rows whose certainty the next selection can read, counted from this step's
        block: the block, then ceil(k / block) blocks (later blocks are untouched, so the k-th remaining
        mask lies within them whether or not this step finishes its block), capped at G."""
        Bl = shape.block_length
        return min(shape.gen_length, Bl * (1 + -(-k // Bl)))

    @staticmethod
    def allocate(cfg: ModelConfig, shape: RequestShape, k: int, sigma: float, attn_budget: int, kmax: int,
                 device) -> "D2Buffers":
        nL, B, L, G = cfg.n_layers, shape.batch, shape.length, shape.gen_length
        s1, s2, S = D2Buffers.budget(shape, k, attn_budget, kmax)
        i = torch.arange(G, dtype=torch.float64)
        gauss = lambda d: torch.exp(-d.pow(2) / (2 * sigma ** 2))            # noqa: E731
        ext = torch.arange(G, dtype=torch.float64)
        kernel = gauss(i[:, None] - i[None, :])
        left = gauss(i[:, None] + 1 + ext[None, :]).sum(1)                   # j = -1 .. -G
        right = gauss(G + ext[None, :] - i[:, None]).sum(1)                  # j = G .. 2G-1
        z = float(gauss(torch.arange(-3 * G, 3 * G + 1, dtype=torch.float64)).sum())
        f32 = dict(dtype=torch.float32, device=device)
        return D2Buffers(s1=s1, s2=s2, k=k, kernel=kernel.to(**f32), left=left.to(**f32), right=right.to(**f32), z=z,
                         conf_all=torch.ones(B, G, **f32),
                         window=torch.arange(D2Buffers.window_rows(shape, k), dtype=torch.int64, device=device),
                         last_block=torch.zeros(1, dtype=torch.int64, device=device),
                         importance=torch.ones(B, L, **f32),
                         attn_full=torch.zeros(nL, B, L, L, **f32), attn_rows=torch.zeros(nL, B, S, L, **f32),
                         rows=torch.zeros(B, S, dtype=torch.int64, device=device),
                         valid=torch.zeros(B, S, dtype=torch.bool, device=device))

    def reset(self) -> None:
        self.conf_all.fill_(1.0)
        self.last_block.zero_()
        self.importance.fill_(1.0)


# ---------------------------------------------------------------- row selection (device)

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


def search_window(d2: D2Buffers, masked: torch.Tensor, start: torch.Tensor, Bl: int) -> torch.Tensor:
    """masked [B, G] -> [B, G] bool: stage 1's candidates, from the block start (response index, [1]) up
    to the end of the block that holds the k-th remaining mask (the whole rest when fewer remain)."""
    G = masked.shape[1]
    meets = masked.long().cumsum(dim=1) >= d2.k                      # [B, G]
    first = torch.where(meets.any(dim=1, keepdim=True), meets.long().argmax(dim=1, keepdim=True),
                        torch.full_like(meets[:, :1], G - 1, dtype=torch.int64))    # [B, 1]
    end = (first // Bl + 1) * Bl - 1
    g = torch.arange(G, device=masked.device)
    return (g >= start) & (g <= end)


def d2_select(cfg: ModelConfig, st: StepState, d2: D2Buffers, attn_p: float | None) -> None:
    """Choose this step's rows from the last step's outputs; writes d2.rows and d2.valid. Stage 1 works
    on the last step's block, as the reference's selection (made when that step ended): at the first
    step of a new block the finished block gets the bias and the window starts there."""
    P, L, Bl = st.shape.prompt_bucket, st.shape.length, st.shape.block_length
    resp = st.tokens[:, P:]                                          # [B, G]
    masked = resp == cfg.mask_id
    dens = certainty_density(d2, ~masked)
    score = d2.conf_all * dens                                       # in [0, 1]
    start = d2.last_block * Bl                                       # [1] response index of that block
    g_idx = torch.arange(resp.shape[1], device=resp.device)
    in_block = (g_idx >= start) & (g_idx < start + Bl)
    score = torch.where(in_block, score + 2.0, score)                # the block first
    score = torch.where(masked & search_window(d2, masked, start, Bl), score, torch.full_like(score, float("-inf")))
    top1 = score.topk(d2.s1, dim=1)
    s1_valid = top1.values > float("-inf")
    shift = 1 if cfg.shift_logits else 0                             # Dream: row j-1 decodes position j
    s1_rows = P + top1.indices - shift
    picked = s1_valid
    if attn_p is not None and shift:    # the reference ORs the last prompt row in after its nucleus, so
        picked = s1_valid & (top1.indices > 0)   # there that row (stage 1's pick of position 0) is a candidate
    chosen = row_mask(torch.cat([s1_rows, st.commit_pos], 1), torch.cat([picked, st.commit_valid], 1), L)
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
        v = v - 0.5 * torch.zeros_like(v).scatter_add(1, d2.rows, vs) \
            + 0.5 * (vs[:, None, :] @ d2.attn_rows[layer])[:, 0]
    d2.importance.copy_(v)


# ---------------------------------------------------------------- step bodies

def window(st: StepState, d2: D2Buffers) -> torch.Tensor:
    """[W] response indices whose certainty this step computes: its block first, then the rows after it;
    past the response end the indices wrap to rows just before the block (decoded, never read), so all
    W are distinct (index_copy_ writes each once)."""
    G = st.shape.gen_length
    win = st.current_block()[0] - st.shape.prompt_bucket + d2.window
    return torch.where(win >= G, win - d2.window.shape[0], win)


def window_rows(cfg: ModelConfig, st: StepState, win: torch.Tensor) -> torch.Tensor:
    """The hidden rows [W] whose logits decode the window (Dream: the row before each)."""
    return win + st.shape.prompt_bucket - (1 if cfg.shift_logits else 0)


def _commit(cfg: ModelConfig, st: StepState, d2: D2Buffers, logits, win, fresh, quasi_l2r: bool) -> None:
    """logits [B, W, V] of the window's decoding rows (the block's first): commit from the block's, then
    store the p(x0) of every window row as its latest certainty (block rows recomputed this step: the
    commit's own p(x0), which under sampling is the drawn token's)."""
    P, Bl = st.shape.prompt_bucket, st.shape.block_length
    blk = win[:Bl]                                                   # [Bl] response indices (before step += 1)
    d2.last_block.copy_(st.block.clamp(max=st.shape.n_blocks - 1))
    prior = None
    if quasi_l2r:
        known = st.tokens[:, P:] != cfg.mask_id
        prior = certainty_density(d2, known).index_select(1, blk)
    logits[..., cfg.mask_id] = float("-inf")                         # as commit: never a candidate
    commit(cfg, st, logits[:, :Bl], fresh, prior)
    s, values = st.structure, (st.temperature, st.top_p, st.top_k)
    own = st.p0                                                      # [B, Bl] the commit's p(x0)
    if s.sampled and fresh is not None:     # block rows not recomputed: as every row outside the block
        own = torch.where(fresh, own, top_p0(s, logits[:, :Bl].float(), logits[:, :Bl], values).float())
    parts = [own] + [top_p0(s, logits[:, lo:lo + Bl].float(), logits[:, lo:lo + Bl], values).float()
                     for lo in range(Bl, win.shape[0], Bl)]          # past the block, a block of rows at a time
    d2.conf_all.index_copy_(1, win, torch.cat(parts, dim=1))


def d2_full(w, cfg: ModelConfig, st: StepState, cache, d2: D2Buffers, quasi_l2r: bool) -> None:
    """d2Cache's first step: a full refresh that also records every layer's attention for the rollout."""
    x = F.embedding(st.tokens, w.embed)
    for i in range(cfg.n_layers):
        x = full_layer(w, cfg, i, x, st, cache, probs_out=d2.attn_full[i])
    win = window(st, d2)
    _commit(cfg, st, d2, head(w, cfg, x.index_select(1, window_rows(cfg, st, win))), win, None, quasi_l2r)
    rollout_full(d2)


def d2_selected(w, cfg: ModelConfig, st: StepState, cache, d2: D2Buffers, attn_p: float | None,
                quasi_l2r: bool) -> None:
    """d2Cache's selected step: choose the rows from the last step's outputs, recompute only them in
    every layer (the rest reuse cached K/V and deltas), decode what was recomputed first, roll out."""
    d2_select(cfg, st, d2, attn_p)
    S, Bl = d2.row_budget, st.shape.block_length
    win = window(st, d2)
    dec = window_rows(cfg, st, win)                                  # [W]: the block's decoding rows first
    track = torch.cat([d2.rows, dec.expand(st.shape.batch, -1)], dim=1)   # [B, S + W]: only these rows are read
    x = embed_rows(w, st, track)
    for i in range(cfg.n_layers):
        rows_layer(w, cfg, i, x[:, :S], st, cache, d2.rows, probs_out=d2.attn_rows[i])
        x = advance(cache, i, x, track=track)
    fresh = row_mask(d2.rows, d2.valid, st.shape.length).index_select(1, dec[:Bl])
    _commit(cfg, st, d2, head(w, cfg, x[:, S:]), win, fresh, quasi_l2r)
    rollout_rows(d2)


@dataclass(frozen=True)
class D2Cache(Policy):
    k: int = field(default=32, metadata={"help": "d2cache: masked rows chosen by certainty x density"})
    sigma: float = field(default=10.0, metadata={"help": "d2cache: certainty-density kernel width"})
    attn_budget: int = field(default=32, metadata={"help": "d2cache: rows chosen by attention rollout"})
    attn_p: float | None = field(default=None, metadata={
        "help": "d2cache: also mask rollout picks beyond this top-p nucleus (reference: 0.1)", "type": float})
    quasi_l2r: bool = field(default=False, metadata={
        "help": "d2cache: rank commits by confidence x certainty density (quasi left-to-right)"})
    name = "d2cache"
    kinds = ("full", "selected")

    def __post_init__(self):
        check_int(self.name, "k", self.k, 1, "masked rows chosen per step")
        check_int(self.name, "attn_budget", self.attn_budget, 0, "rows chosen by attention rollout")
        if not isinstance(self.sigma, (int, float)) or isinstance(self.sigma, bool) or not self.sigma > 0:
            raise RequestError(f"d2cache sigma (the certainty-density kernel width) must be > 0, got {self.sigma!r}",
                               "sigma")
        if self.attn_p is not None and not 0.0 < self.attn_p <= 1.0:
            raise RequestError(f"d2cache attn_p must be in (0, 1], got {self.attn_p!r}", "attn_p")

    def kind_at(self, n: int, i: int) -> str:
        return "full" if n == 1 else "selected"

    def check(self, cfg, s) -> None:
        if s.reveals:
            raise RequestError("d2cache needs a fixed commit count per step; Dream's 'origin' alg reveals a "
                               "random number of tokens. Use --alg maskgit_plus, topk_margin or entropy")

    def head_rows(self, shape, kind):
        return D2Buffers.window_rows(shape, self.k)

    def work(self, cfg, shape, kmax, kind):
        if kind == "full":
            return full_work(cfg, shape, probs=True)
        S = D2Buffers.budget(shape, self.k, self.attn_budget, kmax)[2]
        return [LayerWork(S, S, probs=True)] * cfg.n_layers

    def scratch(self, cfg, shape, st, device) -> D2Buffers:
        return D2Buffers.allocate(cfg, shape, self.k, self.sigma, self.attn_budget, st.kmax, device)

    def reset(self, scratch: D2Buffers) -> None:
        scratch.reset()

    def bodies(self, w, cfg, st, cache, scratch: D2Buffers):
        return {"full": lambda: d2_full(w, cfg, st, cache, scratch, self.quasi_l2r),
                "selected": lambda: d2_selected(w, cfg, st, cache, scratch, self.attn_p, self.quasi_l2r)}
