"""CPU weight prepacking: every dense float32 matrix reordered once into oneDNN's blocked layout.

A plain `x @ w.t()` on the CPU goes through MKL's sgemm, which packs the weight into its own blocked
layout on every call. For a partial step's 32-129 rows that packing costs as much as the product
(`python -m dllm.perf.roofline --prepack both` put the dual cache's block kind at 22 % of its floor with
plain weights, 36 % packed). Packed once, oneDNN's fp32 GEMM runs the model's small-M products up to
2.9x faster (`python -m dllm.perf.gemm`; docs/performance.md, "CPU steps near their floor").
Two properties keep the runtime's equalities:

- Every output row depends on its input row only, for any number of rows from 2 up, and a row range's
  columns are the whole product's: a partial step's rows stay bit-for-bit the rows a whole-canvas step
  gives them (tests/test_prepack.py checks both). A single row takes a matrix-vector kernel, as it does
  in MKL's sgemm.
- The reference forward (models.layers.forward) reads the same Weights, so the exact-token tests compare
  like with like. Against unpacked weights the products differ in the last bits (another summation
  order), so tokens can differ where two candidates tie to the last bit; on the recorded cases they do
  not (tests/test_prepack.py).

Packing applies to dense float32 weights on the CPU under the eager backend (Inductor cannot lower an
opaque oneDNN tensor, so the compile backend keeps plain weights), where oneDNN is built in
(torch.backends.mkldnn.is_available()). Memory: the packed matrices replace the plain ones in the
engine's Weights (both are held while packing: with less memory free than that, the engine keeps plain
weights and logs it), and the v rows of the fused q|k|v matrix are also packed alone (dLLM-Cache projects V
for the whole response in every layer; the q|k rows of a partial step are cut from the whole product,
which adds its few rows' v columns): kv / (all layer rows) more, 2 % for the small preset, 8 % at
LLaDA-8B's shapes.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .memory import available_bytes

if TYPE_CHECKING:                                    # checkpoint -> quant -> prepack: types only here
    from .checkpoint import Weights

log = logging.getLogger("dllm")
FIELDS = ("wqkv", "wo", "w_gate_up", "w_down")     # stacked [nL, N, K]; the head is one [V, d] matrix


@dataclass(frozen=True)
class Packed:
    """One matrix [N, K] as oneDNN packed it, and row ranges (lo, hi) packed on their own."""
    whole: torch.Tensor                              # opaque oneDNN tensor, shape [N, K]
    ranges: dict[tuple[int, int], torch.Tensor]      # (lo, hi) -> the rows lo:hi packed alone


def applies(device, dtype: torch.dtype, backend: str, w: Weights) -> bool:
    """Whether an engine with these settings packs its weights (the module docstring says when)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and backend == "eager"
            and w.wqkv_scale is None and torch.backends.mkldnn.is_available())


def pack(m: torch.Tensor, ranges: tuple[tuple[int, int], ...] = ()) -> Packed:
    """A dense [N, K] float32 matrix -> Packed (the batch hint only tunes oneDNN's layout)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(t.contiguous(), 32)
    return Packed(one(m), {r: one(m[r[0]:r[1]]) for r in ranges})


def matmul(x: torch.Tensor, w: Packed, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """x [..., K] times rows lo:hi of a packed matrix -> [..., hi - lo]: a range packed alone, else cut
    from the whole product (the same bits either way)."""
    N = w.whole.shape[0]
    hi = N if hi is None else hi
    if (lo, hi) in w.ranges:
        return torch.ops.mkldnn._linear_pointwise(x, w.ranges[(lo, hi)], None, "none", [], "")
    y = torch.ops.mkldnn._linear_pointwise(x, w.whole, None, "none", [], "")
    return y if (lo, hi) == (0, N) else y[..., lo:hi]


def prepack(w: Weights, cfg: ModelConfig) -> Weights:
    """Dense float32 CPU Weights -> the same Weights with every matrix packed (per layer: a tuple indexed
    like the stacked tensor). cfg: this rank's widths (the v rows of wqkv)."""
    qk = cfg.q_width + cfg.kv_width
    v_rows = ((qk, qk + cfg.kv_width),)             # models.layers.values: V alone
    out = {f: tuple(pack(m, v_rows if f == "wqkv" else ()) for m in getattr(w, f)) for f in FIELDS}
    return dataclasses.replace(w, head=pack(w.head), **out)


def is_packed(w: Weights) -> bool:
    return isinstance(w.head, Packed)


def plain(w: Weights) -> Weights:
    """Packed Weights -> the dense stacked Weights they were packed from (bit-exact; export and the compile
    backend take these). A head equal to the embedding is the embedding again (a tied head)."""
    if not is_packed(w):
        return w
    out = {f: torch.stack([p.whole.to_dense() for p in getattr(w, f)]) for f in FIELDS}
    head = w.head.whole.to_dense()
    tied = head.shape == w.embed.shape and torch.equal(head, w.embed)
    return dataclasses.replace(w, head=w.embed if tied else head, **out)


def for_engine(w: Weights, cfg: ModelConfig, device, dtype: torch.dtype, backend: str, on: bool = True) -> Weights:
    """The Weights an engine runs: packed where `applies` (and `on`), plain otherwise (either kind may come
    in: the perf tools build engines of several backends, packed and not, on one engine's weights)."""
    if on and applies(device, dtype, backend, w):
        if is_packed(w):
            return w
        need = sum(getattr(w, f).numel() * 4 for f in (*FIELDS, "head"))      # the packed copies, briefly beside
        free = available_bytes(device)
        if free is not None and need > free:
            log.info("prepack: %.1f GiB to pack, %.1f GiB free: keeping plain weights", need / 2**30, free / 2**30)
            return w
        return prepack(w, cfg)
    return plain(w)
