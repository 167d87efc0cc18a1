"""The network as plain functions: RMSNorm, rotate-half RoPE, bidirectional attention, SwiGLU.

Knows nothing about caching. The one layer primitive is `layer_rows`: a subset of rows through one
layer, attending over keys and values the caller supplies (by default the rows' own: every row is a
full layer). The runtime (runtime/steps.py) only decides which rows go through it and where the results are
stored (docs/ARCHITECTURE.md). Shapes: B batch, S rows computed, L canvas length, H / Hkv query /
key-value heads, hd head dim, d model width, F FFN width, V vocab.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import Weights
from .config import ModelConfig
from .quant import at, linear


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in fp32, cast back, then scale (the order both references use)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(positions: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] int64 -> cos, sin [B, 1, L, hd] fp32 (rotate-half layout: cat(f, f))."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64,
                                                      device=positions.device).float() / hd))  # [hd/2]
    ang = positions.float()[..., None] * inv_freq                                               # [B, L, hd/2]
    emb = torch.cat([ang, ang], dim=-1)[:, None]                                                # [B, 1, L, hd]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool) -> torch.Tensor:
    """x [B, H, S, hd]; cos/sin [B, 1, S, hd] fp32. LLaDA rotates in fp32, Dream in the activation dtype."""
    if fp32:
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return x * c + _rotate_half(x) * s


def project(w: Weights, cfg: ModelConfig, i: int, xn: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """xn [B, S, d] (normed) -> columns lo:hi of the fused q|k|v projection [B, S, hi - lo] (bias included)."""
    y = linear(xn, w.wqkv[i], at(w.wqkv_scale, i), lo, hi)
    if w.bqkv is not None:
        y = y + w.bqkv[i, lo:hi]
    return y


def heads(y: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, n_heads * hd] -> [B, n_heads, S, hd]."""
    B, S, _ = y.shape
    return y.view(B, S, n_heads, head_dim).transpose(1, 2)


