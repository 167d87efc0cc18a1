"""Per-step latency of each step kind (eager), one run, one machine.

    python -m perf.steps --preset small --family llada --prompt-len 512 --gen-length 128 --rho 0.25

Times each step kind on the same buffers (median of --iters, after warm-up) and prints its ratio to
the full step. The end-to-end speedup of a plan is bounded by these ratios and the plan's mix of kinds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.tiny import PRESETS, write_tiny
from runtime import DllmCache, Engine
from runtime.buffers import RequestShape
from runtime.decoding import DecodeConfig
from runtime.steps import make_steps

from .e2e import random_prompt


def time_kind(fn, st, iters: int, sync) -> float:
    times = []
    for _ in range(iters):
        st.step.zero_()                      # stay inside the schedule; tokens already committed stay put
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--rho", type=float, default=0.25)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        eng = Engine.from_pretrained(write_tiny(Path(tmp) / "m", a.family, a.preset, tokenizer=False))
    cfg = eng.cfg
    block = a.block_length if cfg.family == "llada" else a.gen_length
    shape = RequestShape(1, a.prompt_len, a.gen_length, block, a.gen_length)
    st = eng.state_for(shape, DecodeConfig.make(cfg.family))
    cache = eng.cache_for(shape)
    prompt = random_prompt(cfg, a.prompt_len)
    budget = DllmCache(rho=a.rho).budget(a.gen_length)
    steps = make_steps(eng.weights, cfg, st, cache, budget)
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    print(f"# {cfg.family} preset={a.preset} (layers {cfg.n_layers}, d {cfg.d_model}) P={a.prompt_len} "
          f"G={a.gen_length} block={block} rho={a.rho} (budget {budget} rows) device={eng.device.type} "
          f"threads={torch.get_num_threads()} median of {a.iters}")
    with torch.inference_mode():
        st.fill(cfg, [prompt], seed=0)
        for fn in steps.values():            # warm-up
            fn()
        res = {k: time_kind(fn, st, a.iters, sync) for k, fn in steps.items()}
    print(f"{'step kind':<18} {'ms':>9} {'vs full':>8}")
    for k, s in res.items():
        print(f"{k:<18} {s * 1e3:>9.2f} {res['full'] / s:>7.2f}x")


if __name__ == "__main__":
    main()
