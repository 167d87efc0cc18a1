"""Weight-only quantization: int8 per output channel, int4 group-wise, both symmetric.

A quantized matrix lives in the same `Weights` field as a dense one, with its scales beside it (`<field>_scale`);
the weight's dtype says its kind: floating point (dense), int8 (`aten._weight_int8pack_mm`), uint8 (int4 packed for
the CPU kernel `aten._weight_int4pack_mm_for_cpu`) or int32 (int4 packed for the CUDA kernel
`aten._weight_int4pack_mm`). `linear` is the one matmul of every weight kind; activations stay in the engine's
dtype and the kernels are PyTorch's own (docs/quantization.md).

Shapes: N output rows, K input width, G the int4 group size.

    stored (a `dllm quantize` folder, device independent)   on the device (Weights)
    int8: q int8 [N, K], scale [N]                          q int8 [N, K], scale [N] (engine dtype)
    int4: nibbles uint8 [N, K/2] (q + 8, high nibble first),  CPU: uint8 [N, K/2]; CUDA: int32 [N/8, K/(16 t), 32, t/2]
          scale [N, K/G]                                    scale_and_zero [K/G, N, 2] (engine dtype, zero = 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import CheckpointError, ModelConfig
from .prepack import Packed
from .prepack import matmul as packed_matmul

MODES = ("none", "int8", "int4")
GROUPS = (32, 64, 128, 256)          # the group sizes the int4 kernels take
LAYER_FIELDS = ("wqkv", "wo", "w_gate_up", "w_down")    # attention projections and the FFN
CONFIG_KEY = "dllm_quantization"     # the config.json entry of a quantized folder
STORED_FILE = "quantized.safetensors"


@dataclass(frozen=True)
class Quantization:
    mode: str = "none"              # none | int8 | int4
    group: int | None = None        # int4 group size; None: 128, or the largest of 64, 32 that divides a width
    head: bool = False              # quantize the LM head too (off by default: docs/quantization.md says why)

    def __post_init__(self):
        if self.mode not in MODES:
            raise CheckpointError(f"--quantize must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group is not None and self.group not in GROUPS:
            raise CheckpointError(f"--quantize-group must be one of {', '.join(map(str, GROUPS))} (the int4 "
                                  f"kernels' group sizes), got {self.group!r}")
        if self.mode != "int4" and self.group is not None:
            raise CheckpointError(f"--quantize-group is the int4 group size; it does not apply to --quantize "
                                  f"{self.mode}")
        if self.mode == "none" and self.head:
            raise CheckpointError("--quantize-head needs --quantize int8 or int4")

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def fields(self, cfg: ModelConfig) -> tuple[str, ...]:
        """The Weights fields this quantizes (a tied head stays the embedding, which is never quantized)."""
        if not self.on:
            return ()
        return LAYER_FIELDS + (("head",) if self.head and not cfg.tied_head else ())

    def group_for(self, field: str, K: int) -> int:
        """The int4 group size of a matrix with input width K (one line when none fits)."""
        if self.group is not None:
            if K % self.group:
                raise CheckpointError(f"--quantize-group {self.group} does not divide the input width {K} of "
                                      f"'{field}'; choose one of "
                                      f"{', '.join(str(g) for g in GROUPS if K % g == 0) or 'none (no int4)'}")
            return self.group
        for g in (128, 64, 32):
            if K % g == 0:
                return g
        raise CheckpointError(f"int4 needs an input width divisible by 32; '{field}' has {K}: use --quantize int8")

    def check(self, cfg: ModelConfig) -> None:
        """Everything that can be refused from config.json alone, before a weight is read."""
        for field, (N, K) in matrix_shapes(cfg).items():
            if field not in self.fields(cfg):
                continue
            if self.mode == "int4":
                self.group_for(field, K)
                if N % 16:
                    raise CheckpointError(f"int4 packs output rows in 16s; '{field}' has {N}: use --quantize int8")

    def entry(self, cfg: ModelConfig) -> dict:
        """The config.json entry of a folder quantized this way."""
        groups = {f: self.group_for(f, K) for f, (_, K) in matrix_shapes(cfg).items()
                  if f in self.fields(cfg)} if self.mode == "int4" else {}
        return {"mode": self.mode, "head": self.head, "group": self.group, "groups": groups}

    @classmethod
    def from_entry(cls, e) -> Quantization:
        if not isinstance(e, dict) or e.get("mode") not in ("int8", "int4"):
            raise CheckpointError(f"config.json's '{CONFIG_KEY}' must name a mode (int8 or int4), got {e!r}; "
                                  f"write the folder again with dllm quantize")
        return cls(e["mode"], e.get("group"), bool(e.get("head", False)))


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Weights field -> (N, K) of each layer's matrix (the head's: one matrix)."""
    d, q, kv, F = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden
    return {"wqkv": (q + 2 * kv, d), "wo": (d, q), "w_gate_up": (2 * F, d), "w_down": (d, F),
            "head": (cfg.vocab_size, d)}


# ---------------------------------------------------------------- quantizing (float -> stored form)

