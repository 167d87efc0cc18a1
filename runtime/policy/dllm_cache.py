"""dLLM-Cache: refresh the prompt every kp steps and the response every kr steps; in between, recompute
the int(rho * G) response rows whose value vectors changed most (V-verify), in every layer but the
first (layer 0 is always recomputed in full).

Step kinds (layers >= 1), in capture order:
  full              all rows recomputed, every cache written
  prompt_refresh    prompt rows recomputed, plus the V-verify rows
  response_refresh  response rows recomputed; prompt rows reuse their cached deltas
  verify            fresh V of all response rows, the int(rho * G) least similar rows recomputed
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dllm.models.layers import rms_norm, values

from ..decoding import RequestError
from ..steps import block_logits, commit, full_layer, full_step, rows_layer
from .base import Policy, check_int


def v_verify(v_new: torch.Tensor, v_old: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows whose value vectors changed most: v_new, v_old [B, Hkv, G, hd] -> indices [B, n_rows] of the
    lowest cosine similarity over the whole flattened V width (per batch row)."""
    a, b = v_new.float(), v_old.float()
    dot = (a * b).sum(dim=(1, 3))                                     # [B, G]
    norms = a.pow(2).sum(dim=(1, 3)).sqrt() * b.pow(2).sum(dim=(1, 3)).sqrt()
    cos = dot / norms.clamp_min(1e-8)
    return cos.topk(n_rows, dim=1, largest=False).indices


def cached_forward(w, cfg, st, cache, kind: str, n_verify: int) -> torch.Tensor:
    """The forward of a cached dLLM-Cache step kind (n_verify V-verify rows) -> stream [B, L, d]."""
    P = st.shape.prompt_bucket
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    x = full_layer(w, cfg, 0, x, st, cache)                           # layer 0 is always fully recomputed
    for i in range(1, cfg.n_layers):
        if kind == "response_refresh":
            cache.v[i, :, :, P:].copy_(values(w, cfg, i, rms_norm(x[:, P:], w.attn_norm[i], cfg.norm_eps)))
            x = rows_layer(w, cfg, i, x, st, cache, cache.resp_rows, with_v=False)
            continue
        rows = [cache.prompt_rows] if kind == "prompt_refresh" else []
        if n_verify > 0:                                              # V-verify
            v_resp = values(w, cfg, i, rms_norm(x[:, P:], w.attn_norm[i], cfg.norm_eps))   # [B, Hkv, G, hd]
            rows.append(P + v_verify(v_resp, cache.v[i, :, :, P:], n_verify))
            cache.v[i, :, :, P:].copy_(v_resp)
        if not rows:                                                  # pure reuse
            x = x + cache.a[i] + cache.m[i]
            continue
        store = None
        if kind == "prompt_refresh":                                  # the prompt rows' V, from their normed inputs
            store = (lambda i: lambda xn: cache.v[i, :, :, :P].copy_(values(w, cfg, i, xn[:, :P])))(i)
        x = rows_layer(w, cfg, i, x, st, cache, torch.cat(rows, dim=1), with_v=False, store=store)
    return x


@dataclass(frozen=True)
class DllmCache(Policy):
    kp: int = field(default=100, metadata={"help": "dllm-cache: refresh the prompt every kp steps"})
    kr: int = field(default=7, metadata={"help": "dllm-cache: refresh the response every kr steps"})
    rho: float = field(default=0.25, metadata={"help": "dllm-cache: fraction of the response recomputed by "
                                                        "V-verify in between"})
    name = "dllm-cache"
    kinds = ("full", "prompt_refresh", "response_refresh", "verify")

    def __post_init__(self):
        check_int(self.name, "kp", self.kp, 1, "refresh the prompt every kp steps")
        check_int(self.name, "kr", self.kr, 1, "refresh the response every kr steps")
        if not isinstance(self.rho, (int, float)) or isinstance(self.rho, bool) or not 0.0 <= self.rho <= 1.0:
            raise RequestError(f"dllm-cache rho must be in [0, 1] (the fraction of the response recomputed "
                               f"per step), got {self.rho!r}")

    def kind_at(self, n: int, i: int) -> str:
        rp, rr = (n - 1) % self.kp == 0, (n - 1) % self.kr == 0   # n runs across blocks, as the reference
        return "full" if rp and rr else "prompt_refresh" if rp else "response_refresh" if rr else "verify"

    def n_verify(self, gen_length: int) -> int:
        """Rows V-verify recomputes per step: int(rho * G) over the whole response, not the block (reference)."""
        return int(gen_length * self.rho)

    def key(self, shape) -> tuple:
        return (self.name, self.n_verify(shape.gen_length))          # kp and kr only change the plan

    def bodies(self, w, cfg, st, cache, scratch):
        n = self.n_verify(st.shape.gen_length)
        out = {"full": lambda: full_step(w, cfg, st, cache)}
        for kind in self.kinds[1:]:
            out[kind] = (lambda k: lambda: commit(cfg, st, block_logits(w, cfg, st, cached_forward(
                w, cfg, st, cache, k, n))))(kind)
        return out
