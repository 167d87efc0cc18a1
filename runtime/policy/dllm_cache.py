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

from dllm.models.layers import head, rms_norm, values
from dllm.models.parallel import Shard

from ..errors import RequestError
from ..steps import advance, block_logits, commit, embed_rows, full_layer, full_step, rows_layer
from .base import LayerWork, Policy, check_int


def v_verify(v_new: torch.Tensor, v_old: torch.Tensor, n_rows: int, shard: Shard = Shard()) -> torch.Tensor:
    """Rows whose value vectors changed most: v_new, v_old [B, Hkv, G, hd] -> indices [B, n_rows] of the
    lowest cosine similarity over the whole flattened V width (per batch row; under tensor parallelism
    the ranks' sums over their heads are added before the cosine)."""
    a, b = v_new.float(), v_old.float()
    sums = shard.all_reduce(torch.stack([(a * b).sum(dim=(1, 3)), a.pow(2).sum(dim=(1, 3)),
                                         b.pow(2).sum(dim=(1, 3))]))                      # [3, B, G]
    cos = sums[0] / (sums[1].sqrt() * sums[2].sqrt()).clamp_min(1e-8)
    return cos.topk(n_rows, dim=1, largest=False).indices


def verify_rows(w, cfg, i: int, x: torch.Tensor, cache, P: int, n_verify: int) -> torch.Tensor:
    """V-verify in layer i: fresh V of every response row (x [B, G, d] their stream) replaces the cached
    V; returns the indices [B, n_verify] (0-based in the response) of the rows whose V changed most."""
    v_resp = values(w, cfg, i, rms_norm(x, w.attn_norm[i], cfg.norm_eps))            # [B, Hkv, G, hd]
    idx = v_verify(v_resp, cache.v[i, :, :, P:], n_verify, w.shard)
    cache.put_kv(i, cache.resp_rows, v=v_resp)
    return idx


def prompt_refresh_logits(w, cfg, st, cache, n_verify: int) -> torch.Tensor:
    """The prompt refresh: every row through layer 0; in layers >= 1 the prompt rows and the V-verify
    rows recomputed, the rest reused; the whole canvas is carried (the prompt rows' stream is read)
    -> logits [B, Bl, V] of the current block."""
    P = st.shape.prompt_bucket
    x = F.embedding(st.tokens, w.embed)                               # [B, L, d]
    x = full_layer(w, cfg, 0, x, st, cache)                           # layer 0 is always fully recomputed
    for i in range(1, cfg.n_layers):
        rows = [cache.prompt_rows]
        if n_verify > 0:
            rows.append(P + verify_rows(w, cfg, i, x[:, P:], cache, P, n_verify))
        rows = torch.cat(rows, dim=1)
        store = (lambda i: lambda xn: cache.put_kv(i, cache.prompt_rows, v=values(w, cfg, i, xn[:, :P])))(i)
        rows_layer(w, cfg, i, x, st, cache, rows, rows, with_v=False, store=store)
        x = advance(cache, i, x, 0)
    return block_logits(w, cfg, st, x)


def response_logits(w, cfg, st, cache, kind: str, n_verify: int) -> torch.Tensor:
    """The response refresh and the V-verify step -> logits [B, Bl, V] of the current block.

    Nothing these steps compute reads a prompt row's stream: the prompt's keys and values come from
    the cache in every layer (layer 0's too: they depend on the prompt tokens alone, so the cached
    ones are exactly what recomputing them gives). So only the response rows (for Dream also the
    last prompt row, whose logits decode the first response position) are carried: layer 0
    recomputes all of them (the reference's rule that layer 0 is always refreshed), the later layers
    the response (response_refresh) or the V-verify rows, every other tracked row advancing by its
    cached deltas."""
    P, L, B = st.shape.prompt_bucket, st.shape.length, st.shape.batch
    sh = 1 if cfg.shift_logits else 0
    lo = P - sh                                                       # tracked rows: lo .. L-1
    track = torch.arange(lo, L, device=st.tokens.device).expand(B, L - lo)   # [B, T]
    x = embed_rows(w, st, track)                                      # [B, T, d]
    a, m = rows_layer(w, cfg, 0, x, st, cache, track)
    x = x + a + m
    for i in range(1, cfg.n_layers):
        if kind == "response_refresh":
            cache.put_kv(i, cache.resp_rows, v=values(w, cfg, i, rms_norm(x[:, sh:], w.attn_norm[i], cfg.norm_eps)))
            rows_layer(w, cfg, i, x[:, sh:], st, cache, cache.resp_rows, with_v=False)
        elif n_verify > 0:
            idx = verify_rows(w, cfg, i, x[:, sh:], cache, P, n_verify)
            rows_layer(w, cfg, i, x, st, cache, P + idx, sh + idx, with_v=False)
        x = advance(cache, i, x, lo)                                  # (rho = 0: pure reuse)
    return head(w, cfg, x.index_select(1, st.current_block() - P))


def cached_logits(w, cfg, st, cache, kind: str, n_verify: int) -> torch.Tensor:
    """The logits [B, Bl, V] of a cached step kind (n_verify V-verify rows per layer)."""
    if kind == "prompt_refresh":
        return prompt_refresh_logits(w, cfg, st, cache, n_verify)
    return response_logits(w, cfg, st, cache, kind, n_verify)


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
                               f"per step), got {self.rho!r}", "rho")

    def kind_at(self, n: int, i: int) -> str:
        rp, rr = (n - 1) % self.kp == 0, (n - 1) % self.kr == 0   # n runs across blocks, as the reference
        return "full" if rp and rr else "prompt_refresh" if rp else "response_refresh" if rr else "verify"

    def n_verify(self, gen_length: int) -> int:
        """Rows V-verify recomputes per step: int(rho * G) over the whole response, not the block (reference)."""
        return int(gen_length * self.rho)

    def key(self, shape) -> tuple:
        return (self.name, self.n_verify(shape.gen_length))          # kp and kr only change the plan

    def work(self, cfg, shape, kmax, kind):
        P, G, L, n = shape.prompt_bucket, shape.gen_length, shape.length, self.n_verify(shape.gen_length)
        T = G + (1 if cfg.shift_logits else 0)                       # rows response_logits carries
        rest = {"full": LayerWork(L, L), "prompt_refresh": LayerWork(P + n, P + (G if n else 0)),
                "response_refresh": LayerWork(G, G), "verify": LayerWork(n, G if n else 0)}[kind]
        first = LayerWork(L, L) if kind in ("full", "prompt_refresh") else LayerWork(T, T)
        return [first] + [rest] * (cfg.n_layers - 1)

    def bodies(self, w, cfg, st, cache, scratch):
        n = self.n_verify(st.shape.gen_length)
        out = {"full": lambda: full_step(w, cfg, st, cache)}
        for kind in self.kinds[1:]:
            out[kind] = (lambda k: lambda: commit(cfg, st, cached_logits(w, cfg, st, cache, k, n)))(kind)
        return out
