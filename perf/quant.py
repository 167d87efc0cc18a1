"""Weight-only int8 / int4 against bf16 and fp32: memory, greedy agreement, every step kind, end to end.

    python -m dllm.perf.quant --preset small [--family llada] [--prompt-len 256] [--gen-length 64]
                              [--block-length 32] [--iters 5] [--repeats 3] [--backend eager] [--head]
                              [--no-timing] [--kernels]

One run, one machine: the preset is written as a real-format checkpoint and loaded four ways (fp32, bf16,
and int8 / int4 weights with --act-dtype activations, bf16 by default). Prints the loaded weight bytes
per mode, each policy's greedy tokens' agreement with bf16's (and fp32's), and unless --no-timing every
step kind's median milliseconds (--iters, going round modes, policies and kinds so a slow spell of a
shared machine hits all of them) and every policy's end-to-end median seconds (--repeats, interleaved
the same way), each as a ratio to bf16 and to fp32.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dllm.models import prepack
from dllm.models.tiny import PRESETS, write_tiny
from dllm.runtime import Engine
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.options import parse_spec
from dllm.runtime.state import RequestShape

from .e2e import random_prompt

POLICIES = ["none", "dllm-cache:kp=100,kr=7,rho=0.25", "d2cache:k=32,attn_budget=32", "dual-cache"]


def modes(act: str, head: bool = False) -> dict[str, tuple[str, str]]:
    """label -> (activation dtype, quantize); head: also int8 / int4 with the LM head quantized (MODE+head)."""
    out = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": (act, "int8"), "int4": (act, "int4")}
    return out | ({"int8+head": (act, "int8"), "int4+head": (act, "int4")} if head else {})


def weight_bytes(eng: Engine) -> int:
    """Bytes of the loaded weights, each storage once (a tied head is the embedding)."""
    seen, total = set(), 0
    for t in prepack.plain(eng.weights).tensors().values():     # packed ones as the matrices they hold
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def kind_times(engines: dict, shape: RequestShape, specs: list[str], prompt, iters: int) -> dict:
    """{(mode, spec, kind): median seconds}: every kind of every policy in every mode, prepared first,
    then timed going round modes, policies and kinds `iters` times."""
    runs = []
    for mode, eng in engines.items():
        dc = DecodeConfig.make(eng.cfg.family).structure
        for spec in specs:
            policy = parse_spec(spec)["policy"]
            prep = eng.prepared(shape, dc, policy)
            eng.prepare_steps(prep, policy.kinds)
            with torch.inference_mode():
                prep.fill(eng.cfg, [prompt], seed=0)
                for k in policy.kinds:          # warm-up, the full step first (it writes every cache)
                    prep.steps[k]()
            runs += [(mode, spec, k, prep) for k in policy.kinds]
    times = {(m, s, k): [] for m, s, k, _ in runs}
    with torch.inference_mode():
        for _ in range(iters):
            for mode, spec, kind, prep in runs:
                prep.state.rewind()
                t0 = time.perf_counter()
                prep.steps[kind]()
                times[mode, spec, kind].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def e2e_times(engines: dict, specs: list[str], prompt, repeats: int, **kw) -> tuple[dict, dict]:
    """({(mode, spec): median seconds}, {(mode, spec): tokens}): interleaved over modes and policies."""
    times, tokens = {}, {}
    for mode, eng in engines.items():
        for spec in specs:
            tokens[mode, spec] = eng.generate(prompt, **kw, **parse_spec(spec)).tokens[0]     # warm-up
            times[mode, spec] = []
    for _ in range(repeats):
        for mode, eng in engines.items():
            for spec in specs:
                times[mode, spec].append(eng.generate(prompt, **kw, **parse_spec(spec)).seconds)
    return {k: statistics.median(v) for k, v in times.items() if v}, tokens


def kernel_table(K: int, N: int, rows=(16, 320), seconds: float = 0.3) -> list[str]:
    """One matmul [M, K] x [N, K]^T per weight kind and activation dtype: ms (best-of loop mean over
    `seconds`), dense / int8 / int4 interleaved per shape (models/quant.linear, the kernels steps use)."""
    from dllm.models.quant import Quantization, linear, quantize, to_device
    G = Quantization("int4").group_for("w_gate_up", K)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    out = ["| M | activations | dense ms | int8 ms | int4 ms |", "|---|---|---|---|---|"]
    with torch.inference_mode():
        for M in rows:
            for dt in (torch.bfloat16, torch.float32):
                x, calls = torch.randn(M, K).to(dt), {"dense": (lambda wd=w.to(dt): x @ wd.t())}
                for mode in ("int8", "int4"):
                    pw, ps = to_device(*quantize(w, mode, G, dt), "cpu", dt)
                    calls[mode] = lambda pw=pw, ps=ps: linear(x, pw, ps)
                ms = {}
                for name, f in calls.items():
                    f()
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        f()
                        n += 1
                    ms[name] = (time.perf_counter() - t0) / n * 1e3
                out.append(f"| {M} | {str(dt)[6:]} | {ms['dense']:.3f} | {ms['int8']:.3f} | {ms['int4']:.3f} |")
    return out


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=POLICIES, help="POLICY[:key=value,...] as in perf.e2e")
    ap.add_argument("--act-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="activations of the int8 / int4 rows (default bfloat16)")
    ap.add_argument("--backend", default="eager", help="eager | compile (CPU)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls of each step kind (median)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations of each policy (median)")
    ap.add_argument("--head", action="store_true", help="also int8 / int4 with the LM head quantized")
    ap.add_argument("--no-timing", action="store_true", help="memory and agreement only (no timed runs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernels", action="store_true",
                    help="only the matmul kernels: the preset's FFN up matrix, dense / int8 / int4, bf16 and fp32")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.kernels:
        p = PRESETS[a.preset]
        print(f"# one matmul x [M, {p.d_model}] @ W [{2 * p.mlp_hidden}, {p.d_model}]^T (the {a.preset} preset's "
              f"gate|up), threads={torch.get_num_threads()}\n")
        print("\n".join(kernel_table(p.d_model, 2 * p.mlp_hidden)))
        return
    G, block = a.gen_length, a.block_length
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny(Path(tmp) / a.preset, a.family, a.preset, tokenizer=False)
        engines = {m: Engine.from_pretrained(folder, dtype=dt, quantize=q, backend=a.backend,
                                             quantize_head=m.endswith("+head"))
                   for m, (dt, q) in modes(a.act_dtype, a.head).items()}
    cfg = engines["bf16"].cfg
    prompt = random_prompt(cfg, a.prompt_len)
    kw = dict(gen_length=G, steps=G, block_length=block)
    print(f"# {a.family} preset={a.preset} (layers {cfg.n_layers}, d {cfg.d_model}, vocab {cfg.vocab_size}) "
          f"P={a.prompt_len} G={G} steps={G} block={block} backend={a.backend} threads={torch.get_num_threads()} "
          f"int8/int4 activations {a.act_dtype}; iters={a.iters} repeats={a.repeats} (medians, interleaved)")
    print("\n| mode | weight MB | vs bf16 |\n|---|---|---|")
    base = weight_bytes(engines["bf16"])
    for m, eng in engines.items():
        print(f"| {m} | {weight_bytes(eng) / 1e6:.1f} | {weight_bytes(eng) / base:.2f}× |")

    e2e, tokens = e2e_times(engines, a.policies, prompt, 0 if a.no_timing else a.repeats, **kw)
    print("\nGreedy tokens: agreement with bf16 (with fp32) per policy\n")
    print("| policy | " + " | ".join(m for m in engines if m != "bf16") + " |\n|---|" + "---|" * (len(engines) - 1))
    for spec in a.policies:
        cells = [f"{agreement(tokens[m, spec], tokens['bf16', spec]):.1%} "
                 f"({agreement(tokens[m, spec], tokens['fp32', spec]):.1%})" for m in engines if m != "bf16"]
        print(f"| {spec} | " + " | ".join(cells) + " |")
    if a.no_timing:
        return
    shape = RequestShape(1, a.prompt_len, G, block, G)
    kinds = kind_times(engines, shape, a.policies, prompt, a.iters)
    print("\nEvery step kind: median ms (ratio to bf16 / to fp32)\n")
    print("| policy | kind | " + " | ".join(engines) + " |\n|---|---|" + "---|" * len(engines))
    for spec in a.policies:
        for kind in parse_spec(spec)["policy"].kinds:
            ms = {m: kinds[m, spec, kind] for m in engines}
            print(f"| {spec} | {kind} | " + " | ".join(
                f"{ms[m] * 1e3:.2f} ({ms[m] / ms['bf16']:.2f} / {ms[m] / ms['fp32']:.2f})" for m in engines) + " |")
    print("\nEnd to end: median seconds (ratio to bf16 / to fp32)\n")
    print("| policy | " + " | ".join(engines) + " |\n|---|" + "---|" * len(engines))
    for spec in a.policies:
        s = {m: e2e[m, spec] for m in engines}
        print(f"| {spec} | " + " | ".join(f"{s[m]:.3f} ({s[m] / s['bf16']:.2f} / {s[m] / s['fp32']:.2f})"
                                          for m in engines) + " |")


if __name__ == "__main__":
    main()