def quantize_int8(w: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale [N] in dtype). The scale is rounded to dtype before q is
    chosen, so |w - q * scale| <= scale / 2 for every element: scale = max|w_row| / 127."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (nibbles uint8 [N, K/2] holding q + 8, scale [N, K/G] in dtype): q in [-7, 7],
    scale = max|w_group| / 7 (rounded to dtype first), so |w - q * scale| <= scale / 2."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    scale = (wg.abs().amax(-1) / 7).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)    # [N, K/G]
    q = (torch.round(wg / scale.float()[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(N, K)
    return (q[:, ::2] << 4) | q[:, 1::2], scale


def int4_values(nibbles: torch.Tensor) -> torch.Tensor:
    """nibbles uint8 [N, K/2] -> q + 8 as int32 [N, K]."""
    return torch.stack([nibbles >> 4, nibbles & 15], -1).reshape(nibbles.shape[0], -1).to(torch.int32)


def quantize(w: torch.Tensor, mode: str, group: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form (device independent) of one matrix."""
    return quantize_int8(w, dtype) if mode == "int8" else quantize_int4(w, group, dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A stored form back to float32 [N, K] (tests and tools)."""
    if q.dtype == torch.int8:
        return q.float() * scale.float()[:, None]
    v = int4_values(q).float() - 8
    N, K = v.shape
    return (v.reshape(N, scale.shape[1], -1) * scale.float()[..., None]).reshape(N, K)


# ---------------------------------------------------------------- the device form

def int4_inner_tiles(K: int) -> int:
    """innerKTiles of the CUDA int4 pack (K must be a multiple of 16 * tiles)."""
    return next(t for t in (8, 4, 2) if K % (16 * t) == 0)


def to_device(q: torch.Tensor, scale: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored form -> what `linear` takes on `device` (packing only: no rounding happens here)."""
    device = torch.device(device)
    scale = scale.to(device=device, dtype=dtype)
    if q.dtype == torch.int8:
        return q.to(device), scale
    q = q.to(device)
    zero = torch.zeros_like(scale)
    sz = torch.stack([scale.t(), zero.t()], -1).contiguous()                          # [K/G, N, 2]
    if device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(q, int4_inner_tiles(2 * q.shape[1])), sz
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_values(q), 1), sz


def device_shapes(cfg: ModelConfig, quant: Quantization, device, dtype, packed: bool = True) -> dict:
    """Weights field -> (shape, dtype) of the quantized fields and their scales on `device`, stacked over
    the layers (packed=False: the stored form)."""
    out = {}
    for field, (N, K) in matrix_shapes(cfg).items():
        if field not in quant.fields(cfg):
            continue
        lead = () if field == "head" else (cfg.n_layers,)
        if quant.mode == "int8":
            out[field] = (lead + (N, K), torch.int8)
            out[field + "_scale"] = (lead + (N,), dtype)
        else:
            G = quant.group_for(field, K)
            if not packed:
                out[field] = (lead + (N, K // 2), torch.uint8)
                out[field + "_scale"] = (lead + (N, K // G), dtype)
                continue
            if torch.device(device).type == "cuda":
                t = int4_inner_tiles(K)
                out[field] = (lead + (N // 8, K // (16 * t), 32, t // 2), torch.int32)
            else:
                out[field] = (lead + (N, K // 2), torch.uint8)
            out[field + "_scale"] = (lead + (K // G, N, 2), dtype)
    return out


def nbytes(shapes: dict) -> int:
    return sum(math.prod(s) * torch.empty(0, dtype=dt).element_size() for s, dt in shapes.values())


# ---------------------------------------------------------------- the one matmul of every weight kind

def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, lo: int = 0,
           hi: int | None = None) -> torch.Tensor:
    """x [..., K] times rows lo:hi of one matrix w [N, K] of any kind (scale None: dense) -> [..., hi - lo].

    The kind is the weight's dtype (fixed when the weights load), so a traced or compiled step holds one
    branch. int4's packed rows cannot be sliced (the packing interleaves rows), so a row range of an int4
    matrix is cut from the whole product: the dual-cache / dLLM-Cache V-only and Q|K projections cost the
    full fused projection's bytes at int4."""
    if isinstance(w, Packed):
        return packed_matmul(x, w, lo, hi)
    if scale is None:
        return x @ w[lo:hi].t()
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                                            # [M, K]
    if w.dtype == torch.int8:
        y = torch.ops.aten._weight_int8pack_mm(x2, w[lo:hi], scale[lo:hi])
    else:
        N, G = scale.shape[1], K // scale.shape[0]
        if w.dtype == torch.uint8:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, G, scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, w, G, scale)
        if lo != 0 or (hi is not None and hi != N):
            y = y[:, lo:hi]
    return y.reshape(*lead, y.shape[-1])


def at(scale: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Layer i's scales (None stays None: a dense weight)."""
    return None if scale is None else scale[i]


def weight_mode(w) -> str:
    """none | int8 | int4: how a Weights' layer matrices are held (read from their dtype)."""
    return "none" if w.wqkv_scale is None else "int8" if w.wqkv.dtype == torch.int8 else "int4"


def quantize_weights(w, cfg: ModelConfig, quant: Quantization, dtype):
    """Dense Weights already on a device -> the same Weights with quant's matrices quantized there, one
    layer at a time (random-weight benchmarks; checkpoints quantize while loading, checkpoint.load_weights)."""
    import dataclasses
    if not quant.on:
        return w
    quant.check(cfg)
    full, out = matrix_shapes(cfg), {}
    for f in quant.fields(cfg):
        G, dense = quant.group_for(f, full[f][1]), getattr(w, f)
        mats = [dense] if f == "head" else list(dense)
        parts = [to_device(*quantize(m, quant.mode, G, dtype), m.device, dtype) for m in mats]
        if f == "head":
            out[f], out[f + "_scale"] = parts[0]
        else:
            out[f], out[f + "_scale"] = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return dataclasses.replace(w, **out)
