"""Per-step latency of each step kind under each backend, one run, one machine.

    python -m dllm.perf.steps --preset small --family llada --prompt-len 512 --gen-length 128 --rho 0.25

For every backend available on the device (eager and compile on CPU; also cudagraph and
compile+cudagraph on CUDA) it prepares the step kinds of a DllmCache request on shared weights, times
each kind (median of --iters after warm-up, going round the kinds; on CUDA every timed call synchronises) and prints the
latency, the ratio of each kind to the full step, and each backend's speedup over eager. Preparation
(compile / capture) is reported, never timed as a step. --weights-on-device builds random weights
directly on the device (the GPU presets; latency does not depend on weight values).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from dllm.graphs import available
from dllm.models import prepack
from dllm.models.tiny import PRESETS, SHAPE_PRESETS
from dllm.runtime import DllmCache, Engine
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.state import RequestShape

from .e2e import preset_engine, random_prompt

KINDS = ("full", "response_refresh", "verify", "prompt_refresh")   # report order


def backend_times(cfg, weights, device, dtype, shape, policy, prompt, names, iters, dc=None, prepack=True):
    """{backend: {kind: median seconds}} and {backend: preparation seconds} for one request of `policy`
    (every kind it has; warmed up in its capture order, so the full step writes the caches first).
    prepack: Engine's (False: plain weights on the CPU's float32 eager path too)."""
    dc = dc or DecodeConfig.make(cfg.family).structure
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    res, prep = {}, {}
    for name in names:
        eng = Engine(cfg, weights, device=device, dtype=dtype, backend=name, prepack=prepack)
        prepared = eng.prepared(shape, dc, policy)
        prep[name] = eng.prepare_steps(prepared, policy.kinds)
        runners, st = prepared.steps, prepared.state
        with torch.inference_mode():
            prepared.fill(cfg, [prompt], seed=0)
            for k in policy.kinds:           # warm-up (the full step first writes every cache)
                runners[k]()
            times = {k: [] for k in policy.kinds}
            for _ in range(iters):           # round the kinds (a slow spell of a shared machine hits all)
                for k in policy.kinds:
                    st.rewind()              # stay inside the schedule; committed tokens stay put
                    sync()
                    t0 = time.perf_counter()
                    runners[k]()
                    sync()
                    times[k].append(time.perf_counter() - t0)
            res[name] = {k: statistics.median(v) for k, v in times.items()}
        del eng
    return res, prep


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Floor:
    """Memory-traffic floors of one step on one device, from a bandwidth measured on that device."""
    weight_bytes: int       # every weight but the embedding (a step gathers only its rows)
    cache_bytes: int        # K, V, A, M of every layer and row: what a partial step must read besides weights
    bandwidth: float        # bytes/s of a device-to-device copy on the requested device

    @property
    def weights_s(self) -> float:
        """Weights only: the floor of a full step, which recomputes the cache rather than reading it."""
        return self.weight_bytes / self.bandwidth

    @property
    def partial_s(self) -> float:
        """Weights + cache: a partial step attends over every cached key and value and rebuilds every
        row's residual stream from the cached attention / FFN deltas, in every layer."""
        return (self.weight_bytes + self.cache_bytes) / self.bandwidth

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        return (f"weight-streaming floor (weights only, {gb(self.weight_bytes)}) {self.weights_s * 1e3:.2f} ms; "
                f"partial-step floor (weights + cache, + {gb(self.cache_bytes)} = "
                f"{self.cache_bytes / self.weight_bytes:.1%} more) {self.partial_s * 1e3:.2f} ms; "
                f"at {self.bandwidth / 1e12:.2f} TB/s measured")


def weight_floor(weights, device, cache=None) -> Floor:
    """The floors of a step on `device` (bandwidth measured there); cache: the request's Cache, whose
    K/V/A/M a partial step reads in full (None: weights only)."""
    streamed = nbytes(t for n, t in prepack.plain(weights).tensors().items() if n != "embed")
    cached = nbytes(cache.tensors().values()) if cache is not None else 0
    return Floor(streamed, cached, device_bandwidth(torch.device(device)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(SHAPE_PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.25)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--backends", nargs="*", default=None, help="default: every backend available on the device")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if a.preset in SHAPE_PRESETS and device.type != "cuda":
        ap.error(f"--preset {a.preset} has billions of parameters: run it with --device cuda")
    base = preset_engine(a.family, a.preset, device=device, dtype=dtype)
    cfg, weights = base.cfg, base.weights
    block = a.block_length if cfg.family == "llada" else a.gen_length
    shape = RequestShape(1, a.prompt_len, a.gen_length, block, a.gen_length)
    policy = DllmCache(rho=a.rho)
    prompt = random_prompt(cfg, a.prompt_len)
    names = a.backends or available(device)
    print(f"# {cfg.family} preset={a.preset} (layers {cfg.n_layers}, d {cfg.d_model}) P={a.prompt_len} "
          f"G={a.gen_length} block={block} rho={a.rho} ({policy.n_verify(a.gen_length)} V-verify rows) "
          f"device={device.type} dtype={a.dtype} threads={torch.get_num_threads()} median of {a.iters}")
    res, prep = backend_times(cfg, weights, device, dtype, shape, policy, prompt, names, a.iters)
    print(f"{'step kind':<18}" + "".join(f"{n + ' ms (full/kind)':>32}" for n in names))
    for k in KINDS:
        cells = [f"{res[n][k] * 1e3:.2f} ({res[n]['full'] / res[n][k]:.2f}x)" for n in names]
        print(f"{k:<18}" + "".join(f"{c:>32}" for c in cells))
    if "eager" in res:
        for n in names:
            if n != "eager":
                ratios = "  ".join(f"{k} {res['eager'][k] / res[n][k]:.2f}x" for k in KINDS)
                print(f"speedup of {n} over eager: {ratios}")
    print("preparation (compile / capture) seconds: " + ", ".join(f"{n} {prep[n]:.1f}" for n in names))
    if device.type == "cuda":
        eng = Engine(cfg, weights, device=device, dtype=dtype, backend="eager")
        cache = eng.prepared(shape, DecodeConfig.make(cfg.family).structure, policy).cache
        floor = weight_floor(weights, device, cache)
        print(floor.describe())
        print("full step / weights-only floor: " + ", ".join(f"{n} {res[n]['full'] / floor.weights_s:.2f}x"
                                                            for n in names))
        print("verify step / weights + cache floor: " +
              ", ".join(f"{n} {res[n]['verify'] / floor.partial_s:.2f}x" for n in names))


def cuda_seconds(device: torch.device, fn, iters: int) -> float:
    """Seconds per call of fn, timed with CUDA events on `device`'s current stream (not on whichever
    device happens to be current)."""
    with torch.cuda.device(device):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters


def device_bandwidth(device, gib: int = 2, iters: int = 10) -> float:
    """Bytes per second of a large device-to-device copy on `device` (each byte read once and written once)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_seconds(torch.device(device), lambda: dst.copy_(src), iters)


def device_flops(device, dtype=torch.bfloat16, n: int = 8192, iters: int = 10) -> float:
    """FLOP/s of a large square matmul on `device` in `dtype`: the compute floor's peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / cuda_seconds(torch.device(device), lambda: a @ b, iters)


if __name__ == "__main__":
    main()
