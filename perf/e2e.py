"""End-to-end generation latency per policy, one run, one machine.

    python -m dllm.perf.e2e --preset small --family llada --prompt-len 256 --gen-length 64 --steps 64 --block-length 32
    python -m dllm.perf.e2e --preset llada-8b-shape --device cuda --dtype bfloat16 --backend compile+cudagraph \
        --prompt-len 512 --gen-length 256 --steps 256 --block-length 32 --policies none dual-cache

Writes a tiny random checkpoint of the preset (real on-disk format) into a temp folder, loads it with
the real loader, warms up once per policy, then times `--repeats` generations and reports the median
seconds, tokens/s, the ratio to the first policy (the baseline) and token agreement with it. The
real-dimension presets (llada-8b-shape, dream-7b-shape) are random weights made on the GPU: CUDA only.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from dllm.models.quant import Quantization, quantize_weights
from dllm.models.tiny import PRESETS, SHAPE_PRESETS, random_weights, write_tiny
from dllm.runtime import Engine
from dllm.runtime.device import DTYPES
from dllm.runtime.options import parse_spec


def preset_engine(family: str, preset: str, *, device="cpu", dtype=torch.float32, backend="eager",
                  quantize: str = "none") -> Engine:
    """An engine with a preset's weights. CPU presets are written as real-format checkpoints and loaded
    with the real loader; real-dimension presets are random weights made directly on the device (and
    quantized there, layer by layer, with quantize)."""
    device = torch.device(device)
    if preset in SHAPE_PRESETS:
        if device.type != "cuda":
            raise ValueError(f"preset {preset} has real dimensions: run it on a GPU (--device cuda)")
        cfg, weights = random_weights(family, SHAPE_PRESETS[preset], device, dtype)
        weights = quantize_weights(weights, cfg, Quantization(quantize), dtype)
        return Engine(cfg, weights, device=device, dtype=dtype, backend=backend)
    with tempfile.TemporaryDirectory() as tmp:
        return Engine.from_pretrained(write_tiny(Path(tmp) / preset, family, preset, tokenizer=False),
                                      device=device, dtype=dtype, backend=backend, quantize=quantize)




def preset_dtype(preset: str, device, dtype: str | None) -> torch.dtype:
    """The dtype to run a preset in (default: bfloat16 for the real-dimension presets, else float32);
    SystemExit with one line when a real-dimension preset is asked for off CUDA."""
    if preset in SHAPE_PRESETS and torch.device(device).type != "cuda":
        raise SystemExit(f"--preset {preset} has real dimensions (billions of parameters): run it with "
                         f"--device cuda on a GPU machine")
    return DTYPES[dtype or ("bfloat16" if preset in SHAPE_PRESETS else "float32")]


def random_prompt(cfg, n: int, seed: int = 0) -> list[int]:
    """n random ids that are not special (mask, eos/pad); latency does not depend on their values."""
    g = torch.Generator().manual_seed(seed)
    specials = {cfg.mask_id, cfg.eos_id, cfg.pad_id}
    return [t for t in torch.randint(8, cfg.vocab_size, (n * 2,), generator=g).tolist() if t not in specials][:n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(SHAPE_PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=None)
    ap.add_argument("--policies", nargs="+", default=["none"],
                    help="first is the baseline; POLICY[:key=value,...], the keys any of the policy's or the "
                         "request's options, e.g. none dllm-cache:kp=100,kr=7,rho=0.25 d2cache:k=32,attn_budget=32 "
                         "dual-cache:threshold=0.9")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="eager", help="eager | compile | cudagraph | compile+cudagraph")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bfloat16 for the real-dimension presets, float32 otherwise")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    dtype = preset_dtype(a.preset, a.device, a.dtype)
    eng = preset_engine(a.family, a.preset, device=a.device, dtype=dtype, backend=a.backend)
    cfg = eng.cfg
    prompt = random_prompt(cfg, a.prompt_len)
    kw = dict(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length or a.gen_length)

    dev = "cpu" if eng.device.type == "cpu" else torch.cuda.get_device_name()
    print(f"# {a.family} preset={a.preset} (layers {cfg.n_layers}, d {cfg.d_model}, vocab {cfg.vocab_size}) "
          f"P={a.prompt_len} G={a.gen_length} steps={a.steps} block={kw['block_length']} "
          f"device={dev} dtype={str(dtype).replace('torch.', '')} backend={eng.backend} "
          f"threads={torch.get_num_threads()} repeats={a.repeats} (median)")
    print(f"{'policy':<44} {'seconds':>9} {'tok/s':>9} {'speedup':>8} {'agree':>7} {'steps':>6}  step kinds")
    for r in policy_rows(eng, prompt, a.policies, a.repeats, **kw):
        kinds = " ".join(f"{k}={n}" for k, n in r["step_kinds"].items())
        print(f"{r['policy']:<44} {r['seconds']:>9.3f} {r['tok_s']:>9.1f} {r['speedup']:>7.2f}x {r['agree']:>7.1%} "
              f"{r['steps']:>6}  {kinds}")


def policy_rows(eng: Engine, prompt: list[int], specs: list[str], repeats: int, **kw) -> list[dict]:
    """One row per policy spec, the first being the baseline: median seconds, tokens/s, speedup and
    token agreement against the baseline, measured in this one run. Every policy is warmed up first,
    then the timed generations go round the policies `repeats` times (interleaved, so a slow spell of
    a shared machine hits every policy rather than one)."""
    parsed = [{**kw, **parse_spec(spec)} for spec in specs]       # a spec's own options win over the shape's
    for options in parsed:
        eng.generate(prompt, **options)                              # warm-up (allocation, first-touch, compile)
    runs = [[] for _ in parsed]
    for _ in range(repeats):
        for j, options in enumerate(parsed):
            runs[j].append(eng.generate(prompt, **options))
    rows, base_s, base_tokens = [], None, None
    for label, outs in zip(specs, runs):
        sec, out = statistics.median(r.seconds for r in outs), outs[-1]
        toks = out.tokens[0]
        if base_s is None:
            base_s, base_tokens = sec, toks
        rows.append(dict(policy=label, seconds=sec, tok_s=len(toks) / sec, speedup=base_s / sec,
                         agree=sum(x == y for x, y in zip(toks, base_tokens)) / len(toks), steps=out.steps,
                         step_kinds=out.step_kinds))
    return rows


if __name__ == "__main__":
    main()
