"""Fast-dLLM's dual cache: a full refresh at each block start, then `block` steps that recompute only
the current block's rows (for Dream also the row before it, whose logits decode the block's first
position); the prefix and the suffix reuse their cached K/V and deltas."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm.models.layers import head

from ..steps import commit, embed_rows, full_step, rows_layer
from .base import LayerWork, Policy, full_work


def dual_logits(w, cfg, st, cache) -> torch.Tensor:
    """The current block's rows through every layer against the cache -> logits [B, Bl, V]. Only these
    rows are carried: nothing reads another row's stream."""
    pos = st.current_block()                                         # [Bl]
    rows = torch.cat([pos[:1] - 1, pos]) if cfg.shift_logits else pos
    rows = rows.expand(st.shape.batch, -1)                           # [B, Bl (+1)]
    x = embed_rows(w, st, rows)                                      # [B, Bl (+1), d]
    for i in range(cfg.n_layers):
        a, m = rows_layer(w, cfg, i, x, st, cache, rows)
        x = x + a + m
    return head(w, cfg, x[:, :pos.shape[0]])                        # Dream: rows pos-1 decode the block


@dataclass(frozen=True)
class DualCache(Policy):
    name = "dual-cache"
    kinds = ("full", "block")

    def kind_at(self, n: int, i: int) -> str:
        return "full" if i == 0 else "block"

    def work(self, cfg, shape, kmax, kind):
        if kind == "full":
            return full_work(cfg, shape)
        S = shape.block_length + (1 if cfg.shift_logits else 0)
        return [LayerWork(S, S)] * cfg.n_layers

    def bodies(self, w, cfg, st, cache, scratch):
        return {"full": lambda: full_step(w, cfg, st, cache),
                "block": lambda: commit(cfg, st, dual_logits(w, cfg, st, cache))}
