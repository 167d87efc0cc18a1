"""FLOP and byte floors of every step kind, the machine's measured peaks, and how close each kind gets.

    python -m dllm.perf.roofline --preset small --prompt-len 512 --gen-length 128 --block-length 32 [--dtype bfloat16]

The model: a policy says per layer how many rows each step kind recomputes (Policy.work). From that,
a kind's FLOPs are its matmuls (Q/K/V/output projections, the FFN, attention over all L keys, the
head over the rows the policy decodes (Policy.head_rows: the current block, or d2Cache's certainty
window), d2Cache's attention probabilities), and its bytes are what it
must move at least once: the weights of every layer it touches and the head, the cached keys and
values it attends over, and the cache rows it writes. Norms, RoPE and other elementwise work are not
counted (they are O(rows x d), a few percent of the FLOPs). The floor of a kind is the roofline
max(FLOPs / matmul peak, bytes / bandwidth), with both peaks measured in the same run on the same
device by a micro-benchmark (the fastest call of a few square matmuls and of the model's own
full-step FFN matmul in the run's dtype; the fastest large copy). Achieved fraction = floor / measured step time.

Tensor parallel (--tp-table): per rank, a kind's FLOPs and weight bytes are 1/N (its heads, FFN columns and
vocabulary rows), the attention deltas it caches stay whole, and each layer adds its all-reduces (a ring:
2(N-1)/N of the message over the rank's link, plus a fixed latency per collective; the head's logits add
one all-gather). The steps do not overlap collectives with compute, so the terms add.

    python -m dllm.perf.roofline --tp-table       # LLaDA-8B, TP 1/2/4/8 on H100 / H200 (nominal peaks)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from dllm.models.config import ModelConfig
from dllm.models.parallel import Shard
from dllm.models.quant import Quantization
from dllm.runtime.policy.base import LayerWork, Policy
from dllm.runtime.state import RequestShape

# Nominal peaks of the GPUs the tables predict for (dense bf16 tensor-core FLOP/s, HBM bytes/s, NVLink
# bytes/s one way per GPU) and the latency of one small NCCL collective inside an NVLink node (of the order
# of 10 us; the all-reduces of a partial step are a few hundred KB, where latency dominates).
NOMINAL = {"H100 SXM": (989e12, 3.35e12, 450e9), "H200": (989e12, 4.8e12, 450e9)}
COLLECTIVE_LATENCY = 10e-6


@dataclass(frozen=True)
class Cost:
    flops: float            # floating-point operations of one step (a multiply-add counts 2)
    bytes: float            # bytes one step must move at least once
    cache: float = 0.0      # the part of bytes that is one batch row's cache traffic (the rest: weights)
    link: float = 0.0       # tensor parallel: bytes one rank sends to the others (ring all-reduce / all-gather)
    collectives: int = 0    # tensor parallel: collectives per step


def matrix_bytes(N: int, K: int, elt: int, mode: str = "none", group: int = 128) -> float:
    """Bytes of an N x K weight matrix as stored: dense (elt each), int8 (1 byte + one scale per row) or
    int4 (half a byte + a (scale, zero) pair per group of `group`): models/quant.py's layouts."""
    if mode == "int8":
        return N * K + N * elt
    if mode == "int4":
        return N * K / 2 + 2 * N * (K // group) * elt
    return N * K * elt


def layer_cost(cfg: ModelConfig, L: int, lw: LayerWork, elt: int, quant: Quantization | None = None) -> Cost:
    """One layer for one batch row: FLOPs of its matmuls and the bytes of its weights and cache. quant:
    the matrices' bytes as quantized (int4 cannot slice its packed rows: a projection of only Q|K or only
    V reads the whole fused matrix, models/quant.linear)."""
    d, F, qw, kw = cfg.d_model, cfg.mlp_hidden, cfg.q_width, cfg.kv_width
    r, v = lw.rows, lw.v_rows
    flops = 2 * r * d * (qw + kw) + 2 * v * d * kw                  # Q, K of the rows; V of the v rows
    flops += 4 * r * L * qw + (2 * r * L * qw if lw.probs else 0)   # scores and weighted values (+ probabilities)
    flops += 2 * r * qw * d + 6 * r * d * F                         # output projection, SwiGLU FFN
    cache = (2 * L * kw if r else 0) + 2 * r * kw + v * kw + 2 * r * d   # read K/V; write the rows' K, V, A, M
    mode = quant.mode if quant is not None else "none"

    def mb(field, N, K):
        return matrix_bytes(N, K, elt, mode, quant.group_for(field, K) if mode == "int4" else 128)
    if mode == "int4":
        qkv = mb("wqkv", qw + 2 * kw, d) * ((1 if r else 0) + (1 if v and v != r else 0))
        weights = qkv + ((mb("wo", d, qw) + mb("w_gate_up", 2 * F, d) + mb("w_down", d, F)) if r else 0)
    else:
        weights = ((mb("wqkv", qw + kw, d) + mb("wo", d, qw) + mb("w_gate_up", 2 * F, d) + mb("w_down", d, F))
                   if r else 0) + (mb("wqkv", kw, d) if v else 0)
    return Cost(flops, weights + cache * elt, cache * elt)


def kind_cost(cfg: ModelConfig, shape: RequestShape, kmax: int, policy: Policy, kind: str,
              dtype: torch.dtype, quant: Quantization | None = None, tp: int = 1) -> Cost:
    """The FLOPs and bytes of one step of `kind` (all batch rows); quant: weight-only quantized matrices;
    tp > 1: those of one tensor-parallel rank, with the bytes it sends to the others and its collectives."""
    elt = torch.empty(0, dtype=dtype).element_size()
    L, B, d, R = shape.length, shape.batch, cfg.d_model, policy.head_rows(shape, kind)
    work = policy.work(cfg, shape, kmax, kind)
    layers = [layer_cost(Shard(0, tp).local(cfg), L, lw, elt, quant) for lw in work]
    V = cfg.vocab_size // tp
    head_mode = quant.mode if quant is not None and "head" in quant.fields(cfg) else "none"
    head_flops = 2 * R * d * V
    head_bytes = matrix_bytes(V, d, elt, head_mode, quant.group_for("head", d) if head_mode == "int4" else 128)
    weight_bytes = sum(c.bytes - c.cache for c in layers)      # read once per step whatever the batch
    cache_bytes = B * sum(c.cache for c in layers)             # every batch row's own keys, values, deltas
    link, collectives = 0.0, 0
    if tp > 1:
        ring = 2 * (tp - 1) / tp
        for lw in work:
            if lw.rows:                                        # the output and down projections' sums
                link, collectives = link + ring * 2 * B * lw.rows * d * elt, collectives + 2
            if lw.probs:                                       # d2Cache: the mean attention over all heads
                link, collectives = link + ring * B * lw.rows * L * 4, collectives + 1
            if lw.v_rows > lw.rows:                            # dLLM-Cache V-verify: 3 sums per response row
                link, collectives = link + ring * 3 * B * lw.v_rows * 4, collectives + 1
        link, collectives = link + (tp - 1) / tp * B * R * cfg.vocab_size * elt, collectives + 1    # head gather
    return Cost(B * (sum(c.flops for c in layers) + head_flops), weight_bytes + cache_bytes + head_bytes,
                cache_bytes, link, collectives)


def predicted_seconds(cost: Cost, flops: float, bandwidth: float, link: float,
                      latency: float = COLLECTIVE_LATENCY) -> float:
    """A step's floor on one rank: the roofline plus its collectives (not overlapped with compute)."""
    return max(cost.flops / flops, cost.bytes / bandwidth) + cost.link / link + cost.collectives * latency


TP_KINDS = (("none", "full"), ("dllm-cache", "verify"), ("d2cache", "selected"), ("dual-cache", "block"))


def tp_prediction(flops: float, bandwidth: float, link: float, tps=(1, 2, 4, 8),
                  batch: int = 1) -> dict[tuple[str, str], list[float]]:
    """LLaDA-8B in bf16, P=512 G=256 block 32: seconds per step per rank of the full step and of each cache
    policy's partial step kind at each tensor-parallel size, on a device with these peaks."""
    from dllm.models.config import parse_config
    from dllm.models.tiny import SHAPE_PRESETS, tiny_config
    from dllm.runtime import make_policy
    cfg = parse_config(tiny_config("llada", SHAPE_PRESETS["llada-8b-shape"]))
    shape = RequestShape(batch, 512, 256, 32, 256)
    return {(name, kind): [predicted_seconds(kind_cost(cfg, shape, 8, make_policy(name), kind, torch.bfloat16, tp=n),
                                             flops, bandwidth, link) for n in tps]
            for name, kind in TP_KINDS}


def tp_table(tps=(1, 2, 4, 8)) -> list[str]:
    """tp_prediction on each GPU of NOMINAL, as a markdown table."""
    out = ["| GPU | step kind | " + " | ".join(f"TP {n}" for n in tps) + " |", "|---|---|" + "---|" * len(tps)]
    for gpu, peaks in NOMINAL.items():
        for (name, kind), seconds in tp_prediction(*peaks, tps).items():
            out.append(f"| {gpu} | {name} {kind} | " + " | ".join(f"{t * 1e3:.2f} ms" for t in seconds) + " |")
    return out


@dataclass(frozen=True)
class Peaks:
    flops: float            # FLOP/s: the best matmul rate measured
    bandwidth: float        # bytes/s of a large copy (each byte read once and written once)
    device: str
    dtype: str

    def floor(self, cost: Cost) -> tuple[float, str]:
        """(seconds, 'compute' | 'memory'): the roofline floor of a step and what bounds it."""
        c, m = cost.flops / self.flops, cost.bytes / self.bandwidth
        return (c, "compute") if c >= m else (m, "memory")

    def describe(self) -> str:
        return (f"measured peaks on {self.device}: matmul {self.flops / 1e9:.0f} GFLOP/s ({self.dtype}), "
                f"copy bandwidth {self.bandwidth / 1e9:.1f} GB/s")


def best_seconds(device: torch.device, fn, iters: int) -> float:
    """The fastest call's seconds (a peak is the best the machine showed; a shared machine's slow spells
    only ever add time). CPU: each call timed; CUDA: CUDA events around `iters` calls, twice."""
    if device.type == "cuda":
        from .steps import cuda_seconds
        return min(cuda_seconds(device, fn, iters) for _ in range(2))
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_peaks(device, dtype: torch.dtype, cfg: ModelConfig | None = None, rows: int = 640) -> Peaks:
    """The matmul peak (best of square matmuls and, with cfg, the model's full-step FFN matmul
    [rows, d] @ [d, 2F], each also with the weight prepacked for oneDNN where engines prepack: the
    fastest way this machine multiplies) and the copy bandwidth, measured now on `device` in `dtype`."""
    from dllm.models import prepack
    device = torch.device(device)
    big = device.type == "cuda"
    shapes = [(n, n, n) for n in ((4096, 8192) if big else (1024, 2048))]
    if cfg is not None:
        shapes.append((rows, cfg.d_model, 2 * cfg.mlp_hidden))
    packs = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    best = 0.0
    with torch.inference_mode():
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(n, k, device=device, dtype=dtype)
            best = max(best, 2 * m * k * n / best_seconds(device, lambda: a @ b.t(), 10))
            if packs:
                p = prepack.pack(b)
                best = max(best, 2 * m * k * n / best_seconds(device, lambda: prepack.matmul(a, p), 10))
        src = torch.empty((2 << 30) if big else (512 << 20), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        bw = 2 * src.numel() / best_seconds(device, lambda: dst.copy_(src), 10)
    name = torch.cuda.get_device_name(device) if big else "cpu"
    return Peaks(best, bw, name, str(dtype).replace("torch.", ""))


def roofline_rows(cfg: ModelConfig, shape: RequestShape, kmax: int, policy: Policy, dtype: torch.dtype,
                  times: dict[str, float], peaks: Peaks, quant: Quantization | None = None) -> list[dict]:
    """One row per step kind of `policy` timed in `times` (seconds): its cost, floor and achieved fraction."""
    rows = []
    for kind in policy.kinds:
        if kind not in times:
            continue
        cost = kind_cost(cfg, shape, kmax, policy, kind, dtype, quant)
        floor, bound = peaks.floor(cost)
        rows.append(dict(policy=policy.name, kind=kind, ms=times[kind] * 1e3, gflop=cost.flops / 1e9,
                         mb=cost.bytes / 1e6, floor_ms=floor * 1e3, bound=bound, fraction=floor / times[kind]))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    out = ["| policy | step kind | ms | GFLOP | MB moved | floor ms | bound | of floor |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['policy']} | {r['kind']} | {r['ms']:.2f} | {r['gflop']:.2f} | {r['mb']:.0f} | "
                   f"{r['floor_ms']:.2f} | {r['bound']} | {r['fraction']:.0%} |")
    return out


def main(argv=None) -> None:
    from dllm.graphs import available
    from dllm.runtime.decoding import DecodeConfig
    from dllm.runtime.options import parse_policy

    from .e2e import DTYPES, preset_engine, random_prompt
    from .steps import backend_times
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--backend", default="eager", help="one of " + ", ".join(available(torch.device("cpu"))) +
                    " (CUDA: also cudagraph, compile+cudagraph)")
    ap.add_argument("--policies", nargs="+", default=["none", "dllm-cache", "d2cache", "dual-cache"],
                    help="policy specs, e.g. dllm-cache:kp=100,kr=7,rho=0.25")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tp-table", action="store_true", help="print the tensor-parallel prediction for LLaDA-8B on "
                    "H100 / H200 (nominal peaks, no measurement) and exit")
    ap.add_argument("--prepack", choices=["on", "off", "both"], default="on",
                    help="CPU float32 eager: weights prepacked for oneDNN (Engine's prepack), plain, or both, "
                    "interleaved per policy (the before / after of models/prepack.py)")
    ap.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                    help="weight-only quantization (bytes counted as stored)")
    a = ap.parse_args(argv)
    if a.tp_table:
        print(f"# LLaDA-8B bf16, batch 1, P=512 G=256 block 32: floor per step per rank = max(FLOPs / peak, bytes / "
              f"HBM) + link bytes / NVLink + {COLLECTIVE_LATENCY * 1e6:.0f} us per collective")
        print("\n".join(tp_table()))
        return
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    quant = Quantization(a.quantize)
    eng = preset_engine(a.family, a.preset, device=device, dtype=dtype, quantize=a.quantize)
    cfg = eng.cfg
    block = a.block_length
    shape = RequestShape(1, a.prompt_len, a.gen_length, block, a.gen_length)
    prompt = random_prompt(cfg, a.prompt_len)
    peaks = measure_peaks(device, dtype, cfg, shape.length)
    print(f"# {cfg.family} preset={a.preset} (layers {cfg.n_layers}, d {cfg.d_model}, vocab {cfg.vocab_size}) "
          f"P={a.prompt_len} G={a.gen_length} block={block} backend={a.backend} threads={torch.get_num_threads()} "
          f"quantize={a.quantize}")
    print(f"# {peaks.describe()}")
    rows = []
    variants = {"on": [True], "off": [False], "both": [False, True]}[a.prepack]
    for name in a.policies:
        policy = parse_policy(name)
        kmax = eng.prepared(shape, DecodeConfig.make(cfg.family).structure, policy).state.kmax
        for packed in variants:
            times, _ = backend_times(cfg, eng.weights, device, dtype, shape, policy, prompt, [a.backend], a.iters,
                                     prepack=packed)
            for r in roofline_rows(cfg, shape, kmax, policy, dtype, times[a.backend], peaks, quant):
                rows.append(r | ({"policy": f"{r['policy']} ({'prepacked' if packed else 'plain'})"}
                                 if len(variants) > 1 else {}))
    print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