def values(w: Weights, cfg: ModelConfig, i: int, xn: torch.Tensor) -> torch.Tensor:
    """xn [B, S, d] (normed) -> V [B, Hkv, S, hd]: only the V slice of the fused projection."""
    return heads(project(w, cfg, i, xn, cfg.q_width + cfg.kv_width), cfg.n_kv_heads, cfg.head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, gqa: bool) -> torch.Tensor:
    """q [B, H, S, hd] over k, v [B, Hkv, L, hd]; key_mask [B, 1, 1, L] bool (True = real key) -> [B, S, H*hd].

    Bidirectional; only keys are masked, so no query row is ever fully masked. gqa (H != Hkv) comes
    from the config, not from tensor shapes, so the call traces and exports as a constant. Grouped K/V
    heads are expanded to the query heads before the call instead of passing enable_gqa: with a key
    mask, CUDA SDPA's flash kernel is out and the memory-efficient kernel rejects unequal head counts,
    so enable_gqa would run the fp32-upcast math kernel in every layer (Dream: 28 / 4 heads). The copy
    is 2 * (H - Hkv) * L * hd per layer, a few MB against hundreds of MB of weights."""
    if gqa:   # KV head j serves query heads j*g .. j*g+g-1 (enable_gqa's and Qwen2's order)
        B, Hkv, L, hd = k.shape
        g = q.shape[1] // Hkv
        k = k[:, :, None].expand(B, Hkv, g, L, hd).reshape(B, Hkv * g, L, hd)        # [B, H, L, hd]
        v = v[:, :, None].expand(B, Hkv, g, L, hd).reshape(B, Hkv * g, L, hd)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    B, H, S, hd = o.shape
    return o.transpose(1, 2).reshape(B, S, H * hd)


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Head-averaged attention probabilities of the query rows: q [B, H, S, hd], k [B, Hkv, L, hd],
    key_mask [B, 1, 1, L] -> [B, S, L] fp32 (for attention rollout; outputs still come from SDPA)."""
    g = cfg.n_heads // cfg.n_kv_heads
    kf = k.float().repeat_interleave(g, dim=1) if g > 1 else k.float()
    scores = (q.float() @ kf.transpose(-1, -2)) * cfg.head_dim ** -0.5          # [B, H, S, L]
    scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(-1).mean(1)


def attn_out(w: Weights, i: int, o: torch.Tensor) -> torch.Tensor:
    """o [B, S, H*hd] -> [B, S, d] (row-parallel under tensor parallelism: the ranks' partial sums added)."""
    return w.shard.all_reduce(linear(o, w.wo[i], at(w.wo_scale, i)))


def ffn(w: Weights, cfg: ModelConfig, i: int, h: torch.Tensor) -> torch.Tensor:
    """h [B, S, d] (residual stream after attention) -> FFN delta [B, S, d]."""
    hn = rms_norm(h, w.ffn_norm[i], cfg.norm_eps)
    gate, up = linear(hn, w.w_gate_up[i], at(w.w_gate_up_scale, i)).chunk(2, dim=-1)   # [B, S, F] each
    return w.shard.all_reduce(linear(F.silu(gate) * up, w.w_down[i], at(w.w_down_scale, i)))   # row-parallel


def _own_keys(k, v, xn):
    return k, v


def layer_rows(w: Weights, cfg: ModelConfig, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               key_mask: torch.Tensor, keys: Callable = _own_keys, *, with_v: bool = True,
               probs_out: torch.Tensor | None = None):
    """Layer i for the rows x [B, S, d] (the residual stream at those rows), attending over all L keys.

    cos, sin [B, 1, S, hd]: RoPE at the rows' positions. keys(k, v, xn) receives the rows' post-RoPE
    keys k [B, Hkv, S, hd], their values v [B, Hkv, S, hd] (None when with_v is False: the caller has
    the values already, e.g. from V-verify) and the normed rows xn [B, S, d]; it stores what the caller
    caches and returns the keys and values [B, Hkv, L, hd] to attend over (default: the rows' own, so
    S = L is a full layer). probs_out [B, S, L], if given, receives the head-averaged attention.

    Returns (attention delta a [B, S, d], FFN delta m [B, S, d], k, v); the rows' output is x + a + m."""
    xn = rms_norm(x, w.attn_norm[i], cfg.norm_eps)
    y = project(w, cfg, i, xn, 0, cfg.q_width + cfg.kv_width * (2 if with_v else 1))
    q = heads(y[..., :cfg.q_width], cfg.n_heads, cfg.head_dim)                       # [B, H, S, hd]
    k = heads(y[..., cfg.q_width:cfg.q_width + cfg.kv_width], cfg.n_kv_heads, cfg.head_dim)
    v = heads(y[..., cfg.q_width + cfg.kv_width:], cfg.n_kv_heads, cfg.head_dim) if with_v else None
    q, k = apply_rope(q, cos, sin, cfg.rope_fp32), apply_rope(k, cos, sin, cfg.rope_fp32)
    k_all, v_all = keys(k, v, xn)                                                   # [B, Hkv, L, hd]
    if probs_out is not None:
        probs_out.copy_(w.shard.average(attention_probs(q, k_all, key_mask, cfg)))   # the mean over all heads
    a = attn_out(w, i, attention(q, k_all, v_all, key_mask, cfg.n_heads != cfg.n_kv_heads))
    m = ffn(w, cfg, i, x + a)
    return a, m, k, v


def head(w: Weights, cfg: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """h [B, R, d] final residual rows -> logits [B, R, V] in the model dtype (vocabulary-parallel under
    tensor parallelism: each rank's V/N logits, gathered in rank order)."""
    return w.shard.all_gather(linear(rms_norm(h, w.final_norm, cfg.norm_eps), w.head, w.head_scale), -1)


def positions_and_mask(tokens: torch.Tensor, n_pad: torch.Tensor):
    """Left-padded canvas: positions count from each row's first real token; pads are masked keys.

    tokens [B, L]; n_pad [B] int64 -> positions [B, L] int64, key_mask [B, 1, 1, L] bool."""
    L = tokens.shape[1]
    ar = torch.arange(L, device=tokens.device)[None]                  # [1, L]
    positions = (ar - n_pad[:, None]).clamp(min=0)
    key_mask = (ar >= n_pad[:, None])[:, None, None, :]
    return positions, key_mask


def forward(w: Weights, cfg: ModelConfig, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Reference whole-canvas forward: tokens [B, L] -> logits [B, L, V] (unshifted: row i is the
    model's raw output at i; for Dream it predicts token i+1). For tests and tools, not the hot path."""
    if n_pad is None:
        n_pad = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    positions, key_mask = positions_and_mask(tokens, n_pad)
    cos, sin = rope_tables(positions, cfg)
    x = w.embed[tokens]
    for i in range(cfg.n_layers):
        a, m, _, _ = layer_rows(w, cfg, i, x, cos, sin, key_mask)
        x = x + a + m
    return head(w, cfg, x)
